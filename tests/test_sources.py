"""Sources: the ILSVRC2012 tarballs, parquet shards and webdataset tars each convert to the
records the extracted tree converts to (same keys, labels, image bytes and class list)."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest

from converters.convert import ConvertConfig, convert
from converters.sources import SourceError, SourceOptions, discover
from datasvc.packs import open_pack
from tests.conftest import TEST_MAX_PIXELS
from tests.fake_sources import extracted_tree, ilsvrc_tarballs, parquet_shards, webdataset_tars
from tests.test_packs import cli

FORMATS = ["lmdb", "tfrecord"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("sources")
    src = extracted_tree(base / "tree")
    return {
        "src": src,
        "tree": src["root"],
        "ilsvrc": ilsvrc_tarballs(src, base / "ilsvrc"),
        "kaggle": ilsvrc_tarballs(src, base / "kaggle", labels="kaggle"),
        "parquet": parquet_shards(src, base / "parquet"),
        "webdataset": webdataset_tars(src, base / "wds"),
    }


def _convert(src: Path, out: Path, fmt: str, **kw) -> Path:
    cfg = ConvertConfig(format=fmt, shards=3, max_pixels=TEST_MAX_PIXELS)
    convert(src, out, cfg, progress=False, **kw)
    return out


@pytest.fixture(scope="module")
def tree_packs(sources, tmp_path_factory) -> dict[str, Path]:
    """The packs of the extracted tree, the reference every source must equal."""
    tree = sources["tree"]
    base = tmp_path_factory.mktemp("tree-packs")
    labels = {"val_labels": str(tree / "gt.txt"), "val_synsets": str(tree / "synsets.txt")}
    return {fmt: _convert(tree, base / fmt, fmt, **labels) for fmt in FORMATS}


def records(pack_dir: Path) -> dict[str, list[tuple]]:
    pack = open_pack(pack_dir)
    out = {}
    for name in pack.splits:
        split = pack.split(name)
        out[name] = [(s.key, s.label, s.image) for s in (split[i] for i in range(len(split)))]
    return out


def shard_digests(pack_dir: Path) -> dict[str, list[tuple]]:
    m = open_pack(pack_dir).manifest
    return {k: [(s["file"], s["digest"]) for s in v["shards"]] for k, v in m["splits"].items()}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["ilsvrc", "kaggle", "webdataset"])
def test_tar_sources_give_the_trees_pack(kind, fmt, sources, tree_packs, tmp_path):
    """Read in place, tar members give the very shards the extracted tree gives."""
    pack = _convert(sources[kind], tmp_path / "p", fmt)
    ref = tree_packs[fmt]
    assert open_pack(pack).classes == open_pack(ref).classes == sources["src"]["wnids"]
    assert records(pack) == records(ref)
    assert shard_digests(pack) == shard_digests(ref)
    au, ref_au = open_pack(pack).manifest["audit"], open_pack(ref).manifest["audit"]
    assert (au["passed"], au["rejected"]) == (ref_au["passed"], ref_au["rejected"]) != (0, 0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_parquet_gives_the_trees_records(fmt, sources, tree_packs, tmp_path):
    """Parquet is read in its own row order, so shards differ; the records do not."""
    pack = _convert(sources["parquet"], tmp_path / "p", fmt)
    ref = tree_packs[fmt]
    assert open_pack(pack).classes == open_pack(ref).classes
    got, want = records(pack), records(ref)
    assert got.keys() == want.keys() == {"train", "val"}
    for split in want:
        assert sorted(got[split]) == sorted(want[split]) and len(got[split]) > 0


def test_ilsvrc_listing_reads_no_image(sources, monkeypatch):
    """The listing reads tar headers only; the first image byte is read by a worker."""
    import os

    opened = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: opened.append(n) or real(fd, n, off))
    kind, classes, listings = discover(sources["ilsvrc"], SourceOptions())
    assert kind == "ilsvrc" and classes == sources["src"]["wnids"]
    assert [l.name for l in listings] == ["train", "val"]
    assert max(opened) <= 10240  # header blocks, never a member's bytes
    keys = [c.path for c in listings[0].candidates]
    assert f"{classes[1]}/nested/deep.jpeg" in keys and all("/" in k for k in keys)


def test_parquet_class_names_from_a_file(sources, tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("".join(f"{w} some words\n" for w in sources["src"]["wnids"]))
    no_meta = tmp_path / "pq"
    shutil.copytree(sources["parquet"], no_meta)
    import pyarrow.parquet as pq

    for p in (no_meta / "data").glob("*.parquet"):
        pq.write_table(pq.read_table(p).replace_schema_metadata(None), p)
    with pytest.raises(SourceError, match="--classes"):
        discover(no_meta, SourceOptions())
    _, classes, _ = discover(no_meta, SourceOptions(classes=str(names)))
    assert classes == sources["src"]["wnids"]
    with pytest.raises(SourceError, match="no image column 'img'.*--image-column"):
        discover(no_meta, SourceOptions(classes=str(names), image_column="img"))


def _convert_error(src: Path, out: Path) -> str:
    r = cli("convert", src, out, "-q", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("datasvc convert: error: "), r.stderr
    assert not (out / "manifest.json").exists()
    return lines[0]


def test_damaged_tarballs_name_the_member(sources, tmp_path):
    src = tmp_path / "damaged"
    shutil.copytree(sources["ilsvrc"], src)
    train = src / "ILSVRC2012_img_train.tar"
    with tarfile.open(train) as tar:
        inner = tar.getmembers()[1]  # one class's tar: its first header becomes garbage
    with open(train, "r+b") as f:
        f.seek(inner.offset_data)
        f.write(b"\x01" * 512)
    line = _convert_error(src, tmp_path / "out")
    assert f"ILSVRC2012_img_train.tar: member {inner.name}: not a readable" in line
    data = train.read_bytes()
    train.write_bytes(data[: len(data) * 2 // 3])  # cut short: the outer tar ends early
    line = _convert_error(src, tmp_path / "out2")
    assert "ILSVRC2012_img_train.tar: damaged tar at the member after n0" in line


def test_val_tar_without_labels_says_what_to_add(sources, tmp_path):
    src = tmp_path / "nolabels"
    src.mkdir()
    (src / "ILSVRC2012_img_val.tar").symlink_to(sources["ilsvrc"] / "ILSVRC2012_img_val.tar")
    with pytest.raises(SourceError, match="ILSVRC2012_devkit_t12.tar.gz or Kaggle's LOC_val"):
        discover(src, SourceOptions())


def test_tar_listing_keeps_no_headers(tmp_path, monkeypatch):
    """A listing streams a tar's headers: tarfile would keep every TarInfo in .members (50,000
    for ImageNet's val tar), and the listing never looks at one twice."""
    from converters.sources import tarfiles

    path = tmp_path / "flat.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(300):
            info = tarfile.TarInfo(f"img_{i:04d}.JPEG")
            info.size = i
            tar.addfile(info, io.BytesIO(b"x" * i))
    held = []
    real_next = tarfile.TarFile.next

    def next_member(self):
        held.append(len(self.members))
        return real_next(self)

    monkeypatch.setattr(tarfile.TarFile, "next", next_member)
    listed = list(tarfiles.members(str(path)))
    assert [m.name for m in listed] == [f"img_{i:04d}.JPEG" for i in range(300)]
    assert [m.size for m in listed] == list(range(300))
    with open(path, "rb") as f:  # the offsets address the members' bytes
        f.seek(listed[7].offset)
        assert f.read(listed[7].size) == b"x" * 7
    assert max(held) <= 1  # at most the header just read, never the tar's whole list


