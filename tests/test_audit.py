"""The audit's ``--max-side`` path and its grayscale JPEGs: the longest side is cut to the
limit, the result is an RGB JPEG, the same bytes every time, and damage is still caught."""

from __future__ import annotations

import io

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from converters.audit import AuditConfig, Rejected, audit_image, dct_downscale


def _jpeg(h: int, w: int, mode: str, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3))
    arr = np.clip(ramp + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("layout", ["segmented", "original"])
@pytest.mark.parametrize(
    "h,w,mode,kind",
    [
        (480, 640, "RGB", "resized"),  # just over: decoded whole, resized
        (853, 1280, "RGB", "resized"),  # decoded at 1/2, then resized
        (480, 640, "L", "grayscale"),
        (853, 1280, "L", "grayscale"),
        (300, 400, "L", "grayscale"),  # under the limit: kept at its size
    ],
)
def test_max_side_cuts_the_longest_side(h, w, mode, kind, layout):
    data = _jpeg(h, w, mode)
    cfg = AuditConfig(max_side=512, jpeg_layout=layout)
    a = audit_image(data, cfg)
    assert a.kind == kind
    assert max(a.height, a.width) == min(512, max(h, w))
    assert abs(a.width / a.height - w / h) < 0.01  # aspect kept
    rgb = simplejpeg.decode_jpeg(a.image)
    assert rgb.shape == (a.height, a.width, 3)
    assert audit_image(data, cfg).image == a.image  # deterministic
    if mode == "L":  # gray in, gray RGB out
        assert np.abs(rgb.astype(int) - rgb[..., :1].astype(int)).max() <= 2


def test_gray_jpeg_keeps_pils_pixels_without_max_side():
    data = _jpeg(90, 120, "L")
    a = audit_image(data, AuditConfig())
    want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    got = simplejpeg.decode_jpeg(a.image)
    assert (a.kind, got.shape) == ("grayscale", want.shape)
    # re-encoded at q95: close to what PIL decodes, channel for channel
    assert np.abs(got.astype(int) - want.astype(int)).mean() < 2


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("max_side", [None, 512])
def test_truncated_jpeg_is_rejected(mode, max_side):
    data = _jpeg(480, 640, mode)
    with pytest.raises(Rejected, match="corrupt or truncated JPEG"):
        audit_image(data[: len(data) * 6 // 10], AuditConfig(max_side=max_side))


def test_dct_downscale_keeps_at_least_the_target():
    assert dct_downscale(640, 512) == 1
    assert dct_downscale(1024, 512) == 2
    assert dct_downscale(1280, 512) == 2
    assert dct_downscale(4096, 512) == 8
