"""``datasvc serve``: a broker process and batch builders that work on request.

The broker binds a ROUTER socket for clients, validates every request, and hands valid ones
to idle builders (least-recently-used queue). Builders build batches with the same code as the
``custom`` loader. Process builders (the default) are forked before the broker makes its
ZeroMQ context and write each batch into a slot of a shared anonymous mapping that the broker
names; the broker sends that slot to the client without copying it and gives it back once
libzmq is done with it. Thread builders hand their arrays over inproc. The server keeps no
progress state: a request names everything that determines its batch.
"""

from __future__ import annotations

import collections
import json
import mmap
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np

from datasvc.service.auth import is_loopback, load_keypair
from datasvc.service.protocol import (
    MAX_REQUEST_BYTES,
    BatchRequest,
    ProtocolError,
    error_header,
    pack_header,
    parse_request,
)

SLOTS_PER_WORKER = 2  # process builders: one batch being sent while the next is built


def parse_pack_args(items: list[str]) -> dict[str, str]:
    """``NAME=PATH`` or ``PATH`` (named by its folder) → {name: path}."""
    packs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            path, name = item, Path(item.rstrip("/")).name
        if name in packs:
            raise ValueError(f"pack name {name!r} given twice")
        packs[name] = path
    if not packs:
        raise ValueError("name at least one pack to serve")
    return packs


# --- workers -------------------------------------------------------------------------------


class _Listings:
    """Epoch listings by request key; a small LRU, since a permutation costs O(samples)."""

    def __init__(self, size: int = 16):
        self.size = size
        self._d: collections.OrderedDict = collections.OrderedDict()

    def get(self, req: BatchRequest, n: int):
        from datasvc.sampling import EpochSampler

        key = req.key()
        s = self._d.get(key)
        if s is None:
            s = EpochSampler(
                n,
                req.batch_size,
                rank=req.rank,
                world_size=req.world_size,
                seed=req.seed,
                shuffle=req.train,
                drop_last=req.train,
            )
            s.set_epoch(req.epoch)
            self._d[key] = s
            if len(self._d) > self.size:
                self._d.popitem(last=False)
        self._d.move_to_end(key)
        return s


def worker_main(
    index: int, packs: dict[str, str], backend: str, ctx=None, parent=None, ring=None, slot_bytes=0
) -> None:
    """One worker. A thread worker shares the broker's context and hands batches over inproc
    (no copies). A process worker (forked before the broker makes its context) makes its own
    context and socket, and writes each batch into the slot of the shared ``ring`` that the
    broker names in the task; the broker sends the slot to the client without a copy."""
    import zmq

    from datasvc.augment import train_crop
    from datasvc.batch import fill_batch
    from datasvc.packs import open_pack

    own_ctx = ctx is None
    if own_ctx:
        from datasvc.lifecycle import die_with_parent

        die_with_parent(parent)
        # A Ctrl-C or SIGTERM to the process group is for the broker, which stops us in turn.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        ctx = zmq.Context(1)
    from datasvc.memory import recycle_large_allocations

    recycle_large_allocations()  # a fresh batch array per reply: reuse heap, not new pages
    opened = {name: open_pack(path) for name, path in packs.items()}
    listings = _Listings()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(backend)
    sock.send_multipart([b"READY", str(index).encode()])
    try:
        while True:
            frames = sock.recv_multipart(copy=True)
            if frames == [b"STOP"]:
                return
            client, frame = frames[0], frames[1]
            slot = int(frames[2]) if len(frames) > 2 else None
            t0 = time.perf_counter()
            header, req = parse_request([frame])
            rid = header.get("id")
            split = opened[req.pack].split(req.split)
            try:
                ids = listings.get(req, len(split)).batch(req.batch)
                cfg = req.transform_config()
                if req.op == "samples":
                    reply = _samples_reply(split, ids, cfg, req, rid, train_crop)
                else:
                    s = req.image_size
                    shape = (len(ids), s, s, 3)
                    nbytes = len(ids) * s * s * 3
                    in_ring = slot is not None and nbytes <= slot_bytes
                    if in_ring:
                        images = np.frombuffer(ring, np.uint8, nbytes, slot * slot_bytes)
                        images = images.reshape(shape)
                    else:
                        # Fresh arrays per batch: they leave without a copy, and libzmq may
                        # still hold them while the next batch is being built.
                        images = np.empty(shape, np.uint8)
                    labels = np.empty(len(ids), np.int64)
                    fill_batch(split, ids, cfg, req.seed, req.epoch, images, labels)
                    head = pack_header(
                        {
                            "id": rid,
                            "ok": True,
                            "op": "batch",
                            "n": len(ids),
                            "shape": list(images.shape),
                            "layout": "NHWC",
                            "batch": req.batch,
                            "epoch": req.epoch,
                            "busy_s": time.perf_counter() - t0,
                            "slot": slot if in_ring else None,
                        }
                    )
                    ids = np.ascontiguousarray(ids, np.int64)
                    reply = [head, labels, ids] if in_ring else [head, images, labels, ids]
            except Exception as e:  # noqa: BLE001 - reported to the client, worker lives on
                reply = [error_header(rid, "build", f"{type(e).__name__}: {e}")]
            sock.send_multipart([client, *reply], copy=False)
    finally:
        sock.close(0)
        if own_ctx:
            ctx.term()


