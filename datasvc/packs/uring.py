"""The ``io_uring`` read-ahead method: a thread reads each batch's ranges through one
io_uring, up to ``DEPTH`` reads in flight, so that the disk sees many requests at once (the
``thread`` method has one in flight). Needs the optional ``liburing`` package
(``pip install 'datasvc[io_uring]'``); without it the method is not registered."""

from __future__ import annotations

import logging

import liburing as uring

from datasvc.packs.readahead import ThreadAdviser

log = logging.getLogger(__name__)

DEPTH = 32
CHUNK = 256 << 10


class UringAdviser(ThreadAdviser):
    """Reads ranges through io_uring from a thread; the data lands in the page cache (the
    reads are buffered) and the scratch buffers are dropped."""

    def advise(self, ranges):
        chunks = [
            (shard, off + at, min(CHUNK, n - at))
            for shard, off, n in ranges
            for at in range(0, n, CHUNK)
        ]
        self._queue.put(chunks)

    def _run(self) -> None:
        ring, cqe = uring.Ring(), uring.Cqe()
        try:
            uring.io_uring_queue_init(DEPTH, ring)
        except Exception as e:  # noqa: BLE001 - an old kernel or a seccomp filter: no read-ahead
            log.warning("io_uring read-ahead unavailable (%s); reading without it", e)
            while self._queue.get() is not None:
                self._queue.task_done()
            self._queue.task_done()
            return
        try:
            while (chunks := self._queue.get()) is not None:
                self._read_all(ring, cqe, chunks)
                self._queue.task_done()
            self._queue.task_done()
        finally:
            uring.io_uring_queue_exit(ring)

    def _read_all(self, ring, cqe, chunks) -> None:
        buffers: dict[int, bytearray] = {}  # in flight: tag → buffer
        i = 0
        while i < len(chunks) or buffers:
            while i < len(chunks) and len(buffers) < DEPTH:
                shard, off, n = chunks[i]
                buffers[i] = bytearray(n)
                sqe = uring.io_uring_get_sqe(ring)
                uring.io_uring_prep_read(sqe, self.fd(shard), buffers[i], off)
                sqe.user_data = i
                i += 1
            uring.io_uring_submit(ring)
            uring.io_uring_wait_cqe(ring, cqe)
            entry = cqe[0]
            tag = entry.user_data
            try:
                _ = entry.res  # raises the read's error, if any: read-ahead only logs it
            except OSError as e:
                log.debug("io_uring read-ahead read failed: %s", e)
            uring.io_uring_cqe_seen(ring, entry)
            buffers.pop(tag, None)