# --- webdataset: odd samples --------------------------------------------------------------


def _wds(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _jpeg(sources) -> bytes:
    w = sources["src"]["wnids"][0]
    return next(d for n, d in sources["src"]["train"][w].items() if n.endswith(".JPEG"))


def test_webdataset_groups_consecutive_members_and_reports_odd_samples(sources, tmp_path):
    """Samples are runs of members sharing a key, as webdataset's own reader groups them; a
    sample without an image or a label, and a key repeated in a second tar, are ignored (the
    first sample of a key is kept) and counted, never packed twice."""
    jpg = _jpeg(sources)
    src = tmp_path / "wds"
    src.mkdir()
    _wds(src / "train-0000.tar", [
        ("a/x1.jpg", jpg), ("a/x1.cls", b"0"),
        ("b/y1.jpg", jpg), ("b/y1.cls", b"1"), ("b/y1.json", b"{}"),
        ("a/nolabel.jpg", jpg),
        ("b/noimage.cls", b"1"),
    ])  # fmt: skip
    _wds(src / "train-0001.tar", [("a/x1.jpg", jpg), ("a/x1.cls", b"0"), ("a/x2.jpg", jpg),
                                  ("a/x2.cls", b"0")])  # fmt: skip
    kind, classes, (train,) = discover(src, SourceOptions())
    assert kind == "webdataset" and classes == ["a", "b"]
    got = [(c.path, c.label, c.loc[0]) for c in train.candidates]
    assert got == [("a/x1.jpg", 0, 0), ("a/x2.jpg", 0, 1), ("b/y1.jpg", 1, 0)]
    assert sorted(train.ignored) == [
        "a/nolabel (no .cls label)",
        "a/x1.jpg (a second sample with this key)",
        "b/noimage (no image)",
        "b/y1.json",
    ]


@pytest.mark.parametrize(
    "members, opts, message",
    [
        ([("a/x.jpg", b"j"), ("a/x.cls", b"cat")], {}, "member a/x.cls: label 'cat' is not"),
        ([("x.jpg", b"j"), ("x.cls", b"0")], {}, "do not name their classes; pass --classes"),
        ([("a/x.jpg", b"j"), ("a/x.cls", b"0"), ("a/y.jpg", b"j"), ("a/y.cls", b"1")], {},
         "do not name their classes"),  # one folder, two labels
        ([("x.jpg", b"j"), ("x.cls", b"5")], {"classes": True}, "x.jpg: label 5 is not one of"),
    ],
)  # fmt: skip
def test_webdataset_bad_samples_name_the_member(tmp_path, members, opts, message):
    src = tmp_path / "wds"
    src.mkdir()
    _wds(src / "train-0000.tar", members)
    if opts.get("classes"):
        (tmp_path / "classes.txt").write_text("a\nb\n")
        opts = {"classes": str(tmp_path / "classes.txt")}
    with pytest.raises(SourceError, match=message):
        discover(src, SourceOptions(**opts))
