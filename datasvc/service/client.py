"""The service's client side: requests spread over the job's servers with at most ``credits``
in flight per server; a request that times out is re-asked elsewhere; no live server for
``dead_after`` seconds raises instead of hanging.

The servers are a membership spec (``membership.py``): a comma list, ``dns:NAME:PORT`` or
``file:PATH``, re-resolved while an epoch runs. A server that appears is pinged and, once its
answer shows it serves the job's pack (the same manifest digest as the first server that
answered: one job, one pack), gets requests; one that leaves the spec, drains or stops
answering gets no new ones. Exactly-once lives here: each batch index is delivered once, the
first reply wins, and a batch lost with its server is asked again elsewhere.

Only a batch is progress: a server that keeps answering "no" (busy, draining) cannot keep a
client waiting past ``dead_after``, and any other error reply raises at once. A reply whose
request id the server could not read is tied to the oldest request in flight on that server. A
refused CURVE handshake (seen on the socket monitor) raises ``AuthenticationError`` naming the
server within moments, unless another server has accepted this client.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import logging
import time
from dataclasses import dataclass

from datasvc.corrupt import CorruptRecordError
from datasvc.errors import UserError
from datasvc.service.membership import DEFAULT_REFRESH_S, Membership
from datasvc.service.protocol import (
    BatchRequest,
    ProtocolError,
    pack_header,
    request_header,
    unpack_header,
)

log = logging.getLogger(__name__)

JOINING, READY, REFUSED, LEAVING = "joining", "ready", "refused", "leaving"
PING_EVERY_S = 1.0  # a joining server is pinged again this often (its server may restart)
BUSY_BACKOFF_S = 0.05  # a server that answered "busy" is asked again after this long


class RemoteError(UserError, RuntimeError):
    """The server refused or failed a request; ``code`` names why. A ``UserError``: the
    server's message is the whole story (a client-side traceback would add nothing)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


class NoServerError(UserError, ConnectionError):
    """No server made progress within the configured time."""


class AuthenticationError(UserError, ConnectionError):
    """A server refused this client's CURVE handshake (or the client refused the server)."""


class PackMismatchError(RemoteError):
    """A server serves a different pack under the job's pack name."""

    def __init__(self, message: str):
        super().__init__("pack-mismatch", message)


def _handshake_failure(event: int, value: int, curve: bool) -> tuple[str, str] | None:
    """A monitor event → (what went wrong, what to do), for a client with or without CURVE;
    None for an event that is no handshake failure."""
    import zmq

    failed = (
        zmq.EVENT_HANDSHAKE_FAILED_AUTH,
        zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
        zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
    )
    if event not in failed:
        return None
    if not curve:
        return (
            "refused this plain (unencrypted) client: it expects CURVE",
            "give curve_client_key and curve_server_key (key files from `datasvc keys`)",
        )
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (
            f"refused this client's CURVE key (ZAP status {value})",
            "add the client's public .key file to the server's --curve-allow folder and send "
            "the server SIGHUP, or use a key that is on it",
        )
    return (
        "failed the CURVE handshake: the server key given is not this server's, or the "
        "server does not use CURVE",
        "pass the server's public key file (the .key next to its --curve-secret) as "
        "curve_server_key, or no keys for a plain server",
    )


@dataclass
class CurveKeys:
    """Client key pair and the server's public key (all z85 bytes)."""

    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def from_files(cls, client_secret_file: str, server_public_file: str) -> CurveKeys:
        from datasvc.service.auth import load_keypair

        if not client_secret_file or not server_public_file:
            raise UserError(
                "CURVE needs both curve_client_key and curve_server_key",
                "give the client's .key_secret file and the server's public .key file",
            )
        pub, sec = load_keypair(client_secret_file)
        if sec is None:
            raise UserError(
                f"{client_secret_file} holds no secret key",
                "give the client's .key_secret file as curve_client_key",
            )
        server, _ = load_keypair(server_public_file)
        return cls(pub, sec, server)


