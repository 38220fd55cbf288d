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
                                then the broker sends the slot), ``bufs`` the buffers that
                                follow it (images unless in the slot, labels, ids; or the
                                encoded samples)
=============================  ===============================================================
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import threading
import time

import numpy as np

from datasvc.service.protocol import BatchRequest, error_header, pack_header, parse_request

log = logging.getLogger(__name__)

TASK = b"TASK"
STOP = b"STOP"
READY = b"READY"
DONE = b"DONE"


def builder_identity(index: int) -> bytes:
    """A builder's routing id on the broker's ROUTER: a replacement takes over its index."""
    return b"builder-%d" % index


def builder_index(identity: bytes) -> int:
    return int(identity.rpartition(b"-")[2])


class Listings:
    """Request → its rank's ``EpochSampler`` over the process's shared epoch listings
    (``datasvc.sampling.LISTINGS``): a sampler costs nothing to make, and the listing it
    slices is computed once per (split size, seed, epoch, shuffle) whatever the number of
    ranks, world sizes or batch sizes asking."""

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


def build_batch(split, ids: np.ndarray, req: BatchRequest, images, labels) -> dict:
    """Decode and augment samples ``ids`` into ``images``/``labels``; → extra header fields.
    The one place where a batch is built (a policy for damaged records extends it here)."""
    from datasvc.batch import fill_batch

    fill_batch(split, ids, req.transform_config(), req.seed, req.epoch, images, labels)
    return {}


def batch_reply(split, ids, req: BatchRequest, rid, ring, slot) -> list:
    """A decoded batch: header, then (images unless written into ``slot``), labels, ids."""
    s = req.image_size
    shape = (len(ids), s, s, 3)
    in_ring = slot is not None and int(np.prod(shape)) <= ring.slot_bytes
    # Out of the ring: a fresh array per batch, which leaves without a copy while libzmq may
    # still hold it as the next batch is built.
    images = ring.images(slot, shape) if in_ring else np.empty(shape, np.uint8)
    labels = np.empty(len(ids), np.int64)
    extra = build_batch(split, ids, req, images, labels)
    head = {
        "id": rid,
        "ok": True,
        "op": "batch",
        "n": len(ids),
        "shape": list(images.shape),
        "layout": "NHWC",
        "batch": req.batch,
        "epoch": req.epoch,
        "slot": slot if in_ring else None,
        **extra,
    }
    ids = np.ascontiguousarray(ids, np.int64)
    return [head, labels, ids] if in_ring else [head, images, labels, ids]


def samples_reply(split, ids, req: BatchRequest, rid) -> list:
    """Encoded samples plus their crop parameters, for clients that decode on their GPU."""
    from datasvc.augment import eval_geometry, train_crop

    cfg = req.transform_config()
    images, meta = [], []
    for sid in ids:
        s = split[int(sid)]
        images.append(s.image)
        if cfg.train:
            c = train_crop(cfg, req.seed, req.epoch, int(sid), s.height, s.width)
            geo = [c.top, c.left, c.height, c.width, int(c.flip)]
        else:
            geo = list(eval_geometry(cfg, s.height, s.width))
        meta.append([int(sid), s.label, s.height, s.width, len(s.image), *geo])
    head = {"id": rid, "ok": True, "op": "samples", "n": len(ids), "batch": req.batch}
    return [{**head, "epoch": req.epoch, "meta": meta}, b"".join(images)]


def build_reply(opened: dict, listings: Listings, frame: bytes, ring, slot) -> list:
    """One request frame → the reply frames (header bytes first); errors become error replies."""
    t0 = time.perf_counter()
    header, req = parse_request([frame])
    rid = header.get("id")
    try:
        split = opened[req.pack].split(req.split)
        ids = listings.get(req, len(split)).batch(req.batch)
        if req.op == "samples":
            reply = samples_reply(split, ids, req, rid)
        else:
            reply = batch_reply(split, ids, req, rid, ring, slot)
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
    recycle_large_allocations()  # a fresh batch array per reply: reuse heap, not new pages
    opened = {name: open_pack(path) for name, path in packs.items()}
    listings = Listings()
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
            reply = build_reply(opened, listings, request, ring, int(slot) if slot else None)
            sock.send_multipart([DONE, task, *reply], copy=False)
    finally:
        sock.close(0)
        if own_ctx:
            ctx.term()


# --- the pool ------------------------------------------------------------------------------


class BuilderPool:
    """``count`` builders of ``engine`` ('process' or 'thread') connected to ``endpoint``.
    Process builders must be started before the broker makes its ZeroMQ context."""

    def __init__(self, packs: dict[str, str], count: int, engine: str, ring, endpoint: str):
        self.packs = packs
        self.count = count
        self.engine = engine
        self.ring = ring
        self.endpoint = endpoint
        self._members: list = []

    def start(self, ctx=None, parent: int | None = None) -> None:
        for i in range(self.count):
            if self.engine == "process":
                m = mp.get_context("fork").Process(
                    target=builder_main,
                    args=(i, self.packs, self.endpoint, self.ring, None, parent),
                    daemon=True,
                    name=f"datasvc-builder-{i}",
                )
            else:
                m = threading.Thread(
                    target=builder_main,
                    args=(i, self.packs, self.endpoint, self.ring, ctx),
                    daemon=True,
                    name=f"datasvc-builder-{i}",
                )
            m.start()
            self._members.append(m)

    def dead(self) -> list[tuple[int, str]]:
        """(index, cause) of builders that died."""
        return [
            (i, f"exit code {getattr(m, 'exitcode', None)}")
            for i, m in enumerate(self._members)
            if not m.is_alive()
        ]

    def any_alive(self) -> bool:
        return any(m.is_alive() for m in self._members)

    def join(self, deadline: float) -> None:
        """Wait for the builders until ``deadline`` (monotonic); kill processes still there."""
        for m in self._members:
            m.join(timeout=max(0.1, deadline - time.monotonic()))
            if m.is_alive() and hasattr(m, "kill"):
                m.kill()
                m.join(timeout=1.0)
