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
 *     the network input.
 *
 * Needs libjpeg-turbo >= 1.5 (jpeg_crop_scanline / jpeg_skip_scanlines).
 *
 * Python API:
 *   info(data) -> (width, height, num_components, colorspace_name)
 *   decode_crop(data, x, y, w, h, scale_denom=1, *, fast=False) -> (bytearray, out_h, out_w)
 *       RGB, interleaved HWC, uint8:
 *       numpy.frombuffer(buf, numpy.uint8).reshape(out_h, out_w, 3)
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
/* decode_crop(data, x, y, w, h, scale_denom=1, *, fast=False)                           */

static PyObject *jc_decode_crop(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"data", "x", "y", "w", "h", "scale_denom", "fast", "out", NULL};
    Py_buffer view;
    Py_buffer out_view = {0}; /* optional caller-provided output buffer (obj NULL if absent) */
    Py_ssize_t x, y, w, h;
    int scale = 1, fast = 0;
    struct jpeg_decompress_struct cinfo;
    jc_error_mgr jerr;
    /* modified after setjmp and read by the longjmp handler: volatile */
    PyObject *volatile result = NULL;
    PyThreadState *volatile tstate = NULL;
    Py_ssize_t W, H;
    JDIMENSION sW, sH, sx0, sy0, sx1, sy1, out_w, out_h;
    (void)self;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*nnnn|i$pw*:decode_crop", kwlist, &view,
                                     &x, &y, &w, &h, &scale, &fast, &out_view))
        return NULL;

    if (scale != 1 && scale != 2 && scale != 4 && scale != 8) {
        if (out_view.obj != NULL)
            PyBuffer_Release(&out_view);
        PyBuffer_Release(&view);
        PyErr_Format(PyExc_ValueError, "scale_denom must be 1, 2, 4 or 8, not %d", scale);
        return NULL;
    }

    jc_init_error(&cinfo, &jerr);
    if (setjmp(jerr.jb)) {
        if (tstate != NULL)
            PyEval_RestoreThread(tstate);
        jpeg_destroy_decompress(&cinfo); /* safe if already destroyed (mem == NULL) */
        Py_XDECREF(result);
        if (out_view.obj != NULL)
            PyBuffer_Release(&out_view);
        PyBuffer_Release(&view);
        jc_set_error(&jerr);
        return NULL;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, (const unsigned char *)view.buf, (unsigned long)view.len);
    jpeg_read_header(&cinfo, TRUE);

    if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
        PyErr_Format(UnsupportedColorspaceError,
                     "CMYK JPEG (colorspace %s) is not supported; use a library decoder",
                     jc_colorspace_name(cinfo.jpeg_color_space));
        goto fail;
    }

    W = (Py_ssize_t)cinfo.image_width;
    H = (Py_ssize_t)cinfo.image_height;
    if (x < 0 || y < 0 || w < 1 || h < 1 || x > W - w || y > H - h) {
        PyErr_Format(PyExc_ValueError,
                     "crop box (x=%zd, y=%zd, w=%zd, h=%zd) is not inside the %zdx%zd image", x,
                     y, w, h, W, H);
        goto fail;
    }

    cinfo.out_color_space = JCS_RGB; /* also converts grayscale to RGB */
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)scale;
    cinfo.dct_method = fast ? JDCT_IFAST : JDCT_ISLOW;
    cinfo.do_fancy_upsampling = fast ? FALSE : TRUE;
    jpeg_calc_output_dimensions(&cinfo);
    if (cinfo.output_components != 3) {
        PyErr_SetString(PyExc_ValueError, "cannot decode JPEG: unsupported output format");
        goto fail;
    }
    sW = cinfo.output_width;
    sH = cinfo.output_height;

    /* the crop box in the scaled image */
    sx0 = (JDIMENSION)(x / scale);
    sy0 = (JDIMENSION)(y / scale);
    sx1 = (JDIMENSION)((x + w + scale - 1) / scale);
    sy1 = (JDIMENSION)((y + h + scale - 1) / scale);
    if (sx1 > sW)
        sx1 = sW;
    if (sy1 > sH)
        sy1 = sH;
    out_w = sx1 - sx0;
    out_h = sy1 - sy0;

    if (out_view.obj != NULL) {
        /* Decode into the caller's buffer (e.g. a reused, cache-hot scratch area). */
        if (out_view.len < (Py_ssize_t)out_h * (Py_ssize_t)out_w * 3) {
            PyErr_Format(PyExc_ValueError, "out holds %zd bytes, the crop needs %zd",
                         out_view.len, (Py_ssize_t)out_h * (Py_ssize_t)out_w * 3);
            goto fail;
        }
        result = out_view.obj;
        Py_INCREF(result);
    } else {
        result = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)out_h * (Py_ssize_t)out_w * 3);
        if (result == NULL)
            goto fail;
    }

    tstate = PyEval_SaveThread();
    {
        unsigned char *out = out_view.obj != NULL ? (unsigned char *)out_view.buf
                                                  : (unsigned char *)PyByteArray_AS_STRING(result);
        const size_t out_stride = (size_t)out_w * 3;
        JDIMENSION xoff, cw, skipped, row, col0, group, got;
        JSAMPARRAY scratch;

        jpeg_start_decompress(&cinfo);

        /* Column range. One extra pixel is asked for on each side (where the image has
         * one) so that fancy upsampling of the wanted columns sees the same chroma
         * neighbours as in a full decode: the edge columns of a cropped decode are
         * upsampled with edge replication. */
        xoff = sx0 > JC_CROP_MARGIN ? sx0 - JC_CROP_MARGIN : 0;
        cw = (sx1 + JC_CROP_MARGIN < sW ? sx1 + JC_CROP_MARGIN : sW) - xoff;
        if (xoff != 0 || cw != cinfo.output_width)
            jpeg_crop_scanline(&cinfo, &xoff, &cw); /* xoff may move left; cw grows */
        col0 = sx0 - xoff;

        if (sy0 > 0) {
            skipped = jpeg_skip_scanlines(&cinfo, sy0);
            if (skipped != sy0)
                ERREXIT(&cinfo, JERR_BAD_STATE); /* not reachable with a memory source */
        }

        /* rows per jpeg_read_scanlines call: a whole row group (2 with h2v2 merged
         * upsampling) avoids the library's spare-row copy */
        group = cinfo.rec_outbuf_height > 0 ? (JDIMENSION)cinfo.rec_outbuf_height : 1;
        if (col0 == 0 && cinfo.output_width == out_w) {
            /* no cropping (full-width box): decode straight into the output */
            JSAMPARRAY rows = (JSAMPARRAY)(*cinfo.mem->alloc_small)(
                (j_common_ptr)&cinfo, JPOOL_IMAGE, (size_t)out_h * sizeof(JSAMPROW));
            for (row = 0; row < out_h; row++)
                rows[row] = (JSAMPROW)(out + (size_t)row * out_stride);
            for (row = 0; row < out_h;) {
                got = jpeg_read_scanlines(&cinfo, rows + row, out_h - row);
                if (got == 0)
                    ERREXIT(&cinfo, JERR_BAD_STATE); /* not reachable with a memory source */
                row += got;
            }
        } else {
            /* Decode into scratch rows and copy the wanted columns out. Freed with the
             * decompressor on every path. Sized for uncropped rows: libjpeg-turbo before
             * 2.0.7/2.1.3 could write a whole uncropped row with merged (fast) upsampling
             * after jpeg_crop_scanline. */
            scratch = (*cinfo.mem->alloc_sarray)((j_common_ptr)&cinfo, JPOOL_IMAGE, sW * 3,
                                                 group);
            for (row = 0; row < out_h;) {
                JDIMENSION i, want = out_h - row < group ? out_h - row : group;
                got = jpeg_read_scanlines(&cinfo, scratch, want);
                if (got == 0)
                    ERREXIT(&cinfo, JERR_BAD_STATE);
                for (i = 0; i < got; i++, row++)
                    memcpy(out + (size_t)row * out_stride, scratch[i] + (size_t)col0 * 3,
                           out_stride);
            }
        }
        /* stop here: rows below the box are never decoded */
        jpeg_destroy_decompress(&cinfo);
    }
    PyEval_RestoreThread(tstate);
    tstate = NULL;

    if (out_view.obj != NULL)
        PyBuffer_Release(&out_view);
    PyBuffer_Release(&view);
    return Py_BuildValue("(NII)", (PyObject *)result, (unsigned int)out_h, (unsigned int)out_w);