def _samples_reply(split, ids, cfg, req, rid, train_crop) -> list:
    """Encoded samples plus their crop parameters, for clients that decode on their GPU."""
    from datasvc.augment import eval_geometry

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
    head = pack_header(
        {
            "id": rid,
            "ok": True,
            "op": "samples",
            "n": len(ids),
            "batch": req.batch,
            "epoch": req.epoch,
            "meta": meta,
        }
    )
    return [head, b"".join(images)]


# --- broker --------------------------------------------------------------------------------


@dataclass
class ClientStats:
    requests: int = 0
    batches: int = 0
    images: int = 0
    bytes: int = 0
    errors: int = 0


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    batches: int = 0
    images: int = 0
    bytes: int = 0
    errors: int = 0
    busy_s: float = 0.0
    clients: dict = field(default_factory=lambda: collections.defaultdict(ClientStats))

    def as_dict(self, workers: int) -> dict:
        up = max(1e-9, time.time() - self.started)
        return {
            "uptime_s": round(up, 1),
            "batches": self.batches,
            "images": self.images,
            "bytes": self.bytes,
            "errors": self.errors,
            "images_per_s": round(self.images / up, 1),
            "bytes_per_image": round(self.bytes / self.images) if self.images else 0,
            "worker_busy": round(self.busy_s / (up * workers), 3),
            "clients": {k: vars(v) for k, v in self.clients.items()},
        }


