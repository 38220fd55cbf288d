"""Batch builders: processes (or threads) that turn one validated request into one reply, with
the same code as the ``custom`` loader, and the pool that starts, watches and stops them.

Frames between the broker (a ROUTER bound on ipc or inproc) and a builder (a DEALER whose
routing id is ``builder_identity(index)``), all of them named here:

=========================  ===============================================================
broker → builder           meaning
=========================  ===============================================================
``[TASK, task, req, slot]`` build the client's request frame ``req`` (the protocol's bytes,
                            validated by the broker); ``task`` is the broker's task number
                            (ASCII), ``slot`` the slot to write the images into (ASCII)
``[STOP]``                  finish and exit
=========================  ===============================================================

=============================  ===========================================================
builder → broker               meaning
=============================  ===========================================================
``[READY]``                     started; give me tasks
``[DONE, task, head, *bufs]``   the reply for the client: ``head`` is the msgpack reply
                                header (with ``slot`` set when the images are in the slot,
                                then the broker sends the slot; ``skipped``: the records
                                left out as corrupt under ``on_corrupt="skip"``, each
                                ``{id, shard, record, reason}``), ``bufs`` the buffers that
                                follow it (images unless in the slot, labels, ids; or the
                                encoded samples)
=============================  ===============================================================
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time

import numpy as np

from datasvc.corrupt import CorruptRecordError
from datasvc.packs.readahead import AheadOfRequests
from datasvc.sampling import ListingCache
from datasvc.service.protocol import BatchRequest, error_header, pack_header, parse_request

log = logging.getLogger(__name__)

TASK = b"TASK"
STOP = b"STOP"
READY = b"READY"
DONE = b"DONE"
# A builder drops an epoch listing no request has read for this long (recomputing one costs
# ~50 ms for ImageNet): it holds the epochs being read, so its memory is steady from the
# second epoch on instead of growing until four listings are kept.
LISTING_IDLE_S = 10.0
#: The epoch listings of this process's builders (thread builders share it).
BUILDER_LISTINGS = ListingCache(max_idle_s=LISTING_IDLE_S)


def builder_identity(index: int) -> bytes:
    """A builder's routing id on the broker's ROUTER: a replacement takes over its index."""
    return b"builder-%d" % index


def builder_index(identity: bytes) -> int:
    return int(identity.rpartition(b"-")[2])


class Listings:
    """Request → its rank's ``EpochSampler`` over the process's shared epoch listings
    (``BUILDER_LISTINGS`` in a builder; by default ``datasvc.sampling.LISTINGS``): a sampler
    costs nothing to make, and the listing it slices is computed once per (split size, seed,
    epoch, shuffle) whatever the number of ranks, world sizes or batch sizes asking."""

    def __init__(self, cache=None):
        from datasvc.sampling import LISTINGS

        self.cache = LISTINGS if cache is None else cache

    @property
    def computed(self) -> int:
        """Listings this process has computed (reported in every reply as ``listings``)."""
        return self.cache.computed

    def get(self, req: BatchRequest, n: int):
        from datasvc.sampling import EpochSampler

        s = EpochSampler(
            n,
            req.batch_size,
            rank=req.rank,
            world_size=req.world_size,
            seed=req.seed,
            shuffle=req.train,
            drop_last=req.train,
            listings=self.cache,
        )
        s.set_epoch(req.epoch)
        return s


# --- building one reply --------------------------------------------------------------------


def build_batch(split, ids: np.ndarray, req: BatchRequest, images, labels) -> tuple:
    """Decode and augment samples ``ids`` into ``images``/``labels`` under the request's
    corrupt-record policy → (the ids filled, rows ``0..k-1``; the skipped entries)."""
    from datasvc.batch import fill_batch

    cfg = req.transform_config()
    return fill_batch(
        split, ids, cfg, req.seed, req.epoch, images, labels, on_corrupt=req.on_corrupt
    )


def readable_samples(split, ids, on_corrupt: str) -> tuple[list[int], dict, list[dict]]:
    """The samples of ``ids`` that read cleanly → (their ids, id → Sample, skipped entries);
    a damaged one raises ``CorruptRecordError`` unless ``on_corrupt`` is "skip"."""
    from datasvc.corrupt import CorruptRecordError, read_sample

    kept, samples, skipped = [], {}, []
    for sid in ids:
        try:
            samples[int(sid)] = read_sample(split, int(sid))
            kept.append(int(sid))
        except CorruptRecordError as e:
            if on_corrupt != "skip":
                raise
            skipped.append(e.entry)
    return kept, samples, skipped


def batch_reply(split, ids, req: BatchRequest, rid, ring, slot: int) -> list:
    """A decoded batch written into ``slot``: header (naming the slot), labels, ids."""
    s = req.image_size
    images = ring.images(slot, (len(ids), s, s, 3))
    labels = np.empty(len(ids), np.int64)
    ids, skipped = build_batch(split, ids, req, images, labels)
    images, labels = images[: len(ids)], labels[: len(ids)]
    head = {
        "id": rid,
        "ok": True,
        "op": "batch",
        "n": len(ids),
        "skipped": skipped,
        "shape": list(images.shape),
        "layout": "NHWC",
        "batch": req.batch,
        "epoch": req.epoch,
        "slot": slot,
    }
    return [head, labels, np.ascontiguousarray(ids, np.int64)]


def segments_reply(split, ids, req: BatchRequest, rid) -> list:
    """Per image the restart segments that cover its train crop, as a small JPEG, and the crop
    moved into it (``decode="client"``): no decoding here, only marker walking."""
    from datasvc.segments import cut_batch

    ids, samples, skipped = readable_samples(split, ids, req.on_corrupt)
    meta, jpegs = cut_batch(samples, ids, req.transform_config(), req.seed, req.epoch)
    head = {"id": rid, "ok": True, "op": "segments", "n": len(ids), "batch": req.batch}
    head["skipped"] = skipped
    return [{**head, "epoch": req.epoch, "meta": meta}, b"".join(jpegs)]


def samples_reply(split, ids, req: BatchRequest, rid) -> list:
    """Encoded samples plus their crop parameters, for clients that decode on their GPU."""
    from datasvc.augment import eval_geometry, train_crop

    cfg = req.transform_config()
    ids, samples, skipped = readable_samples(split, ids, req.on_corrupt)
    images, meta = [], []
    for sid in ids:
        s = samples[sid]
        images.append(s.image)
        if cfg.train:
            c = train_crop(cfg, req.seed, req.epoch, int(sid), s.height, s.width)
            geo = [c.top, c.left, c.height, c.width, int(c.flip)]
        else:
            geo = list(eval_geometry(cfg, s.height, s.width))
        meta.append([int(sid), s.label, s.height, s.width, len(s.image), *geo])
    head = {"id": rid, "ok": True, "op": "samples", "n": len(ids), "batch": req.batch}
    head["skipped"] = skipped
    return [{**head, "epoch": req.epoch, "meta": meta}, b"".join(images)]


def build_reply(opened: dict, listings: Listings, frame: bytes, ring, slot, ahead=None) -> list:
    """One request frame → the reply frames (header bytes first); errors become error replies.
    ``ahead`` (an ``AheadOfRequests``) reads ahead the batches the client asks for next."""
    t0 = time.perf_counter()
    header, req = parse_request([frame])
    rid = header.get("id")
    try:
        split = opened[req.pack].split(req.split)
        sampler = listings.get(req, len(split))
        ids = sampler.batch(req.batch)
        if ahead is not None:
            ahead.after(split, sampler, req.key(), req.batch)
        if req.op == "samples":
            reply = samples_reply(split, ids, req, rid)
        elif req.op == "segments":
            reply = segments_reply(split, ids, req, rid)
        else:
            reply = batch_reply(split, ids, req, rid, ring, slot)
    except CorruptRecordError as e:  # on_corrupt="raise": the client raises it, named
        return [error_header(rid, "corrupt", str(e), record=e.entry)]
    except Exception as e:  # noqa: BLE001 - reported to the client, the builder lives on
        return [error_header(rid, "build", f"{type(e).__name__}: {e}")]
    reply[0]["busy_s"] = time.perf_counter() - t0
    reply[0]["listings"] = listings.computed
    return [pack_header(reply[0]), *reply[1:]]


# --- the builder's loop --------------------------------------------------------------------


def builder_main(index: int, packs: dict[str, str], endpoint: str, ring, ctx=None, parent=None):
    """One builder. A thread builder shares the broker's context (``ctx``); a process builder
    (forked before the broker made its context) makes its own and dies with ``parent``."""
    import zmq

    from datasvc.decode import init_decode_worker
    from datasvc.memory import recycle_large_allocations
    from datasvc.packs import open_pack

    own_ctx = ctx is None
    if own_ctx:
        from datasvc.lifecycle import die_with_parent

        die_with_parent(parent)
        # A Ctrl-C or SIGTERM to the process group is for the broker, which stops us in turn.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        ctx = zmq.Context(1)
    recycle_large_allocations()  # decode scratch buffers: reuse heap, not new pages
    init_decode_worker()
    opened = {name: open_pack(path) for name, path in packs.items()}
    listings = Listings(BUILDER_LISTINGS)
    ahead = AheadOfRequests()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.routing_id = builder_identity(index)
    sock.connect(endpoint)
    sock.send(READY)
    try:
        while True:
            frames = sock.recv_multipart(copy=True)
            if frames[0] == STOP:
                return
            _, task, request, slot = frames
            reply = build_reply(opened, listings, request, ring, int(slot), ahead)
            sock.send_multipart([DONE, task, *reply], copy=False)
    finally:
        ahead.close()
        sock.close(0)
        if own_ctx:
            ctx.term()


# --- the pools ----------------------------------------------------------------------------


def death_cause(status: int) -> str:
    """A ``waitpid`` status → words: the signal (SIGKILL is also how the OOM killer ends a
    process) or the exit code."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else sig
        return f"killed by {name}" + (" (kill -9 or the OOM killer)" if sig == 9 else "")
    return f"exit code {os.WEXITSTATUS(status)}"