fail: /* Python exception already set; GIL held */
    jpeg_destroy_decompress(&cinfo);
    Py_XDECREF(result);
    if (out_view.obj != NULL)
        PyBuffer_Release(&out_view);
    PyBuffer_Release(&view);
    return NULL;
}

/* ------------------------------------------------------------------------------------ */

static PyMethodDef jc_methods[] = {
    {"info", (PyCFunction)jc_info, METH_O,
     "info(data) -> (width, height, num_components, colorspace_name)\n\n"
     "Reads only the JPEG header. colorspace_name is one of GRAY, RGB, YCbCr, CMYK, YCCK, "
     "UNKNOWN."},
    {"decode_crop", (PyCFunction)(void (*)(void))jc_decode_crop, METH_VARARGS | METH_KEYWORDS,
     "decode_crop(data, x, y, w, h, scale_denom=1, *, fast=False, out=None)\n"
     "    -> (buffer, out_h, out_w)\n\n"
     "out: a writable buffer of at least out_h*out_w*3 bytes to decode into (returned);\n"
     "by default a new bytearray.\n"
     "Decodes only the box (x, y, w, h) (full-resolution pixels) of a JPEG, optionally\n"
     "downscaled by DCT scaling (scale_denom 1, 2, 4 or 8), to RGB uint8 HWC in a\n"
     "bytearray. With s = scale_denom the result is the scaled box floor(x/s) ..\n"
     "min(ceil((x+w)/s), ceil(W/s)) (and likewise for rows). fast=True selects the fast\n"
     "integer IDCT and plain upsampling. Raises ValueError for bad boxes and for corrupt or\n"
     "truncated data, UnsupportedColorspaceError (a ValueError) for CMYK/YCCK."},
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
