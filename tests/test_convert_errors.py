"""Conversion's bad inputs: what must not silently go wrong (symlink loops, an output inside
its source, a finished shard damaged before a resume) and the one-line errors for layouts and
outputs convert cannot use."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from converters.convert import ConversionError, ConvertConfig, convert
from datasvc.packs import open_pack
from datasvc.packs.verify import verify_pack
from tests.conftest import make_tree
from tests.test_packs import cli
from tests.test_sources import records, shard_digests


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("err") / "src", classes=3, per_class=8,
                     val_per_class=2, oddities=False)  # fmt: skip


@pytest.fixture(scope="module")
def small_pack(small_tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("errpack") / "pack"
    convert(small_tree, out, ConvertConfig(shards=3), progress=False)
    return out


def _one_line_error(*args) -> str:
    r = cli(*args, check=False)
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("datasvc convert: error: "), r.stderr
    return lines[0]


def test_symlink_loop_gives_the_same_pack(small_tree, small_pack, tmp_path):
    looped = tmp_path / "looped"
    shutil.copytree(small_tree, looped)
    cls = sorted((looped / "train").iterdir())[0]
    (cls / "loop").symlink_to("..", target_is_directory=True)  # train/<cls>/loop -> train/
    (cls / "self").symlink_to(".", target_is_directory=True)
    other = sorted((looped / "train").iterdir())[1]
    first = sorted(other.glob("*.JPEG"))[0]
    os.link(first, other / "~twin.JPEG")  # the same file again, under a later name
    r = cli("convert", looped, tmp_path / "pack", "--shards", "3")
    assert "reached twice" in r.stdout and "reached a second time" in r.stderr
    assert records(tmp_path / "pack") == records(small_pack)
    assert shard_digests(tmp_path / "pack") == shard_digests(small_pack)
    audit = open_pack(tmp_path / "pack").manifest["splits"]["train"]["audit"]
    assert audit["reached_twice"] == 3  # loop/, self/ and the hard-linked twin


def test_output_inside_source_is_refused(small_tree, tmp_path):
    inside = small_tree / "train" / "pack"
    line = _one_line_error("convert", small_tree, inside)
    assert "is inside the source" in line and not inside.exists()
    src = tmp_path / "out" / "src"
    shutil.copytree(small_tree, src)
    line = _one_line_error("convert", src, tmp_path / "out")
    assert "is inside the output" in line and not (tmp_path / "out" / ".convert").exists()


def test_resume_redoes_a_truncated_finished_shard(small_tree, small_pack, tmp_path):
    out = tmp_path / "pack"
    convert(small_tree, out, ConvertConfig(shards=3), progress=False)
    (out / "manifest.json").unlink()  # as if the run died before its last step
    shard = sorted((out / "train").glob("*.lmdb"))[1]
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    r = cli("convert", small_tree, out, "--shards", "3", "-q")
    assert f"{shard.name} is {size // 2} bytes, its done record says {size}" in r.stderr
    assert "redoing it" in r.stderr and "resuming: 5 of 6" in r.stderr
    assert shard.stat().st_size == size and verify_pack(out).ok
    assert shard_digests(out) == shard_digests(small_pack)


def test_resume_redoes_a_changed_shard_of_the_same_size(small_tree, tmp_path):
    out = tmp_path / "pack"
    convert(small_tree, out, ConvertConfig(shards=3), progress=False)
    (out / "manifest.json").unlink()
    shard = sorted((out / "train").glob("*.lmdb"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = cli("convert", small_tree, out, "--shards", "3", "-q")
    assert "differs from its done record (CRC32C)" in r.stderr and verify_pack(out).ok


def test_layouts_convert_cannot_take(small_tree, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "an empty folder, no split folders" in _one_line_error("convert", empty, tmp_path / "o")
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted((small_tree / "val").rglob("*.JPEG")):
        shutil.copy(p, flat / p.name)
    line = _one_line_error("convert", flat, tmp_path / "o")
    assert "a flat folder of images" in line and "SRC/<split>/<class>/<image>" in line
    line = _one_line_error("convert", small_tree / "train", tmp_path / "o")
    assert "class folders at the top level (a plain ImageFolder)" in line
    assert f"move the class folders into {small_tree / 'train'}/train" in line
    assert not (tmp_path / "o").exists()


def test_read_only_output(small_tree, tmp_path):
    if os.geteuid() == 0:  # root writes through permission bits: use a read-only file system
        out = Path("/sys/datasvc-test-pack")
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        out = ro / "pack"
    line = _one_line_error("convert", small_tree, out)
    assert f"{out}: cannot write there" in line and "choose an output folder" in line


def test_conversion_error_is_the_shared_user_error():
    from datasvc.errors import UserError

    assert issubclass(ConversionError, UserError)