def _fork_builder(index: int, packs, endpoint: str, ring, conn) -> int:
    """Fork one builder from the spawner; → its pid. The child never returns."""
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        conn.close()
        builder_main(index, packs, endpoint, ring, None, os.getppid())
    except BaseException:  # noqa: BLE001 - a builder's end is reported by its exit code
        log.exception("builder %d failed", index)
        code = 1
    finally:
        os._exit(code)


def spawner_main(conn, broker_end, packs: dict, endpoint: str, ring, parent: int) -> None:
    """The spawner: forked before the broker's ZeroMQ context, it forks builders on request
    (so replacements are forked before any context too) and reports each one's death.

    Messages on ``conn``: from the broker ``("spawn", index)``, ``("stop", grace_s)``; to it
    ``("started", index, pid)``, ``("died", index, pid, cause)``."""
    from datasvc.lifecycle import die_with_parent

    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    broker_end.close()  # so that the broker's end closing reads as EOF here
    children: dict[int, int] = {}  # pid → index
    grace = 0.0
    try:
        while True:
            if conn.poll(0.02):
                try:
                    cmd = conn.recv()
                except EOFError:
                    break  # the broker is gone
                if cmd[0] == "stop":
                    grace = cmd[1]
                    break
                pid = _fork_builder(cmd[1], packs, endpoint, ring, conn)
                children[pid] = cmd[1]
                conn.send(("started", cmd[1], pid))
            _reap(children, conn)
    finally:
        _end_children(children, grace)


