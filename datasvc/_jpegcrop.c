/*
 * datasvc._jpegcrop -- crop-aware JPEG decoding over the libjpeg(-turbo) API.
 *
 * For RandomResizedCrop only the crop box has to be decoded:
 *   - columns: jpeg_crop_scanline() restricts IDCT/upsampling/colour conversion to the
 *     iMCU columns that cover the box (it may widen the range to the left to an iMCU
 *     boundary; we copy only the wanted columns out of each scanline),
 *   - rows above the box: jpeg_skip_scanlines() (entropy decoding only, no IDCT),
 *   - rows below the box: never read; the decompressor is destroyed, not finished,
 *   - optional DCT scaling (scale_denom 1, 2, 4 or 8) when the box is much larger than
 *     the network input,
 *   - JPEGs in the restart-segment layout (see transcode(), which packs are written in):
 *     only the restart segments that cover the box are entropy-decoded at all.
 *
 * Needs libjpeg-turbo >= 1.5 (jpeg_crop_scanline / jpeg_skip_scanlines).
 *
 * Python API:
 *   info(data) -> (width, height, num_components, colorspace_name)
 *   decode_crop(data, x, y, w, h, scale_denom=1, *, fast=False, out=None, segments=True)
 *       -> (buffer, out_h, out_w)
 *       RGB, interleaved HWC, uint8:
 *       numpy.frombuffer(buf, numpy.uint8).reshape(out_h, out_w, 3)
 *   cut_segments(data, x, y, w, h, scale_denom=1, *, fast=False) -> (bytes, x, y) or None
 *       the restart segments decode_crop() would decode, as a JPEG of their own
 *   transcode(data, *, restart=-1, optimize=False) -> bytes   (lossless, jpegtran-like)
 *   layout(data) -> dict or None
 *   restart_interval(mcus_per_row) -> int   (the interval transcode() picks)
 *   UnsupportedColorspaceError (subclass of ValueError): CMYK / YCCK input.
 *
 * All decoding errors, and libjpeg's corrupt-data warnings (premature end of file,
 * bad Huffman code, ...), raise ValueError. libjpeg never prints and never exit()s.
 * The GIL is released around the decompression proper.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

#ifndef LIBJPEG_TURBO_VERSION
#error "datasvc._jpegcrop needs libjpeg-turbo (jpeg_crop_scanline / jpeg_skip_scanlines)"
#endif

/* Extra columns decoded on each side of the box (see decode_crop); 0 shows the edge
 * effect that it avoids. */
#ifndef JC_CROP_MARGIN
#define JC_CROP_MARGIN 1
#endif

static PyObject *UnsupportedColorspaceError = NULL;

/* ------------------------------------------------------------------------------------ */
/* Error manager: error_exit and corrupt-data warnings longjmp back to the caller.       */

typedef struct {
    struct jpeg_error_mgr pub; /* must be first */
    jmp_buf jb;
    int from_warning; /* the failure was a corrupt-data warning promoted to an error */
    char msg[JMSG_LENGTH_MAX];
} jc_error_mgr;

static void jc_error_exit(j_common_ptr cinfo)
{
    jc_error_mgr *err = (jc_error_mgr *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->msg);
    longjmp(err->jb, 1);
}

/* Warnings that do not mean the pixel data is damaged. */
static int jc_warning_is_benign(int code)
{
    switch (code) {
    case JWRN_ADOBE_XFORM:   /* unknown Adobe transform code: libjpeg guesses, fine */
    case JWRN_JFIF_MAJOR:    /* unknown JFIF revision */
    case JWRN_BOGUS_ICC:     /* bad ICC marker: metadata only */
    case JWRN_TOO_MUCH_DATA: /* cannot happen here */
        return 1;
    default:
        return 0;
    }
}

static void jc_emit_message(j_common_ptr cinfo, int msg_level)
{
    jc_error_mgr *err = (jc_error_mgr *)cinfo->err;
    if (msg_level >= 0)
        return; /* trace messages: ignore */
    err->pub.num_warnings++;
    if (jc_warning_is_benign(err->pub.msg_code))
        return;
    /* Corrupt data (libjpeg would fill the rest with gray and carry on): report it.
     * Stopping here is as safe as from error_exit: the only thing done with the
     * object afterwards is jpeg_destroy_decompress(). */
    (*cinfo->err->format_message)(cinfo, err->msg);
    err->from_warning = 1;
    longjmp(err->jb, 1);
}

static void jc_output_message(j_common_ptr cinfo)
{
    (void)cinfo; /* never print */
}

static void jc_init_error(struct jpeg_decompress_struct *cinfo, jc_error_mgr *jerr)
{
    memset(cinfo, 0, sizeof(*cinfo));
    cinfo->err = jpeg_std_error(&jerr->pub);
    jerr->pub.error_exit = jc_error_exit;
    jerr->pub.emit_message = jc_emit_message;
    jerr->pub.output_message = jc_output_message;
    jerr->from_warning = 0;
    jerr->msg[0] = '\0';
}

