"""``datasvc bench``: registered with the ``datasvc`` CLI through the ``datasvc.commands`` entry
point; the benchmark suite itself is imported only when the command runs."""

from __future__ import annotations

import argparse

from datasvc.cli import Command

ALL_BACKENDS = ["custom", "torch", "torch_tensor", "dali_cpu", "dali_native", "dali_gpu", "remote"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pack", nargs="?", help="pack to read (default: the built-in sample, cached)")
    p.add_argument("--backends", default=",".join(ALL_BACKENDS))
    p.add_argument("--split", default="train")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes/threads (default: the cores this process may use)",
    )
    p.add_argument("--repeats", type=int, default=3, help="rounds over all backends")
    p.add_argument("--warmup", type=int, default=2, help="untimed epochs per backend and round")
    p.add_argument("--eval", action="store_true", help="eval transform instead of train")
    p.add_argument("--json", default=None, help="write results as JSON")
    p.add_argument("--plot", default=None, help="write a PNG bar chart")
    from benchmarks.storage import add_arguments as storage_arguments

    storage_arguments(p)


def run(a: argparse.Namespace) -> int:
    if a.io is not None:
        from benchmarks.storage import main as storage_main

        return storage_main(a)
    from benchmarks.loaders import main

    return main(a)


COMMAND = Command("benchmark loader backends on one pack", add_arguments, run)
