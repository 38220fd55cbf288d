"""``python -m trainer``: train | eval | models.

    torchrun --nproc_per_node N -m trainer train --config trainer/configs/NAME.yaml [k=v ...]
        [--resume | --resume-from CHECKPOINT]
    python -m trainer eval --config CONFIG --checkpoint RUN/last.pt [--ema] [k=v ...]
    python -m trainer models [--json] [--pattern 'resnet*']
    python -m trainer configs [--json]

Overrides are ``section.key=value`` with YAML values, e.g. ``optim.lr=0.2 data.batch_size=64
optim.milestones=[30,60,90]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import zipfile
from pathlib import Path

from datasvc.errors import UserError


def _cmd_train(a) -> int:
    from datasvc.memory import recycle_large_allocations
    from trainer.config import load_config, require_data_source

    # This process owns its allocator: batch-sized buffers reuse heap pages (see there).
    recycle_large_allocations()
    cfg = load_config(a.config, a.overrides)
    require_data_source(cfg.data)  # before torch is imported and any process group starts
    if a.out:
        cfg = cfg.replace({"train.out_dir": a.out})
    if a.fresh:
        cfg = cfg.replace({"train.auto_resume": False})
    resume = a.resume_from or a.resume
    last = Path(cfg.train.out_dir) / "last.pt"
    if not resume and cfg.train.auto_resume and last.exists():
        resume = True  # a run folder with a checkpoint continues where it stopped
        if _rank() == 0:
            print(
                f"python -m trainer train: continuing the run in {last.parent} (--fresh restarts)"
            )
    if a.resume_from:
        check_checkpoint_file(a.resume_from)
    elif a.resume and (Path(cfg.train.out_dir) / "last.pt").exists():
        check_checkpoint_file(Path(cfg.train.out_dir) / "last.pt")
    check_pack_early(cfg.data)
    from trainer.engine import train

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


def check_pack_early(data) -> None:
    """Fail fast, before torch is imported: a server must answer (with the right CURVE keys)
    and serve the pack; a local pack must exist, have the train and val splits, and give every
    rank a full train batch (the loaders check it all again, later)."""
    if data.backend == "remote":
        from trainer.sources import pack_classes

        if _rank() == 0:  # one ping per job, not one per rank
            pack_classes(data)
        return
    if not isinstance(data.source, str):
        return
    from datasvc.packs import PackError, open_pack
    from datasvc.sampling import EpochSampler, require_batches

    try:
        pack = open_pack(data.source)
    except PackError:
        if (Path(data.source) / data.train_split).is_dir():
            return  # an ImageFolder tree, which the torch backend reads
        raise
    train = pack.split(data.train_split)
    pack.split(data.val_split)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    require_batches(EpochSampler(len(train), data.batch_size, world_size=world))


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Fail fast, before torch is imported or any loader starts: a checkpoint is a zip archive
    (``torch.save``'s format), so a missing, truncated or foreign file is refused here, by
    name. What the archive holds is checked when it is loaded."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a checkpoint file" if path.is_dir() else "no such checkpoint"
        raise UserError(f"{path}: {what}", "check the path")
    hint = "use another checkpoint file (an earlier one), or start afresh"
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            pickles = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            first = _first_pickle_op(z.read(pickles[0])) if pickles else None
    except (zipfile.BadZipFile, EOFError, ValueError) as e:
        raise UserError(
            f"{path}: not a readable checkpoint (damaged or truncated? {e})", hint
        ) from None
    if bad is not None:
        raise UserError(f"{path}: not a readable checkpoint (member {bad} fails its CRC)", hint)
    if first != "EMPTY_DICT":  # a trainer checkpoint is a dict; pickletools reads, never runs
        raise UserError(f"{path}: not a trainer checkpoint", hint)


def _first_pickle_op(data: bytes) -> str | None:
    import pickletools

    try:
        for op, _, _ in pickletools.genops(data):
            if op.name not in ("PROTO", "FRAME"):
                return op.name
    except ValueError:
        return None
    return None


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _cmd_eval(a) -> int:
    from trainer.config import load_config, require_data_source

    cfg = load_config(a.config, a.overrides)
    require_data_source(cfg.data)  # before torch is imported and any process group starts
    check_checkpoint_file(a.checkpoint)
    check_pack_early(cfg.data)
    from trainer.engine import evaluate_checkpoint

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


def _cmd_configs(a) -> int:
    from trainer.catalog import CONFIG_DIR, config_rows

    rows = config_rows(Path(a.dir) if a.dir else CONFIG_DIR)
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    head = f"{'config':<32} {'model':<20} {'epochs':>6} {'batch':>6} {'lr':>7} {'top-1':>7} GPU"
    print(head + "  tricks")
    for r in rows:
        top1 = f"{r['published_top1']:.2f}" if r["published_top1"] is not None else "-"
        gpu = "yes" if r["needs_gpu"] else "no "
        print(
            f"{r['name']:<32} {r['model']:<20} {r['epochs']:>6} {r['global_batch']:>6} "
            f"{r['lr']:>7.4g} {top1:>7} {gpu}  {', '.join(r['tricks']) or '-'}"
        )
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
    t.add_argument(
        "--fresh",
        action="store_true",
        help="start afresh even when <out_dir>/last.pt exists (train.auto_resume=false)",
    )
    t.add_argument("overrides", nargs="*", metavar="section.key=value")
    t.set_defaults(fn=_cmd_train)

    e = sub.add_parser("eval", help="exact top-1/top-5 of a checkpoint on the val split")
    e.add_argument("--config", required=True)
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    e.add_argument("overrides", nargs="*", metavar="section.key=value")
    e.set_defaults(fn=_cmd_eval)

    c = sub.add_parser("configs", help="list the seed-row configs and what they published")
    c.add_argument("--json", action="store_true", help="print one JSON object per config")
    c.add_argument("--dir", help="another folder of configs (default: trainer/configs)")
    c.set_defaults(fn=_cmd_configs)

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Like ``parse_args``, but ``section.key=value`` overrides may also follow an option
    (``--resume-from X a=b``), where argparse alone would stop collecting them."""
    parser = build_parser()
    a, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if "=" in x and not x.startswith("-")]
    if len(stray) != len(extra) or (stray and not hasattr(a, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if stray:
        a.overrides = [*a.overrides, *stray]
    return a


def _error_prefix(cmd: str) -> str:
    """``python -m trainer train``, with the rank under torchrun: one line per rank at most."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = f" [rank {_rank()}/{world}]" if world > 1 else ""
    return f"python -m trainer {cmd}{rank}"


class _ConsoleFormatter(logging.Formatter):
    """The message as is (the per-interval lines are read by people and by tests); a warning
    or an error says so first."""

    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        return msg if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {msg}"


def configure_logging() -> None:
    """The trainer's library code logs through ``logging`` (``trainer.*`` loggers) and logs the
    run's events from rank 0 only; this command line shows them on stdout, one plain line each:
    INFO and up on rank 0, warnings and errors on the other ranks. Other packages' records keep
    the logging defaults (warnings on stderr)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_ConsoleFormatter("%(message)s"))
    logger = logging.getLogger("trainer")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if _rank() == 0 else logging.WARNING)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Parse, run one command; an expected failure is one line on stderr (datasvc.errors)."""
    from datasvc.errors import run_command
    from trainer.torchrun_exit import end_torchrun_job

    a = parse_args(argv)
    configure_logging()
    return run_command(
        _error_prefix(a.cmd), lambda: a.fn(a), debug=a.debug, after_report=end_torchrun_job
    )


if __name__ == "__main__":
    sys.exit(main())