static const char *jc_colorspace_name(J_COLOR_SPACE cs)
{
    switch (cs) {
    case JCS_GRAYSCALE:
        return "GRAY";
    case JCS_RGB:
        return "RGB";
    case JCS_YCbCr:
        return "YCbCr";
    case JCS_CMYK:
        return "CMYK";
    case JCS_YCCK:
        return "YCCK";
    default:
        return "UNKNOWN";
    }
}

static void jc_set_error(const jc_error_mgr *jerr)
{
    PyErr_Format(PyExc_ValueError, "%s JPEG: %s",
                 jerr->from_warning ? "corrupt" : "cannot decode", jerr->msg);
}

/* ------------------------------------------------------------------------------------ */
/* info(data)                                                                            */

static PyObject *jc_info(PyObject *self, PyObject *arg)
{
    Py_buffer view;
    struct jpeg_decompress_struct cinfo;
    jc_error_mgr jerr;
    PyObject *res;
    (void)self;

    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;

    jc_init_error(&cinfo, &jerr);
    if (setjmp(jerr.jb)) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&view);
        jc_set_error(&jerr);
        return NULL;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, (const unsigned char *)view.buf, (unsigned long)view.len);
    jpeg_read_header(&cinfo, TRUE);

    res = Py_BuildValue("(IIis)", (unsigned int)cinfo.image_width,
                        (unsigned int)cinfo.image_height, cinfo.num_components,
                        jc_colorspace_name(cinfo.jpeg_color_space));
    jpeg_destroy_decompress(&cinfo);
    PyBuffer_Release(&view);
    return res;
}

/* ------------------------------------------------------------------------------------ */
/* Restart segments: a region's sub-image without entropy-decoding the rest.             */
/*
 * A baseline JPEG whose restart interval divides its MCUs per row splits every MCU row
 * into G independent segments (each resets the DC predictors). The MCU rows r0..r1 and
 * segment columns c0..c1 that cover a box then form a JPEG of their own: the same headers
 * with the SOF's size changed, those segments with their RST markers renumbered, and EOI.
 * Decoding it costs the entropy decoding of the box's segments only, where libjpeg's
 * jpeg_skip_scanlines() must still entropy-decode every row above the box, and every
 * row of the box over the full width. transcode() writes packs in this layout, losslessly.
 */

typedef struct {
    size_t sof;                 /* offset of the SOF marker's 0xFF */
    size_t entropy;             /* offset of the first entropy-coded byte (after SOS) */
    unsigned width, height;     /* image size in pixels */
    unsigned mcu_w, mcu_h;      /* MCU size in pixels */
    unsigned mcus_per_row, mcu_rows;
    unsigned max_h;             /* largest horizontal sampling factor (1 for one component) */
    unsigned restart;           /* restart interval in MCUs; divides mcus_per_row */
    unsigned groups;            /* restart segments per MCU row */
} jc_layout;

/* Reads the markers up to SOS. 1 if the JPEG has the restart-segment layout, else 0
 * (progressive, several scans, no restart interval, one that does not divide the MCU row,
 * or anything malformed: the caller then decodes the usual way). */
static int jc_parse_layout(const unsigned char *d, size_t n, jc_layout *L)
{
    size_t pos = 2, len;
    unsigned nf = 0, max_h = 1, max_v = 1, ri = 0, i;
    int have_sof = 0;

    if (n < 4 || d[0] != 0xFF || d[1] != 0xD8)
        return 0;
    while (pos + 4 <= n) {
        unsigned char m;
        if (d[pos] != 0xFF)
            return 0;
        m = d[pos + 1];
        if (m == 0xFF) { /* fill byte */
            pos++;
            continue;
        }
        len = ((size_t)d[pos + 2] << 8) | d[pos + 3];
        if (len < 2 || pos + 2 + len > n)
            return 0;
        if (m == 0xC0 || m == 0xC1) { /* baseline / extended sequential, Huffman */
            const unsigned char *q = d + pos + 4;
            if (len < 8 || q[0] != 8)
                return 0;
            L->sof = pos;
            L->height = ((unsigned)q[1] << 8) | q[2];
            L->width = ((unsigned)q[3] << 8) | q[4];
            nf = q[5];
            if (nf < 1 || nf > 4 || len < 8 + 3 * (size_t)nf || L->height == 0 || L->width == 0)
                return 0;
            for (i = 0; i < nf; i++) {
                unsigned hv = q[6 + 3 * i + 1], h = hv >> 4, v = hv & 15;
                if (h < 1 || h > 4 || v < 1 || v > 4)
                    return 0;
                if (h > max_h)
                    max_h = h;
                if (v > max_v)
                    max_v = v;
            }
            have_sof = 1;
        } else if ((m >= 0xC2 && m <= 0xCF && m != 0xC4 && m != 0xC8 && m != 0xCC) ||
                   (m >= 0xD0 && m <= 0xD9) || m == 0x01) {
            return 0; /* another coding process, or a stand-alone marker before SOS */
        } else if (m == 0xDD) { /* DRI */
            if (len != 4)
                return 0;
            ri = ((unsigned)d[pos + 4] << 8) | d[pos + 5];
        } else if (m == 0xDA) { /* SOS */
            if (!have_sof || len < 6 + 2 * (size_t)nf || d[pos + 4] != nf)
                return 0; /* one scan must hold every component */
            L->entropy = pos + 2 + len;
            break;
        }
        pos += 2 + len;
    }
    if (!have_sof || L->entropy == 0 || ri == 0)
        return 0;
    if (nf == 1) { /* non-interleaved: one block per MCU */
        L->mcu_w = L->mcu_h = 8;
        max_h = 1;
    } else {
        L->mcu_w = 8 * max_h;
        L->mcu_h = 8 * max_v;
    }
    L->mcus_per_row = (L->width + L->mcu_w - 1) / L->mcu_w;
    L->mcu_rows = (L->height + L->mcu_h - 1) / L->mcu_h;
    if (L->mcus_per_row % ri != 0)
        return 0;
    L->max_h = max_h;
    L->restart = ri;
    L->groups = L->mcus_per_row / ri;
    return 1;
}