class Server:
    """Broker + ``workers`` processes serving ``packs`` at ``bind``."""

    def __init__(
        self,
        packs: dict[str, str],
        bind: str,
        workers: int = 2,
        *,
        curve_secret: str | None = None,
        curve_allow: str | None = None,
        insecure: bool = False,
        log_interval: float = 10.0,
        max_queue: int = 1024,
        hwm: int = 64,
        engine: str = "auto",
        max_batch_mb: int = 64,
    ):
        from datasvc.packs import open_pack

        if not is_loopback(bind) and not curve_secret and not insecure:
            raise ValueError(
                f"{bind} is beyond loopback: give --curve-secret and --curve-allow "
                "(CurveZMQ encryption and a client allow-list), or --insecure to serve plain TCP"
            )
        # Process builders write batches up to this size into shared slots (address space is
        # reserved, memory is used only as far as batches reach); larger ones travel by ipc.
        self.slot_bytes = max_batch_mb << 20
        if engine not in ("auto", "process", "thread"):
            raise ValueError(f"engine must be 'auto', 'process' or 'thread', got {engine!r}")
        # Process builders hand batches over in shared slots (no copy, no GIL) and matched
        # threads on a 2-core machine (BENCHMARKS.md); threads remain an option.
        self.engine = "process" if engine == "auto" else engine
        if bool(curve_secret) != bool(curve_allow):
            raise ValueError("--curve-secret and --curve-allow go together")
        self.packs = packs
        self.bind = bind
        self.workers = workers
        self.curve_secret = curve_secret
        self.curve_allow = curve_allow
        self.log_interval = log_interval
        self.max_queue = max_queue
        self.hwm = hwm
        self.sizes = {}
        self.classes = {}
        for name, path in packs.items():
            manifest = open_pack(path).manifest
            self.sizes[name] = {s: v["num_samples"] for s, v in manifest["splits"].items()}
            self.classes[name] = list(manifest["classes"])
        self.stats = Stats()
        self._stop = False

    def _check(self, req: BatchRequest) -> None:
        from datasvc.sampling import EpochSampler

        if req.pack not in self.sizes:
            raise ProtocolError(
                "pack", f"unknown pack {req.pack!r}; served: {', '.join(sorted(self.sizes))}"
            )
        splits = self.sizes[req.pack]
        if req.split not in splits:
            raise ProtocolError(
                "split",
                f"pack {req.pack!r} has no split {req.split!r}; splits: {', '.join(splits)}",
            )
        n = EpochSampler(
            splits[req.split],
            req.batch_size,
            rank=req.rank,
            world_size=req.world_size,
            shuffle=req.train,
            drop_last=req.train,
        ).__len__()
        if req.batch >= n:
            raise ProtocolError(
                "range",
                f"batch {req.batch} is past the end of the epoch "
                f"listing ({n} batches for this rank)",
            )

    def serve_forever(self) -> None:
        import zmq

        tmp = Path(tempfile.mkdtemp(prefix="datasvc-serve-"))
        self._ring = None
        if self.engine == "process":
            # Forked before any ZeroMQ context exists, so the builders share an anonymous
            # mapping of batch slots (pages are only backed once written).
            backend = f"ipc://{tmp}/workers"
            n_slots = SLOTS_PER_WORKER * self.workers
            self._ring = mmap.mmap(-1, n_slots * self.slot_bytes)
            ctx_mp = mp.get_context("fork")
            procs = [
                ctx_mp.Process(
                    target=worker_main,
                    args=(i, self.packs, backend, None, os.getpid(), self._ring, self.slot_bytes),
                    daemon=True,
                    name=f"datasvc-worker-{i}",
                )
                for i in range(self.workers)
            ]
            for p in procs:
                p.start()
        ctx = zmq.Context(1)
        back = ctx.socket(zmq.ROUTER)
        if self.engine == "process":
            back.bind(backend)
        else:
            backend = "inproc://datasvc-workers"
            back.bind(backend)
            procs = [
                threading.Thread(
                    target=worker_main,
                    args=(i, self.packs, backend, ctx),
                    daemon=True,
                    name=f"datasvc-worker-{i}",
                )
                for i in range(self.workers)
            ]
            for p in procs:
                p.start()
        front = ctx.socket(zmq.ROUTER)
        auth = None
        for s in (front, back):
            s.linger = 0
        front.maxmsgsize = MAX_REQUEST_BYTES
        front.sndhwm = self.hwm  # a client that stops reading gets dropped messages, not memory
        front.rcvhwm = self.hwm * 4
        if self.curve_secret:
            from zmq.auth.thread import ThreadAuthenticator

            auth = ThreadAuthenticator(ctx)
            auth.start()
            auth.configure_curve(domain="*", location=str(self.curve_allow))
            pub, sec = load_keypair(self.curve_secret)
            if sec is None:
                raise ValueError(f"{self.curve_secret} holds no secret key")
            front.curve_publickey, front.curve_secretkey = pub, sec
            front.curve_server = True
        front.bind(self.bind)
        self.endpoint = front.getsockopt_string(zmq.LAST_ENDPOINT)
        print(
            f"datasvc serve: {self.endpoint} packs {json.dumps(self.sizes)} "
            f"workers {self.workers}{' curve' if auth else ''}",
            file=sys.stderr,
            flush=True,
        )
        idle: collections.deque = collections.deque()
        queue: collections.deque = collections.deque()
        self._free: dict[bytes, list[int]] = {}
        self._assigned: dict[bytes, int] = {}
        self._busy: set[bytes] = set()
        self._pending: list = []
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        poller.register(back, zmq.POLLIN)
        last_log = time.time()
        last_images = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: setattr(self, "_stop", True))
        try:
            while not self._stop:
                events = dict(poller.poll(500))
                if back in events:
                    self._from_worker(back.recv_multipart(copy=False), front, idle)
                if front in events:
                    self._from_client(front.recv_multipart(copy=False), front, queue)
                self._reclaim(idle)
                while idle and queue:
                    client, frame = queue.popleft()
                    worker = idle.popleft()
                    extra = []
                    if self._ring is not None:
                        slot = self._free[worker].pop()
                        self._assigned[worker] = slot
                        extra = [str(slot).encode()]
                    self._busy.add(worker)
                    back.send_multipart([worker, client, frame, *extra], copy=False)
                dead = [p for p in procs if not p.is_alive()]
                if dead and not self._stop:
                    code = getattr(dead[0], "exitcode", None)
                    raise RuntimeError(f"worker {dead[0].name} died (exit code {code})")
                now = time.time()
                if self.log_interval and now - last_log >= self.log_interval:
                    rate = (self.stats.images - last_images) / (now - last_log)
                    st = self.stats.as_dict(self.workers)
                    print(
                        f"datasvc serve: {st['batches']} batches, {st['images']} images, "
                        f"{rate:.0f} img/s, {len(st['clients'])} clients, {st['errors']} errors,"
                        f" worker busy {st['worker_busy']:.2f}",
                        file=sys.stderr,
                        flush=True,
                    )
                    last_log, last_images = now, self.stats.images
        finally:
            self._stop_workers(back, idle, procs)
            if auth:
                auth.stop()
            front.close(0)
            back.close(0)
            if not any(p.is_alive() for p in procs):
                ctx.term()  # a thread worker still holding a socket would block term()
            shutil.rmtree(tmp, ignore_errors=True)

    def _stop_workers(self, back, idle, procs, grace: float = 3.0) -> None:
        """Tell idle workers to stop, and busy ones as soon as they report back."""
        import zmq

        stopped = 0
        deadline = time.monotonic() + grace
        while stopped < len(procs) and time.monotonic() < deadline:
            while idle:
                try:
                    back.send_multipart([idle.popleft(), b"STOP"])
                    stopped += 1
                except zmq.ZMQError:
                    pass
            if back.poll(100):
                idle.append(back.recv_multipart()[0])
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
            if p.is_alive() and hasattr(p, "kill"):
                p.kill()

    def _reclaim(self, idle) -> None:
        """Slots whose send has completed go back to their worker; a worker with a free slot
        and nothing to do is idle again."""
        still = []
        for worker, slot, tracker in self._pending:
            if tracker.done:
                self._free[worker].append(slot)
                if worker not in self._busy and worker not in idle:
                    idle.append(worker)
            else:
                still.append((worker, slot, tracker))
        self._pending = still

    def _from_worker(self, frames, front, idle) -> None:
        import zmq

        worker = frames[0].bytes
        if frames[1].bytes == b"READY":
            if self._ring is not None:
                index = int(frames[2].bytes)
                first = index * SLOTS_PER_WORKER
                self._free[worker] = list(range(first, first + SLOTS_PER_WORKER))
            idle.append(worker)
            return
        self._busy.discard(worker)
        slot = self._assigned.pop(worker, None)
        client, head = frames[1], frames[2]
        header = msgpack.unpackb(head.bytes, raw=False)
        out = list(frames[1:])
        if header.get("slot") is not None:
            # The batch is in the shared ring: send the slot itself, and take it back once
            # libzmq is done with it.
            n_bytes = int(np.prod(header["shape"]))
            base = header.pop("slot") * self.slot_bytes
            images = zmq.Frame(memoryview(self._ring)[base : base + n_bytes], track=True)
            self._pending.append((worker, slot, images.tracker))
            out = [client, msgpack.packb(header, use_bin_type=True), images, *frames[3:]]
        elif slot is not None:
            self._free[worker].append(slot)  # an error or an oversized batch left it unused
        cs = self.stats.clients[client.bytes.hex()]
        if header.get("ok"):
            n = header["n"]
            size = sum(len(f) if isinstance(f, bytes) else len(f.buffer) for f in out[1:])
            self.stats.batches += 1
            self.stats.images += n
            self.stats.bytes += size
            self.stats.busy_s += header.get("busy_s", 0.0)
            cs.batches += 1
            cs.images += n
            cs.bytes += size
        else:
            self.stats.errors += 1
            cs.errors += 1
        front.send_multipart(out, copy=False)
        if self._ring is None or self._free[worker]:
            idle.append(worker)

    def _from_client(self, frames, front, queue) -> None:
        client = frames[0]
        cs = self.stats.clients[client.bytes.hex()]
        cs.requests += 1
        rid = None
        try:
            header, req = parse_request([f.bytes for f in frames[1:]])
            rid = header.get("id")
            if req is None:
                if header["op"] == "stats":
                    body = self.stats.as_dict(self.workers)
                    body["packs"] = self.sizes
                    reply = pack_header({"id": rid, "ok": True, "op": "stats", "stats": body})
                else:
                    reply = pack_header(
                        {
                            "id": rid,
                            "ok": True,
                            "op": "pong",
                            "packs": self.sizes,
                            "classes": self.classes,
                            "workers": self.workers,
                        }
                    )
                front.send_multipart([client, reply])
                return
            self._check(req)
            if len(queue) >= self.max_queue:
                raise ProtocolError("busy", f"server queue full ({self.max_queue}); retry later")
            queue.append((client, frames[1]))
        except ProtocolError as e:
            self.stats.errors += 1
            cs.errors += 1
            front.send_multipart([client, error_header(rid, e.code, str(e))])


