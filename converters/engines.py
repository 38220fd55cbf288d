"""Engines that run a conversion's shard jobs: worker processes on this machine (``process``)
or tasks on a Ray cluster (``ray``: an embedded local one, or ``--ray-address`` /
``RAY_ADDRESS``). Either way one progress bar covers every shard of the plan, fed from the done
records, so it counts the work of other array jobs and of remote workers too."""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing as mp
import os
import signal
from pathlib import Path

from converters.shards import STATE_DIR, ShardJob, convert_shard
from datasvc.decode import init_decode_worker
from datasvc.lifecycle import die_with_parent

log = logging.getLogger(__name__)

ENGINES = ("process", "ray")
_POLL_S = 0.2


class ProgressFeed:
    """One bar over all shards of the plan: images of shards with a done record, plus the
    images of shards still being written here (``in_flight``)."""

    def __init__(self, out: Path, jobs: list[ShardJob], enabled: bool):
        from tqdm import tqdm

        self._sizes = {j.done_name: len(j.candidates) for j in jobs}
        self._done_dir = out / STATE_DIR / "done"
        self.total = sum(self._sizes.values())
        self.bar = tqdm(
            total=self.total, unit="img", disable=not enabled, smoothing=0.1, dynamic_ncols=True
        )

    def done_images(self) -> int:
        names = os.listdir(self._done_dir) if self._done_dir.is_dir() else []
        return sum(self._sizes.get(n, 0) for n in names)

    def update(self, in_flight: int = 0) -> None:
        self.bar.n = min(self.total, self.done_images() + in_flight)
        self.bar.refresh()

    def close(self) -> None:
        self.update()
        self.bar.close()


# --- processes ---------------------------------------------------------------------------

_progress = None  # shared counter of images in shards being written, set in each worker


def _init_worker(counter, parent: int):
    global _progress
    _progress = counter
    die_with_parent(parent)  # a killed parent leaves no worker writing on
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    init_decode_worker()  # OpenCV single-threaded in each worker (see there)


def _terminate_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _run_job(args) -> str:
    job, out, cfg, classes = args
    convert_shard(job, out, cfg, classes, _progress)
    return job.done_name


@contextlib.contextmanager
def _no_opencv_pool():
    """Fork with OpenCV's thread pool stopped: a child of a process whose pool has run (a
    caller that resized images in-process, say) inherits the pool's locks but not its
    threads, and hangs for good in ``init_decode_worker``'s ``cv2.setNumThreads(1)``. The
    caller's setting is restored once the workers are forked."""
    import cv2

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # joins the pool's threads here, in the parent
    try:
        yield
    finally:
        cv2.setNumThreads(threads)


def run_processes(todo: list[ShardJob], out: Path, cfg, classes, feed: ProgressFeed) -> None:
    """Run the shard jobs in ``cfg.workers`` forked processes."""
    ctx = mp.get_context("fork")
    counter = ctx.Value("q", 0)
    args = [(j, str(out), cfg, classes) for j in todo]
    previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)  # stop like Ctrl-C
    # The forked workers inherit the driver's objects; frozen, the workers' garbage collector
    # never walks them, so their pages stay shared instead of being copied into every worker
    # (the plan itself is numpy columns, which the collector does not walk anyway).
    gc.freeze()
    try:
        with _no_opencv_pool():
            pool = ctx.Pool(
                min(cfg.workers, len(todo)),
                initializer=_init_worker,
                initargs=(counter, os.getpid()),
            )
    finally:
        gc.unfreeze()
    try:
        results = pool.imap_unordered(_run_job, args)
        for _ in todo:
            while True:
                try:
                    results.next(timeout=_POLL_S)
                    break
                except mp.TimeoutError:
                    feed.update(counter.value)
            feed.update(counter.value)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
        signal.signal(signal.SIGTERM, previous)


# --- Ray ---------------------------------------------------------------------------------


def _import_ray():
    try:
        import ray
    except ImportError:
        from converters.convert import ConversionError

        raise ConversionError(
            "--engine ray needs Ray", "pip install 'datasvc[ray]', or use --engine process"
        ) from None
    return ray


def _shard_task(job: ShardJob, out: str, cfg, classes: list[str]) -> str:
    convert_shard(job, out, cfg, classes)
    return job.done_name


def connect_ray(ray, cfg) -> bool:
    """Join the cluster at ``cfg.ray_address`` or ``RAY_ADDRESS``; with neither, start an
    embedded local Ray of ``cfg.workers`` CPUs. Returns whether this call started Ray."""
    if ray.is_initialized():
        return False
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(
            num_cpus=cfg.workers,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=128 << 20,  # only done records travel through it
        )
    return True


def run_ray(todo: list[ShardJob], out: Path, cfg, classes, feed: ProgressFeed) -> None:
    """Run each shard job as a Ray task (one CPU each); the shards are written by the workers
    straight into ``out``, which must be storage they share with this driver."""
    ray = _import_ray()
    started = connect_ray(ray, cfg)
    task = ray.remote(num_cpus=1)(_shard_task)
    pending = []
    try:
        pending = [task.remote(j, str(out), cfg, classes) for j in todo]
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=_POLL_S)
            ray.get(ready)  # a failed shard raises here
            feed.update()
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started:
            ray.shutdown()


def run_engine(name: str, todo, out: Path, cfg, classes, feed: ProgressFeed) -> None:
    if todo:
        (run_ray if name == "ray" else run_processes)(todo, out, cfg, classes, feed)