/* The next marker's 0xFF at or after p (not a stuffed 0xFF00 nor a fill byte), or NULL. */
static const unsigned char *jc_next_marker(const unsigned char *p, const unsigned char *end)
{
    while (p + 1 < end) {
        const unsigned char *ff = memchr(p, 0xFF, (size_t)(end - p - 1));
        if (ff == NULL)
            return NULL;
        if (ff[1] == 0x00)
            p = ff + 2;
        else if (ff[1] == 0xFF)
            p = ff + 1;
        else
            return ff;
    }
    return NULL;
}

/* This thread's buffer for sub-images (kept between calls: no page faults per image). */
static __thread unsigned char *jc_sub_buf = NULL;
static __thread size_t jc_sub_cap = 0;

/* Writes the sub-image of MCU rows [r0, r1) and segment columns [c0, c1) into this
 * thread's buffer. Returns its length, or 0 if the entropy data does not have the segments
 * the headers promise (the caller then decodes the original). */
static size_t jc_build_sub(const unsigned char *d, size_t n, const jc_layout *L, unsigned r0,
                           unsigned r1, unsigned c0, unsigned c1, const unsigned char **sub)
{
    const unsigned char *end = d + n, *seg = d + L->entropy, *m;
    const size_t last = (size_t)(r1 - 1) * L->groups + c1 - 1;
    const unsigned seg_px = L->restart * L->mcu_w;
    const unsigned sub_w = (c1 == L->groups ? L->width : c1 * seg_px) - c0 * seg_px;
    const unsigned sub_h = (r1 == L->mcu_rows ? L->height : r1 * L->mcu_h) - r0 * L->mcu_h;
    size_t cap = n + 2 * (size_t)(r1 - r0) * (c1 - c0) + 16, k, out, written = 0;
    unsigned char *o;

    if (cap > jc_sub_cap) {
        unsigned char *grown = realloc(jc_sub_buf, cap);
        if (grown == NULL)
            return 0;
        jc_sub_buf = grown;
        jc_sub_cap = cap;
    }
    o = jc_sub_buf;
    memcpy(o, d, L->entropy);
    o[L->sof + 5] = (unsigned char)(sub_h >> 8);
    o[L->sof + 6] = (unsigned char)(sub_h & 0xFF);
    o[L->sof + 7] = (unsigned char)(sub_w >> 8);
    o[L->sof + 8] = (unsigned char)(sub_w & 0xFF);
    out = L->entropy;
    for (k = 0;; k++) {
        size_t row = k / L->groups, col = k % L->groups;
        m = jc_next_marker(seg, end);
        if (m == NULL)
            return 0;
        if (row >= r0 && col >= c0 && col < c1) {
            if (written > 0) { /* the marker that ends the previous segment */
                o[out++] = 0xFF;
                o[out++] = (unsigned char)(0xD0 + (written - 1) % 8);
            }
            memcpy(o + out, seg, (size_t)(m - seg));
            out += (size_t)(m - seg);
            written++;
        }
        if (k == last)
            break;
        if (m[1] != 0xD0 + k % 8)
            return 0; /* not the restart marker expected here */
        seg = m + 2;
    }
    o[out++] = 0xFF;
    o[out++] = 0xD9;
    *sub = o;
    return out;
}

/* The restart interval transcode() writes: the largest divisor of the MCUs per row that
 * is at most an eighth of it (rounded up), so a row splits into about 8 or more segments;
 * 1 for prime widths. */
static unsigned jc_restart_for(unsigned mcus_per_row)
{
    unsigned r = (mcus_per_row + 7) / 8;
    while (r > 1 && mcus_per_row % r != 0)
        r--;
    return r < 1 ? 1 : r;
}

/* ------------------------------------------------------------------------------------ */
/* decode_crop(data, x, y, w, h, scale_denom=1, *, fast=False), in three steps:            */
/*   jc_parse_crop_args: the Python arguments;                                             */
/*   jc_cut_box: for the segmented layout, the restart segments that cover the box;       */
/*   jc_decode_rows: libjpeg decodes the box's rows and copies its columns out.            */

