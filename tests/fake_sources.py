"""Small fake versions of what users download, built from the test tree (the built-in sample
with ImageNet's odd files)."""

from __future__ import annotations

from pathlib import Path

from converters.sample_sources import (  # noqa: F401 - re-exported for the tests
    flatten_val,
    ilsvrc_tarballs,
    parquet_shards,
    webdataset_tars,
)
from tests.conftest import make_tree


def extracted_tree(root: Path, classes=3, per_class=6, val_per_class=2) -> dict:
    make_tree(root, classes=classes, per_class=per_class, val_per_class=val_per_class)
    return flatten_val(root)
