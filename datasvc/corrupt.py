"""One corrupt-record policy for every loader and the server.

A record that fails its checksum, cannot be parsed or decoded, or lies in a damaged shard is a
``CorruptRecordError`` naming the sample id, the shard file, the record within it and the
reason. ``on_corrupt="raise"`` (the library's default) lets it stop the job; ``"skip"`` leaves the
record out of its batch (the batch is one shorter) and reports it as a ``skipped`` entry
``{"id", "shard", "record", "reason"}``. A ``CorruptLedger`` per loader and epoch collects the
entries, logs each record once, and raises ``TooManyCorruptError`` naming them once more than
``max_corrupt`` were skipped (default 0.1% of the epoch's samples).
"""

from __future__ import annotations

import logging
import math
from typing import Literal, get_args

from datasvc.packs import CorruptSampleError

log = logging.getLogger(__name__)

OnCorrupt = Literal["raise", "skip"]
ON_CORRUPT: tuple[str, ...] = get_args(OnCorrupt)
DEFAULT_MAX_CORRUPT = 0.001  # a fraction of the epoch's samples


class CorruptRecordError(CorruptSampleError):
    """One sample could not be read or decoded; ``.entry`` is its skipped-record entry."""

    def __init__(self, id: int, shard: str, record: int, reason: str):
        super().__init__(
            f"corrupt record: sample {id} ({shard} record {record}): {reason}",
            "on_corrupt='skip' leaves damaged records out; datasvc verify lists every one",
        )
        self.id, self.shard, self.record, self.reason = int(id), str(shard), int(record), reason

    @property
    def entry(self) -> dict:
        return {"id": self.id, "shard": self.shard, "record": self.record, "reason": self.reason}

    @classmethod
    def from_entry(cls, entry: dict) -> CorruptRecordError:
        return cls(entry["id"], entry["shard"], entry["record"], entry["reason"])

    def __reduce__(self):  # picklable across worker processes
        return (CorruptRecordError, (self.id, self.shard, self.record, self.reason))


class TooManyCorruptError(CorruptSampleError):
    """More records were skipped in one epoch than ``max_corrupt`` allows; names them."""

    def __init__(self, entries: list[dict], limit: int, num_samples: int):
        names = ", ".join(f"{e['id']} ({e['shard']} record {e['record']})" for e in entries[:20])
        more = f" and {len(entries) - 20} more" if len(entries) > 20 else ""
        super().__init__(
            f"{len(entries)} corrupt records skipped this epoch, more than max_corrupt allows "
            f"({limit} of the epoch's {num_samples} samples): {names}{more}",
            "repair or re-convert the pack (datasvc verify names every damaged record), "
            "or raise max_corrupt",
        )
        self.entries = list(entries)


def corrupt_record(split, sid: int, reason: str) -> CorruptRecordError:
    """The error for sample ``sid`` of ``split``, naming its shard file and record."""
    shard, local = split.locate(int(sid))
    name = split.shard_paths[shard].name
    for prefix in (f"{name} record {local}: ", f"{name}: "):  # readers name the file first
        head, found, rest = reason.partition(prefix)
        if found and "/" + name not in rest and head.count(" ") == 0:
            reason = rest
            break
    return CorruptRecordError(int(sid), name, local, reason)


def read_sample(split, sid: int):
    """``split[sid]``, with any damage raised as a ``CorruptRecordError``."""
    try:
        return split[int(sid)]
    except CorruptRecordError:
        raise
    except CorruptSampleError as e:
        raise corrupt_record(split, sid, str(e)) from None


def check_on_corrupt(value: str) -> str:
    if value not in ON_CORRUPT:
        raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {value!r}")
    return value


def corrupt_limit(max_corrupt: int | float | None, num_samples: int) -> int:
    """Records that may be skipped per epoch: an int is a count, a float a fraction of
    ``num_samples`` (rounded down), None the default fraction."""
    if max_corrupt is None:
        max_corrupt = DEFAULT_MAX_CORRUPT
    if isinstance(max_corrupt, bool) or not isinstance(max_corrupt, int | float):
        raise TypeError(f"max_corrupt must be a count (int) or a fraction (float): {max_corrupt!r}")
    if max_corrupt < 0 or (isinstance(max_corrupt, float) and max_corrupt > 1):
        raise ValueError(f"max_corrupt must be a count >= 0 or a fraction in [0, 1]: {max_corrupt}")
    if isinstance(max_corrupt, float):
        return math.floor(max_corrupt * num_samples + 1e-9)
    return max_corrupt


class CorruptLedger:
    """The records skipped in one epoch: counts them, logs each once, enforces the cap."""

    def __init__(self, num_samples: int, max_corrupt: int | float | None = None):
        self.num_samples = int(num_samples)
        self.limit = corrupt_limit(max_corrupt, self.num_samples)
        self.max_corrupt = max_corrupt
        self.epoch: int | None = None
        self.entries: list[dict] = []
        self._seen: set[int] = set()

    def start_epoch(self, epoch: int, entries: list[dict] | None = None) -> None:
        """Forget the last epoch's entries (or restore a resumed epoch's)."""
        if epoch == self.epoch and entries is None:
            return
        self.epoch = epoch
        self.entries, self._seen = [], set()
        for e in entries or []:
            self._remember(e)

    def _remember(self, entry: dict) -> bool:
        if entry["id"] in self._seen:
            return False
        self._seen.add(entry["id"])
        self.entries.append(dict(entry))
        return True

    def add(self, entries) -> None:
        """Record skipped entries (each logged once); raise past the cap."""
        for e in entries:
            if self._remember(e):
                log.warning(
                    "skipped corrupt record: sample %d, shard %s, record %d: %s",
                    e["id"],
                    e["shard"],
                    e["record"],
                    e["reason"],
                )
        if len(self.entries) > self.limit:
            raise TooManyCorruptError(self.entries, self.limit, self.num_samples)


__all__ = [
    "DEFAULT_MAX_CORRUPT",
    "ON_CORRUPT",
    "CorruptLedger",
    "CorruptRecordError",
    "OnCorrupt",
    "TooManyCorruptError",
    "check_on_corrupt",
    "corrupt_limit",
    "corrupt_record",
    "read_sample",
]