typedef struct {
    Py_buffer view;
    Py_buffer out_view; /* optional caller-provided output buffer (obj NULL if absent) */
    Py_ssize_t x, y, w, h;
    int scale, fast, segments;
} jc_crop_args;

static void jc_release_crop_args(jc_crop_args *a)
{
    if (a->out_view.obj != NULL)
        PyBuffer_Release(&a->out_view);
    PyBuffer_Release(&a->view);
}

static int jc_check_scale(int scale)
{
    if (scale == 1 || scale == 2 || scale == 4 || scale == 8)
        return 1;
    PyErr_Format(PyExc_ValueError, "scale_denom must be 1, 2, 4 or 8, not %d", scale);
    return 0;
}

/* 1 with the buffers held (release them with jc_release_crop_args), or 0 with an error. */
static int jc_parse_crop_args(PyObject *args, PyObject *kwargs, jc_crop_args *a)
{
    static char *kwlist[] = {"data", "x",   "y",   "w",        "h",
                             "scale_denom", "fast", "out", "segments", NULL};
    memset(a, 0, sizeof(*a));
    a->scale = 1;
    a->segments = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*nnnn|i$pw*p:decode_crop", kwlist,
                                     &a->view, &a->x, &a->y, &a->w, &a->h, &a->scale, &a->fast,
                                     &a->out_view, &a->segments))
        return 0;
    if (!jc_check_scale(a->scale)) {
        jc_release_crop_args(a);
        return 0;
    }
    return 1;
}

/* MCU rows [r0, r1) and segment columns [c0, c1) of a segmented JPEG. */
typedef struct {
    unsigned r0, r1, c0, c1;
} jc_segment_range;

/* The segments that cover the box plus `margin` pixels on each side for fancy upsampling's
 * chroma neighbours (plain upsampling needs none). 1 if that is fewer than all of them. */
static int jc_plan_segments(const jc_layout *L, Py_ssize_t x, Py_ssize_t y, Py_ssize_t w,
                            Py_ssize_t h, int scale, int fast, jc_segment_range *R)
{
    const Py_ssize_t margin = fast ? 0 : scale, seg_px = L->restart * L->mcu_w;
    const Py_ssize_t bx0 = x > margin ? x - margin : 0, by0 = y > margin ? y - margin : 0;
    const Py_ssize_t bx1 = x + w + margin, by1 = y + h + margin;
    R->c0 = (unsigned)(bx0 / seg_px);
    R->r0 = (unsigned)(by0 / L->mcu_h);
    R->c1 = (unsigned)((bx1 + seg_px - 1) / seg_px);
    R->r1 = (unsigned)((by1 + L->mcu_h - 1) / L->mcu_h);
    if (R->c1 > L->groups)
        R->c1 = L->groups;
    if (R->r1 > L->mcu_rows)
        R->r1 = L->mcu_rows;
    /* libjpeg upsamples a subsampled component whose (scaled) row is 2 samples or less
     * without the fancy filter: keep the sub-image wide enough for the same filter as
     * in the whole image (3 chroma samples at this scale) */
    while ((R->c1 == L->groups ? (Py_ssize_t)L->width : (Py_ssize_t)R->c1 * seg_px) -
                   (Py_ssize_t)R->c0 * seg_px <
               3 * (Py_ssize_t)scale * L->max_h &&
           (R->c0 > 0 || R->c1 < L->groups)) {
        if (R->c1 < L->groups)
            R->c1++;
        else
            R->c0--;
    }
    return R->r0 > 0 || R->c0 > 0 || R->r1 < L->mcu_rows || R->c1 < L->groups;
}

/* For a JPEG in the segmented layout whose box (*x, *y, w, h) lies inside it: the sub-image
 * of the segments that cover the box (in this thread's buffer), with *src, *len, *x and *y
 * moved to it; returns 1. Returns 0, changing nothing, when the whole JPEG is to be decoded
 * (no layout, the box needs every segment, a bad box, damaged entropy data). Called with the
 * GIL held; releases it while copying. */
static int jc_cut_box(const unsigned char **src, size_t *len, Py_ssize_t *x, Py_ssize_t *y,
                      Py_ssize_t w, Py_ssize_t h, int scale, int fast)
{
    jc_layout L;
    jc_segment_range R;
    const unsigned char *sub = NULL;
    size_t sub_len;

    memset(&L, 0, sizeof(L));
    if (*x < 0 || *y < 0 || w < 1 || h < 1 || !jc_parse_layout(*src, *len, &L) ||
        *x + w > (Py_ssize_t)L.width || *y + h > (Py_ssize_t)L.height ||
        !jc_plan_segments(&L, *x, *y, w, h, scale, fast, &R))
        return 0;
    Py_BEGIN_ALLOW_THREADS
    sub_len = jc_build_sub(*src, *len, &L, R.r0, R.r1, R.c0, R.c1, &sub);
    Py_END_ALLOW_THREADS
    if (sub_len == 0)
        return 0;
    *src = sub;
    *len = sub_len;
    *x -= (Py_ssize_t)R.c0 * L.restart * L.mcu_w;
    *y -= (Py_ssize_t)R.r0 * L.mcu_h;
    return 1;
}