def _send(sock, frame: bytes) -> bool:
    """Send without blocking: a DEALER with no live connection (a refused handshake, a server
    gone) would block forever. False when the frame could not be queued."""
    import zmq

    try:
        sock.send(frame, flags=zmq.NOBLOCK, copy=True)
        return True
    except zmq.Again:
        return False


class _Endpoint:
    def __init__(self, ctx, address: str, curve: CurveKeys | None, hwm: int):
        import zmq

        self.address = address
        self.curve = curve is not None
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.sndhwm = hwm
        self.sock.rcvhwm = hwm
        if curve is not None:
            self.sock.curve_publickey = curve.public
            self.sock.curve_secretkey = curve.secret
            self.sock.curve_serverkey = curve.server
        # Handshake outcomes: a refusal is reported at once instead of waiting for dead_after.
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_CONNECTED
            | zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        )
        self.connected = False
        self.handshake_ok = False
        self.handshake_failure: tuple[str, str] | None = None  # (cause, what to do)
        self.backoff_until = 0.0  # answered "busy": not asked again before this
        self.sock.connect(address)
        self.state = JOINING
        self.pong: dict | None = None
        self.credits = 0  # set when admitted
        self.ping_id = None
        self.pinged_at = -1e9
        self.inflight = 0
        self.suspect_until = 0.0
        self.timeouts = 0
        self.replies = 0
        self.requests = 0
        self.got = 0  # one past the last delivery number (``seq``) read from this server
        self.first_request_at: float | None = None  # monotonic time of its first batch request

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except Exception:  # noqa: BLE001 - already closed
            pass
        self.monitor.close(0)
        self.sock.close(0)


