"""The service's client side: requests spread over endpoints with at most ``credits`` in
flight per endpoint; a request that times out is re-asked elsewhere; no live endpoint for
``dead_after`` seconds raises instead of hanging."""

from __future__ import annotations

import collections
import itertools
import time
from dataclasses import dataclass

from datasvc.service.protocol import (
    BatchRequest,
    ProtocolError,
    pack_header,
    request_header,
    unpack_header,
)


class RemoteError(RuntimeError):
    """The server refused or failed a request; ``code`` names why."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


class NoServerError(ConnectionError):
    """No endpoint answered within the configured time."""


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
        self.inflight = 0
        self.suspect_until = 0.0
        self.timeouts = 0
        self.replies = 0


class BatchClient:
    """Fetches batches from one or more ``datasvc serve`` endpoints."""

    _ids = itertools.count(1)

    def __init__(
        self,
        endpoints,
        *,
        credits: int = 2,
        request_timeout: float = 30.0,
        dead_after: float = 60.0,
        curve: CurveKeys | None = None,
        hwm: int = 64,
    ):
        import zmq

        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e]
        if not endpoints:
            raise ValueError("give at least one endpoint, e.g. tcp://127.0.0.1:5555")
        self.credits = max(1, credits)
        self.request_timeout = request_timeout
        self.dead_after = dead_after
        self.ctx = zmq.Context(1)
        self.endpoints = [_Endpoint(self.ctx, e, curve, hwm) for e in endpoints]
        self.poller = zmq.Poller()
        for ep in self.endpoints:
            self.poller.register(ep.sock, zmq.POLLIN)
        self.bytes_received = 0
        self.retries = 0

    def close(self) -> None:
        for ep in self.endpoints:
            ep.sock.close(0)
        self.endpoints = []
        self.ctx.term()

    # --- small requests -----------------------------------------------------------------

    def call(self, op: str, timeout: float | None = None) -> dict:
        """Send ``op`` ('ping' or 'stats') to each endpoint in turn; first answer wins."""
        timeout = self.dead_after if timeout is None else timeout
        deadline = time.monotonic() + timeout
        rid = next(self._ids)
        for ep in self.endpoints:
            ep.sock.send(pack_header({"op": op, "id": rid}))
        while time.monotonic() < deadline:
            events = dict(self.poller.poll(100))
            for ep in self.endpoints:
                if ep.sock in events:
                    frames = ep.sock.recv_multipart()
                    header = unpack_header(frames[0], request=False)
                    if header.get("id") == rid:
                        if not header.get("ok"):
                            raise RemoteError(header.get("error", "?"), header.get("message", ""))
                        return header
        raise NoServerError(
            f"no datasvc server answered {op!r} within {timeout:.0f}s at "
            f"{', '.join(e.address for e in self.endpoints)}"
        )

    # --- batches ------------------------------------------------------------------------

    def _pick(self, now: float) -> _Endpoint | None:
        free = [e for e in self.endpoints if e.inflight < self.credits]
        if not free:
            return None
        healthy = [e for e in free if e.suspect_until <= now] or free
        return min(healthy, key=lambda e: (e.inflight, e.timeouts))

    def fetch(self, requests: list[BatchRequest]):
        """Yield ``(header, frames)`` replies for ``requests``, in order."""
        pending = collections.deque(range(len(requests)))
        inflight: dict[int, tuple[int, _Endpoint, float]] = {}  # request id → (index, ep, sent)
        done: dict[int, tuple] = {}
        asked = set()
        window = self.credits * len(self.endpoints)
        last_answer = time.monotonic()
        want = 0
        try:
            while want < len(requests):
                now = time.monotonic()
                while pending and pending[0] < want + 2 * window:
                    ep = self._pick(now)
                    if ep is None:
                        break
                    index = pending.popleft()
                    if index in done:
                        continue
                    rid = next(self._ids)
                    ep.sock.send(request_header(requests[index], rid), copy=True)
                    ep.inflight += 1
                    inflight[rid] = (index, ep, now)
                    if index in asked:
                        self.retries += 1
                    asked.add(index)
                events = dict(self.poller.poll(50))
                for ep in self.endpoints:
                    if ep.sock not in events:
                        continue
                    while True:
                        try:
                            frames = ep.sock.recv_multipart(copy=False, flags=1)  # NOBLOCK
                        except Exception:  # noqa: BLE001 - zmq.Again: drained
                            break
                        last_answer = time.monotonic()
                        self._on_reply(frames, ep, inflight, done, pending)
                now = time.monotonic()
                for rid, (index, ep, sent) in list(inflight.items()):
                    if now - sent > self.request_timeout:
                        # Lost (server died or dropped us): re-ask, preferably elsewhere.
                        del inflight[rid]
                        ep.inflight -= 1
                        ep.timeouts += 1
                        ep.suspect_until = now + self.request_timeout
                        if index not in done:
                            pending.appendleft(index)
                if now - last_answer > self.dead_after:
                    raise NoServerError(
                        f"no datasvc server answered for {self.dead_after:.0f}s at "
                        f"{', '.join(e.address for e in self.endpoints)}"
                    )
                while want in done:
                    yield done.pop(want)
                    want += 1
        finally:
            for _, ep, _ in inflight.values():
                ep.inflight -= 1

    def _on_reply(self, frames, ep, inflight, done, pending) -> None:
        try:
            header = unpack_header(frames[0].bytes, request=False)
        except ProtocolError:
            return  # not a reply we can read; the request will time out and be re-asked
        entry = inflight.pop(header.get("id"), None)
        if entry is None:
            return  # a late reply to a request already re-asked and answered
        index, owner, _ = entry
        owner.inflight -= 1
        owner.replies += 1
        owner.timeouts = 0
        owner.suspect_until = 0.0
        if not header.get("ok"):
            code = header.get("error", "?")
            if code == "busy":
                pending.appendleft(index)
                return
            raise RemoteError(code, header.get("message", ""))
        if index not in done:
            self.bytes_received += sum(len(f.buffer) for f in frames)
            done[index] = (header, frames)


__all__ = ["BatchClient", "CurveKeys", "NoServerError", "RemoteError"]
