"""The plan's columnar candidate table: it gives the candidates a list of them gave, pickles
compactly, stays small per image, and leaves every listing digest and shard plan as it was."""

from __future__ import annotations

import pickle
import tracemalloc
from pathlib import Path

import google_crc32c
import pytest

from converters.convert import ConvertConfig, make_plan
from converters.sample_sources import ilsvrc_tarballs, parquet_shards, webdataset_tars
from converters.sources import Candidate, CandidateTable, SourceOptions, tree_order

WNIDS = ["n01440764", "n01443537", "n01484850"]


def _fake_src(root: Path) -> dict:
    """A tiny ImageNet-like source of few-byte files (listing reads no image): ImageNet's
    names, a nested folder, a non-ASCII name, an ignored file, a flat val out of order."""
    train = {w: {f"{w}_{i}.JPEG": bytes([65 + i]) * i for i in range(1, 13)} for w in WNIDS}
    train[WNIDS[1]]["nested/deep.jpeg"] = b"d"
    train[WNIDS[2]]["\u00e9t\u00e9_\u00fc.JPEG"] = b"u"
    val = {f"ILSVRC2012_val_{n:08d}.JPEG": (b"v" * n, WNIDS[n % 3]) for n in range(9, 0, -1)}
    for w, files in train.items():
        for name, data in files.items():
            (root / "train" / w / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "train" / w / name).write_bytes(data)
    (root / "train" / WNIDS[0] / "README.txt").write_text("not an image")
    (root / "val").mkdir()
    for name, (data, _) in val.items():
        (root / "val" / name).write_bytes(data)
    lines = ["ImageId,PredictionString"] + [f"{n[:-5]},{w} 1 2 3 4" for n, (_, w) in val.items()]
    (root.parent / "val.csv").write_text("\n".join(lines) + "\n")
    return {"root": root, "wnids": WNIDS, "synsets": WNIDS, "train": train, "val": val}


@pytest.fixture(scope="module")
def fake_sources(tmp_path_factory) -> dict[str, tuple[Path, SourceOptions]]:
    base = tmp_path_factory.mktemp("plan")
    src = _fake_src(base / "tree")
    return {
        "tree": (src["root"], SourceOptions(val_labels=str(base / "val.csv"))),
        "ilsvrc": (ilsvrc_tarballs(src, base / "ilsvrc", labels="kaggle"), SourceOptions()),
        "parquet": (parquet_shards(src, base / "parquet", row_group_size=4), SourceOptions()),
        "webdataset": (webdataset_tars(src, base / "wds"), SourceOptions()),
    }


def _shards_digest(jobs) -> str:
    crc = 0
    for job in jobs:
        for c in job.candidates:
            line = f"{job.split}\t{job.index}/{job.count}\t{c.path}\t{c.label}\t{c.loc}\n"
            crc = google_crc32c.extend(crc, line.encode())
    return f"{crc:08x}"


# Taken with the list-of-Candidate plan (before the columnar table): a resume of a conversion
# started then must find the same plan.json and the same shards.
SAME = {
    "train": {"candidates": 38, "listing": "1c667f7e"},
    "val": {"candidates": 9, "listing": "f8c817b7"},
}
PINNED = {
    "tree": (SAME, "24d56cb1"),
    "ilsvrc": (SAME, "a5d1e01d"),
    "parquet": (
        {
            "train": {"candidates": 38, "listing": "183f6eb6"},
            "val": {"candidates": 9, "listing": "dc9b7657"},
        },
        "b14b35fd",
    ),
    "webdataset": (SAME, "16899b25"),
}


@pytest.mark.parametrize("kind", sorted(PINNED))
def test_listing_digest_and_shards_are_as_before(kind, fake_sources):
    src, opts = fake_sources[kind]
    planned = make_plan(src, ConvertConfig(shards=3), opts)
    got = (planned.plan["splits"], _shards_digest(planned.jobs))
    assert got == PINNED[kind]


def _imagenet_like(n: int) -> list[Candidate]:
    """ImageNet's train keys and tar locs: ``n01440764/n01440764_10026.JPEG``, (0, offset, size)."""
    wnids = [f"n{1440764 + 7919 * c:08d}" for c in range(1000)]
    return [
        Candidate(
            f"{wnids[i % 1000]}/{wnids[i % 1000]}_{10000 + i}.JPEG",
            i % 1000,
            (0, 512 * i, 110_000 + i),
        )  # fmt: skip
        for i in range(n)
    ]


MIXED = [
    Candidate("n01/a.JPEG", 3, (0, 512, 7)),
    Candidate("\u00e9t\u00e9/\udcff.jpg", 0, (1, 2**40, 0)),  # a surrogate-escaped file name
    Candidate("flat.png", 999, (0, 1024, 5)),
    Candidate("n01/a.JPEG", 1, (2, 0, 0)),  # a duplicate key keeps its place in a stable sort
]