/* The box in the output of a decompressor whose header has been read. */
typedef struct {
    JDIMENSION sx0, sy0, out_w, out_h; /* the scaled box */
    JDIMENSION sW;                     /* scaled image width */
} jc_scaled_box;

/* Sets RGB output, DCT scaling and IDCT/upsampling for `a` and finds the scaled box.
 * 1, or 0 with a Python error set (CMYK, a box outside the image, a format libjpeg does not
 * turn into 3 components). libjpeg errors longjmp to the caller's handler. */
static int jc_setup_output(j_decompress_ptr cinfo, const jc_crop_args *a, Py_ssize_t x,
                           Py_ssize_t y, jc_scaled_box *B)
{
    const Py_ssize_t W = (Py_ssize_t)cinfo->image_width, H = (Py_ssize_t)cinfo->image_height;
    const int scale = a->scale;
    JDIMENSION sx1, sy1;

    if (cinfo->jpeg_color_space == JCS_CMYK || cinfo->jpeg_color_space == JCS_YCCK) {
        PyErr_Format(UnsupportedColorspaceError,
                     "CMYK JPEG (colorspace %s) is not supported; use a library decoder",
                     jc_colorspace_name(cinfo->jpeg_color_space));
        return 0;
    }
    if (x < 0 || y < 0 || a->w < 1 || a->h < 1 || x > W - a->w || y > H - a->h) {
        PyErr_Format(PyExc_ValueError,
                     "crop box (x=%zd, y=%zd, w=%zd, h=%zd) is not inside the %zdx%zd image", x,
                     y, a->w, a->h, W, H);
        return 0;
    }
    cinfo->out_color_space = JCS_RGB; /* also converts grayscale to RGB */
    cinfo->scale_num = 1;
    cinfo->scale_denom = (unsigned int)scale;
    cinfo->dct_method = a->fast ? JDCT_IFAST : JDCT_ISLOW;
    cinfo->do_fancy_upsampling = a->fast ? FALSE : TRUE;
    jpeg_calc_output_dimensions(cinfo);
    if (cinfo->output_components != 3) {
        PyErr_SetString(PyExc_ValueError, "cannot decode JPEG: unsupported output format");
        return 0;
    }
    B->sW = cinfo->output_width;
    B->sx0 = (JDIMENSION)(x / scale);
    B->sy0 = (JDIMENSION)(y / scale);
    sx1 = (JDIMENSION)((x + a->w + scale - 1) / scale);
    sy1 = (JDIMENSION)((y + a->h + scale - 1) / scale);
    if (sx1 > B->sW)
        sx1 = B->sW;
    if (sy1 > cinfo->output_height)
        sy1 = cinfo->output_height;
    B->out_w = sx1 - B->sx0;
    B->out_h = sy1 - B->sy0;
    return 1;
}

/* Decodes the box's rows into `out` (out_h rows of out_w RGB pixels) and stops: rows below
 * it are never decoded. Runs without the GIL; libjpeg errors longjmp to the caller. */
static void jc_decode_rows(j_decompress_ptr cinfo, const jc_scaled_box *B, unsigned char *out)
{
    const size_t out_stride = (size_t)B->out_w * 3;
    const JDIMENSION sW = B->sW, out_h = B->out_h;
    JDIMENSION xoff, cw, row, col0, group, got;

    jpeg_start_decompress(cinfo);

    /* Column range. One extra pixel is asked for on each side (where the image has
     * one) so that fancy upsampling of the wanted columns sees the same chroma
     * neighbours as in a full decode: the edge columns of a cropped decode are
     * upsampled with edge replication. */
    xoff = B->sx0 > JC_CROP_MARGIN ? B->sx0 - JC_CROP_MARGIN : 0;
    cw = (B->sx0 + B->out_w + JC_CROP_MARGIN < sW ? B->sx0 + B->out_w + JC_CROP_MARGIN : sW) -
         xoff;
    /* and at least 4 samples of every subsampled component: libjpeg's fancy upsampling
     * of a one-sample row differs from the same columns of a wider one */
    if (cw < 4 * (JDIMENSION)cinfo->max_h_samp_factor)
        cw = 4 * (JDIMENSION)cinfo->max_h_samp_factor < sW - xoff
                 ? 4 * (JDIMENSION)cinfo->max_h_samp_factor
                 : sW - xoff;
    if (xoff != 0 || cw != cinfo->output_width)
        jpeg_crop_scanline(cinfo, &xoff, &cw); /* xoff may move left; cw grows */
    col0 = B->sx0 - xoff;

    if (B->sy0 > 0 && jpeg_skip_scanlines(cinfo, B->sy0) != B->sy0)
        ERREXIT(cinfo, JERR_BAD_STATE); /* not reachable with a memory source */

    /* rows per jpeg_read_scanlines call: a whole row group (2 with h2v2 merged
     * upsampling) avoids the library's spare-row copy */
    group = cinfo->rec_outbuf_height > 0 ? (JDIMENSION)cinfo->rec_outbuf_height : 1;
    if (col0 == 0 && cinfo->output_width == B->out_w) {
        /* no cropping (full-width box): decode straight into the output */
        JSAMPARRAY rows = (JSAMPARRAY)(*cinfo->mem->alloc_small)(
            (j_common_ptr)cinfo, JPOOL_IMAGE, (size_t)out_h * sizeof(JSAMPROW));
        for (row = 0; row < out_h; row++)
            rows[row] = (JSAMPROW)(out + (size_t)row * out_stride);
        for (row = 0; row < out_h; row += got) {
            got = jpeg_read_scanlines(cinfo, rows + row, out_h - row);
            if (got == 0)
                ERREXIT(cinfo, JERR_BAD_STATE); /* not reachable with a memory source */
        }
    } else {
        /* Decode into scratch rows and copy the wanted columns out. Freed with the
         * decompressor on every path. Sized for uncropped rows: libjpeg-turbo before
         * 2.0.7/2.1.3 could write a whole uncropped row with merged (fast) upsampling
         * after jpeg_crop_scanline. */
        JSAMPARRAY scratch =
            (*cinfo->mem->alloc_sarray)((j_common_ptr)cinfo, JPOOL_IMAGE, sW * 3, group);
        for (row = 0; row < out_h;) {
            JDIMENSION i, want = out_h - row < group ? out_h - row : group;
            got = jpeg_read_scanlines(cinfo, scratch, want);
            if (got == 0)
                ERREXIT(cinfo, JERR_BAD_STATE);
            for (i = 0; i < got; i++, row++)
                memcpy(out + (size_t)row * out_stride, scratch[i] + (size_t)col0 * 3,
                       out_stride);
        }
    }
}

