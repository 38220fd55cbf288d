"""One rank of ``remote`` reading an epoch, for runs in another network namespace: prints
``batch N`` as it goes, then one JSON line: images/s, bytes received, per-batch ids and an
image digest (to compare with a reference), data-wait per batch."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time


def _epochs(loader, first: int, count: int):
    for epoch in range(first, first + count):
        loader.set_epoch(epoch)
        yield from loader


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("endpoints")
    p.add_argument("--pack", required=True)
    p.add_argument("--decode", default="server", choices=["server", "client"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epoch", type=int, default=0, help="the first epoch")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--request-timeout", type=float, default=30.0)
    p.add_argument("--dead-after", type=float, default=60.0)
    p.add_argument("--limit", type=int, default=0, help="stop after this many batches (0: all)")
    p.add_argument("--warmup", type=int, default=2, help="batches not timed")
    p.add_argument("--pause", type=float, default=0.0, help="seconds to wait after each batch")
    a = p.parse_args(argv)

    from datasvc.loaders import create_loader

    loader = create_loader(
        "remote", a.endpoints, pack=a.pack, batch_size=a.batch_size, image_size=a.image_size,
        seed=a.seed, decode=a.decode, num_workers=a.num_workers,
        request_timeout=a.request_timeout, dead_after=a.dead_after,
    )  # fmt: skip
    ids, digests, waits = [], [], []
    images = 0
    t_start = None
    with loader:
        t = time.perf_counter()
        for i, b in enumerate(_epochs(loader, a.epoch, a.epochs)):
            now = time.perf_counter()
            waits.append(now - t)
            if i == a.warmup:
                t_start = now
            elif i > a.warmup:
                images += len(b.ids)
            ids.append(b.ids.tolist())
            digests.append(hashlib.sha256(b.images.contiguous().numpy().tobytes()).hexdigest())
            print(f"batch {i}", flush=True)
            if a.limit and i + 1 >= a.limit:
                break
            time.sleep(a.pause)
            t = time.perf_counter()
        end = time.perf_counter()
        received = loader.client.bytes_received
    total = sum(len(x) for x in ids)
    seconds = end - t_start if t_start else 0.0
    out = {
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds if seconds else 0.0,
        "bytes_per_image": received / total if total else 0.0,
        "ids": ids,
        "digests": digests,
        "waits": waits,
    }
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
