"""Decoding: JPEG bytes → HWC uint8 RGB, crop-aware where the decoder allows.

``CROP_DECODER`` names the backend in use: ``turbo_crop`` (the project's C extension over
libjpeg-turbo, decoding only the crop's rows and columns, with DCT downscaling) when it was
built, else ``simplejpeg`` (whole-image decode with DCT downscaling, then a slice).
"""

from __future__ import annotations

import math
import threading

import cv2
import numpy as np
import simplejpeg

from datasvc.augment import Crop, TransformConfig, eval_geometry
from datasvc.registry import Registry

try:
    from datasvc import _jpegcrop
except ImportError:  # the optional extension was not built
    _jpegcrop = None


class DecodeError(ValueError):
    """Encoded bytes that do not decode."""


def init_decode_worker() -> None:
    """Settings for a process (or thread pool) whose workers decode and resize in parallel:
    OpenCV single-threaded, since the workers already fill the cores and OpenCV's own pool
    would oversubscribe them. The setting is process-wide, so workers call this when they
    start; importing this module changes nothing."""
    cv2.setNumThreads(1)


def dct_scale(crop_h: int, crop_w: int, out_h: int, out_w: int) -> int:
    """Largest DCT downscale in {1, 2, 4, 8} that keeps the crop at least the output size."""
    for s in (8, 4, 2):
        if crop_h >= s * out_h and crop_w >= s * out_w:
            return s
    return 1


def _fallback_full(data: bytes) -> np.ndarray:
    """Any image OpenCV or PIL reads (CMYK JPEG, PNG...) → HWC RGB."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if arr is None:
        import io

        from PIL import Image

        try:
            return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        except Exception as e:  # noqa: BLE001
            raise DecodeError(f"undecodable image ({e})") from None
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


def _simplejpeg_scaled(data: bytes, height: int, width: int, s: int, fast=False) -> np.ndarray:
    try:
        return simplejpeg.decode_jpeg(
            data,
            min_height=math.ceil(height / s),
            min_width=math.ceil(width / s),
            fastdct=fast,
            fastupsample=fast,
        )
    except ValueError:
        full = _fallback_full(data)
        if s == 1:
            return full
        return cv2.resize(
            full, (math.ceil(width / s), math.ceil(height / s)), interpolation=cv2.INTER_AREA
        )


# --- region decoders: (data, top, left, h, w, scale, H, W) → HWC of the scaled box --------

DECODERS = Registry("decoder")


@DECODERS.register("simplejpeg")
def decode_region_simplejpeg(data, top, left, h, w, s, height, width, fast=False) -> np.ndarray:
    """JPEG bytes → the scaled crop box, via a whole-image (DCT-scaled) decode and a slice."""
    full = _simplejpeg_scaled(data, height, width, s, fast)
    fy, fx = full.shape[0] / height, full.shape[1] / width
    y0, x0 = int(top * fy), int(left * fx)
    y1 = max(y0 + 1, min(full.shape[0], math.ceil((top + h) * fy)))
    x1 = max(x0 + 1, min(full.shape[1], math.ceil((left + w) * fx)))
    return full[y0:y1, x0:x1]


_scratch = threading.local()


def _scratch_buffer(nbytes: int) -> bytearray:
    """This thread's reusable decode area. Decoding into fresh memory cost 4% more for a crop
    (and 34% for a full image) than into memory that stays mapped and cached."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or len(buf) < nbytes:
        buf = _scratch.buf = bytearray(max(nbytes, 4 << 20))
    return buf


