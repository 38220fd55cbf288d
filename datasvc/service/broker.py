"""The broker: owns the client socket (a ROUTER), validates every request, queues valid ones as
tasks and hands them to idle builders, then sends each builder's reply to its client (the
images straight from the shared slot, without a copy). The broker keeps no progress state: a
request names everything that determines its batch, so any builder (or server) can build it.

Clients are served round-robin within their credits (``clients.py``); builders are supervised
(``builders.py``) and write into the shared slot ring (``slots.py``).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from datasvc.errors import UserError
from datasvc.lifecycle import pid_alive
from datasvc.service.auth import allowed_keys, is_loopback, load_keypair
from datasvc.service.builders import (
    DONE,
    READY,
    STOP,
    TASK,
    ProcessBuilders,
    ThreadBuilders,
    builder_identity,
    builder_index,
)
from datasvc.service.clients import ClientTable, FairQueue
from datasvc.service.metrics import LatencyHistogram, outcome_label
from datasvc.service.protocol import (
    MAX_REQUEST_BYTES,
    BatchRequest,
    Limits,
    ProtocolError,
    error_header,
    pack_header,
    parse_request,
)
from datasvc.service.slots import SlotRing

log = logging.getLogger(__name__)

SLOTS_PER_BUILDER = 2  # one batch being sent while the next is built
SPARE_SLOTS = 2  # for slots held by slow readers' sends
UNREAD_REPLIES = 2  # a client with this many replies not taken by the network is not reading
MAX_BUILD_DEATHS = 3  # builders that died holding one request: then it fails (no crash loop)
RECENT_DEATHS = 10  # builder deaths listed in stats
DRAIN_LINGER_S = 0.5  # a draining server answers "draining" at least this long before exiting


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    batches: int = 0
    images: int = 0
    bytes: int = 0
    errors: int = 0
    busy: int = 0  # requests answered "busy"
    dropped: int = 0  # error replies not sent: the client was not reading
    copied: int = 0  # batches sent as a copy: their client already had a slot on its way
    busy_s: float = 0.0
    clients: ClientTable = field(default_factory=ClientTable)
    # builder index → epoch listings its process has computed (from its latest reply)
    listings: dict = field(default_factory=dict)
    restarts: int = 0  # builders replaced after dying
    corrupt_skipped: int = 0  # records left out of replies as corrupt (on_corrupt="skip")
    outcomes: collections.Counter = field(default_factory=collections.Counter)  # by metric label
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    deaths: collections.deque = field(
        default_factory=lambda: collections.deque(maxlen=RECENT_DEATHS)
    )
    # per builder index (fixed-length lists: the metrics thread reads them while we write)
    builders: int = 1
    busy_s_by_builder: list = field(init=False)
    restarts_by_builder: list = field(init=False)

    def __post_init__(self) -> None:
        self.busy_s_by_builder = [0.0] * self.builders
        self.restarts_by_builder = [0] * self.builders

    def as_dict(self, builders: int) -> dict:
        up = max(1e-9, time.time() - self.started)
        return {
            "uptime_s": round(up, 1),
            "batches": self.batches,
            "images": self.images,
            "bytes": self.bytes,
            "errors": self.errors,
            "busy": self.busy,
            "dropped": self.dropped,
            "copied": self.copied,
            "images_per_s": round(self.images / up, 1),
            "bytes_per_image": round(self.bytes / self.images) if self.images else 0,
            "worker_busy": round(self.busy_s / (up * builders), 3),
            "clients": self.clients.as_dict(),
            "clients_forgotten": self.clients.forgotten,
            "listings_by_builder": {str(k): v for k, v in sorted(self.listings.items())},
            "builder_restarts": self.restarts,
            "corrupt_skipped": self.corrupt_skipped,
            "builder_deaths": list(self.deaths),
        }


@dataclass
class Task:
    """A validated request waiting for, or held by, a builder."""

    number: int
    client: bytes
    request_id: int | None
    # The request's bytes (a few hundred), copied out of the received frame so that a queued
    # task holds no libzmq message.
    frame: bytes
    builder: int | None = None
    slot: int | None = None
    deaths: int = 0  # builders that died while building it
    pinned: bool = False  # its reply is sent from its slot (not a copy)
    seq: int = -1  # its reply's delivery number to its client (batches only)
    received: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class BrokerConfig:
    """What ``datasvc serve`` was asked to do (validated by ``Broker``)."""

    packs: dict
    bind: str
    builders: int = 2
    engine: str = "auto"
    curve_secret: str | None = None
    curve_allow: str | None = None
    curve_allow_any: bool = False
    insecure: bool = False
    log_interval: float = 10.0
    drain_timeout: float = 30.0  # SIGTERM: seconds for the batches in flight, then exit
    max_queue: int = 1024
    hwm: int = 64
    limits: Limits = field(default_factory=Limits)
    announce: str | None = None  # endpoints file to add this server to while it serves
    metrics_port: int | None = None  # Prometheus /metrics on this port (0: any free one)
    metrics_addr: str = "0.0.0.0"
    advertise: str | None = None  # the endpoint written there (default: the bound one)


SERVE_DIR_PREFIX = "datasvc-serve-"


def make_serve_dir() -> Path:
    """This server's private folder for its builders' ipc socket, named after its pid.

    A server killed -9 cannot remove its folder; the next server on the machine removes those
    whose pid is gone, so a fleet host restarted for days does not fill its /tmp."""
    root = Path(tempfile.gettempdir())
    for old in root.glob(f"{SERVE_DIR_PREFIX}*-*"):
        pid = old.name[len(SERVE_DIR_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{SERVE_DIR_PREFIX}{os.getpid()}-", dir=root))


def _pack_sizes(packs: dict) -> tuple[dict, dict, dict]:
    """Per pack name: split sizes, class list, manifest digest (advertised in ping)."""
    from datasvc.packs import open_pack
    from datasvc.packs.manifest import manifest_digest

    sizes, classes, digests = {}, {}, {}
    for name, path in packs.items():
        manifest = open_pack(path).manifest
        sizes[name] = {s: v["num_samples"] for s, v in manifest["splits"].items()}
        classes[name] = list(manifest["classes"])
        digests[name] = manifest_digest(manifest)
    return sizes, classes, digests


class Broker:
    """Broker + builder pool serving ``config.packs`` at ``config.bind``."""

    def __init__(self, config: BrokerConfig):
        c = config
        if not is_loopback(c.bind) and not c.curve_secret and not c.insecure:
            raise ValueError(
                f"{c.bind} is beyond loopback: give --curve-secret and --curve-allow "
                "(CurveZMQ encryption and a client allow-list), or --insecure to serve plain TCP"
            )
        if c.engine not in ("auto", "process", "thread"):
            raise ValueError(f"engine must be 'auto', 'process' or 'thread', got {c.engine!r}")
        if bool(c.curve_secret) != bool(c.curve_allow or c.curve_allow_any):
            raise ValueError("--curve-secret and --curve-allow (or --curve-allow-any) go together")
        self.config = c
        # Process builders hand batches over in shared slots (no copy, no GIL) and matched
        # threads on a 2-core machine (BENCHMARKS.md); threads remain an option.
        self.engine = "process" if c.engine == "auto" else c.engine
        # Every batch the limits allow fits a slot (address space is reserved for all slots;
        # memory is used only as far as batches reach).
        self.slot_bytes = c.limits.max_batch_mb << 20
        self.sizes, self.classes, self.digests = _pack_sizes(c.packs)
        self.stats = Stats(builders=c.builders)
        self.endpoint = None
        self._stop = False  # stop now (a second SIGTERM, or SIGINT twice)
        self._draining = False  # finish what is in flight, refuse new work, then stop
        self._drain_deadline = 0.0
        self._reload = False  # SIGHUP: re-read the CURVE allow-list
        self._allowed: set | None = None  # allowed client keys (z85), None: any
        self._announced = None
        self._queue = FairQueue(self.stats.clients, c.limits.credits, c.max_queue)
        self._tasks: dict[int, Task] = {}  # by number: queued or held by a builder
        self._next_task = 0
        self._idle: collections.deque[int] = collections.deque()  # builder indices
        self._holding: dict[int, Task] = {}  # builder index → the task it builds
        self._unsent: list = []  # (task, tracker): replies libzmq still holds

    # --- start and stop ---------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Start the builders and sockets, serve until SIGTERM/SIGINT, then stop them all."""
        self._tmp = make_serve_dir()
        self._ctx = self.front = self.back = self._auth = self.pool = None
        slots = self.config.builders * SLOTS_PER_BUILDER + SPARE_SLOTS
        self.ring = SlotRing(slots, self.slot_bytes)
        previous = {
            sig: signal.signal(sig, handler)
            for sig, handler in (
                (signal.SIGTERM, self._on_stop_signal),
                (signal.SIGINT, self._on_stop_signal),
                (signal.SIGHUP, lambda *_: setattr(self, "_reload", True)),
            )
        }
        try:
            self._start()
            self._loop()
        finally:
            self._close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_stop_signal(self, *_) -> None:
        """The first SIGTERM/SIGINT drains; a second one stops at once."""
        if self._draining or self.endpoint is None:
            self._stop = True
        else:
            self._draining = True
            self._drain_deadline = time.monotonic() + self.config.drain_timeout
            # Requests already on their way get their "draining" reply, not silence.
            self._drain_linger = time.monotonic() + DRAIN_LINGER_S

    def _start(self) -> None:
        import zmq

        c = self.config
        inproc = self.engine == "thread"
        backend = "inproc://datasvc-builders" if inproc else f"ipc://{self._tmp}/builders"
        if not inproc:
            # Forked before any ZeroMQ context exists: the builders share the slot mapping.
            self.pool = ProcessBuilders(c.packs, c.builders, self.ring, backend)
        self._ctx = zmq.Context(1)
        self.back = self._ctx.socket(zmq.ROUTER)
        self.back.linger = 0
        self.back.router_handover = 1  # a replaced builder takes over its routing id
        self.back.router_mandatory = 1  # a send to a builder not (or no longer) there raises
        self.back.bind(backend)
        if inproc:
            self.pool = ThreadBuilders(c.packs, c.builders, self.ring, backend, self._ctx)
        self.front = self._front_socket()
        self._bind_front()
        log.info(
            "%s packs %s workers %d%s",
            self.endpoint,
            json.dumps(self.sizes),
            c.builders,
            " curve" if self._auth else "",
        )

    def _bind_front(self) -> None:
        import zmq

        try:
            self.front.bind(self.config.bind)
        except zmq.ZMQError as e:
            raise UserError(
                f"cannot bind {self.config.bind}: {e.strerror}",
                "stop the other server on that port or choose another --bind",
            ) from None
        self.endpoint = self.front.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.config.metrics_port is not None:
            from datasvc.service.metrics import start_metrics_server

            start_metrics_server(self, self.config.metrics_port, self.config.metrics_addr)
        if self.config.announce:
            from datasvc.service.membership import advertised_endpoint, announce

            self._announced = advertised_endpoint(self.endpoint, self.config.advertise)
            announce(self.config.announce, self._announced)

    def _withdraw(self) -> None:
        """Take this server out of its --announce file: clients stop asking it."""
        if self._announced:
            from datasvc.service.membership import withdraw

            withdraw(self.config.announce, self._announced)
            self._announced = None

    def _front_socket(self):
        import zmq

        front = self._ctx.socket(zmq.ROUTER)
        front.linger = 0
        front.maxmsgsize = MAX_REQUEST_BYTES
        # A client's replies are bounded by its credits (+ 1, see clients.py): its pipe must hold
        # them all, since a full pipe drops messages.
        front.sndhwm = max(self.config.hwm, 2 * self.config.limits.credits + 8)
        front.rcvhwm = self.config.hwm * 4
        if self.config.curve_secret:
            from zmq.auth.thread import ThreadAuthenticator

            pub, sec = load_keypair(self.config.curve_secret)
            if sec is None:
                raise ValueError(f"{self.config.curve_secret} holds no secret key")
            self._auth = ThreadAuthenticator(self._ctx)
            self._auth.start()
            if self.config.curve_allow_any:
                self._auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
            else:
                self._allowed = {k.decode() for k in allowed_keys(self.config.curve_allow)}
                self._auth.configure_curve(domain="*", location=str(self.config.curve_allow))
            front.curve_publickey, front.curve_secretkey = pub, sec
            front.curve_server = True
        return front

    def _close(self) -> None:
        self._withdraw()  # first: clients stop asking
        started = self.endpoint is not None
        if self.pool is not None:
            self._stop_builders(grace=3.0 if started else 0.0)
        if self._auth:
            self._auth.stop()
        if self.front is not None:
            # After a drain, let the last replies leave (bounded: a client may not read).
            self.front.close(linger=1000 if self._draining else 0)
        if self.back is not None:
            self.back.close(0)
        if self._ctx is not None and not (self.pool and self.pool.any_alive()):
            self._ctx.term()  # a thread builder still holding a socket would block term()
        self.ring.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _stop_builders(self, grace: float) -> None:
        """Tell builders to stop (busy ones once they report back), give them ``grace``
        seconds, then end the pool."""
        import zmq

        stopped: set[int] = set()
        deadline = time.monotonic() + grace
        while self.back is not None and time.monotonic() < deadline:
            for i in range(self.config.builders):
                if i not in stopped and i not in self._holding:
                    try:
                        self.back.send_multipart([builder_identity(i), STOP])
                        stopped.add(i)
                    except zmq.ZMQError:
                        pass  # not connected (yet, or any more)
            if len(stopped) == self.config.builders:
                break
            if self.back.poll(50):
                frames = self.back.recv_multipart()
                self._holding.pop(builder_index(frames[0]), None)
        self.pool.stop(max(0.0, deadline - time.monotonic()))

    # --- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        if self.pool.supervised:
            poller.register(self.pool.fileno(), zmq.POLLIN)
        last_log, last_images = time.time(), 0
        drain_logged = False
        while not self._stop:
            if self._draining:
                if not drain_logged:
                    self._begin_drain()
                    drain_logged = True
                if time.monotonic() > self._drain_deadline or (
                    not self._tasks and time.monotonic() > self._drain_linger
                ):
                    self._end_drain()
                    return
            if self._reload:
                self._reload = False
                self._reload_allow_list()
            events = dict(poller.poll(100 if self._draining else 500))
            if self.pool.supervised and self.pool.fileno() in events:
                self._on_pool_events(self.pool.events())
            if self.back in events:
                self._on_builder(self.back.recv_multipart(copy=False))
            if self.front in events:
                self._on_client(self.front.recv_multipart(copy=False))
            self.ring.reclaim()
            self._release_sent()
            self._dispatch()
            now = time.time()
            if self.config.log_interval and now - last_log >= self.config.log_interval:
                self._log_stats((self.stats.images - last_images) / (now - last_log))
                last_log, last_images = now, self.stats.images

    def _begin_drain(self) -> None:
        self._withdraw()
        log.info(
            "draining: %d requests in flight finish (at most %.0fs); new ones are answered "
            "'draining'",
            len(self._tasks),
            self.config.drain_timeout,
        )

    def _end_drain(self) -> None:
        if self._tasks:
            log.warning("drain timeout: %d requests left unanswered", len(self._tasks))
        log.info("drained; %d batches served; exiting", self.stats.batches)

    def _reload_allow_list(self) -> None:
        """SIGHUP: re-read --curve-allow; keys no longer there are refused from now on, on new
        and open connections alike. A folder that cannot be read keeps the old list."""
        if self._allowed is None:
            log.info("SIGHUP: no allow-list to re-read (none given, or --curve-allow-any)")
            return
        folder = self.config.curve_allow
        try:
            keys = {k.decode() for k in allowed_keys(folder)} if Path(folder).is_dir() else set()
        except UserError as e:
            log.error("SIGHUP: %s; keeping the previous allow-list", e)
            return
        if not keys:
            log.error("SIGHUP: %s is missing or empty; keeping the previous allow-list", folder)
            return
        self._auth.configure_curve(domain="*", location=str(folder))
        added, removed = len(keys - self._allowed), len(self._allowed - keys)
        self._allowed = keys
        log.info(
            "SIGHUP: allow-list re-read: %d keys (%d added, %d revoked)", len(keys), added, removed
        )

    def _log_stats(self, rate: float) -> None:
        st = self.stats.as_dict(self.config.builders)
        log.info(
            "%d batches, %d images, %.0f img/s, %d clients, %d errors, worker busy %.2f",
            st["batches"],
            st["images"],
            rate,
            len(self.stats.clients),
            st["errors"],
            st["worker_busy"],
        )

    def _maybe_idle(self, builder: int) -> None:
        """A builder that holds no task can take the next one."""
        if builder not in self._holding and builder not in self._idle:
            self._idle.append(builder)

    def _dispatch(self) -> None:
        import zmq

        while self._idle and self._queue and self.ring.free():
            task = self._queue.pop()
            builder = self._idle.popleft()
            slot = self.ring.take()
            number = b"%d" % task.number
            try:
                self.back.send_multipart(
                    [builder_identity(builder), TASK, number, task.frame, b"%d" % slot],
                    copy=False,
                )
            except zmq.ZMQError:
                # Gone (its death is on its way from the spawner): the task waits for another.
                self.ring.give_back(slot)
                self._queue.push_back(task)
                continue
            task.builder, task.slot = builder, slot
            self._holding[builder] = task

    # --- supervision ------------------------------------------------------------------------

    def _on_pool_events(self, events: list[tuple]) -> None:
        for event in events:
            if event[0] == "died" and not self._stop:
                self._on_builder_died(*event[1:])

    def _on_builder_died(self, builder: int, pid: int, cause: str) -> None:
        """Replace the builder; its task goes back to the front of the queue, or fails once
        ``MAX_BUILD_DEATHS`` builders have died on it."""
        self.stats.restarts += 1
        self.stats.restarts_by_builder[builder] += 1
        self.stats.deaths.append({"builder": builder, "pid": pid, "cause": cause, "t": time.time()})
        if builder in self._idle:
            self._idle.remove(builder)
        task = self._holding.pop(builder, None)
        what = "idle"
        if task is not None:
            self.ring.give_back(task.slot)
            task.deaths += 1
            what = f"building {self._describe(task)} (death {task.deaths} on it)"
            if task.deaths >= MAX_BUILD_DEATHS:
                self._fail_task(task, cause)
            else:
                self._queue.push_back(task)
        log.warning("builder %d (pid %d) died, %s, %s; replacing it", builder, pid, cause, what)
        self.pool.spawn(builder)

    def _fail_task(self, task: Task, cause: str) -> None:
        del self._tasks[task.number]
        self._queue.done(task)
        self.stats.errors += 1
        self.stats.clients[task.client].errors += 1
        self.stats.outcomes["crash"] += 1
        message = (
            f"{MAX_BUILD_DEATHS} builders died building {self._describe(task)} "
            f"(last: {cause}); this request is not retried"
        )
        log.error(message)
        self.front.send_multipart([task.client, error_header(task.request_id, "crash", message)])

    @staticmethod
    def _describe(task: Task) -> str:
        """The batch a task asks for, in words (the request was validated, so it parses)."""
        _, req = parse_request([task.frame])
        return (
            f"batch {req.batch} of {req.pack}/{req.split} (epoch {req.epoch}, rank {req.rank}"
            f"/{req.world_size}, seed {req.seed}, batch size {req.batch_size})"
        )

    # --- builders' messages -----------------------------------------------------------------

    def _on_builder(self, frames) -> None:
        builder = builder_index(frames[0].bytes)
        kind = frames[1].bytes
        if kind == READY:
            self._maybe_idle(builder)
            return
        if kind != DONE:
            log.error("builder %d sent an unknown frame %r", builder, kind[:16])
            return
        task = self._holding.get(builder)
        if task is None or task.number != int(frames[2].bytes):
            return  # from a builder since replaced; its task went to another
        del self._holding[builder]
        del self._tasks[task.number]
        self._deliver(task, frames[3], frames[4:])
        self._maybe_idle(builder)

    def _deliver(self, task: Task, head, buffers) -> None:
        """Send a builder's reply to its client. A batch's credit stays taken until libzmq has
        handed it to the network, so a client that does not read holds its credits (and then
        gets "busy"), not the others' share."""
        header = msgpack.unpackb(head.bytes, raw=False)
        slot = header.pop("slot", None)
        tracker = None
        if slot is not None:
            images, tracker = self._images_frame(task, slot, header["shape"])
            cs = self.stats.clients[task.client]
            task.seq = header["seq"] = cs.delivered  # the client names it read by this
            cs.delivered += 1
            out = [msgpack.packb(header, use_bin_type=True), images, *buffers]
        else:
            self.ring.give_back(task.slot)  # an error or encoded samples
            out = [head, *buffers]
        self._count(task, header, out)
        self.front.send_multipart([task.client, *out], copy=False)
        self.stats.latency.observe(time.monotonic() - task.received)
        self._queue.done(task)
        if tracker is not None:
            self.stats.clients[task.client].unsent += 1
            self._unsent.append((task, tracker))

    def _images_frame(self, task: Task, slot: int, shape: list) -> tuple:
        """The batch's images as a tracked frame: the slot itself (no copy), or, when this
        client already has a slot on its way, a copy, so a slow reader pins one slot at most
        and the builders keep theirs."""
        n_bytes = 1
        for d in shape:
            n_bytes *= d
        cs = self.stats.clients[task.client]
        if cs.sending:
            import zmq

            frame = zmq.Frame(self.ring.copy_out(slot, n_bytes), track=True)
            self.ring.give_back(slot)
            self.stats.copied += 1
            return frame, frame.tracker
        cs.sending += 1
        task.pinned = True
        frame = self.ring.send_frame(slot, n_bytes)
        return frame, frame.tracker

    def _release_sent(self) -> None:
        """Replies libzmq is done with give their client's credit back."""
        still = []
        for task, tracker in self._unsent:
            if tracker.done:
                cs = self.stats.clients[task.client]
                cs.unsent -= 1
                cs.sending -= task.pinned
            else:
                still.append((task, tracker))
        self._unsent = still
        self._queue.unsent = len(still)

    def _count_unread(self, client: bytes, cs) -> None:
        """The client's replies libzmq still holds and the client has not said it read."""
        cs.unread = sum(1 for t, _ in self._unsent if t.client == client and t.seq >= cs.got)

    def _count(self, task: Task, header: dict, out: list) -> None:
        cs = self.stats.clients[task.client]
        if "listings" in header:
            self.stats.listings[task.builder] = header["listings"]
        if header.get("ok"):
            size = sum(len(f) if isinstance(f, bytes) else len(f.buffer) for f in out)
            self.stats.batches += 1
            self.stats.images += header["n"]
            self.stats.bytes += size
            self.stats.busy_s += header.get("busy_s", 0.0)
            self.stats.busy_s_by_builder[task.builder] += header.get("busy_s", 0.0)
            self.stats.corrupt_skipped += len(header.get("skipped") or ())
            cs.batches += 1
            cs.images += header["n"]
            cs.bytes += size
        else:
            self.stats.errors += 1
            cs.errors += 1
        self.stats.outcomes[outcome_label(None if header.get("ok") else header.get("error"))] += 1

    # --- clients' messages ------------------------------------------------------------------

    def _on_client(self, frames) -> None:
        client = frames[0].bytes
        cs = self.stats.clients[client]
        cs.requests += 1
        rid = None
        try:
            header, req = parse_request([f.bytes for f in frames[1:]])
            rid = header.get("id")
            self._check_allowed(frames[1])
            if req is None:
                self.front.send_multipart([client, self._control_reply(header)])
                return
            if self._draining:
                raise ProtocolError("draining", "this server is stopping; ask another one")
            self._check(req)
            cs.got = max(cs.got, min(header.get("got", 0), cs.delivered))
            self._release_sent()  # a reply the network just took frees its credit first
            self._count_unread(client, cs)
            refusal = self._queue.refusal(client)
            if refusal:
                self.stats.busy += 1
                self.stats.outcomes["busy"] += 1
                cs.busy += 1
                self._refuse(client, cs, error_header(rid, "busy", refusal))
                return
            self._enqueue(client, rid, frames[1].bytes)
        except ProtocolError as e:
            self.stats.errors += 1
            self.stats.outcomes[outcome_label(e.code)] += 1
            cs.errors += 1
            rid = e.request_id if rid is None else rid
            self._refuse(client, cs, error_header(rid, e.code, str(e)))

    def _refuse(self, client: bytes, cs, reply: bytes) -> None:
        """Send an error reply, unless the client is not reading (two replies the network has
        not taken): more replies would fill its pipe, and a full pipe drops messages, batches
        too, which would free the credits they hold."""
        if cs.unsent >= UNREAD_REPLIES:
            self.stats.dropped += 1
            cs.dropped += 1
            return
        self.front.send_multipart([client, reply])

    def queue_depth(self) -> int:
        """Requests queued, not yet given to a builder (read by the metrics thread)."""
        return self._queue.queued

    def tasks_in_flight(self) -> list[int]:
        """Per builder index, the tasks it is building now (0 or 1; read by the metrics
        thread)."""
        holding = self._holding
        return [int(i in holding) for i in range(self.config.builders)]

    def _check_allowed(self, frame) -> None:
        """A client whose key was revoked (SIGHUP) is refused even on an open connection."""
        if self._allowed is not None and frame.get("User-Id") not in self._allowed:
            raise ProtocolError(
                "auth", "this client's CURVE key is no longer on the server's allow-list"
            )

    def _enqueue(self, client: bytes, rid, frame) -> None:
        task = Task(self._next_task, client, rid, frame)
        self._next_task += 1
        self._tasks[task.number] = task
        self._queue.push(task)

    def _control_reply(self, header: dict) -> bytes:
        rid = header.get("id")
        if header["op"] == "stats":
            body = self.stats.as_dict(self.config.builders)
            body["packs"] = self.sizes
            body["queued"] = self._queue.queued
            body["builders"] = self.config.builders
            body["builder_pids"] = [self.pool.pids.get(i) for i in range(self.config.builders)]
            body["builders_busy"] = sorted(self._holding)
            return pack_header({"id": rid, "ok": True, "op": "stats", "stats": body})
        return pack_header(
            {
                "id": rid,
                "ok": True,
                "op": "pong",
                "packs": self.sizes,
                "classes": self.classes,
                "digests": self.digests,
                "workers": self.config.builders,
                "limits": self.config.limits.as_dict(),
                "draining": self._draining,
            }
        )

    def _check(self, req: BatchRequest) -> None:
        from datasvc.sampling import EpochSampler

        self.config.limits.check(req)
        if req.pack not in self.sizes:
            raise ProtocolError(
                "pack", f"unknown pack {req.pack!r}; served: {', '.join(sorted(self.sizes))}"
            )
        if req.op == "segments" and not req.train:
            raise ProtocolError("field", "op 'segments' is for train requests; eval is decoded")
        splits = self.sizes[req.pack]
        if req.split not in splits:
            raise ProtocolError(
                "split",
                f"pack {req.pack!r} has no split {req.split!r}; splits: {', '.join(splits)}",
            )
        n = len(
            EpochSampler(
                splits[req.split],
                req.batch_size,
                rank=req.rank,
                world_size=req.world_size,
                shuffle=req.train,
                drop_last=req.train,
            )
        )
        if req.batch >= n:
            raise ProtocolError(
                "range",
                f"batch {req.batch} is past the end of the epoch "
                f"listing ({n} batches for this rank)",
            )
