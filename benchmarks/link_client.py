"""One rank of ``remote`` reading an epoch, for runs in another network namespace: prints
``batch N`` as it goes, then one JSON line: images/s, bytes received, this process's CPU
seconds per image, per-batch ids and an image digest (to compare with a reference; off with
``--no-digests`` for rate runs), data-wait per batch."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time


def image_digest(images) -> str:
    """SHA-256 of a batch's pixels in NHWC order, hashed in place: a batch from ``remote``
    or ``custom`` is an NCHW view of an NHWC buffer, so this copies nothing."""
    nhwc = images.permute(0, 2, 3, 1).contiguous()  # a no-op on those views
    return hashlib.sha256(nhwc.numpy()).hexdigest()


def _epochs(loader, first: int, count: int):
    for epoch in range(first, first + count):
        loader.set_epoch(epoch)
        yield from loader


def _arguments(argv) -> argparse.Namespace:
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
    p.add_argument("--digests", action=argparse.BooleanOptionalAction, default=True)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = _arguments(argv)
    from datasvc.loaders import create_loader
    from datasvc.memory import recycle_large_allocations

    recycle_large_allocations()  # this process is ours: each reply's buffer reuses the heap
    loader = create_loader(
        "remote", a.endpoints, pack=a.pack, batch_size=a.batch_size, image_size=a.image_size,
        seed=a.seed, decode=a.decode, num_workers=a.num_workers,
        request_timeout=a.request_timeout, dead_after=a.dead_after,
    )  # fmt: skip
    ids, digests, waits = [], [], []
    images, t_start, cpu_start = 0, None, 0.0
    with loader:
        t = time.perf_counter()
        for i, b in enumerate(_epochs(loader, a.epoch, a.epochs)):
            now = time.perf_counter()
            waits.append(now - t)
            if i == a.warmup:
                t_start, cpu_start = now, time.process_time()
            elif i > a.warmup:
                images += len(b.ids)
            ids.append(b.ids.tolist())
            if a.digests:
                digests.append(image_digest(b.images))
            print(f"batch {i}", flush=True)
            if a.limit and i + 1 >= a.limit:
                break
            time.sleep(a.pause)
            t = time.perf_counter()
        end, cpu = time.perf_counter(), time.process_time() - cpu_start
        received = loader.client.bytes_received
    total = sum(len(x) for x in ids)
    seconds = end - t_start if t_start else 0.0
    out = {
        "images": images,
        "images_total": total,
        "seconds": seconds,
        "images_per_s": images / seconds if seconds else 0.0,
        "client_cpu_s_per_image": cpu / images if images else 0.0,
        "bytes_per_image": received / total if total else 0.0,
        "ids": ids,
        "digests": digests,
        "waits": waits,
    }
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
