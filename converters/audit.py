"""The audit of one source file: detect by content, pass clean RGB JPEGs through (losslessly
re-laid-out into restart segments by default), convert odd images to RGB JPEG, and reject what
cannot be trusted, with a reason."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from converters.layout import JPEG_LAYOUTS, segment_interval, transcode_segmented
from datasvc.decode import DecodeError


def pil_pixel_limit() -> int:
    """The largest image PIL opens at all: past it, its decompression-bomb guard raises (past
    half of it, it warns). The audit leaves the guard on for the process; its own cap,
    ``AuditConfig.max_pixels``, must be within this limit and rejects with a reason."""
    return 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else 2**62


_FORMAT_KIND = {
    "PNG": "png",
    "GIF": "gif",
    "BMP": "bmp",
    "WEBP": "webp",
    "TIFF": "tiff",
    "PPM": "ppm",
    "MPO": "mpo",
}


@dataclass(frozen=True)
class AuditConfig:
    """How the audit treats images: an optional longest side, JPEG quality, pixel cap, and
    the layout JPEGs are stored in (``converters.layout.JPEG_LAYOUTS``)."""

    max_side: int | None = None
    quality: int = 95
    max_pixels: int = 178_956_970  # PIL's hard bomb limit; ImageNet's largest is ~ 10^8 / 6
    jpeg_layout: str = "segmented"

    def __post_init__(self):
        if self.max_side is not None and self.max_side < 16:
            raise ValueError(f"max_side must be at least 16, got {self.max_side}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")
        if not 1 <= self.max_pixels <= pil_pixel_limit():
            raise ValueError(
                f"max_pixels must be in 1..{pil_pixel_limit()} (PIL's decompression-bomb limit, "
                f"which stays on), got {self.max_pixels}"
            )
        if self.jpeg_layout not in JPEG_LAYOUTS:
            raise ValueError(
                f"jpeg_layout must be one of {', '.join(JPEG_LAYOUTS)}, got {self.jpeg_layout!r}"
            )


class Rejected(Exception):
    """The file cannot be packed; ``str(e)`` is the reason."""


@dataclass(frozen=True)
class Audited:
    """An accepted image: RGB JPEG bytes, stored height/width, and what the audit did."""

    image: bytes
    height: int
    width: int
    kind: str  # "jpeg" for pass-through, else the oddity converted (cmyk, grayscale, png, ...)


def _to_rgb_array(img: Image.Image) -> tuple[np.ndarray, str | None]:
    """Any PIL mode → HWC uint8 RGB, and the oddity name (None for plain RGB)."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img), None
    if mode == "CMYK":
        kind = "ycck" if img.info.get("adobe_transform") == 2 else "cmyk"
        return np.asarray(img.convert("RGB")), kind
    if mode in ("L", "1"):
        return np.asarray(img.convert("RGB")), "grayscale"
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        gray = np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2), "16bit"
    if mode in ("P", "PA"):
        return np.asarray(img.convert("RGB")), "palette"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        return np.asarray(img.convert("RGB")), "alpha"
    return np.asarray(img.convert("RGB")), f"mode-{mode}"


def _fit(arr: np.ndarray, max_side: int | None) -> np.ndarray:
    """Shrink to ``max_side``. JPEGs arrive DCT-downscaled to within 2x of the target, where
    bilinear samples every source pixel (and costs a sixth of INTER_AREA); larger factors
    (PNG and other converted images) use INTER_AREA."""
    h, w = arr.shape[:2]
    if max_side is None or max(h, w) <= max_side:
        return arr
    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    interp = cv2.INTER_LINEAR if s >= 0.5 else cv2.INTER_AREA
    return cv2.resize(arr, size, interpolation=interp)