/* The output object: the caller's buffer (checked for size) or a new bytearray. */
static PyObject *jc_output_for(const jc_crop_args *a, const jc_scaled_box *B)
{
    const Py_ssize_t need = (Py_ssize_t)B->out_h * (Py_ssize_t)B->out_w * 3;
    if (a->out_view.obj == NULL)
        return PyByteArray_FromStringAndSize(NULL, need);
    /* Decode into the caller's buffer (e.g. a reused, cache-hot scratch area). */
    if (a->out_view.len < need) {
        PyErr_Format(PyExc_ValueError, "out holds %zd bytes, the crop needs %zd",
                     a->out_view.len, need);
        return NULL;
    }
    Py_INCREF(a->out_view.obj);
    return a->out_view.obj;
}

static PyObject *jc_decode_crop(PyObject *self, PyObject *args, PyObject *kwargs)
{
    jc_crop_args a;
    const unsigned char *src;
    size_t src_len;
    Py_ssize_t x, y;
    jc_scaled_box B;
    struct jpeg_decompress_struct cinfo;
    jc_error_mgr jerr;
    /* modified after setjmp and read by the longjmp handler: volatile */
    PyObject *volatile result = NULL;
    PyThreadState *volatile tstate = NULL;
    (void)self;

    if (!jc_parse_crop_args(args, kwargs, &a))
        return NULL;
    src = (const unsigned char *)a.view.buf;
    src_len = (size_t)a.view.len;
    x = a.x;
    y = a.y;
    if (a.segments)
        jc_cut_box(&src, &src_len, &x, &y, a.w, a.h, a.scale, a.fast);

    jc_init_error(&cinfo, &jerr);
    if (setjmp(jerr.jb)) {
        if (tstate != NULL)
            PyEval_RestoreThread(tstate);
        jpeg_destroy_decompress(&cinfo); /* safe if already destroyed (mem == NULL) */
        Py_XDECREF(result);
        jc_release_crop_args(&a);
        jc_set_error(&jerr);
        return NULL;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, src, (unsigned long)src_len);
    jpeg_read_header(&cinfo, TRUE);
    if (!jc_setup_output(&cinfo, &a, x, y, &B) || (result = jc_output_for(&a, &B)) == NULL) {
        jpeg_destroy_decompress(&cinfo);
        jc_release_crop_args(&a);
        return NULL;
    }
    tstate = PyEval_SaveThread();
    jc_decode_rows(&cinfo, &B,
                   a.out_view.obj != NULL ? (unsigned char *)a.out_view.buf
                                          : (unsigned char *)PyByteArray_AS_STRING(result));
    jpeg_destroy_decompress(&cinfo); /* not finished: rows below the box are never read */
    PyEval_RestoreThread(tstate);
    tstate = NULL;
    jc_release_crop_args(&a);
    return Py_BuildValue("(NII)", (PyObject *)result, (unsigned int)B.out_h,
                         (unsigned int)B.out_w);
}

/* ------------------------------------------------------------------------------------ */
/* cut_segments(data, x, y, w, h, scale_denom=1, *, fast=False)                          */

