"""``datasvc``: sample | convert | adopt | verify | inspect | bench | serve | status | keys.

Every command is a ``Command`` in ``COMMANDS``. Those whose code lives in other packages
(``convert`` in ``converters``, ``bench`` in ``benchmarks``) register themselves through the
``datasvc.commands`` entry-point group, so this package imports nothing from them (the layering
contract in pyproject.toml holds it). A command imports what it runs only when it runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points

from datasvc.errors import run_command
from datasvc.registry import Registry

ENTRY_POINT_GROUP = "datasvc.commands"


@dataclass(frozen=True)
class Command:
    """A subcommand: ``add_arguments(parser)`` declares its options; ``run(args)`` does the work
    and returns the exit code."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS = Registry("command")


def register_command(name: str, command: Command) -> Command:
    return COMMANDS.add(name, command)


def load_registered_commands() -> None:
    """Add the commands other installed packages register under ``datasvc.commands``."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in COMMANDS:
            register_command(ep.name, ep.load())


# --- the commands of this package ----------------------------------------------------------


def _sample_args(s: argparse.ArgumentParser) -> None:
    s.description = (
        "Write OUT/train/<wnid>/*.JPEG and OUT/val/<wnid>/*.JPEG: crops of the "
        "photos scikit-image ships, tinted per class, at ImageNet-like sizes and JPEG "
        "qualities, with ImageNet's oddities (a CMYK JPEG, a PNG named .JPEG, grayscale and "
        "progressive files). The same options always write the same bytes."
    )
    s.add_argument("out", help="a new or empty folder")
    s.add_argument("--classes", type=int, default=10, help="class folders, 1..10000 (default 10)")
    s.add_argument("--per-class", type=int, default=32, help="train images per class (default 32)")
    s.add_argument(
        "--val-per-class",
        type=int,
        default=None,
        help="val images per class (default: a quarter of --per-class, at least 2)",
    )
    s.add_argument(
        "--seed", type=int, default=0, help="another seed writes other crops and tints (default 0)"
    )


def _sample(a) -> int:
    from datasvc.sample import write_sample

    counts = write_sample(a.out, a.classes, a.per_class, a.val_per_class, a.seed)
    print(f"wrote {a.out}: {json.dumps(counts)}")
    return 0


def _adopt_args(ad: argparse.ArgumentParser) -> None:
    ad.add_argument("path", help="folder of train-NNNNN-of-NNNNN / validation-... shards")
    ad.add_argument("--workers", type=int, default=2)


def _adopt(a) -> int:
    from datasvc.packs.tfrecord import adopt_tf_imagenet

    m = adopt_tf_imagenet(a.path, workers=a.workers, progress=not a.quiet)
    counts = ", ".join(f"{k} {v['num_samples']}" for k, v in m["splits"].items())
    print(f"{a.path}: {len(m['classes'])} classes; {counts}; wrote {a.path}/manifest.json")
    return 0


def _verify_args(v: argparse.ArgumentParser) -> None:
    v.add_argument("pack")
    v.add_argument("--decode", action="store_true", help="also decode every image")


def _verify(a) -> int:
    from datasvc.packs.verify import verify_pack

    r = verify_pack(a.pack, decode=a.decode, progress=not a.quiet)
    for p in r.problems:
        print(f"DAMAGED {p}", file=sys.stderr)
    status = "OK" if r.ok else f"FAILED ({len(r.problems)} problems)"
    print(f"{a.pack}: {r.checked} records verified{' and decoded' if a.decode else ''}: {status}")
    return 0 if r.ok else 1


def _inspect_args(i: argparse.ArgumentParser) -> None:
    i.add_argument("pack")
    i.add_argument("--json", action="store_true")


def _inspect(a) -> int:
    from datasvc.packs import open_pack
    from datasvc.packs.verify import describe_pack, format_description

    d = describe_pack(open_pack(a.pack))
    print(json.dumps(d, indent=1) if a.json else format_description(d))
    return 0


def _serve_args(sv: argparse.ArgumentParser) -> None:
    from datasvc.service.server import add_arguments

    add_arguments(sv)


def _serve(a) -> int:
    from datasvc.service.server import main as serve_main

    return serve_main(a)


def _status_args(st: argparse.ArgumentParser) -> None:
    from datasvc.service.status import add_arguments

    add_arguments(st)


def _status(a) -> int:
    from datasvc.service.status import main as status_main

    return status_main(a)


def _keys_args(k: argparse.ArgumentParser) -> None:
    k.add_argument("dir")
    k.add_argument("--name", default="client")


def _keys(a) -> int:
    from datasvc.service.auth import write_keypair

    pub, sec = write_keypair(a.dir, a.name)
    print(f"public key  {pub}\nsecret key  {sec}")
    return 0


register_command(
    "sample", Command("write the built-in ImageNet-like sample tree", _sample_args, _sample)
)
register_command(
    "adopt",
    Command(
        "index TensorFlow-made ImageNet TFRecords once so they open as a pack", _adopt_args, _adopt
    ),
)
register_command("verify", Command("check every record of a pack", _verify_args, _verify))
register_command("inspect", Command("describe a pack", _inspect_args, _inspect))
register_command("serve", Command("serve uint8 batches over ZeroMQ", _serve_args, _serve))
register_command("status", Command("a live table of servers, one line each", _status_args, _status))
register_command("keys", Command("make a CurveZMQ key pair", _keys_args, _keys))


# --- the parser and the entry point ----------------------------------------------------------


def _verbosity() -> argparse.ArgumentParser:
    """``-v``/``-q``, accepted by every command: the log level, and ``-q`` hides progress bars."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv)")
    p.add_argument(
        "-q", "--quiet", action="count", default=0, help="warnings only, no progress bars"
    )
    return p


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or with only ``command``'s options declared (the others
    keep their names and help), so that running one command loads no other's code."""
    load_registered_commands()
    p = argparse.ArgumentParser(prog="datasvc", description=__doc__.splitlines()[0])
    p.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an error (also DATASVC_DEBUG=1)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    common = _verbosity()
    for name in COMMANDS.names():
        entry = COMMANDS.get(name)
        sp = sub.add_parser(name, help=entry.help, parents=[common])
        if command in (None, name):
            entry.add_arguments(sp)
        sp.set_defaults(fn=entry.run)
    return p


def _command_named(argv: list[str]) -> str | None:
    """The command ``argv`` runs (its first word that is not an option), if it names one."""
    first = next((x for x in argv if not x.startswith("-")), None)
    return first if first in COMMANDS else None


def configure_logging(verbose: int = 0, quiet: int = 0) -> None:
    """Library code logs through ``logging`` only; the CLI decides where it goes: stderr, at
    INFO by default, DEBUG with ``-v``, WARNING with ``-q``."""
    level = max(logging.DEBUG, min(logging.ERROR, logging.INFO + 10 * (quiet - verbose)))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)


def main(argv=None) -> int:
    """Parse, run one command; an expected failure is one line on stderr (datasvc.errors)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    load_registered_commands()
    args = build_parser(_command_named(argv)).parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    return run_command(f"datasvc {args.cmd}", lambda: args.fn(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