def decode_region_turbo(
    data, top, left, h, w, s, height, width, fast=False, segments=True
) -> np.ndarray:
    """JPEG bytes → the scaled crop box, decoding only its rows and columns. The array is a
    view of this thread's scratch buffer: valid until the thread's next decode. ``segments``
    False decodes ``data`` as given (a JPEG already cut to the box's restart segments)."""
    need = (w // s + 2) * (h // s + 2) * 3
    try:
        buf, oh, ow = _jpegcrop.decode_crop(
            data, left, top, w, h, s, fast=fast, out=_scratch_buffer(need), segments=segments
        )
    except ValueError as e:
        if "CMYK" in str(e) or "YCCK" in str(e):
            return decode_region_simplejpeg(data, top, left, h, w, s, height, width, fast)
        raise DecodeError(str(e)) from None
    return np.frombuffer(buf, np.uint8, oh * ow * 3).reshape(oh, ow, 3)


# Registered only where the extension was built, rather than registered and then removed.
if _jpegcrop is not None:
    DECODERS.add("turbo_crop", decode_region_turbo)
CROP_DECODER = "turbo_crop" if _jpegcrop is not None else "simplejpeg"


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the JPEG header."""
    try:
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        return h, w
    except ValueError:
        full = _fallback_full(data)
        return full.shape[0], full.shape[1]


def decode_full(data: bytes, buffer=None) -> np.ndarray:
    """JPEG bytes → the whole HWC uint8 RGB image (the decode bound's unit of work);
    ``buffer``, if given, is a reusable bytearray to decode into."""
    try:
        return simplejpeg.decode_jpeg(data, buffer=buffer)
    except ValueError:
        return _fallback_full(data)


def _resize_into(src: np.ndarray, out: np.ndarray) -> None:
    """Resize into ``out``. DCT downscaling already took the crop to within 2x of the output,
    so bilinear suffices there (INTER_AREA costs ~4x more); larger factors use INTER_AREA."""
    oh, ow = out.shape[:2]
    big_shrink = src.shape[0] >= 2 * oh or src.shape[1] >= 2 * ow
    cv2.resize(
        src, (ow, oh), dst=out, interpolation=cv2.INTER_AREA if big_shrink else cv2.INTER_LINEAR
    )


def decode_train(
    data: bytes,
    crop: Crop,
    height: int,
    width: int,
    out: np.ndarray,
    decoder: str | None = None,
    fast: bool = False,
) -> None:
    """JPEG bytes → RandomResizedCrop + flip of ``crop`` written into ``out`` (S×S×3 uint8)."""
    s = dct_scale(crop.height, crop.width, out.shape[0], out.shape[1])
    region = DECODERS.get(decoder or CROP_DECODER)(
        data, crop.top, crop.left, crop.height, crop.width, s, height, width, fast
    )
    _resize_and_flip(region, crop.flip, out)


def _resize_and_flip(region: np.ndarray, flip: bool, out: np.ndarray) -> None:
    _resize_into(region, out)
    if flip:
        cv2.flip(out, 1, dst=out)


# --- crop-segment transport: the server cuts, the client decodes ----------------------------


def cut_train_crop(data: bytes, crop: Crop, out_size: int, fast: bool) -> tuple[bytes, Crop]:
    """JPEG bytes + its train crop → (the small JPEG of the restart segments that cover the
    crop, the crop moved into it): exactly what ``decode_train`` would decode. No decoding
    happens here, only a walk over markers. A JPEG without the segmented layout (or a crop
    that needs every segment) comes back whole, with its crop unchanged."""
    s = dct_scale(crop.height, crop.width, out_size, out_size)
    cut = None
    if _jpegcrop is not None:
        cut = _jpegcrop.cut_segments(
            data, crop.left, crop.top, crop.width, crop.height, s, fast=fast
        )
    if cut is None:
        return data, crop
    sub, left, top = cut
    return sub, crop._replace(top=top, left=left)


def decode_train_cut(
    data: bytes, crop: Crop, height: int, width: int, out: np.ndarray, fast: bool
) -> None:
    """The client's half of ``cut_train_crop``: the cut JPEG and its moved crop → the pixels
    ``decode_train`` gives on the whole file, bit for bit (both decode the same bytes with
    the same libjpeg calls). ``height``/``width`` are the cut JPEG's size."""
    if _jpegcrop is None:
        raise RuntimeError(
            "decoding crop segments needs the datasvc._jpegcrop extension (the server's "
            "decoder), or the pixels would differ from server decoding"
        )
    s = dct_scale(crop.height, crop.width, out.shape[0], out.shape[1])
    region = decode_region_turbo(
        data, crop.top, crop.left, crop.height, crop.width, s, height, width, fast, segments=False
    )
    _resize_and_flip(region, crop.flip, out)


def decode_eval(
    data: bytes, cfg: TransformConfig, height: int, width: int, out: np.ndarray
) -> None:
    """JPEG bytes → resize shorter side + center crop, written into ``out`` (S×S×3 uint8)."""
    rh, rw, top, left = eval_geometry(cfg, height, width)
    s = dct_scale(height, width, rh, rw)
    img = _simplejpeg_scaled(data, height, width, s) if s > 1 else decode_full(data)
    from PIL import Image

    # PIL's antialiased bilinear, as torchvision's reference evaluation resizes.
    resized = np.asarray(Image.fromarray(img).resize((rw, rh), Image.BILINEAR))
    out[...] = resized[top : top + cfg.image_size, left : left + cfg.image_size]
