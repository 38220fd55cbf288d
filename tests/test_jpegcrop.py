"""Tests for the crop-aware JPEG decoder extension datasvc._jpegcrop.

Build it first: ``python setup.py build_ext --inplace``. Without it this module fails to
import, loudly, as ``test_api.py::test_the_crop_decoder_was_built`` fails: CI needs it built.
"""

from __future__ import annotations

import io
import math
import os
import threading
import time
import zlib

import cv2
import numpy as np
import PIL.features
import pytest
import simplejpeg
from PIL import Image

from converters.layout import segment_interval
from datasvc import _jpegcrop as jc

# Pillow, simplejpeg and (usually) OpenCV decode with libjpeg-turbo's ISLOW IDCT and fancy
# upsampling, as the extension does by default: their pixels match exactly.
PIL_IS_TURBO = bool(PIL.features.check_feature("libjpeg_turbo"))

SCALES = (1, 2, 4, 8)
# random boxes per image and scale in the segmented-layout test (more: JPEGCROP_SEG_BOXES=400)
NSEG = int(os.environ.get("JPEGCROP_SEG_BOXES", 25))


# ---------------------------------------------------------------------------------------
# test images


def _synthetic(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack(
        [
            128 + 100 * np.sin(xx / 17.0 + seed),
            128 + 100 * np.cos(yy / 23.0 - seed),
            255 * (xx + yy) / (w + h),
        ],
        axis=-1,
    )
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _photo(name: str) -> np.ndarray:
    """A real photo from scikit-image's bundled data, or a synthetic stand-in."""
    try:
        import skimage.data

        return getattr(skimage.data, name)()
    except Exception:  # noqa: BLE001 - scikit-image missing or without that image
        shapes = {
            "astronaut": (512, 512),
            "coffee": (400, 600),
            "chelsea": (300, 451),
            "rocket": (427, 640),
            "retina": (1411, 1411),
            "camera": (512, 512),
        }
        img = _synthetic(*shapes[name], seed=len(name))
        return img.mean(axis=2).astype(np.uint8) if name == "camera" else img


def _pil_jpeg(img: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", **kw)
    return buf.getvalue()


def _cv2_jpeg(img_rgb: np.ndarray, *params: int) -> bytes:
    ok, enc = cv2.imencode(".jpg", np.ascontiguousarray(img_rgb[:, :, ::-1]), list(params))
    assert ok
    return enc.tobytes()


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    astronaut = _photo("astronaut")
    coffee = _photo("coffee")
    chelsea = _photo("chelsea")
    rocket = _photo("rocket")
    odd = _resize(_photo("retina"), 333, 517)  # W=333, H=517: not multiples of 8 or 16
    camera = _photo("camera")
    return {
        "astronaut_420_q90": _pil_jpeg(astronaut, quality=90, subsampling=2),
        "astronaut_444_q95": _pil_jpeg(astronaut, quality=95, subsampling=0),
        "coffee_422_q85": _pil_jpeg(coffee, quality=85, subsampling=1),
        "chelsea_420_progressive": _pil_jpeg(chelsea, quality=90, progressive=True),
        "odd_333x517_420": _pil_jpeg(odd, quality=90, subsampling=2),
        "odd_333x517_444_progressive": _pil_jpeg(odd, quality=90, subsampling=0, progressive=True),
        "odd_517x333_440": _cv2_jpeg(
            np.ascontiguousarray(odd.transpose(1, 0, 2)),
            cv2.IMWRITE_JPEG_QUALITY,
            90,
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
            0x121111,
        ),
        "rocket_411_restart": _cv2_jpeg(
            rocket,
            cv2.IMWRITE_JPEG_QUALITY,
            90,
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
            0x411111,
            cv2.IMWRITE_JPEG_RST_INTERVAL,
            5,
        ),
        "camera_gray": _pil_jpeg(camera, quality=90),
        "gray_301x197_progressive": _pil_jpeg(
            _resize(camera, 301, 197), quality=90, progressive=True
        ),
        "tiny_1x1": _pil_jpeg(astronaut[200:201, 200:201], quality=90),
        "small_17x9_420": _pil_jpeg(_resize(chelsea, 17, 9), quality=90),
    }


@pytest.fixture(scope="module")
def cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_photo("chelsea")).convert("CMYK").save(buf, "JPEG", quality=90)
    return buf.getvalue()


IMAGE_NAMES = [
    "astronaut_420_q90",
    "astronaut_444_q95",
    "coffee_422_q85",
    "chelsea_420_progressive",
    "odd_333x517_420",
    "odd_333x517_444_progressive",
    "odd_517x333_440",
    "rocket_411_restart",
    "camera_gray",
    "gray_301x197_progressive",
    "tiny_1x1",
    "small_17x9_420",
]


# ---------------------------------------------------------------------------------------
# helpers


def decode(data, x, y, w, h, s=1, **kw) -> np.ndarray:
    buf, out_h, out_w = jc.decode_crop(data, x, y, w, h, s, **kw)
    assert isinstance(buf, bytearray)
    assert len(buf) == out_h * out_w * 3
    return np.frombuffer(buf, np.uint8).reshape(out_h, out_w, 3)


def decode_full(data, s=1, **kw) -> np.ndarray:
    W, H, _, _ = jc.info(data)
    return decode(data, 0, 0, W, H, s, **kw)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def scaled_box(x, y, w, h, s, W, H):
    """(sx0, sy0, sx1, sy1) of a box as specified for decode_crop."""
    return (
        x // s,
        y // s,
        min(ceil_div(x + w, s), ceil_div(W, s)),
        min(ceil_div(y + h, s), ceil_div(H, s)),
    )


def random_boxes(W: int, H: int, n: int, seed: int) -> list[tuple[int, int, int, int]]:
    rng = np.random.default_rng(seed)
    boxes = [
        (0, 0, W, H),
        (0, 0, 1, 1),
        (0, 0, 1, H),  # one column at the left edge: one chroma sample wide
        (W - 1, H - 1, 1, 1),
        (0, H - 1, W, 1),
        (W - 1, 0, 1, H),
        (W // 2, H // 2, W - W // 2, H - H // 2),
    ]
    # boxes whose edges fall on 8/16-pixel (iMCU) boundaries, where fancy upsampling of a
    # cropped decode would differ from a full decode without the extension's margin
    for a in (8, 16, 32):
        if W > a + 1 and H > a + 1:
            boxes += [(a, a, W - a, H - a), (a, 0, min(a, W - a), H), (0, a, W, min(a, H - a))]
    for _ in range(n):
        w = int(rng.integers(1, W + 1))
        h = int(rng.integers(1, H + 1))
        boxes.append((int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1)), w, h))
    return boxes


