"""The shared slot ring: batch slots in one anonymous shared mapping that builders write into and
the broker sends from without copying.

The mapping is made before any builder is forked (builders inherit it) and has no name, so no
crash can leave a segment behind. Address space is reserved for every slot; memory is used only
as far as batches reach. Slots are one pool: the broker names the slot with each task, so a
builder can build the next batch while libzmq still sends the previous one, and a slot held by
a slow reader's send costs the pool one slot, not a builder. The broker is the only one that
decides who may write a slot: a slot is free, being written by the builder it was given to, or
being sent (until libzmq's tracker says the send is done).
"""

from __future__ import annotations

import logging
import mmap

import numpy as np

log = logging.getLogger(__name__)


class SlotRing:
    """``count`` slots of ``slot_bytes`` each; the broker's view of which are free."""

    def __init__(self, count: int, slot_bytes: int):
        self.count = count
        self.slot_bytes = slot_bytes
        self.mapping = mmap.mmap(-1, count * slot_bytes)  # MAP_SHARED | MAP_ANONYMOUS
        self._free = list(range(count))
        self._sending: list = []  # (slot, zmq.MessageTracker)

    # --- the builder's side -----------------------------------------------------------------

    def images(self, slot: int, shape: tuple) -> np.ndarray:
        """A writable uint8 array of ``shape`` over ``slot`` (it must fit)."""
        nbytes = int(np.prod(shape))
        if nbytes > self.slot_bytes:
            raise ValueError(f"{nbytes} bytes do not fit a slot of {self.slot_bytes}")
        base = slot * self.slot_bytes
        return np.frombuffer(self.mapping, np.uint8, nbytes, base).reshape(shape)

    # --- the broker's side ------------------------------------------------------------------

    def free(self) -> int:
        return len(self._free)

    def take(self) -> int:
        """A free slot, now reserved for the next batch."""
        return self._free.pop()

    def give_back(self, slot: int) -> None:
        """``slot`` was not sent (an error reply, a copy, a dead builder)."""
        self._free.append(slot)

    def send_frame(self, slot: int, nbytes: int):
        """A zero-copy ZeroMQ frame of the slot's first ``nbytes``; the slot stays reserved
        until libzmq is done with the frame (see ``reclaim``)."""
        import zmq

        base = slot * self.slot_bytes
        frame = zmq.Frame(memoryview(self.mapping)[base : base + nbytes], track=True)
        self._sending.append((slot, frame.tracker))
        return frame

    def copy_out(self, slot: int, nbytes: int) -> bytes:
        """A copy of the slot's first ``nbytes`` (the slot can be reused at once)."""
        base = slot * self.slot_bytes
        return self.mapping[base : base + nbytes]

    def reclaim(self) -> int:
        """Free the slots whose sends have completed; → how many."""
        still, freed = [], 0
        for slot, tracker in self._sending:
            if tracker.done:
                self._free.append(slot)
                freed += 1
            else:
                still.append((slot, tracker))
        self._sending = still
        return freed

    def close(self) -> None:
        """Unmap, unless a frame still points into the mapping (then the GC unmaps later)."""
        self._sending = []
        try:
            self.mapping.close()
        except BufferError:
            log.debug("slot ring still exported; left to the garbage collector")
