"""The CLI's small commands (sample, inspect, keys), its command registry and log levels."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys

from datasvc.cli import main


def _digest(root) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_sample_is_deterministic_and_imagenet_like(tmp_path, capsys):
    from PIL import Image

    assert main(["sample", str(tmp_path / "a"), "--classes", "3", "--per-class", "8"]) == 0
    assert main(["sample", str(tmp_path / "b"), "--classes", "3", "--per-class", "8"]) == 0
    assert main(["sample", str(tmp_path / "c"), "--classes", "3", "--per-class", "8",
                 "--seed", "1"]) == 0  # fmt: skip
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    files = sorted((tmp_path / "a").rglob("*.JPEG"))
    assert len(files) == 3 * 8 + 3 * 2 and {p.parent.parent.name for p in files} == {"train", "val"}
    formats = {(Image.open(p).format, Image.open(p).mode) for p in files}
    assert ("JPEG", "CMYK") in formats and ("PNG", "RGB") in formats  # ImageNet's oddities


def test_inspect_json(lmdb_pack, capsys):
    assert main(["inspect", str(lmdb_pack), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["format"] == "lmdb" and d["num_classes"] == 4
    train = d["splits"]["train"]
    assert train["num_samples"] > 0 and train["bytes_per_image"] > 1000
    assert train["audit"]["rejected"] == 4 and train["longest_side"]["max"] >= 300
    assert d["options"]["jpeg_layout"] == "segmented"
    assert main(["inspect", str(lmdb_pack)]) == 0
    out = capsys.readouterr().out
    assert "split train" in out and "jpeg_layout=segmented" in out


def test_keys_makes_a_curve_pair(tmp_path, capsys):
    assert main(["keys", str(tmp_path), "--name", "alice"]) == 0
    pub = (tmp_path / "alice.key").read_text()
    sec = tmp_path / "alice.key_secret"
    assert "public-key" in pub and "secret-key" in sec.read_text()
    assert sec.stat().st_mode & 0o077 == 0  # the secret is private


def test_every_command_is_registered_and_the_serve_path_loads_no_other_package():
    """convert and bench come from their own packages (entry points); the parser ``datasvc
    serve`` builds imports no converter, benchmark, trainer nor torch, while the full parser
    declares every command's options."""
    code = (
        "import sys; from datasvc.cli import COMMANDS, build_parser, _command_named; "
        "build_parser(_command_named(['serve', 'p'])).parse_args(['serve', 'p']); "
        "print(COMMANDS.names()); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'trainer') "
        "or m.startswith(('benchmarks.', 'converters.')) "
        "and m not in ('benchmarks.cli', 'converters.cli', 'converters.layout'))); "
        "print(build_parser().parse_args(['bench', '--repeats', '1']).repeats)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout.splitlines()
    assert out[0] == str(
        ["adopt", "bench", "convert", "inspect", "keys", "sample", "serve", "status", "verify"]
    )
    assert out[1] == "[]", f"the serve path imported {out[1]}"
    assert out[2] == "1"


def test_verbosity_flags_set_the_log_level(tmp_path):
    root = logging.getLogger()
    before = root.level
    try:
        for k, (flags, level) in enumerate(
            (([], logging.INFO), (["-q"], logging.WARNING), (["-vv"], logging.DEBUG))
        ):
            assert main(["keys", str(tmp_path), "--name", f"k{k}", *flags]) == 0
            assert root.level == level, flags
    finally:
        root.setLevel(before)