static PyObject *jc_cut_segments(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"data", "x", "y", "w", "h", "scale_denom", "fast", NULL};
    Py_buffer view;
    Py_ssize_t x, y, w, h;
    int scale = 1, fast = 0;
    const unsigned char *src;
    size_t len;
    PyObject *res;
    (void)self;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*nnnn|i$p:cut_segments", kwlist, &view, &x,
                                     &y, &w, &h, &scale, &fast))
        return NULL;
    if (!jc_check_scale(scale)) {
        PyBuffer_Release(&view);
        return NULL;
    }
    src = (const unsigned char *)view.buf;
    len = (size_t)view.len;
    if (!jc_cut_box(&src, &len, &x, &y, w, h, scale, fast)) {
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    res = Py_BuildValue("(y#nn)", (const char *)src, (Py_ssize_t)len, x, y);
    PyBuffer_Release(&view);
    return res;
}

/* ------------------------------------------------------------------------------------ */
/* transcode(data, *, restart=-1, optimize=False)                                        */

static PyObject *jc_transcode(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"data", "restart", "optimize", NULL};
    Py_buffer view;
    int restart = -1, optimize = 0;
    struct jpeg_decompress_struct dinfo;
    struct jpeg_compress_struct cinfo;
    jc_error_mgr jerr;
    unsigned char *volatile out = NULL;
    unsigned long out_len = 0;
    volatile int compress_created = 0;
    PyThreadState *volatile tstate = NULL;
    PyObject *res;
    (void)self;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*|$ip:transcode", kwlist, &view, &restart,
                                     &optimize))
        return NULL;
    if (restart < -1 || restart > 65535) {
        PyBuffer_Release(&view);
        PyErr_Format(PyExc_ValueError, "restart must be -1 (auto), 0 (none) or 1..65535, not %d",
                     restart);
        return NULL;
    }

    jc_init_error(&dinfo, &jerr);
    memset(&cinfo, 0, sizeof(cinfo));
    cinfo.err = &jerr.pub; /* one error manager for both: any failure lands here */
    if (setjmp(jerr.jb)) {
        if (tstate != NULL)
            PyEval_RestoreThread(tstate);
        if (compress_created)
            jpeg_destroy_compress(&cinfo);
        jpeg_destroy_decompress(&dinfo);
        free(out);
        PyBuffer_Release(&view);
        jc_set_error(&jerr);
        return NULL;
    }
    tstate = PyEval_SaveThread();
    jpeg_create_decompress(&dinfo);
    jpeg_mem_src(&dinfo, (const unsigned char *)view.buf, (unsigned long)view.len);
    jpeg_read_header(&dinfo, TRUE);
    {
        /* every scan is entropy-decoded here: truncated or corrupt data raises */
        jvirt_barray_ptr *coefs = jpeg_read_coefficients(&dinfo);
        unsigned char *buf = NULL;
        jpeg_create_compress(&cinfo);
        compress_created = 1;
        jpeg_copy_critical_parameters(&dinfo, &cinfo); /* sequential, one scan */
        cinfo.optimize_coding = optimize ? TRUE : FALSE;
        if (restart == -1) {
            int i, max_h = 1;
            for (i = 0; i < dinfo.num_components; i++)
                if (dinfo.comp_info[i].h_samp_factor > max_h)
                    max_h = dinfo.comp_info[i].h_samp_factor;
            if (dinfo.num_components == 1)
                max_h = 1;
            cinfo.restart_interval =
                jc_restart_for((dinfo.image_width + 8 * (unsigned)max_h - 1) / (8 * (unsigned)max_h));
        } else {
            cinfo.restart_interval = (unsigned int)restart;
        }
        jpeg_mem_dest(&cinfo, &buf, &out_len);
        jpeg_write_coefficients(&cinfo, coefs);
        jpeg_finish_compress(&cinfo);
        out = buf;
        jpeg_destroy_compress(&cinfo);
        compress_created = 0;
        jpeg_finish_decompress(&dinfo);
        jpeg_destroy_decompress(&dinfo);
    }
    PyEval_RestoreThread(tstate);
    tstate = NULL;
    res = PyBytes_FromStringAndSize((const char *)out, (Py_ssize_t)out_len);
    free(out);
    PyBuffer_Release(&view);
    return res;
}

/* ------------------------------------------------------------------------------------ */
/* restart_interval(mcus_per_row)                                                        */

