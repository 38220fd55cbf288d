"""The service's client side: requests spread over the job's servers with at most ``credits``
in flight per server; a request that times out is re-asked elsewhere; no live server for
``dead_after`` seconds raises instead of hanging.

The servers are a membership spec (``membership.py``): a comma list, ``dns:NAME:PORT`` or
``file:PATH``, re-resolved while an epoch runs. A server that appears is pinged and, once its
answer shows it serves the job's pack (the same manifest digest as the first server that
answered: one job, one pack), gets requests; one that leaves the spec, drains or stops
answering gets no new ones. Exactly-once lives here: each batch index is delivered once, the
first reply wins, and a batch lost with its server is asked again elsewhere.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from dataclasses import dataclass

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


class RemoteError(RuntimeError):
    """The server refused or failed a request; ``code`` names why."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


class NoServerError(ConnectionError):
    """No endpoint answered within the configured time."""


class PackMismatchError(RemoteError):
    """A server serves a different pack under the job's pack name."""

    def __init__(self, message: str):
        super().__init__("pack-mismatch", message)


@dataclass
class CurveKeys:
    """Client key pair and the server's public key (all z85 bytes)."""

    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def from_files(cls, client_secret_file: str, server_public_file: str) -> CurveKeys:
        from datasvc.service.auth import load_keypair

        pub, sec = load_keypair(client_secret_file)
        if sec is None:
            raise ValueError(f"{client_secret_file} holds no secret key")
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
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.sndhwm = hwm
        self.sock.rcvhwm = hwm
        if curve is not None:
            self.sock.curve_publickey = curve.public
            self.sock.curve_secretkey = curve.secret
            self.sock.curve_serverkey = curve.server
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
        self._sync(force=True)

    @property
    def endpoints(self) -> list[_Endpoint]:
        return list(self._members.values())

    def close(self) -> None:
        for ep in self._members.values():
            ep.sock.close(0)
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
            ep.sock.close(0)
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
        raise NoServerError(
            f"no datasvc server answered within {timeout:.0f}s at "
            f"{', '.join(self.membership.items)}" + (f" ({refused})" if refused else "")
        )

    # --- receiving --------------------------------------------------------------------

    def _poll_once(self, timeout_ms: int, on_reply) -> bool:
        """Read every reply that is there (waiting up to ``timeout_ms`` for the first);
        ping answers admit servers, others go to ``on_reply(ep, header, frames)``."""
        events = dict(self.poller.poll(timeout_ms))
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
                if header.get("op") == "pong" and header.get("id") == ep.ping_id:
                    self._admit(ep, header)
                elif on_reply is not None:
                    on_reply(ep, header, frames)
        return got

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
            raise NoServerError(f"no datasvc server answered {op!r} within {timeout:.0f}s")
        if not answer[0].get("ok"):
            raise RemoteError(answer[0].get("error", "?"), answer[0].get("message", ""))
        return answer[0]

    # --- batches ----------------------------------------------------------------------

    def _pick(self, now: float) -> _Endpoint | None:
        free = [e for e in self.ready() if e.inflight < e.credits]
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
        self.last_answer = time.monotonic()

    def replies(self):
        c = self.client
        want = 0
        while want < len(self.requests):
            c._sync()
            self._send(want)
            if c._poll_once(50, self._on_reply):
                self.last_answer = time.monotonic()
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
            if not _send(ep.sock, request_header(self.requests[index], rid)):
                self.pending.appendleft(index)
                ep.suspect_until = now + c.request_timeout
                ep.timeouts += 1
                return
            ep.inflight += 1
            ep.requests += 1
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
                if index not in self.done:
                    self.pending.appendleft(index)
        if now - self.last_answer > c.dead_after:
            raise NoServerError(
                f"no datasvc server answered for {c.dead_after:.0f}s at "
                f"{', '.join(e.address for e in c.endpoints) or ', '.join(c.membership.items)}"
            )

    def _on_reply(self, ep: _Endpoint, header: dict, frames) -> None:
        entry = self.inflight.pop(header.get("id"), None)
        if entry is None:
            return  # a late reply to a request already re-asked and answered
        index, owner, _ = entry
        owner.inflight -= 1
        owner.replies += 1
        owner.timeouts = 0
        owner.suspect_until = 0.0
        if not header.get("ok"):
            code = header.get("error", "?")
            if code in ("busy", "draining"):
                if code == "draining" and owner.state == READY:
                    owner.state = JOINING  # no new requests until it serves again
                self.pending.appendleft(index)
                return
            raise RemoteError(code, header.get("message", ""))
        if index not in self.done:
            self.client.bytes_received += sum(len(f.buffer) for f in frames)
            self.done[index] = (header, frames)


__all__ = ["BatchClient", "CurveKeys", "NoServerError", "PackMismatchError", "RemoteError"]