def rgb_pil(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ---------------------------------------------------------------------------------------
# info()


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_info_matches_pil(images, name):
    data = images[name]
    im = Image.open(io.BytesIO(data))
    W, H, nc, cs = jc.info(data)
    assert (W, H) == im.size
    if im.mode == "L":
        assert (nc, cs) == (1, "GRAY")
    else:
        assert (nc, cs) == (3, "YCbCr")


def test_info_cmyk(cmyk_jpeg):
    W, H, nc, cs = jc.info(cmyk_jpeg)
    assert (W, H) == Image.open(io.BytesIO(cmyk_jpeg)).size
    assert nc == 4 and cs in ("CMYK", "YCCK")


def test_info_accepts_any_buffer(images):
    data = images["astronaut_420_q90"]
    ref = jc.info(data)
    for obj in (bytearray(data), memoryview(data), np.frombuffer(data, np.uint8)):
        assert jc.info(obj) == ref


# ---------------------------------------------------------------------------------------
# full decode vs library decoders


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_full_decode_matches_library_decoders(images, name):
    data = images[name]
    ours = decode_full(data).astype(np.int16)
    refs = {
        "pil": rgb_pil(data),
        "simplejpeg": simplejpeg.decode_jpeg(data, colorspace="RGB"),
        "opencv": cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1],
    }
    for lib, ref in refs.items():
        assert ref.shape == ours.shape, lib
        diff = np.abs(ours - ref)
        assert diff.mean() < 1.0, (lib, diff.mean())
    if PIL_IS_TURBO:
        np.testing.assert_array_equal(ours, refs["pil"])
    # all three library decoders are libjpeg-turbo builds: exact in practice
    np.testing.assert_array_equal(ours, refs["simplejpeg"])


