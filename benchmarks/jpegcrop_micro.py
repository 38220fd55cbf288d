"""Micro-benchmark: crop-aware JPEG decoding (datasvc._jpegcrop) vs library decoders.

    python -m benchmarks.jpegcrop_micro [--n 100] [--repeats 5] [--seed 0]

Makes ~100 ImageNet-like JPEGs (quality 90, 4:2:0; mostly ~500x375, some 1000+ px) from
scikit-image's bundled photos (random crops, resizes and a little sensor-like noise), draws
one RandomResizedCrop box per image (scale 0.08-1, ratio 3/4-4/3, torchvision's sampling),
and measures single-threaded images/s for:

  - full decodes with simplejpeg, cv2.imdecode, Pillow and datasvc._jpegcrop,
  - datasvc._jpegcrop crop decodes of the box at scale 1 and with automatic DCT scaling
    (largest s in {1, 2, 4, 8} with crop_w/s >= 224 and crop_h/s >= 224),
  - each without and with the RandomResizedCrop resize to 224x224 (cv2.INTER_LINEAR; full
    decodes are sliced to the box first),
  - the same on the images in the segmented layout packs are stored in (``_jpegcrop.transcode``,
    lossless): a crop entropy-decodes only the restart segments that cover its box.

Each configuration: one warm-up pass over all images (not timed), then --repeats timed
passes (rounds interleave the configurations); the table shows the median pass. Images/s
are given from the thread's CPU time, which other processes sharing the machine disturb
less than wall time, and from wall time.
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import time
from collections.abc import Callable

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from datasvc import _jpegcrop as jc

OUT = 224
PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "cat",
)
TYPICAL_SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (333, 500), (400, 300))


def load_photos() -> list[np.ndarray]:
    try:
        import skimage.data

        return [np.ascontiguousarray(getattr(skimage.data, n)()) for n in PHOTOS]
    except Exception:  # noqa: BLE001 - no scikit-image: smooth gradients plus noise
        rng = np.random.default_rng(1)
        out = []
        for k in range(len(PHOTOS)):
            yy, xx = np.mgrid[0:600, 0:800].astype(np.float32)
            img = np.stack(
                [128 + 90 * np.sin(xx / (9 + k)), 128 + 90 * np.cos(yy / (13 + k)), xx / 4], -1
            )
            out.append(np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8))
        return out


def make_images(n: int, seed: int, large_frac: float, noise: float) -> list[bytes]:
    rng = np.random.default_rng(seed)
    photos = load_photos()
    images = []
    for _ in range(n):
        src = photos[int(rng.integers(len(photos)))]
        if rng.random() < large_frac:
            long_side = int(rng.integers(1000, 1601))
            aspect = float(rng.choice([4 / 3, 3 / 2, 1.0]))
            tw, th = long_side, int(round(long_side / aspect))
            if rng.random() < 0.5:
                tw, th = th, tw
        else:
            tw, th = TYPICAL_SIZES[int(rng.integers(len(TYPICAL_SIZES)))]
        # a random region of the photo with the target's aspect ratio, then resized
        sh, sw = src.shape[:2]
        frac = float(rng.uniform(0.6, 1.0))
        cw = min(sw, int(sw * frac), int(sh * frac * tw / th))
        ch = max(1, min(sh, int(round(cw * th / tw))))
        cw = max(1, cw)
        x0 = int(rng.integers(0, sw - cw + 1))
        y0 = int(rng.integers(0, sh - ch + 1))
        region = src[y0 : y0 + ch, x0 : x0 + cw]
        if region.ndim == 2:
            region = np.stack([region] * 3, -1)
        interp = cv2.INTER_AREA if tw <= cw else cv2.INTER_CUBIC
        img = cv2.resize(region, (tw, th), interpolation=interp).astype(np.float32)
        img += rng.normal(0, noise, img.shape)  # sensor-like noise: more entropy
        if rng.random() < 0.5:
            img = img[:, ::-1]
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        images.append(buf.getvalue())
    return images


def rrc_box(W: int, H: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params (scale 0.08-1, ratio 3/4-4/3): x, y, w, h."""
    area = W * H
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target_area = area * rng.uniform(0.08, 1.0)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= W and 0 < h <= H:
            return int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1)), w, h
    in_ratio = W / H
    if in_ratio < 3 / 4:
        w, h = W, int(round(W / (3 / 4)))
    elif in_ratio > 4 / 3:
        h, w = H, int(round(H * (4 / 3)))
    else:
        w, h = W, H
    return (W - w) // 2, (H - h) // 2, w, h