def test_table_reads_as_the_list_it_was_built_from():
    table = CandidateTable.of(MIXED)
    assert len(table) == 4 and list(table) == MIXED
    assert [table[i] for i in range(-4, 4)] == MIXED + MIXED
    assert all(type(c.label) is int and all(type(x) is int for x in c.loc) for c in table)
    assert list(table[1:3]) == MIXED[1:3] and list(table[::2]) == MIXED[::2]
    assert list(table[3:1]) == [] and list(table[1:][1:]) == MIXED[2:]
    assert list(table.take([3, 0, 0])) == [MIXED[3], MIXED[0], MIXED[0]]
    view = table.view([3, -4, 2, 1])  # the columns shared, through row numbers
    assert list(view) == [MIXED[3], MIXED[0], MIXED[2], MIXED[1]] and view[-1] == MIXED[1]
    assert list(view[1:3]) == MIXED[0:3:2] and list(view.view([1, 0])[::-1]) == list(view[:2])
    assert list(view.take([0, 3])) == [MIXED[3], MIXED[1]] and view.path(1) == MIXED[0].path
    assert list(table[1:].view([2, 0])) == [MIXED[3], MIXED[1]]
    with pytest.raises(IndexError):
        table.view([0, 4])
    by_tree = sorted(MIXED, key=lambda c: tree_order(c.path))
    assert list(table.tree_sorted()) == by_tree
    with pytest.raises(IndexError):
        table[4]
    flat = CandidateTable.of([Candidate("a", 1), Candidate("b", 2)])  # the tree's: no loc
    assert list(flat) == [Candidate("a", 1, ()), Candidate("b", 2, ())]
    assert list(CandidateTable.Builder().build()) == []


def _tricky_keys(rng) -> list[str]:
    """Keys whose tree order differs from their plain string order: a folder that is a prefix
    of another ('a' and 'a-b': '-' sorts before '/'), sub-folders, flat names, non-ASCII and
    surrogate-escaped names, duplicates."""
    parts = ["a", "a-b", "a b", "ab", "\u00e9", "\udcff", "n01", "Z", "a.b"]
    keys = []
    for _ in range(400):
        depth = rng.choice([0, 1, 1, 2, 3])
        keys.append(
            "/".join(rng.choice(parts) for _ in range(depth + 1)) + rng.choice(["", ".jpg"])
        )
    return keys


@pytest.mark.parametrize("long_key", [False, True])
def test_tree_sorted_is_the_tree_order_sort(long_key):
    """The numpy sort (and, with one key far longer than the rest, Python's) orders as
    ``sorted`` with ``tree_order`` does, stably."""
    import random

    keys = _tricky_keys(random.Random(5))
    if long_key:
        keys.append("x/" + "y" * 5000 + ".jpg")
    cands = [Candidate(k, i, (i,)) for i, k in enumerate(keys)]
    table = CandidateTable.of(cands)
    expected = sorted(cands, key=lambda c: tree_order(c.path))
    assert list(table.tree_sorted()) == expected
    assert list(table.view(list(range(len(cands)))[::-1]).tree_sorted()) == sorted(
        cands[::-1], key=lambda c: tree_order(c.path)
    )


def test_builder_refuses_a_loc_of_another_shape():
    builder = CandidateTable.Builder()
    builder.append("a", 0, (0, 1, 2))
    with pytest.raises(ValueError, match="not 3 numbers"):
        builder.append("b", 0, (0, 1))


def test_iteration_spans_chunks():
    cands = _imagenet_like(20_000)  # more than one chunk of the table's batched reads
    table = CandidateTable.of(cands)
    assert list(table) == cands
    order = list(range(20_000))[::-7]
    assert list(table.take(order)) == [cands[i] for i in order]


def test_a_slice_pickles_only_its_part():
    table = CandidateTable.of(_imagenet_like(50_000))
    shard = table[20_000:21_024]
    data = pickle.dumps(shard)
    assert list(pickle.loads(data)) == list(shard)
    whole = len(pickle.dumps(table))
    assert len(data) < 2 * whole * 1024 / 50_000  # ~its 1,024 rows' share, not the 50,000's
    moved = pickle.loads(pickle.dumps(table.take(range(5, 1029))))
    assert list(moved) == list(table[5:1029])
    order = list(range(50_000))[::-1]
    permuted = table.view(order)[1_000:2_024]  # a train shard: the permuted view's slice
    data = pickle.dumps(permuted)
    assert len(data) < 2 * whole * 1024 / 50_000
    assert list(pickle.loads(data)) == [table[i] for i in order[1_000:2_024]]


def test_bytes_per_candidate_stay_small():
    """The plan's size per image is what grows with the source (1.28M for ImageNet): the
    table's columns and all it allocates stay under 100 bytes an image (a Candidate list:
    ~250)."""
    cands = _imagenet_like(100_000)
    tracemalloc.start()
    try:
        builder = CandidateTable.Builder()
        for c in cands:
            builder.append(c.path, c.label, c.loc)
        table = builder.build()
        del builder
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert list(table[:3]) == cands[:3]
    assert table.nbytes / len(table) < 100
    assert held / len(table) < 100