class BatchClient:
    """Fetches batches from the ``datasvc serve`` servers of an endpoints spec.

    ``pack``: the job's pack name; servers are admitted only when they serve it with the
    manifest digest pinned from the first one (others are refused, see ``refused``).
    ``credits``: requests in flight per server (None: each server's builders + 2).
    ``refresh``: seconds between re-resolutions of ``dns:``/``file:`` items.
    """

    _ids = itertools.count(1)

    def __init__(
        self,
        endpoints,
        *,
        credits: int | None = 2,
        request_timeout: float = 30.0,
        dead_after: float = 60.0,
        curve: CurveKeys | None = None,
        hwm: int = 64,
        pack: str | None = None,
        refresh: float = DEFAULT_REFRESH_S,
    ):
        import zmq

        self.membership = Membership(endpoints, refresh)
        self.credits = None if credits is None else max(1, credits)
        self.request_timeout = request_timeout
        self.dead_after = dead_after
        self.pack = pack
        self.pinned: str | None = None  # the job's pack: its manifest digest
        self.pinned_from: str | None = None
        self.refused: dict[str, str] = {}  # address → why it is not used
        self._curve, self._hwm = curve, hwm
        self.ctx = zmq.Context(1)
        self.poller = zmq.Poller()
        self._members: dict[str, _Endpoint] = {}
        self.bytes_received = 0
        self.retries = 0
        self.busy_replies = 0
        self.started = time.monotonic()
        self._sync(force=True)

    @property
    def endpoints(self) -> list[_Endpoint]:
        return list(self._members.values())

    def close(self) -> None:
        for ep in self._members.values():
            ep.close()
        self._members = {}
        self.ctx.term()

    # --- membership -------------------------------------------------------------------

    def _sync(self, force: bool = False) -> None:
        """Follow the spec: connect new servers, stop asking those that left it."""
        now = time.monotonic()
        current = self.membership.current(force)
        for address in current:
            ep = self._members.get(address)
            if ep is None:
                ep = self._members[address] = _Endpoint(self.ctx, address, self._curve, self._hwm)
                self.poller.register(ep.sock, 1)  # POLLIN
                self.poller.register(ep.monitor, 1)
                log.info("server %s joined the job's endpoints", address)
            elif ep.state == LEAVING:
                ep.state = JOINING  # back in the spec: admit it again once it answers
        listed = set(current)
        for ep in self._members.values():
            if ep.address not in listed and ep.state != LEAVING:
                log.info("server %s left the job's endpoints", ep.address)
                ep.state = LEAVING
            if ep.state == JOINING and now - ep.pinged_at >= PING_EVERY_S:
                ep.ping_id = next(self._ids)
                ep.pinged_at = now
                _send(ep.sock, pack_header({"op": "ping", "id": ep.ping_id}))
        for ep in [e for e in self._members.values() if e.state == LEAVING and not e.inflight]:
            self.poller.unregister(ep.sock)
            self.poller.unregister(ep.monitor)
            ep.close()
            del self._members[ep.address]

    def _admit(self, ep: _Endpoint, pong: dict) -> None:
        """A server's ping answer: pin the job's pack from the first; refuse any other."""
        if ep.state != JOINING:
            return
        if pong.get("draining"):
            return  # stays joining: asked again until it serves or leaves
        reason = self._pack_mismatch(ep.address, pong)
        if reason:
            ep.state = REFUSED
            self.refused[ep.address] = reason
            log.error("%s", reason)
            return
        ep.state, ep.pong = READY, pong
        advertised = (pong.get("limits") or {}).get("credits")
        ep.credits = self.credits or int(advertised or max(2, int(pong.get("workers", 0)) + 2))
        ep.suspect_until, ep.timeouts = 0.0, 0
        self.refused.pop(ep.address, None)

    def _pack_mismatch(self, address: str, pong: dict) -> str | None:
        if self.pack is None:
            return None
        served = sorted(pong.get("packs", {}))
        if self.pack not in served:
            return f"server {address} has no pack {self.pack!r}; it serves {served}"
        digest = pong.get("digests", {}).get(self.pack)
        if self.pinned_from is None:
            self.pinned, self.pinned_from = digest, address
            return None
        if digest != self.pinned:
            return (
                f"server {address} serves a different pack under the name {self.pack!r} "
                f"(manifest digest {str(digest)[:12]}, the job's is {str(self.pinned)[:12]} "
                f"from {self.pinned_from}); not using it: one job reads one pack"
            )
        return None

    def ready(self) -> list[_Endpoint]:
        return [e for e in self._members.values() if e.state == READY]

    def wait_ready(self, timeout: float | None = None) -> dict:
        """Wait until a server serving the job's pack answers; → its ping answer."""
        timeout = self.dead_after if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            ready = self.ready()
            if ready:
                return ready[0].pong
            members = self._members.values()
            if time.monotonic() >= deadline or (
                members and all(e.state == REFUSED for e in members)
            ):
                break
            self._sync()
            self._poll_once(100, None)
        refused = "; ".join(self.refused.values())
        if refused and self.pack is not None and not self.ready():
            raise PackMismatchError(refused)
        raise self._no_server("answered", deadline - timeout)

    # --- receiving --------------------------------------------------------------------

    def _poll_once(self, timeout_ms: int, on_reply) -> bool:
        """Read every reply that is there (waiting up to ``timeout_ms`` for the first);
        ping answers admit servers, others go to ``on_reply(ep, header, frames)``."""
        events = dict(self.poller.poll(timeout_ms))
        for ep in list(self._members.values()):
            if ep.monitor in events:
                self._on_monitor(ep)
        got = False
        for ep in list(self._members.values()):
            if ep.sock not in events:
                continue
            while True:
                try:
                    frames = ep.sock.recv_multipart(copy=False, flags=1)  # NOBLOCK
                except Exception:  # noqa: BLE001 - zmq.Again: drained
                    break
                got = True
                try:
                    header = unpack_header(frames[0].bytes, request=False)
                except ProtocolError:
                    continue  # not a reply we can read; a request will time out, re-asked
                seq = header.get("seq")
                if type(seq) is int:  # in order on one connection (a restarted server's anew)
                    ep.got = seq + 1  # the next request tells the server it was read
                if header.get("op") == "pong" and header.get("id") == ep.ping_id:
                    self._admit(ep, header)
                elif on_reply is not None:
                    on_reply(ep, header, frames)
        return got

    def _on_monitor(self, ep: _Endpoint) -> None:
        import zmq
        from zmq.utils.monitor import recv_monitor_message

        while ep.monitor.poll(0):
            m = recv_monitor_message(ep.monitor, zmq.NOBLOCK)
            if m["event"] == zmq.EVENT_CONNECTED:
                ep.connected = True
            elif m["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                ep.handshake_ok, ep.handshake_failure = True, None
            elif ep.handshake_failure is None:
                ep.handshake_failure = _handshake_failure(m["event"], int(m["value"]), ep.curve)
                if ep.handshake_failure:
                    self._on_refused(ep)

    def _on_refused(self, ep: _Endpoint) -> None:
        """Raise unless another server has accepted this client (then leave this one)."""
        cause, hint = ep.handshake_failure
        if not any(e.handshake_ok for e in self._members.values() if e is not ep):
            raise AuthenticationError(f"datasvc server {ep.address} {cause}", hint)
        log.warning("datasvc server %s %s (%s); using the other servers", ep.address, cause, hint)
        ep.state = REFUSED
        self.refused[ep.address] = cause

    def _no_server(self, what: str, since: float) -> NoServerError:
        """The error for no progress since ``since``: each endpoint's state, the time waited."""
        states = []
        for e in self._members.values():
            if e.handshake_failure:
                states.append(f"{e.address} ({e.handshake_failure[0]})")
            elif not e.connected:
                states.append(f"{e.address} (no connection)")
            elif e.state == JOINING and e.pong is not None:
                states.append(f"{e.address} (draining)")
            else:
                states.append(f"{e.address} (connected, {e.state}, no answer)")
        where = ", ".join(states) or ", ".join(self.membership.items)
        return NoServerError(
            f"no datasvc server {what} in {time.monotonic() - since:.1f}s at {where}",
            "check that `datasvc serve` runs there and the address and port are right, or "
            "raise dead_after",
        )

    # --- small requests ---------------------------------------------------------------

    def call(self, op: str, timeout: float | None = None) -> dict:
        """``ping``: the first admitted server's answer. ``stats``: sent to every admitted
        server, the first answer wins."""
        if op == "ping":
            return self.wait_ready(timeout)
        timeout = self.dead_after if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self.wait_ready(timeout)
        rid = next(self._ids)
        for ep in self.ready():
            _send(ep.sock, pack_header({"op": op, "id": rid}))
        answer: list[dict] = []

        def on_reply(ep, header, frames):
            if header.get("id") == rid and not answer:
                answer.append(header)

        while time.monotonic() < deadline and not answer:
            self._poll_once(100, on_reply)
        if not answer:
            raise self._no_server(f"answered {op!r}", deadline - timeout)
        if not answer[0].get("ok"):
            raise RemoteError(answer[0].get("error", "?"), answer[0].get("message", ""))
        return answer[0]

    # --- batches ----------------------------------------------------------------------

    def _pick(self, now: float) -> _Endpoint | None:
        free = [e for e in self.ready() if e.inflight < e.credits and e.backoff_until <= now]
        if not free:
            return None
        healthy = [e for e in free if e.suspect_until <= now] or free
        return min(healthy, key=lambda e: (e.inflight / e.credits, e.timeouts))

    def fetch(self, requests: list[BatchRequest]):
        """Yield ``(header, frames)`` replies for ``requests``, in order."""
        run = _Fetch(self, requests)
        try:
            yield from run.replies()
        finally:
            for _, ep, _ in run.inflight.values():
                ep.inflight -= 1


class _Fetch:
    """One ``fetch``: which batch indices are pending, in flight (where, since when) or done."""

    def __init__(self, client: BatchClient, requests: list[BatchRequest]):
        self.client = client
        self.requests = requests
        self.pending = collections.deque(range(len(requests)))
        self.inflight: dict[int, tuple[int, _Endpoint, float]] = {}  # rid → (index, ep, sent)
        self.done: dict[int, tuple] = {}
        self.asked: set[int] = set()
        self.progress = time.monotonic()  # the last batch received (error replies are not)

    def replies(self):
        c = self.client
        want = 0
        while want < len(self.requests):
            c._sync()
            self._send(want)
            c._poll_once(50, self._on_reply)
            self._expire()
            while want in self.done:
                yield self.done.pop(want)
                want += 1

    def _send(self, want: int) -> None:
        """Ask admitted servers for pending batches, up to their credits, not far ahead."""
        c = self.client
        now = time.monotonic()
        window = sum(e.credits for e in c.ready()) or 1
        while self.pending and self.pending[0] < want + 2 * window:
            ep = c._pick(now)
            if ep is None:
                return
            index = self.pending.popleft()
            if index in self.done:
                continue
            rid = next(c._ids)
            if not _send(ep.sock, request_header(self.requests[index], rid, ep.got)):
                self.pending.appendleft(index)
                ep.suspect_until = now + c.request_timeout
                ep.timeouts += 1
                return
            ep.inflight += 1
            ep.requests += 1
            if ep.first_request_at is None:
                ep.first_request_at = now
            self.inflight[rid] = (index, ep, now)
            if index in self.asked:
                c.retries += 1
            self.asked.add(index)

    def _expire(self) -> None:
        c = self.client
        now = time.monotonic()
        for rid, (index, ep, sent) in list(self.inflight.items()):
            if now - sent > c.request_timeout:
                # Lost (server died, drained or dropped us): re-ask, preferably elsewhere.
                del self.inflight[rid]
                ep.inflight -= 1
                ep.timeouts += 1
                ep.suspect_until = now + c.request_timeout
                self._requeue(index)
        if now - self.progress > c.dead_after:
            raise c._no_server("delivered a batch", self.progress)

    def _take(self, ep: _Endpoint, rid):
        """The in-flight entry a reply answers: by its id, or the oldest request on ``ep``
        when the server could not read the id (None: a late reply, already re-asked)."""
        if rid is None:
            rid = next((r for r, (_, e, _) in self.inflight.items() if e is ep), None)
        return self.inflight.pop(rid, None)

    def _on_reply(self, ep: _Endpoint, header: dict, frames) -> None:
        entry = self._take(ep, header.get("id"))
        if entry is None:
            return  # a late reply to a request already re-asked and answered
        index, owner, _ = entry
        owner.inflight -= 1
        owner.replies += 1
        owner.timeouts = 0
        owner.suspect_until = 0.0
        if not header.get("ok"):
            self._on_refusal(owner, index, header)
            return
        self.progress = time.monotonic()
        if index not in self.done:
            self.client.bytes_received += sum(len(f.buffer) for f in frames)
            self.done[index] = (header, frames)

    def _on_refusal(self, owner: _Endpoint, index: int, header: dict) -> None:
        """An error reply: "busy" and "draining" re-ask (not progress); others raise."""
        code = header.get("error", "?")
        if code == "busy":
            # Over the server's credits: no more in flight there than it grants, asked again
            # shortly (a reply it has not yet seen leave still holds a credit there).
            self.client.busy_replies += 1
            granted = ((owner.pong or {}).get("limits") or {}).get("credits")
            if granted:
                owner.credits = max(1, min(owner.credits, int(granted)))
            owner.backoff_until = time.monotonic() + BUSY_BACKOFF_S
        elif code == "draining":
            if owner.state == READY:
                log.info("datasvc server %s is draining; using the other servers", owner.address)
                owner.state = JOINING  # no new requests until it serves again
            # Everything else asked there is asked elsewhere now (the first reply wins), not
            # after request_timeout: a draining server may exit before reading it.
            for rid in [r for r, (_, e, _) in self.inflight.items() if e is owner]:
                self._requeue(self.inflight.pop(rid)[0])
                owner.inflight -= 1
        elif code == "corrupt" and isinstance(header.get("record"), dict):
            raise CorruptRecordError.from_entry(header["record"])  # on_corrupt="raise"
        else:
            raise RemoteError(code, f"{owner.address}: {header.get('message', '')}")
        self._requeue(index)

    def _requeue(self, index: int) -> None:
        """Ask ``index`` again; pending stays in batch order (the window counts from it)."""
        if index not in self.done and index not in self.pending:
            bisect.insort(self.pending, index)


__all__ = [
    "AuthenticationError",
    "BatchClient",
    "CurveKeys",
    "NoServerError",
    "PackMismatchError",
    "RemoteError",
]