# ---------------------------------------------------------------------------------------
# crops and DCT scaling


@pytest.mark.parametrize("s", SCALES)
@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_crop_is_exact_region_of_full_decode(images, name, s):
    data = images[name]
    W, H, _, _ = jc.info(data)
    full = decode_full(data, s)
    assert full.shape == (ceil_div(H, s), ceil_div(W, s), 3)
    for x, y, w, h in random_boxes(W, H, 25, seed=zlib.crc32(f"{name}/{s}".encode())):
        sx0, sy0, sx1, sy1 = scaled_box(x, y, w, h, s, W, H)
        crop = decode(data, x, y, w, h, s)
        assert crop.shape == (sy1 - sy0, sx1 - sx0, 3), (x, y, w, h)
        np.testing.assert_array_equal(crop, full[sy0:sy1, sx0:sx1], err_msg=str((x, y, w, h)))


@pytest.mark.parametrize("s", SCALES)
@pytest.mark.parametrize(
    "name",
    [
        "astronaut_420_q90",
        "coffee_422_q85",
        "odd_333x517_420",
        "chelsea_420_progressive",
        "camera_gray",
    ],
)
def test_fast_crop_is_exact_region_of_fast_full_decode(images, name, s):
    data = images[name]
    W, H, _, _ = jc.info(data)
    full = decode_full(data, s, fast=True)
    for x, y, w, h in random_boxes(W, H, 10, seed=7):
        sx0, sy0, sx1, sy1 = scaled_box(x, y, w, h, s, W, H)
        np.testing.assert_array_equal(
            decode(data, x, y, w, h, s, fast=True), full[sy0:sy1, sx0:sx1]
        )


@pytest.mark.parametrize("name", ["astronaut_420_q90", "odd_333x517_420", "camera_gray"])
def test_fast_is_close_to_islow(images, name):
    data = images[name]
    diff = np.abs(decode_full(data, fast=True).astype(np.int16) - decode_full(data))
    assert 0 < diff.mean() < 2.5


