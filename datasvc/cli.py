"""``datasvc``: sample | convert | adopt | verify | inspect | bench | serve | keys."""

from __future__ import annotations

import argparse
import json
import sys

from datasvc.errors import run_command


def _cmd_sample(a) -> int:
    from datasvc.sample import write_sample

    counts = write_sample(a.out, a.classes, a.per_class, a.val_per_class, a.seed)
    print(f"wrote {a.out}: {json.dumps(counts)}")
    return 0


def _cmd_convert(a) -> int:
    from converters.cli import run

    return run(a)


def _cmd_adopt(a) -> int:
    from datasvc.packs.tfrecord import adopt_tf_imagenet

    m = adopt_tf_imagenet(a.path, workers=a.workers, progress=not a.quiet)
    counts = ", ".join(f"{k} {v['num_samples']}" for k, v in m["splits"].items())
    print(f"{a.path}: {len(m['classes'])} classes; {counts}; wrote {a.path}/manifest.json")
    return 0


def _cmd_verify(a) -> int:
    from datasvc.packs.verify import verify_pack

    r = verify_pack(a.pack, decode=a.decode, progress=not a.quiet)
    for p in r.problems:
        print(f"DAMAGED {p}", file=sys.stderr)
    status = "OK" if r.ok else f"FAILED ({len(r.problems)} problems)"
    print(f"{a.pack}: {r.checked} records verified{' and decoded' if a.decode else ''}: {status}")
    return 0 if r.ok else 1


def _cmd_inspect(a) -> int:
    from datasvc.packs import open_pack
    from datasvc.packs.verify import describe_pack, format_description

    d = describe_pack(open_pack(a.pack))
    print(json.dumps(d, indent=1) if a.json else format_description(d))
    return 0


def _cmd_bench(a) -> int:
    if a.io is not None:
        from benchmarks.storage import main as storage_main

        return storage_main(a)
    from benchmarks.loaders import main as bench_main

    return bench_main(a)


def _cmd_serve(a) -> int:
    from datasvc.service.server import main as serve_main

    return serve_main(a)


def _cmd_keys(a) -> int:
    from datasvc.service.auth import write_keypair

    pub, sec = write_keypair(a.dir, a.name)
    print(f"public key  {pub}\nsecret key  {sec}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="datasvc", description=__doc__)
    p.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an error (also DATASVC_DEBUG=1)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser(
        "sample",
        help="write the built-in ImageNet-like sample tree",
        description="Write OUT/train/<wnid>/*.JPEG and OUT/val/<wnid>/*.JPEG: crops of the "
        "photos scikit-image ships, tinted per class, at ImageNet-like sizes and JPEG "
        "qualities, with ImageNet's oddities (a CMYK JPEG, a PNG named .JPEG, grayscale and "
        "progressive files). The same options always write the same bytes.",
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
    s.set_defaults(fn=_cmd_sample)

    from converters.cli import HELP as convert_help
    from converters.cli import add_arguments as convert_args

    c = sub.add_parser("convert", help=convert_help)
    convert_args(c)
    c.set_defaults(fn=_cmd_convert)

    ad = sub.add_parser(
        "adopt", help="index TensorFlow-made ImageNet TFRecords once so they open as a pack"
    )
    ad.add_argument("path", help="folder of train-NNNNN-of-NNNNN / validation-... shards")
    ad.add_argument("--workers", type=int, default=2)
    ad.add_argument("-q", "--quiet", action="store_true")
    ad.set_defaults(fn=_cmd_adopt)

    v = sub.add_parser("verify", help="check every record of a pack")
    v.add_argument("pack")
    v.add_argument("--decode", action="store_true", help="also decode every image")
    v.add_argument("-q", "--quiet", action="store_true")
    v.set_defaults(fn=_cmd_verify)

    i = sub.add_parser("inspect", help="describe a pack")
    i.add_argument("pack")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=_cmd_inspect)

    b = sub.add_parser("bench", help="benchmark loader backends on one pack")
    from benchmarks.loaders import add_arguments as bench_args

    bench_args(b)
    from benchmarks.storage import add_arguments as storage_args

    storage_args(b)
    b.set_defaults(fn=_cmd_bench)

    sv = sub.add_parser("serve", help="serve uint8 batches over ZeroMQ")
    from datasvc.service.server import add_arguments as serve_args

    serve_args(sv)
    sv.set_defaults(fn=_cmd_serve)

    k = sub.add_parser("keys", help="make a CurveZMQ key pair")
    k.add_argument("dir")
    k.add_argument("--name", default="client")
    k.set_defaults(fn=_cmd_keys)
    return p


def main(argv=None) -> int:
    """Parse, run one command; an expected failure is one line on stderr (datasvc.errors)."""
    args = build_parser().parse_args(argv)
    return run_command(f"datasvc {args.cmd}", lambda: args.fn(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
