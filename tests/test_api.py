"""The public API's promises: importing datasvc changes nothing process-wide."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


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


@pytest.mark.parametrize("split", ["train", "val"])
def test_pack_dataset_matches_imagefolder_on_the_same_tree(clean_tree, clean_pack, split):
    """classes, class_to_idx, (key, target) pairs and pixels as torchvision's ImageFolder has
    them; ids follow the pack's order (train is shuffled at conversion). Files stored as they
    were (RGB JPEGs, losslessly re-laid-out) decode to the same pixels; converted oddities
    (CMYK, PNG) keep their size."""
    import numpy as np
    from PIL import Image
    from torchvision.datasets import ImageFolder

    from datasvc.loaders import PackDataset

    ours = PackDataset(clean_pack, split)
    ref = ImageFolder(clean_tree / split)
    assert ours.classes == ref.classes and ours.class_to_idx == ref.class_to_idx
    assert len(ours) == len(ref)
    by_key = {os.path.relpath(path, ref.root): (k, t) for k, (path, t) in enumerate(ref.samples)}
    assert sorted(ours.samples) == sorted((key, t) for key, (_, t) in by_key.items())
    assert ours.targets == [t for _, t in ours.samples] and ours.imgs is ours.samples
    same_pixels = 0
    for i, (key, target) in enumerate(ours.samples):
        image, label = ours[i]
        ref_image, ref_label = ref[by_key[key][0]]
        assert label == ref_label == target and image.size == ref_image.size
        with Image.open(os.path.join(ref.root, key)) as f:
            as_stored = f.format == "JPEG" and f.mode == "RGB"
        if as_stored:
            assert np.array_equal(np.asarray(image), np.asarray(ref_image)), key
            same_pixels += 1
    assert same_pixels >= len(ours) - 2


def test_pack_dataset_in_a_plain_dataloader(clean_pack):
    from torchvision.transforms import v2

    from datasvc.loaders import PackDataset

    t = v2.Compose([v2.PILToTensor(), v2.Resize(32, antialias=True), v2.CenterCrop(32)])
    ds = PackDataset(clean_pack, "val", transform=t, target_transform=lambda y: y + 100)
    dl = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2)
    batches = list(dl)
    assert sum(len(x) for x, _ in batches) == len(ds) == 12
    assert batches[0][0].shape == (5, 3, 32, 32) and batches[0][0].dtype == torch.uint8
    assert torch.cat([y for _, y in batches]).tolist() == [t + 100 for t in ds.targets]


def test_the_crop_decoder_was_built():
    """The C extension is optional for users (the fallback decodes whole images), but this
    suite and every figure in BENCHMARKS.md need it: a failed build fails CI here."""
    from datasvc.decode import CROP_DECODER, DECODERS

    assert CROP_DECODER == "turbo_crop", (
        "datasvc._jpegcrop was not built: install libjpeg-turbo's headers "
        "(scripts/install-apt.sh), then `python setup.py build_ext --inplace`"
    )
    assert "turbo_crop" in DECODERS
