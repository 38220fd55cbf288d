"""The service at fleet scale on 127.0.0.1: 64 ranks against one server, servers joining and
leaving a running job through the endpoints file, one pack per job, crop-segment transport."""

from __future__ import annotations

import concurrent.futures
import io

import numpy as np
import pytest
from PIL import Image

from converters.convert import ConvertConfig, convert
from datasvc.loaders import create_loader
from datasvc.service.local import LocalServer

pytestmark = pytest.mark.timeout(120)


def write_small_tree(root, classes: int, per_class: int, size=(40, 32), seed=0):
    """``classes`` x ``per_class`` small RGB JPEGs: enough samples for 64 ranks, cheap to build."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / "train" / f"n{c:08d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, "JPEG", quality=85)
            (d / f"img_{i:05d}.JPEG").write_bytes(buf.getvalue())
    return root


@pytest.fixture(scope="module")
def small_pack(tmp_path_factory):
    """512 train images of 40x32 in 4 classes."""
    tree = write_small_tree(tmp_path_factory.mktemp("small-tree"), 4, 128)
    out = tmp_path_factory.mktemp("small-pack") / "small"
    convert(tree, out, ConvertConfig(format="lmdb", shards=2), progress=False)
    return out


def rank_ids(endpoint, rank, world, pack="small", **kw):
    kw.setdefault("batch_size", 2)
    kw.setdefault("image_size", 32)
    loader = create_loader(
        "remote", endpoint, pack=pack, rank=rank, world_size=world, seed=1, dead_after=60, **kw
    )
    with loader:
        return [i for b in loader for i in b.ids.tolist()]


def test_64_ranks_one_server_listing_computed_once_per_builder(small_pack):
    world = 64
    with LocalServer([small_pack], workers=2) as server:
        with concurrent.futures.ThreadPoolExecutor(world) as pool:
            per_rank = list(pool.map(lambda r: rank_ids(server.endpoint, r, world), range(world)))
        stats = server.raw_stats()
    flat = [i for ids in per_rank for i in ids]
    assert sorted(flat) == list(range(512)), "every sample exactly once over the job"
    assert {len(ids) for ids in per_rank} == {8}
    assert stats["listings_by_builder"] == {"0": 1, "1": 1}, "one listing per builder per epoch"
