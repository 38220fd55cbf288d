"""The shared slot ring: batch slots in one anonymous shared mapping that builders write into and
the broker sends from without copying.

The mapping is made before any builder is forked (builders inherit it) and has no name, so no
crash can leave a segment behind. Address space is reserved for every slot; memory is used only
as far as batches reach. Each builder owns ``per_builder`` slots (its index picks them), so a
builder can build the next batch while libzmq still sends the previous one. The broker is the
only one that decides who may write a slot: a slot is free, being written by its builder, or
being sent (until libzmq's tracker says the send is done).
"""

from __future__ import annotations

import logging
import mmap

import numpy as np

log = logging.getLogger(__name__)


class SlotRing:
    """``builders * per_builder`` slots of ``slot_bytes`` each; the broker's view of who owns
    which slot."""

    def __init__(self, builders: int, per_builder: int, slot_bytes: int):
        self.builders = builders
        self.per_builder = per_builder
        self.slot_bytes = slot_bytes
        self.mapping = mmap.mmap(-1, builders * per_builder * slot_bytes)  # SHARED|ANONYMOUS
        self._free = {i: list(self.slots_of(i)) for i in range(builders)}
        self._sending: list = []  # (builder, slot, zmq.MessageTracker)

    def slots_of(self, builder: int) -> range:
        first = builder * self.per_builder
        return range(first, first + self.per_builder)

    # --- the builder's side -----------------------------------------------------------------

    def images(self, slot: int, shape: tuple) -> np.ndarray:
        """A writable uint8 array of ``shape`` over ``slot`` (it must fit)."""
        nbytes = int(np.prod(shape))
        if nbytes > self.slot_bytes:
            raise ValueError(f"{nbytes} bytes do not fit a slot of {self.slot_bytes}")
        base = slot * self.slot_bytes
        return np.frombuffer(self.mapping, np.uint8, nbytes, base).reshape(shape)

    # --- the broker's side ------------------------------------------------------------------

    def has_free(self, builder: int) -> bool:
        return bool(self._free[builder])

    def take(self, builder: int) -> int:
        """A free slot of ``builder``, now reserved for its next batch."""
        return self._free[builder].pop()

    def give_back(self, builder: int, slot: int) -> None:
        """``slot`` was not sent (an error reply, a batch built elsewhere, a dead builder)."""
        self._free[builder].append(slot)

    def send_frame(self, builder: int, slot: int, nbytes: int):
        """A zero-copy ZeroMQ frame of the slot's first ``nbytes``; the slot stays reserved
        until libzmq is done with the frame (see ``reclaim``)."""
        import zmq

        base = slot * self.slot_bytes
        frame = zmq.Frame(memoryview(self.mapping)[base : base + nbytes], track=True)
        self._sending.append((builder, slot, frame.tracker))
        return frame

    def copy_out(self, slot: int, nbytes: int) -> bytes:
        """A copy of the slot's first ``nbytes`` (the slot can be reused at once)."""
        base = slot * self.slot_bytes
        return self.mapping[base : base + nbytes]

    def reclaim(self) -> set[int]:
        """Free the slots whose sends have completed; → the builders that got one back."""
        still, freed = [], set()
        for builder, slot, tracker in self._sending:
            if tracker.done:
                self._free[builder].append(slot)
                freed.add(builder)
            else:
                still.append((builder, slot, tracker))
        self._sending = still
        return freed

    def close(self) -> None:
        """Unmap, unless a frame still points into the mapping (then the GC unmaps later)."""
        self._sending = []
        try:
            self.mapping.close()
        except BufferError:
            log.debug("slot ring still exported; left to the garbage collector")
