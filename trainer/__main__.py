"""``python -m trainer``: train | eval | models.

    torchrun --nproc_per_node N -m trainer train --config trainer/configs/NAME.yaml [k=v ...]
        [--resume | --resume-from CHECKPOINT]
    python -m trainer eval --config CONFIG --checkpoint RUN/last.pt [--ema] [k=v ...]
    python -m trainer models [--json] [--pattern 'resnet*']

Overrides are ``section.key=value`` with YAML values, e.g. ``optim.lr=0.2 data.batch_size=64
optim.milestones=[30,60,90]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _cmd_train(a) -> int:
    from datasvc.memory import recycle_large_allocations
    from trainer.config import load_config
    from trainer.engine import train

    # This process owns its allocator: batch-sized buffers reuse heap pages (see there).
    recycle_large_allocations()
    cfg = load_config(a.config, a.overrides)
    if a.out:
        cfg = cfg.replace({"train.out_dir": a.out})
    resume = a.resume_from or a.resume
    summary = train(cfg, resume=resume)
    final = summary.get("final") or {}
    if final and _rank() == 0:
        print(
            json.dumps(
                {
                    "top1": final.get("top1"),
                    "top5": final.get("top5"),
                    "steps": summary["steps"],
                    "wall_s": round(summary["wall_s"], 1),
                    "data_wait_frac": round(summary["data_wait_frac"], 4),
                }
            )
        )
    return 0


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _cmd_eval(a) -> int:
    from trainer.config import load_config
    from trainer.engine import evaluate_checkpoint

    cfg = load_config(a.config, a.overrides)
    res = evaluate_checkpoint(cfg, a.checkpoint, use_ema=a.ema)
    if _rank() == 0:
        print(json.dumps(res))
    return 0


def model_rows(pattern: str | None = None, size: int = 224) -> list[dict]:
    """Every registered model: name, parameter count, GFLOPs (multiply-accumulates) of one
    ``size``×``size`` image, and seed 002's and seed 003's own GFLOPs counts at 224."""
    from trainer import models

    rows = []
    for r in models.model_table(models.list_models(pattern)):
        row = {"name": r["name"], "params": r["params"], "gflops": r["gflops"], "image_size": size}
        # The seeds' own counts are always at 224, as their tables are.
        row["gflops_seed002"] = r["gflops_seed002"]
        row["gflops_seed003"] = r["gflops_seed003"]
        if r.get("image_size", size) != size:  # the table profiles at the model's native size
            row["gflops"] = _profile(models, r["name"], size)["gflops"]
        rows.append(row)
    return rows


def _profile(models, name: str, size: int) -> dict:
    """Meta-device build (no memory, no compute), FlopCounterMode: MACs = flops / 2."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        m = models.create_model(name).eval()
        x = torch.zeros(1, 3, size, size)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            m(x)
    return {
        "name": name,
        "params": sum(p.numel() for p in m.parameters()),
        "gflops": round(fc.get_total_flops() / 2e9, 3),
        "image_size": size,
    }


def _cmd_models(a) -> int:
    rows = model_rows(a.pattern, a.size)
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'model':<22} {'params (M)':>11} {f'GFLOPs@{a.size}':>11}")
    for r in rows:
        print(f"{r['name']:<22} {r['params'] / 1e6:>11.3f} {r['gflops']:>11.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an error (also DATASVC_DEBUG=1)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a model (run under torchrun for several ranks)")
    t.add_argument("--config", required=True, help="YAML config, e.g. trainer/configs/digits.yaml")
    t.add_argument("--out", help="output folder (overrides train.out_dir)")
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue from <out_dir>/last.pt when it exists (else start afresh)",
    )
    t.add_argument("--resume-from", metavar="CHECKPOINT", help="continue from this checkpoint")
    t.add_argument("overrides", nargs="*", metavar="section.key=value")
    t.set_defaults(fn=_cmd_train)

    e = sub.add_parser("eval", help="exact top-1/top-5 of a checkpoint on the val split")
    e.add_argument("--config", required=True)
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    e.add_argument("overrides", nargs="*", metavar="section.key=value")
    e.set_defaults(fn=_cmd_eval)

    m = sub.add_parser("models", help="list registered models with parameters and GFLOPs")
    m.add_argument(
        "--json",
        action="store_true",
        help='print [{"name", "params", "gflops", "gflops_seed002", ...}]',
    )
    m.add_argument("--pattern", help="shell-style filter, e.g. 'resnet*'")
    m.add_argument("--size", type=int, default=224, help="image side for GFLOPs (default 224)")
    m.set_defaults(fn=_cmd_models)
    return p


def _error_prefix(cmd: str) -> str:
    """``python -m trainer train``, with the rank under torchrun: one line per rank at most."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = f" [rank {_rank()}/{world}]" if world > 1 else ""
    return f"python -m trainer {cmd}{rank}"


def main(argv: list[str] | None = None) -> int:
    """Parse, run one command; an expected failure is one line on stderr (datasvc.errors)."""
    from datasvc.errors import run_command

    a = build_parser().parse_args(argv)
    return run_command(_error_prefix(a.cmd), lambda: a.fn(a), debug=a.debug)


if __name__ == "__main__":
    sys.exit(main())