def _reap(children: dict, conn) -> None:
    while children:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if not pid:
            return
        index = children.pop(pid, None)
        if index is not None:
            conn.send(("died", index, pid, death_cause(status)))


def _end_children(children: dict, grace: float) -> None:
    """Wait up to ``grace`` seconds for builders told to stop, then SIGKILL the rest."""
    deadline = time.monotonic() + grace
    while children and time.monotonic() < deadline:
        pid, _ = os.waitpid(-1, os.WNOHANG)
        if pid:
            children.pop(pid, None)
        else:
            time.sleep(0.01)
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


class ProcessBuilders:
    """Builder processes, forked by a spawner process that is itself forked before the broker
    makes its ZeroMQ context. The broker polls ``fileno()`` and reads ``events()``."""

    supervised = True

    def __init__(self, packs: dict[str, str], count: int, ring, endpoint: str):
        self.count = count
        self.pids: dict[int, int] = {}
        parent_end, child_end = mp.Pipe()
        self._conn = parent_end
        self._spawner = mp.get_context("fork").Process(
            target=spawner_main,
            args=(child_end, parent_end, packs, endpoint, ring, os.getpid()),
            daemon=True,
            name="datasvc-spawner",
        )
        self._spawner.start()
        child_end.close()
        for i in range(count):
            self.spawn(i)

    def spawn(self, index: int) -> None:
        self._conn.send(("spawn", index))

    def fileno(self) -> int:
        return self._conn.fileno()

    def events(self) -> list[tuple]:
        """``("started", index, pid)`` and ``("died", index, pid, cause)`` since last asked;
        a spawner that died is reported as every builder dying with it."""
        out = []
        try:
            while self._conn.poll(0):
                out.append(self._conn.recv())
        except (EOFError, OSError):
            raise RuntimeError("the builder spawner died") from None
        for e in out:
            if e[0] == "started":
                self.pids[e[1]] = e[2]
            elif self.pids.get(e[1]) == e[2]:
                del self.pids[e[1]]
        return out

    def any_alive(self) -> bool:
        return self._spawner.is_alive()

    def stop(self, grace: float) -> None:
        """The spawner waits up to ``grace`` s for its builders (told STOP), then kills them."""
        try:
            self._conn.send(("stop", grace))
        except OSError:
            pass
        self._spawner.join(grace + 2.0)
        if self._spawner.is_alive():
            self._spawner.kill()
            self._spawner.join(1.0)
        self._conn.close()


class ThreadBuilders:
    """Builder threads sharing the broker's context (a thread cannot die alone: a crash ends
    the whole server, so there is nothing to supervise)."""

    supervised = False

    def __init__(self, packs: dict[str, str], count: int, ring, endpoint: str, ctx):
        self.count = count
        self.pids: dict[int, int] = {}
        self._threads = [
            threading.Thread(
                target=builder_main,
                args=(i, packs, endpoint, ring, ctx),
                daemon=True,
                name=f"datasvc-builder-{i}",
            )
            for i in range(count)
        ]
        for t in self._threads:
            t.start()

    def any_alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def stop(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        for t in self._threads:
            t.join(timeout=max(0.05, deadline - time.monotonic()))
