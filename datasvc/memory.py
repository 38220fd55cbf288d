"""Process memory settings for batch-sized buffers."""

from __future__ import annotations

import ctypes
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def recycle_large_allocations(threshold_mb: int = 128) -> bool:
    """Keep allocations below ``threshold_mb`` in glibc's heap instead of fresh mmaps.

    A batch tensor (64×224×224×3 = 9.6 MB) is above glibc's default mmap threshold, so each
    new batch costs ~2400 page faults and the kernel zeroing 9.6 MB (about 3.7 ms here);
    from the heap, a freed batch's memory is reused without faults (about 0.8 ms). Peak
    memory is unchanged; freed memory returns to the heap rather than the kernel. Set
    ``DATASVC_NO_MALLOPT=1`` to leave the allocator alone. Returns whether it was applied.

    The setting is process-wide, so library code calls it only in processes it owns (loader
    workers, server builders); the trainer and ``datasvc bench`` call it for their own process.
    """
    global _done
    if _done or os.environ.get("DATASVC_NO_MALLOPT"):
        return _done
    try:
        libc = ctypes.CDLL("libc.so.6")
        size = threshold_mb << 20
        _done = bool(libc.mallopt(_M_MMAP_THRESHOLD, size)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, 2 * size)
        )
    except (OSError, AttributeError):  # not glibc
        _done = False
    return _done