def auto_scale(w: int, h: int) -> int:
    for s in (8, 4, 2):
        if w / s >= OUT and h / s >= OUT:
            return s
    return 1


# ---------------------------------------------------------------------------------------
# the decoders; each takes (data, box) and returns an HWC uint8 RGB array


def _ours(data, x, y, w, h, s=1, fast=False) -> np.ndarray:
    buf, oh, ow = jc.decode_crop(data, x, y, w, h, s, fast=fast)
    return np.frombuffer(buf, np.uint8).reshape(oh, ow, 3)


_CV2_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)


def full_simplejpeg(data, box):
    return simplejpeg.decode_jpeg(data, colorspace="RGB")


def full_cv2(data, box):
    arr = np.frombuffer(data, np.uint8)
    if _CV2_RGB is not None:
        return cv2.imdecode(arr, _CV2_RGB)
    return cv2.cvtColor(cv2.imdecode(arr, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def full_pil(data, box):
    im = Image.open(io.BytesIO(data))
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)


def full_ours(data, box):
    W, H, _, _ = jc.info(data)
    return _ours(data, 0, 0, W, H)


def crop_ours_s1(data, box):
    jc.info(data)  # a real pipeline reads the size to draw the box
    return _ours(data, *box)


def crop_ours_auto(data, box):
    jc.info(data)
    return _ours(data, *box, auto_scale(box[2], box[3]))


def crop_ours_auto_fast(data, box):
    jc.info(data)
    return _ours(data, *box, auto_scale(box[2], box[3]), fast=True)


def pil_draft_crop(data, box):
    """Pillow's own DCT scaling (draft) of the whole image, then the box cut out."""
    x, y, w, h = box
    s = auto_scale(w, h)
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (im.size[0] // s, im.size[1] // s))
    a = np.asarray(im.convert("RGB") if im.mode != "RGB" else im)
    return a[y // s : -(-(y + h) // s), x // s : -(-(x + w) // s)]


# (name, decoder, returns only the box already, reads the segmented copies)
CONFIGS: list[tuple[str, Callable, bool, bool | str]] = [
    ("simplejpeg full", full_simplejpeg, False, False),
    ("cv2.imdecode full", full_cv2, False, False),
    ("PIL full", full_pil, False, False),
    ("jpegcrop full", full_ours, False, False),
    ("jpegcrop crop s=1", crop_ours_s1, True, False),
    ("jpegcrop crop auto-s", crop_ours_auto, True, False),
    ("jpegcrop crop auto-s fast", crop_ours_auto_fast, True, False),
    ("PIL draft(auto-s) + slice", pil_draft_crop, True, False),
    ("sequential, no restarts: full", full_simplejpeg, False, "sequential"),
    ("segmented: simplejpeg full", full_simplejpeg, False, True),
    ("segmented: crop s=1", crop_ours_s1, True, True),
    ("segmented: crop auto-s", crop_ours_auto, True, True),
    ("segmented: crop auto-s fast", crop_ours_auto_fast, True, True),
]


def make_pass(decoder: Callable, is_crop: bool, resize: bool, images, boxes):
    def run() -> None:
        for data, box in zip(images, boxes):
            a = decoder(data, box)
            if resize:
                if not is_crop:
                    x, y, w, h = box
                    a = a[y : y + h, x : x + w]
                cv2.resize(a, (OUT, OUT), interpolation=cv2.INTER_LINEAR)

    return run


def time_passes(passes: list[Callable[[], None]], repeats: int) -> list[tuple[float, float]]:
    """Median (wall, cpu) seconds per pass. Rounds interleave the configurations so that
    load from other processes on the machine hits all of them alike."""
    for fn in passes:
        fn()  # warm-up, not timed
    walls: list[list[float]] = [[] for _ in passes]
    cpus: list[list[float]] = [[] for _ in passes]
    for _ in range(repeats):
        for k, fn in enumerate(passes):
            c0, t0 = time.thread_time(), time.perf_counter()
            fn()
            walls[k].append(time.perf_counter() - t0)
            cpus[k].append(time.thread_time() - c0)
    return [(statistics.median(w), statistics.median(c)) for w, c in zip(walls, cpus)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="number of images")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--large-frac", type=float, default=0.2, help="share of 1000-1600 px images")
    ap.add_argument(
        "--noise",
        type=float,
        default=3.0,
        help="std of the Gaussian noise added before encoding (raises bits/px: 3 gives "
        "~1.7, 12 gives ~3; real ImageNet files average ~4-5)",
    )
    return ap.parse_args(argv)


def describe_inputs(images: list[bytes], sizes, boxes, repeats: int) -> None:
    """What the images and crop boxes are, and the libraries measured."""
    px = np.array([W * H for W, H in sizes], dtype=np.float64)
    nbytes = np.array([len(d) for d in images], dtype=np.float64)
    scales = [auto_scale(b[2], b[3]) for b in boxes]
    crop_frac = np.array([b[2] * b[3] for b in boxes]) / px
    print(
        f"{len(images)} JPEGs q90 4:2:0: mean {px.mean() / 1e3:.0f} kpx "
        f"({sum(W * H >= 1000 * 700 for W, H in sizes)} of 1000+ px), "
        f"mean {nbytes.mean() / 1e3:.0f} kB, {8 * nbytes.sum() / px.sum():.2f} bits/px"
    )
    print(
        f"RandomResizedCrop boxes: mean area {crop_frac.mean():.2f} of the image; auto-s "
        + ", ".join(f"s={s}: {scales.count(s)}" for s in (1, 2, 4, 8))
    )
    print(
        f"single thread, median of {repeats} interleaved passes after a warm-up pass; "
        f"libjpeg-turbo headers {jc.LIBJPEG_TURBO_VERSION}, simplejpeg {simplejpeg.__version__}, "
        f"OpenCV {cv2.__version__}, Pillow {Image.__version__}\n"
    )


def layout_variants(images: list[bytes]) -> dict:
    """The files as found, as `datasvc convert` stores them by default (segmented, lossless:
    same pixels), and the same coefficients without restart markers (what the markers cost:
    libjpeg-turbo takes its slower Huffman path in any JPEG with a restart interval)."""
    segmented = [jc.transcode(d) for d in images]
    assert np.array_equal(full_simplejpeg(segmented[0], None), full_simplejpeg(images[0], None))
    return {
        False: images,
        True: segmented,
        "sequential": [jc.transcode(d, restart=0) for d in images],
    }


def print_table(rows: list) -> None:
    base_d, base_r = rows[0][1][0][1], rows[0][1][1][1]  # simplejpeg full, cpu
    hdr = (
        f"{'configuration':<32}{'decode img/s':>13}{'(wall)':>8}{'x':>7}"
        f"{'+resize224 img/s':>18}{'(wall)':>8}{'x':>7}"
    )
    print(hdr)
    print("-" * len(hdr))
    for name, ((d_wall, d_cpu), (r_wall, r_cpu)) in rows:
        print(
            f"{name:<32}{d_cpu:>13.0f}{d_wall:>8.0f}{d_cpu / base_d:>6.2f}x"
            f"{r_cpu:>18.0f}{r_wall:>8.0f}{r_cpu / base_r:>6.2f}x"
        )
    print(
        "\nimg/s from the thread's CPU time (wall-clock in parentheses); x: relative to "
        "simplejpeg full decode (+ slice + resize in the right half)."
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cv2.setNumThreads(1)  # this process is the benchmark: one decoding thread
    images = make_images(args.n, args.seed, args.large_frac, args.noise)
    rng = np.random.default_rng(args.seed + 1)
    sizes = [jc.info(d)[:2] for d in images]
    boxes = [rrc_box(W, H, rng) for W, H in sizes]
    # sanity: the fast path is the same image as the library decoders
    assert np.array_equal(full_ours(images[0], None), full_simplejpeg(images[0], None))
    describe_inputs(images, sizes, boxes, args.repeats)
    variants = layout_variants(images)
    passes = [
        make_pass(decoder, is_crop, resize, variants[seg], boxes)
        for _, decoder, is_crop, seg in CONFIGS
        for resize in (False, True)
    ]
    times = time_passes(passes, args.repeats)
    n = len(images)
    rows = []
    for k, (name, _, _, _) in enumerate(CONFIGS):
        (dw, dc), (rw, rc) = times[2 * k], times[2 * k + 1]
        rows.append((name, [(n / dw, n / dc), (n / rw, n / rc)]))
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