static PyObject *jc_restart_interval(PyObject *self, PyObject *arg)
{
    unsigned long n = PyLong_AsUnsignedLong(arg);
    (void)self;
    if (n == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (n < 1 || n > 65535) {
        PyErr_Format(PyExc_ValueError, "mcus_per_row must be in 1..65535, not %lu", n);
        return NULL;
    }
    return PyLong_FromUnsignedLong(jc_restart_for((unsigned)n));
}

/* ------------------------------------------------------------------------------------ */
/* layout(data)                                                                          */

static PyObject *jc_layout_info(PyObject *self, PyObject *arg)
{
    Py_buffer view;
    jc_layout L;
    int ok;
    (void)self;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    memset(&L, 0, sizeof(L));
    ok = jc_parse_layout((const unsigned char *)view.buf, (size_t)view.len, &L);
    PyBuffer_Release(&view);
    if (!ok)
        Py_RETURN_NONE;
    return Py_BuildValue("{s:I,s:I,s:I,s:I,s:I,s:I}", "restart", L.restart, "groups", L.groups,
                         "mcu_width", L.mcu_w, "mcu_height", L.mcu_h, "mcus_per_row",
                         L.mcus_per_row, "mcu_rows", L.mcu_rows);
}

static PyMethodDef jc_methods[] = {
    {"info", (PyCFunction)jc_info, METH_O,
     "info(data) -> (width, height, num_components, colorspace_name)\n\n"
     "Reads only the JPEG header. colorspace_name is one of GRAY, RGB, YCbCr, CMYK, YCCK, "
     "UNKNOWN."},
    {"decode_crop", (PyCFunction)(void (*)(void))jc_decode_crop, METH_VARARGS | METH_KEYWORDS,
     "decode_crop(data, x, y, w, h, scale_denom=1, *, fast=False, out=None, segments=True)\n"
     "    -> (buffer, out_h, out_w)\n\n"
     "out: a writable buffer of at least out_h*out_w*3 bytes to decode into (returned);\n"
     "by default a new bytearray.\n"
     "Decodes only the box (x, y, w, h) (full-resolution pixels) of a JPEG, optionally\n"
     "downscaled by DCT scaling (scale_denom 1, 2, 4 or 8), to RGB uint8 HWC in a\n"
     "bytearray. With s = scale_denom the result is the scaled box floor(x/s) ..\n"
     "min(ceil((x+w)/s), ceil(W/s)) (and likewise for rows). fast=True selects the fast\n"
     "integer IDCT and plain upsampling. Raises ValueError for bad boxes and for corrupt or\n"
     "truncated data, UnsupportedColorspaceError (a ValueError) for CMYK/YCCK.\n"
     "segments=True (JPEGs in the restart-segment layout, see transcode()) entropy-decodes\n"
     "only the restart segments around the box; the pixels are the same either way."},
    {"cut_segments", (PyCFunction)(void (*)(void))jc_cut_segments, METH_VARARGS | METH_KEYWORDS,
     "cut_segments(data, x, y, w, h, scale_denom=1, *, fast=False) -> (bytes, x, y) or None\n\n"
     "For a JPEG in the restart-segment layout: the small valid JPEG of the restart segments\n"
     "that cover the box (x, y, w, h), exactly the one decode_crop() decodes for the same\n"
     "arguments, and the box's corner inside it. decode_crop(sub, x, y, w, h, scale_denom,\n"
     "fast=fast, segments=False) then gives the pixels decode_crop(data, ...) gives. None\n"
     "when decode_crop() would decode the whole JPEG (no layout, a box that needs every\n"
     "segment or is not inside the image, damaged entropy data)."},
    {"transcode", (PyCFunction)(void (*)(void))jc_transcode, METH_VARARGS | METH_KEYWORDS,
     "transcode(data, *, restart=-1, optimize=False) -> bytes\n\n"
     "Lossless re-encoding of a JPEG's DCT coefficients (as jpegtran does) as one sequential\n"
     "scan with a restart marker every `restart` MCUs: -1 picks a divisor of the MCUs per\n"
     "row (about 8 segments a row), the layout decode_crop() cuts regions from; 0 writes\n"
     "none. Progressive input becomes sequential; APPn/COM markers are dropped; pixels\n"
     "decode identically. optimize=True writes optimal Huffman tables (a second\n"
     "pass: twice the time for ~3% smaller files that decode no faster). Every scan is\n"
     "entropy-decoded: corrupt or truncated data raises ValueError."},
    {"restart_interval", (PyCFunction)jc_restart_interval, METH_O,
     "restart_interval(mcus_per_row) -> int\n\n"
     "The restart interval transcode(restart=-1) writes: the largest divisor of the MCUs\n"
     "per row that is at most an eighth of it, rounded up (1 for a prime count)."},
    {"layout", (PyCFunction)jc_layout_info, METH_O,
     "layout(data) -> dict or None\n\n"
     "The restart-segment layout decode_crop() uses (restart interval, segments per MCU\n"
     "row, MCU size, MCUs per row, MCU rows), or None when the JPEG does not have one."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef jc_module = {
    PyModuleDef_HEAD_INIT, "datasvc._jpegcrop",
    "Crop-aware JPEG decoding (libjpeg-turbo jpeg_crop_scanline / jpeg_skip_scanlines).", -1,
    jc_methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__jpegcrop(void)
{
    PyObject *m = PyModule_Create(&jc_module);
    if (m == NULL)
        return NULL;
    UnsupportedColorspaceError = PyErr_NewExceptionWithDoc(
        "datasvc._jpegcrop.UnsupportedColorspaceError",
        "The JPEG is CMYK/YCCK; decode it with a library decoder.", PyExc_ValueError, NULL);
    if (UnsupportedColorspaceError == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(UnsupportedColorspaceError);
    if (PyModule_AddObject(m, "UnsupportedColorspaceError", UnsupportedColorspaceError) < 0) {
        Py_DECREF(UnsupportedColorspaceError);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddStringConstant(m, "LIBJPEG_TURBO_VERSION",
                                   Py_STRINGIFY(LIBJPEG_TURBO_VERSION)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