def add_arguments(p) -> None:
    p.add_argument(
        "packs", nargs="+", help="packs to serve: PATH (named by its folder) or NAME=PATH"
    )
    p.add_argument("--bind", default="tcp://127.0.0.1:5555")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="batch-building processes (default: the cores this process may use)",
    )
    p.add_argument("--curve-secret", help="server key file (from `datasvc keys`) with its secret")
    p.add_argument("--curve-allow", help="folder of allowed clients' public .key files")
    p.add_argument("--insecure", action="store_true", help="allow plain TCP beyond loopback")
    p.add_argument("--log-interval", type=float, default=10.0, help="seconds between stats lines")
    p.add_argument(
        "--engine",
        choices=["auto", "process", "thread"],
        default="auto",
        help="batch builders as processes (shared-memory slots; auto) or threads (inproc)",
    )
    p.add_argument(
        "--max-batch-mb",
        type=int,
        default=64,
        help="largest batch that process builders hand over in shared memory (bigger: by ipc)",
    )


def main(a) -> int:
    try:
        server = Server(
            parse_pack_args(a.packs),
            a.bind,
            a.workers or len(os.sched_getaffinity(0)),
            curve_secret=a.curve_secret,
            curve_allow=a.curve_allow,
            insecure=a.insecure,
            log_interval=a.log_interval,
            engine=a.engine,
            max_batch_mb=a.max_batch_mb,
        )
    except (ValueError, KeyError, OSError) as e:
        print(f"datasvc serve: error: {e}", file=sys.stderr)
        return 2
    server.serve_forever()
    return 0
