"""Per-client state in the broker: counters, credits and the round-robin queue of tasks.

A client (a ZeroMQ identity) may have at most ``credits`` requests queued, being built or
answered but not yet read (a client that does not read leaves its replies in libzmq); the
broker answers more with "busy" instead of queueing them, so a client that asks and never reads
costs the others no more than its credits. A reply is read once libzmq has let it go or the
client's next request says so (``got``, one past the last reply number ``seq`` it read):
libzmq's notice comes from pyzmq's own thread and can lag, under load, past the client's next
request, which was then refused although the client had read everything. (A client that says
it read what it did not gains nothing past the socket's high-water mark: libzmq drops the rest.)

Builders take tasks from clients in turn (round-robin), not in arrival order, so one client's
burst cannot delay everyone else's next batch. The table holds at most ``size`` clients with
nothing outstanding (least recently seen forgotten first); clients with outstanding tasks are
bounded by the server's total queue.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

MAX_CLIENTS = 1024  # idle clients remembered (their counters); the quietest is forgotten first


@dataclass
class ClientState:
    requests: int = 0
    batches: int = 0
    images: int = 0
    bytes: int = 0
    errors: int = 0
    busy: int = 0  # requests answered "busy" (over this client's credits or a full queue)
    dropped: int = 0  # error replies not sent while it was not reading
    outstanding: int = 0  # requests queued or being built
    unsent: int = 0  # replies libzmq still holds (the client has not taken them)
    sending: int = 0  # of those, replies sent straight from a slot (at most one)
    delivered: int = 0  # batch replies numbered so far (each reply's ``seq``)
    got: int = 0  # what the client says it has read: replies numbered below this
    unread: int = 0  # replies libzmq still holds that the client has not said it read
    queue: collections.deque = field(default_factory=collections.deque)

    def counters(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "queue"}


class ClientTable:
    """ZeroMQ identity → ``ClientState``, bounded (see the module's docstring)."""

    def __init__(self, size: int = MAX_CLIENTS):
        self.size = size
        self._d: collections.OrderedDict[bytes, ClientState] = collections.OrderedDict()
        self.forgotten = 0

    def __getitem__(self, identity: bytes) -> ClientState:
        entry = self._d.get(identity)
        if entry is None:
            entry = self._d[identity] = ClientState()
            self._forget_idle()
        self._d.move_to_end(identity)
        return entry

    def _forget_idle(self) -> None:
        if len(self._d) <= self.size:
            return
        for identity, state in self._d.items():  # oldest first
            if not (state.outstanding or state.unsent):
                del self._d[identity]
                self.forgotten += 1
                return

    def __len__(self) -> int:
        return len(self._d)

    def as_dict(self) -> dict:
        return {k.hex(): v.counters() for k, v in self._d.items()}


class FairQueue:
    """Tasks by client, served round-robin, each client within its ``credits``."""

    def __init__(self, clients: ClientTable, credits: int, max_queued: int):
        self.clients = clients
        self.credits = credits
        self.max_queued = max_queued
        self.queued = 0
        self.unsent = 0  # replies libzmq still holds (set by the broker)
        self._turns: collections.deque[bytes] = collections.deque()  # clients with tasks

    def refusal(self, client: bytes) -> str | None:
        """Why a new task of ``client`` is refused now ("busy"), or None."""
        state = self.clients[client]
        # A reply the client says it read frees its credit even if libzmq's notice that it
        # let go (the tracker, set from pyzmq's own thread) is late; one more is not counted
        # for clients that do not say what they read.
        if state.outstanding + max(0, state.unread - 1) >= self.credits:
            return (
                f"this client already has {self.credits} requests queued, being built or "
                "answered but not read (the server's --credits); ask again once replies arrive"
            )
        if self.queued + self.unsent >= self.max_queued:
            return f"server queue full ({self.max_queued} requests); retry later"
        return None

    def push(self, task) -> None:
        state = self.clients[task.client]
        state.outstanding += 1
        self._add(task, state, front=False)

    def push_back(self, task) -> None:
        """A task taken but not built (its builder died or was gone): first in line again."""
        self._add(task, self.clients[task.client], front=True)

    def _add(self, task, state: ClientState, front: bool) -> None:
        if not state.queue:
            if front:
                self._turns.appendleft(task.client)
            else:
                self._turns.append(task.client)
        if front:
            state.queue.appendleft(task)
        else:
            state.queue.append(task)
        self.queued += 1

    def pop(self):
        """The next client's oldest task (None when nothing is queued)."""
        if not self._turns:
            return None
        client = self._turns.popleft()
        state = self.clients[client]
        task = state.queue.popleft()
        if state.queue:
            self._turns.append(client)
        self.queued -= 1
        return task

    def done(self, task) -> None:
        """``task`` was answered (a batch or an error): its credit is free again."""
        self.clients[task.client].outstanding -= 1

    def __bool__(self) -> bool:
        return bool(self._turns)