@pytest.mark.parametrize("s", (2, 4, 8))
@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_scaled_decode_matches_pil_draft_and_area_downscale(images, name, s):
    data = images[name]
    W, H, _, _ = jc.info(data)
    ours = decode_full(data, s)
    assert ours.shape == (ceil_div(H, s), ceil_div(W, s), 3)

    # Pillow's draft() uses the same libjpeg DCT scaling
    if W >= s and H >= s:
        im = Image.open(io.BytesIO(data))
        im.draft("RGB", (W // s, H // s))
        assert im.size == (ceil_div(W, s), ceil_div(H, s))
        ref = np.asarray(im.convert("RGB"))
        if PIL_IS_TURBO:
            np.testing.assert_array_equal(ours, ref)
        else:
            assert np.abs(ours.astype(np.int16) - ref).mean() < 1.0

        # and it is a proper downscale: close to box-filtering the full decode
        full = decode_full(data)
        w2, h2 = W // s, H // s
        area = cv2.resize(full[: h2 * s, : w2 * s], (w2, h2), interpolation=cv2.INTER_AREA)
        assert np.abs(area.astype(np.int16) - ours[:h2, :w2]).mean() < 3.0


def test_scaled_box_rounding(images):
    data = images["odd_333x517_420"]  # W=333, H=517
    # x=5,w=10 at s=4: floor(5/4)=1 .. ceil(15/4)=4 -> 3 columns
    _, out_h, out_w = jc.decode_crop(data, 5, 7, 10, 3, 4)
    assert (out_h, out_w) == (ceil_div(10, 4) - 7 // 4, 3)
    # box touching the right/bottom edge is clamped to the scaled size ceil(333/8)=42
    _, out_h, out_w = jc.decode_crop(data, 330, 510, 3, 7, 8)
    assert (out_h, out_w) == (ceil_div(517, 8) - 510 // 8, ceil_div(333, 8) - 330 // 8)


# ---------------------------------------------------------------------------------------
# colour spaces


@pytest.mark.parametrize("name", ["camera_gray", "gray_301x197_progressive"])
def test_grayscale_comes_out_as_rgb(images, name):
    data = images[name]
    out = decode_full(data)
    assert out.ndim == 3 and out.shape[2] == 3
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    np.testing.assert_array_equal(out[..., 0], np.asarray(Image.open(io.BytesIO(data))))


def test_cmyk_raises(cmyk_jpeg):
    W, H, _, _ = jc.info(cmyk_jpeg)
    for box in ((0, 0, W, H), (3, 4, 20, 30)):
        with pytest.raises(ValueError, match="CMYK") as ei:
            jc.decode_crop(cmyk_jpeg, *box)
        assert isinstance(ei.value, jc.UnsupportedColorspaceError)
    assert issubclass(jc.UnsupportedColorspaceError, ValueError)


# ---------------------------------------------------------------------------------------
# corrupt input and bad arguments


@pytest.mark.parametrize("name", IMAGE_NAMES[:-2])
def test_truncated_raises(images, name):
    data = images[name]
    W, H, _, _ = jc.info(data)
    cut = data[: int(len(data) * 0.6)]
    for s in (1, 4):
        with pytest.raises(ValueError, match="(?i)premature end"):
            jc.decode_crop(cut, 0, 0, W, H, s)
        # a crop that reaches the bottom rows hits the missing data as well
        with pytest.raises(ValueError, match="(?i)premature end"):
            jc.decode_crop(cut, W // 3, H - H // 4, W // 3, H // 4, s)


def test_truncated_below_crop_is_not_seen_baseline(images):
    """Documented limitation: decoding stops after the crop's last row, so damage in a
    baseline (sequential) JPEG below the crop is not noticed. Progressive files are read
    whole and always fail."""
    data = images["astronaut_420_q90"]
    cut = data[: int(len(data) * 0.6)]
    top = decode(cut, 0, 0, 512, 40)
    np.testing.assert_array_equal(top, decode_full(data)[:40])
    prog = images["chelsea_420_progressive"]
    with pytest.raises(ValueError):
        jc.decode_crop(prog[: int(len(prog) * 0.6)], 0, 0, 10, 10)


def test_corrupt_entropy_data_raises(images):
    data = bytearray(images["astronaut_420_q90"])
    # overwrite the middle of the scan with 0xFF bytes (bad Huffman codes / stray markers)
    mid = len(data) // 2
    data[mid : mid + 64] = b"\xff\xd0" * 32
    with pytest.raises(ValueError, match="(?i)corrupt"):
        jc.decode_crop(bytes(data), 0, 0, 512, 512)


def test_extraneous_bytes_are_reported(images):
    """libjpeg calls stray bytes between segments "Corrupt JPEG data" (a warning that other
    decoders ignore); the extension reports every corrupt-data warning it meets."""
    data = images["astronaut_420_q90"]
    dqt = data.index(b"\xff\xdb")
    bad = data[:dqt] + b"\x00\x11\x22\x33" + data[dqt:]
    assert rgb_pil(bad).shape == (512, 512, 3)  # Pillow decodes it silently
    with pytest.raises(ValueError, match="extraneous bytes"):
        jc.decode_crop(bad, 0, 0, 16, 16)


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\xff\xd8",
        b"\xff\xd8\xff",
        b"hello world" * 100,
        bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)),
        b"\xff\xd8" + bytes(1000),
        b"\x89PNG\r\n\x1a\n" + bytes(100),
    ],
    ids=["empty", "soi", "soi_ff", "text", "random", "soi_zeros", "png"],
)
def test_garbage_raises(garbage):
    with pytest.raises(ValueError):
        jc.info(garbage)
    with pytest.raises(ValueError):
        jc.decode_crop(garbage, 0, 0, 1, 1)


def test_header_only_raises(images):
    data = images["astronaut_420_q90"]
    sos = data.index(b"\xff\xda")
    assert jc.info(data[: sos + 20])[:2] == (512, 512)  # the header alone is enough
    with pytest.raises(ValueError):
        jc.decode_crop(data[: sos + 20], 0, 0, 512, 512)


@pytest.mark.parametrize(
    "box",
    [
        (-1, 0, 10, 10),
        (0, -1, 10, 10),
        (0, 0, 0, 10),
        (0, 0, 10, 0),
        (0, 0, 513, 10),
        (0, 0, 10, 513),
        (500, 0, 13, 10),
        (0, 500, 10, 13),
        (512, 0, 1, 1),
        (0, 0, -5, 10),
        (2**62, 0, 1, 1),
        (1, 1, 2**62, 1),
    ],
)
def test_bad_box_raises(images, box):
    with pytest.raises(ValueError, match="crop box"):
        jc.decode_crop(images["astronaut_420_q90"], *box)


@pytest.mark.parametrize("s", [0, 3, 16, -1])
def test_bad_scale_raises(images, s):
    with pytest.raises(ValueError, match="scale_denom"):
        jc.decode_crop(images["astronaut_420_q90"], 0, 0, 10, 10, s)


def test_argument_types(images):
    data = images["astronaut_420_q90"]
    with pytest.raises(TypeError):
        jc.decode_crop("not bytes", 0, 0, 1, 1)
    with pytest.raises(TypeError):
        jc.decode_crop(data, 0.5, 0, 1, 1)
    with pytest.raises(TypeError):
        jc.decode_crop(data, 0, 0, 1, 1, 1, True)  # fast is keyword-only
    a = decode(data, 1, 2, 30, 40, 2)
    buf, h, w = jc.decode_crop(data, x=1, y=2, w=30, h=40, scale_denom=2, fast=False)
    np.testing.assert_array_equal(np.frombuffer(buf, np.uint8).reshape(h, w, 3), a)


def test_any_bytes_like_input(images):
    data = images["odd_333x517_420"]
    ref = decode(data, 10, 20, 100, 200)
    padded = b"xx" + data + b"yy"
    for obj in (
        bytearray(data),
        memoryview(data),
        np.frombuffer(data, np.uint8),
        memoryview(padded)[2:-2],
    ):
        np.testing.assert_array_equal(decode(obj, 10, 20, 100, 200), ref)


def test_output_is_writable(images):
    out = np.frombuffer(jc.decode_crop(images["astronaut_420_q90"], 0, 0, 64, 64)[0], np.uint8)
    out[0] = 7  # a bytearray: numpy.frombuffer gives a writable array (torch.from_numpy-safe)
    assert out[0] == 7


def test_decode_into_caller_buffer(images):
    """``out=`` gets the same pixels as a fresh decode, in the caller's buffer; a buffer too
    small is refused before anything is written."""
    data = images["astronaut_420_q90"]
    scratch = bytearray(1 << 20)
    for x, y, w, h, s in [(10, 20, 200, 150, 1), (0, 0, 512, 512, 2), (101, 7, 33, 91, 1)]:
        ref, rh, rw = jc.decode_crop(data, x, y, w, h, s)
        got, gh, gw = jc.decode_crop(data, x, y, w, h, s, out=scratch)
        assert got is scratch and (gh, gw) == (rh, rw)
        assert bytes(scratch[: rh * rw * 3]) == bytes(ref)
    small = bytearray(10)
    with pytest.raises(ValueError, match="out holds 10 bytes"):
        jc.decode_crop(data, 0, 0, 64, 64, out=small)
    assert small == bytearray(10)
    with pytest.raises(TypeError):
        jc.decode_crop(data, 0, 0, 64, 64, out=b"read-only bytes")


# ---------------------------------------------------------------------------------------
# threads and resources


def test_concurrent_decodes_are_identical(images):
    rng = np.random.default_rng(3)
    tasks = []
    for name in IMAGE_NAMES:
        data = images[name]
        W, H, _, _ = jc.info(data)
        for x, y, w, h in random_boxes(W, H, 6, seed=int(rng.integers(1 << 30))):
            tasks.append((data, x, y, w, h, int(rng.choice(SCALES))))
    expected = [bytes(jc.decode_crop(*t)[0]) for t in tasks]

    results: list[list[bytes]] = [[] for _ in range(4)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def work(k: int) -> None:
        try:
            barrier.wait()
            for _ in range(3):
                order = list(range(len(tasks)))
                np.random.default_rng(k).shuffle(order)
                got = {}
                for i in order:
                    got[i] = bytes(jc.decode_crop(*tasks[i])[0])
                results[k].append(b"".join(got[i] for i in range(len(tasks))))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    want = b"".join(expected)
    for k in range(4):
        assert len(results[k]) == 3
        assert all(r == want for r in results[k])


def test_gil_is_released_during_decode():
    """While one thread is inside a long decode_crop call, another keeps running Python."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    big = cv2.resize(noise, (3072, 3072), interpolation=cv2.INTER_LINEAR)
    data = _pil_jpeg(big, quality=95, progressive=True)
    t0 = time.perf_counter()
    jc.decode_crop(data, 0, 0, 3072, 3072)
    call = time.perf_counter() - t0

    worst = math.inf
    for _ in range(3):  # retries absorb scheduling hiccups on a loaded machine
        done = threading.Event()

        def work(ev: threading.Event) -> None:
            jc.decode_crop(data, 0, 0, 3072, 3072)
            ev.set()

        th = threading.Thread(target=work, args=(done,))
        max_gap, last = 0.0, time.perf_counter()
        th.start()
        while not done.is_set():
            now = time.perf_counter()
            max_gap, last = max(max_gap, now - last), now
        th.join()
        worst = min(worst, max_gap)
        if worst < 0.5 * call:
            break
    # with the GIL held, this thread would stall for the whole call
    assert worst < 0.5 * call, (worst, call)


def test_no_memory_leak_on_success_and_error_paths(images, cmyk_jpeg):
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    data = images["chelsea_420_progressive"]  # progressive: large coefficient buffers
    W, H, _, _ = jc.info(data)
    cut = data[: len(data) // 2]

    def once():
        decode(data, 10, 10, W - 20, H - 20)
        decode(data, 0, 0, W, H, 2)
        for bad, box in (
            (cut, (0, 0, W, H)),
            (cmyk_jpeg, (0, 0, 8, 8)),
            (data, (0, 0, W + 1, H)),
            (b"\xff\xd8" + bytes(500), (0, 0, 1, 1)),
        ):
            with pytest.raises(ValueError):
                jc.decode_crop(bad, *box)
        jc.info(data)

    for _ in range(50):
        once()
    before = proc.memory_info().rss
    for _ in range(400):
        once()
    grown = proc.memory_info().rss - before
    # a leak of the decoder state or output on any path would be >= ~100 kB per round
    assert grown < 8 * 2**20, grown


# ---------------------------------------------------------------------------------------
# the segmented layout: transcode() and region decoding from restart segments


@pytest.fixture(scope="module")
def segmented(images) -> dict[str, bytes]:
    return {name: jc.transcode(data) for name, data in images.items()}


def _markers(data: bytes) -> set[int]:
    """The marker codes up to SOS."""
    found, pos = set(), 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        m = data[pos + 1]
        found.add(m)
        if m == 0xDA:
            break
        pos += 2 + (data[pos + 2] << 8 | data[pos + 3])
    return found


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_transcode_is_lossless_and_segmented(images, segmented, name):
    data, seg = images[name], segmented[name]
    np.testing.assert_array_equal(decode_full(seg), decode_full(data))
    np.testing.assert_array_equal(decode_full(seg, fast=True), decode_full(data, fast=True))
    assert jc.info(seg) == jc.info(data)
    layout = jc.layout(seg)
    assert layout is not None
    assert layout["mcus_per_row"] == layout["restart"] * layout["groups"]
    W, H, n, _ = jc.info(seg)
    mcu = 8 if n == 1 else layout["mcu_width"]
    assert layout["restart"] == segment_interval(W, mcu)
    assert layout["mcu_rows"] == ceil_div(H, layout["mcu_height"])
    assert 0xC0 in _markers(seg) and 0xC2 not in _markers(seg)  # progressive → sequential
    assert 0xDD in _markers(seg)  # DRI


def test_layout_of_plain_jpegs(images):
    assert jc.layout(images["astronaut_420_q90"]) is None  # no restart markers
    assert jc.layout(images["chelsea_420_progressive"]) is None
    # cv2's interval 5 divides the 20 MCUs of a 640-px 4:1:1 row: already segmented
    assert jc.layout(images["rocket_411_restart"]) == {
        "restart": 5,
        "groups": 4,
        "mcu_width": 32,
        "mcu_height": 8,
        "mcus_per_row": 20,
        "mcu_rows": 54,
    }
    assert jc.layout(jc.transcode(images["astronaut_420_q90"], restart=0)) is None
    assert jc.layout(jc.transcode(images["astronaut_420_q90"], restart=7)) is None  # 7 ∤ 32
    assert jc.layout(jc.transcode(images["astronaut_420_q90"], restart=32))["groups"] == 1
    assert jc.layout(b"not a jpeg") is None


@pytest.mark.parametrize("s", SCALES)
@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_segmented_crop_is_exact_region_of_full_decode(segmented, name, s):
    """Cutting the box's segments out gives the pixels of a full decode, for fancy upsampling
    (with its margin) and for the fast path, at every scale, and the same bytes as the
    segment-blind path."""
    data = segmented[name]
    W, H, _, _ = jc.info(data)
    for fast in (False, True):
        full = decode_full(data, s, fast=fast, segments=False)
        for x, y, w, h in random_boxes(W, H, NSEG, seed=zlib.crc32(f"seg/{name}/{s}".encode())):
            sx0, sy0, sx1, sy1 = scaled_box(x, y, w, h, s, W, H)
            crop = decode(data, x, y, w, h, s, fast=fast)
            np.testing.assert_array_equal(
                crop, full[sy0:sy1, sx0:sx1], err_msg=str((x, y, w, h, fast))
            )


@pytest.mark.parametrize("s", SCALES)
@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_cut_segments_is_what_decode_crop_decodes(segmented, name, s):
    """The cut JPEG is valid on its own, smaller than the file, and decoding the box inside it
    gives decode_crop's bytes on the whole file."""
    data = segmented[name]
    W, H, _, _ = jc.info(data)
    cuts = 0
    for fast in (False, True):
        for x, y, w, h in random_boxes(W, H, NSEG, seed=zlib.crc32(f"cut/{name}/{s}".encode())):
            cut = jc.cut_segments(data, x, y, w, h, s, fast=fast)
            want = decode(data, x, y, w, h, s, fast=fast)
            if cut is None:  # the box needs every segment: the whole file is the answer
                continue
            sub, sx, sy = cut
            cuts += 1
            sw, sh, _, _ = jc.info(sub)
            assert len(sub) < len(data) and 0 <= sx <= sw - w and 0 <= sy <= sh - h
            got = decode(sub, sx, sy, w, h, s, fast=fast, segments=False)
            np.testing.assert_array_equal(got, want, err_msg=str((x, y, w, h, fast)))
    layout = jc.layout(data)
    if layout is not None and layout["mcu_rows"] >= 4:
        assert cuts > 0, "random boxes of a many-segment file leave some segments out"


def test_cut_segments_of_plain_jpegs_and_bad_boxes(images, segmented):
    name = IMAGE_NAMES[0]
    W, H, _, _ = jc.info(images[name])
    assert jc.cut_segments(images[name], 0, 0, 8, 8) is None  # no restart segments
    assert jc.cut_segments(segmented[name], 0, 0, W, H) is None  # every segment
    assert jc.cut_segments(segmented[name], W - 4, 0, 8, 8) is None  # not inside
    with pytest.raises(ValueError, match="scale_denom"):
        jc.cut_segments(segmented[name], 0, 0, 8, 8, 3)


def test_segment_interval_matches_transcode():
    # the largest divisor of the MCUs per row that is at most an eighth of it, rounded up
    assert [jc.restart_interval(n) for n in (1, 2, 8, 9, 20, 29, 31, 32, 40, 80)] == [
        1, 1, 1, 1, 2, 1, 1, 4, 5, 10,
    ]  # fmt: skip
    with pytest.raises(ValueError):
        jc.restart_interval(0)
    rng = np.random.default_rng(0)
    for w in [1, 8, 16, 17, 100, 255, 256, 496, 500, 512, 640, 1000, 1024, 4000]:
        img = rng.integers(0, 256, (24, w, 3), np.uint8)
        layout = jc.layout(jc.transcode(_pil_jpeg(img, quality=80, subsampling=2)))
        assert layout["restart"] == segment_interval(w, 16), w
        assert layout["groups"] >= min(8, layout["mcus_per_row"]) or layout["restart"] == 1


def test_damaged_segments_fall_back_and_report(segmented):
    """A segmented file whose restart markers are not where its headers say is decoded the
    usual way, and libjpeg's complaint about the damage comes out as ValueError."""
    data = segmented["astronaut_420_q90"]
    W, H, _, _ = jc.info(data)
    layout = jc.layout(data)
    sos = data.index(b"\xff\xda")
    rst = [i for i in range(sos, len(data) - 1) if data[i] == 0xFF and 0xD0 <= data[i + 1] <= 0xD7]
    assert len(rst) == layout["mcus_per_row"] // layout["restart"] * layout["mcu_rows"] - 1
    k = len(rst) // 3
    dropped = data[: rst[k]] + data[rst[k] + 2 :]  # one marker gone: segments run together
    with pytest.raises(ValueError, match="corrupt"):
        jc.decode_crop(dropped, W // 2, H - 64, W // 2, 64)
    # the rows above the damage still decode, and the same with or without segments
    np.testing.assert_array_equal(decode(dropped, 0, 0, W // 2, 32), decode(data, 0, 0, W // 2, 32))
    with pytest.raises(ValueError):
        jc.decode_crop(data[: len(data) * 2 // 3], W - 40, H - 40, 40, 40)


def test_transcode_rejects_bad_input(images, cmyk_jpeg):
    data = images["astronaut_420_q90"]
    for bad in (data[: len(data) // 2], images["chelsea_420_progressive"][:3000], b"\xff\xd8"):
        with pytest.raises(ValueError):
            jc.transcode(bad)
    flipped = bytearray(data)
    sos = data.index(b"\xff\xda")
    flipped[sos + 400 : sos + 420] = b"\xff\xd3" * 10
    with pytest.raises(ValueError, match="corrupt"):
        jc.transcode(bytes(flipped))
    for restart in (-2, 65536):
        with pytest.raises(ValueError, match="restart"):
            jc.transcode(data, restart=restart)
    # CMYK keeps its colour space (the audit converts CMYK to RGB before this is reached)
    assert jc.info(jc.transcode(cmyk_jpeg))[3] in ("CMYK", "YCCK")


def test_transcode_and_segmented_decode_do_not_leak(images, segmented):
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    data, seg = images["chelsea_420_progressive"], segmented["odd_333x517_420"]
    W, H, _, _ = jc.info(seg)

    def once():
        jc.transcode(data)
        decode(seg, 40, 40, 100, 100)
        with pytest.raises(ValueError):
            jc.transcode(data[: len(data) // 2])
        with pytest.raises(ValueError):
            jc.decode_crop(seg[: len(seg) // 2], 0, H - 20, 20, 20)

    for _ in range(30):
        once()
    before = proc.memory_info().rss
    for _ in range(300):
        once()
    assert proc.memory_info().rss - before < 8 * 2**20


def test_damaged_segmented_files_never_crash(segmented):
    """Random byte damage anywhere in a segmented file (headers, markers, entropy data): every
    crop either decodes or raises ValueError."""
    rng = np.random.default_rng(5)
    for name in ("astronaut_420_q90", "odd_333x517_420", "camera_gray"):
        data = segmented[name]
        W, H, _, _ = jc.info(data)
        for _ in range(150):
            bad = bytearray(data)
            for _ in range(int(rng.integers(1, 4))):
                pos = int(rng.integers(0, len(bad)))
                bad[pos] = int(
                    rng.choice([0x00, 0xFF, 0xD0 + int(rng.integers(0, 8)), rng.integers(0, 256)])
                )
            if rng.random() < 0.2:
                bad = bad[: int(rng.integers(2, len(bad)))]
            w, h = int(rng.integers(1, W + 1)), int(rng.integers(1, H + 1))
            x, y = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
            try:
                jc.decode_crop(
                    bytes(bad), x, y, w, h, int(rng.choice(SCALES)), fast=bool(rng.random() < 0.5)
                )
            except ValueError:
                pass
            jc.layout(bytes(bad))
