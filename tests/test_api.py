"""The public API's promises: importing datasvc changes nothing process-wide."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_import_has_no_process_wide_side_effects(clean_pack):
    """OpenCV's thread count, PIL's decompression-bomb guard and glibc's malloc settings are
    the same after importing every module and building a loader (not yet iterated) as before;
    the settings are made in the workers that need them."""
    code = f"""
import cv2, PIL.Image
threads, guard = cv2.getNumThreads(), PIL.Image.MAX_IMAGE_PIXELS
import datasvc.decode, datasvc.batch, datasvc.cli, converters.audit, converters.convert
import datasvc.memory
from datasvc.loaders import create_loader
with create_loader("custom", {str(clean_pack)!r}, batch_size=4, num_workers=1):
    pass
print(cv2.getNumThreads() == threads, PIL.Image.MAX_IMAGE_PIXELS == guard, datasvc.memory._done)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    assert out == ["True", "True", "False"]


def test_audit_cap_lives_within_pils_bomb_guard():
    from PIL import Image

    from converters.audit import AuditConfig, pil_pixel_limit

    assert pil_pixel_limit() == 2 * Image.MAX_IMAGE_PIXELS
    AuditConfig(max_pixels=pil_pixel_limit())
    with pytest.raises(ValueError, match="PIL's decompression-bomb limit"):
        AuditConfig(max_pixels=pil_pixel_limit() + 1)