def _encode(arr: np.ndarray, cfg: AuditConfig, bgr: bool = False) -> bytes:
    """HWC RGB → a 4:2:0 JPEG; in the segmented layout with restart markers (libjpeg via
    OpenCV, as fast as without them), where ``bgr`` says the array is BGR already."""
    if cfg.jpeg_layout == "original":
        return simplejpeg.encode_jpeg(
            np.ascontiguousarray(arr), quality=cfg.quality, colorspace="RGB", colorsubsampling="420"
        )
    params = [
        cv2.IMWRITE_JPEG_QUALITY,
        cfg.quality,
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
        cv2.IMWRITE_JPEG_RST_INTERVAL,
        segment_interval(arr.shape[1], 16),
    ]
    ok, buf = cv2.imencode(".jpg", arr if bgr else cv2.cvtColor(arr, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise Rejected(f"JPEG encoding failed for a {arr.shape[1]}x{arr.shape[0]} image")
    return buf.tobytes()


def dct_downscale(side: int, max_side: int) -> int:
    """The DCT scaling (1/k) to decode a JPEG at before resizing its longest ``side`` to
    ``max_side``: the largest k in 8, 4, 2, 1 that keeps ``side / k`` at least ``max_side``.
    Only these factors have libjpeg-turbo's SIMD IDCTs; its other M/8 scales run in plain C and
    cost more than a full decode (640 px at 7/8: 2.4 ms against 1.6 ms at 1/1, measured)."""
    k = 8
    while k > 1 and side / k < max_side:
        k //= 2
    return k


def _audit_rgb_jpeg(data: bytes, height: int, width: int, cfg: AuditConfig) -> Audited:
    """The common case, a clean colour JPEG: decode it fully (strict) to catch truncation."""
    try:
        if cfg.max_side is not None and max(width, height) > cfg.max_side:
            k = dct_downscale(max(width, height), cfg.max_side)
            bgr = cfg.jpeg_layout == "segmented"  # OpenCV encodes BGR: no conversion pass
            arr = simplejpeg.decode_jpeg(
                data,
                colorspace="BGR" if bgr else "RGB",
                min_height=-(-height // k),
                min_width=-(-width // k),
                strict=True,
            )
            arr = _fit(arr, cfg.max_side)
            return Audited(_encode(arr, cfg, bgr), arr.shape[0], arr.shape[1], "resized")
        if cfg.jpeg_layout == "segmented":
            # entropy-decodes every scan (as strictly as a full decode) and re-encodes the
            # same coefficients: lossless, at about the cost of the full decode it replaces
            return Audited(transcode_segmented(data), height, width, "jpeg")
        arr = simplejpeg.decode_jpeg(data, strict=True)
    except (ValueError, DecodeError) as e:
        raise Rejected(f"corrupt or truncated JPEG: {e}") from None
    if arr.shape[:2] != (height, width):
        raise Rejected(
            f"header says {width}x{height}, data decodes to {arr.shape[1]}x{arr.shape[0]}"
        )
    return Audited(data, height, width, "jpeg")


def _audit_gray_jpeg(data: bytes, height: int, width: int, cfg: AuditConfig) -> Audited:
    """A grayscale JPEG → an RGB one (the gray replicated, as PIL's ``convert("RGB")`` does):
    decoded by libjpeg-turbo straight to one channel (strict), at a power-of-two DCT scale
    when ``max_side`` shrinks it, as colour JPEGs are. Without ``max_side`` the pixels, and so
    the bytes, are those of decoding it with PIL (the same ISLOW IDCT), at half the cost."""
    k = 1
    if cfg.max_side is not None and max(width, height) > cfg.max_side:
        k = dct_downscale(max(width, height), cfg.max_side)
    try:
        gray = simplejpeg.decode_jpeg(
            data,
            colorspace="GRAY",
            min_height=-(-height // k),
            min_width=-(-width // k),
            strict=True,
        )
    except ValueError as e:
        raise Rejected(f"corrupt or truncated JPEG: {e}") from None
    if k == 1 and gray.shape[:2] != (height, width):
        raise Rejected(
            f"header says {width}x{height}, data decodes to {gray.shape[1]}x{gray.shape[0]}"
        )
    arr = _fit(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), cfg.max_side)  # BGR = RGB: all gray
    return Audited(_encode(arr, cfg, bgr=True), arr.shape[0], arr.shape[1], "grayscale")


def _check_size(width: int, height: int, cfg: AuditConfig) -> None:
    if width < 1 or height < 1:
        raise Rejected(f"degenerate size {width}x{height}")
    if width * height > cfg.max_pixels:
        raise Rejected(
            f"decompression bomb: {width}x{height} = {width * height} pixels "
            f"exceeds the cap of {cfg.max_pixels}"
        )


def audit_image(data: bytes, cfg: AuditConfig) -> Audited:
    """Encoded file bytes → an ``Audited`` RGB JPEG; raises ``Rejected`` with the reason."""
    if not data:
        raise Rejected("empty file")
    if data[:2] == b"\xff\xd8":
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            colorspace = None  # let PIL have a look and name the problem
        if colorspace in ("YCbCr", "RGB"):
            _check_size(width, height, cfg)
            return _audit_rgb_jpeg(data, height, width, cfg)
        if colorspace == "Gray":
            _check_size(width, height, cfg)
            return _audit_gray_jpeg(data, height, width, cfg)
    try:
        with warnings.catch_warnings():  # the audit's own cap decides (PIL's warns at half)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise Rejected("not an image (unrecognised content)") from None
    except Image.DecompressionBombError as e:
        raise Rejected(f"decompression bomb: {e}") from None
    except Exception as e:  # noqa: BLE001 - a damaged header
        raise Rejected(f"corrupt header: {e}") from None
    width, height = img.size
    _check_size(width, height, cfg)
    fmt = img.format or "unknown"
    if fmt == "JPEG" and img.mode == "RGB":
        return _audit_rgb_jpeg(data, height, width, cfg)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError...
        raise Rejected(f"corrupt or truncated {fmt}: {e}") from None
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    arr, oddity = _to_rgb_array(img)
    kind = _FORMAT_KIND.get(fmt, "jpeg" if fmt == "JPEG" else fmt.lower())
    if fmt == "JPEG":
        kind = oddity or "jpeg"
    arr = _fit(arr, cfg.max_side)
    return Audited(_encode(arr, cfg), arr.shape[0], arr.shape[1], kind)
