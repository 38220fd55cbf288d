"""``remote``: batches from ``datasvc serve`` over ZeroMQ, with the same contract as every
other loader. The client's cursor is the only progress state, so servers can die, restart
or be added while an epoch runs. With ``decode='dali_gpu'`` (or its ``dali_cpu`` twin) the
servers send encoded samples plus crop parameters and the trainer's GPU decodes them."""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import torch

from datasvc.augment import Crop
from datasvc.batch import Batch
from datasvc.loaders import register_loader
from datasvc.loaders.base import Loader, renamed
from datasvc.service.client import BatchClient, CurveKeys, RemoteError
from datasvc.service.protocol import BatchRequest, Limits, ProtocolError

#: Where a remote batch is decoded: by the server (uint8 batches), or here by DALI.
DecodeMode = Literal["server", "client", "dali_cpu", "dali_gpu"]
DECODE_MODES: tuple[str, ...] = get_args(DecodeMode)


@register_loader("remote")
class RemoteLoader(Loader):
    """Options: ``pack`` (its name on the server, required; the job pins its manifest digest
    from the first server and refuses servers whose pack differs), ``credits`` (requests in
    flight per server; default: what each server grants, its builders + 2 unless started with
    ``--credits``), ``request_timeout``, ``dead_after`` (seconds with no answer before
    raising), ``refresh`` (seconds between re-reads of ``dns:``/``file:`` endpoints),
    ``decode`` ('server', 'client', 'dali_cpu', 'dali_gpu'), ``curve_client_key``/
    ``curve_server_key`` (key files from ``datasvc keys``), ``pin_memory``, ``num_workers``
    (DALI's threads when decoding here; ``workers`` is its deprecated name).

    ``source``: the servers, as a comma list of ``tcp://HOST:PORT``, ``dns:NAME:PORT`` (every
    address of a name, re-resolved: a Kubernetes headless Service) or ``file:PATH`` (one
    endpoint a line, re-read: servers started with ``--announce PATH``)."""

    backend = "remote"

    def __init__(
        self,
        source,
        *,
        pack: str,
        split="train",
        num_workers: int | None = None,
        credits: int | None = None,
        request_timeout: float = 30.0,
        dead_after: float = 60.0,
        decode: DecodeMode = "server",
        curve_client_key=None,
        curve_server_key=None,
        pin_memory: bool = False,
        device_id: int | None = None,
        refresh: float = 2.0,
        workers: int | None = None,
        **common,
    ):
        num_workers = renamed("workers", "num_workers", workers, num_workers)
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        curve = None
        if curve_client_key or curve_server_key:
            curve = CurveKeys.from_files(curve_client_key, curve_server_key)
        self.client = BatchClient(
            source,
            credits=credits,
            request_timeout=request_timeout,
            dead_after=dead_after,
            curve=curve,
            pack=pack,
            refresh=refresh,
        )
        try:
            pong = self.client.wait_ready()
            super().__init__(self._split_size(pong, pack, split), **common)
            self.pack_name = pack
            self.split_name = split
            self.decode = decode
            self.limits = Limits.from_dict(pong.get("limits"))
            self._fit_server(credits)
        except BaseException:
            self.client.close()
            raise
        self.classes: list[str] = pong.get("classes", {}).get(pack, [])
        self.pin_memory = pin_memory
        self.num_workers = num_workers or 1
        self.device_id = device_id
        if decode in ("dali_cpu", "dali_gpu"):
            from datasvc.loaders.dali import import_dali, require_gpu

            import_dali()
            if decode == "dali_gpu":
                self.device_id = require_gpu(device_id)

    @staticmethod
    def _split_size(pong: dict, pack: str, split: str) -> int:
        packs = pong["packs"]
        if pack not in packs:
            raise KeyError(f"server has no pack {pack!r}; it serves {sorted(packs)}")
        if split not in packs[pack]:
            raise KeyError(f"pack {pack!r} has no split {split!r}; splits {list(packs[pack])}")
        return packs[pack][split]

    def _fit_server(self, credits: int | None) -> None:
        """Take the server's credits unless given; fail here, before asking, on a request the
        server's advertised limits refuse."""
        # Without ``credits`` each server gets the credits it advertises (the client reads
        # them from its ping answer as it admits it).
        if self.limits is None:  # a server that does not advertise limits
            return
        try:
            self.limits.check(self._requests(0, 1)[0])
        except ProtocolError as e:
            raise RemoteError(e.code, f"{self.client.endpoints[0].address}: {e}") from None

    def _requests(self, start: int, end: int) -> list[BatchRequest]:
        s = self.sampler
        op = self._op()
        return [
            BatchRequest(
                self.pack_name,
                self.split_name,
                self.cfg.train,
                self.cfg.image_size,
                self.seed,
                s.epoch,
                s.rank,
                s.world_size,
                s.batch_size,
                b,
                op,
                self.cfg,
                self.on_corrupt,
            )
            for b in range(start, end)
        ]

    def _op(self) -> str:
        """Decoded batches from the server; for train batches decoded here, crop segments
        (our CPU decoder with ``decode="client"``, DALI/nvJPEG with the dali modes: the cut
        JPEG and the crop moved into it are a JPEG and a crop like any other); for eval,
        decoded batches (``client``) or whole encoded samples (DALI)."""
        if self.decode == "server" or (self.decode == "client" and not self.cfg.train):
            return "batch"
        return "segments" if self.cfg.train else "samples"

    def _batches(self, start: int):
        end = len(self.sampler)
        if start >= end:
            return
        replies = self._accounted(self.client.fetch(self._requests(start, end)))
        op = self._op()
        if op == "batch":
            for header, frames in replies:
                yield self._decoded(header, frames)
        elif self.decode == "client":
            yield from self._decode_segments(replies)
        else:
            from datasvc.loaders.dali import run_pipeline

            device = "gpu" if self.decode == "dali_gpu" else "cpu"
            yield from run_pipeline(
                self.cfg,
                device=device,
                batch_size=self.batch_size,
                num_threads=self.num_workers,
                device_id=self.device_id,
                batches=(self._encoded(h, f) for h, f in replies),
                count=end - start,
            )

    def _accounted(self, replies):
        """Replies in order, each one's skipped records entered in this loader's ledger (the
        server skipped them under ``on_corrupt="skip"``)."""
        for header, frames in replies:
            self.ledger.add(_skipped_entries(header))
            yield header, frames

    def _decoded(self, header: dict, frames) -> Batch:
        """Reply frames → a Batch; the images tensor is the received buffer itself (no copy)
        unless pinned memory was asked for."""
        shape = tuple(header["shape"])
        if tuple(shape[:1]) != (header["n"],) or len(frames[1].buffer) != int(np.prod(shape)):
            raise RemoteError("malformed", f"reply of {len(frames[1].buffer)} bytes for {shape}")
        if header["n"] == 0:  # every record of the batch was skipped as corrupt
            empty = torch.empty(0, dtype=torch.int64)
            return Batch(torch.empty(shape, dtype=torch.uint8).permute(0, 3, 1, 2), empty, empty)
        images = torch.frombuffer(frames[1].buffer, dtype=torch.uint8).view(shape)
        if self.pin_memory:
            images = images.pin_memory()
        labels = torch.frombuffer(frames[2].buffer, dtype=torch.int64)
        ids = torch.frombuffer(frames[3].buffer, dtype=torch.int64)
        return Batch(images.permute(0, 3, 1, 2), labels, ids)

    def _decode_segments(self, replies):
        """Crop-segment replies → batches, decoded here (``num_workers`` threads: libjpeg
        releases the GIL), in order, a few batches ahead."""
        import collections
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="datasvc-segments") as pool:
            ahead: collections.deque = collections.deque()
            for header, frames in replies:
                ahead.append(pool.submit(self._segments_batch, header, frames))
                if len(ahead) > self.num_workers:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()

    def _segments_batch(self, header: dict, frames) -> Batch:
        from datasvc.segments import decode_batch

        n, s = header["n"], self.cfg.image_size
        images = torch.empty((n, s, s, 3), dtype=torch.uint8, pin_memory=self.pin_memory)
        labels = torch.empty(n, dtype=torch.int64)
        try:
            ids = decode_batch(
                header["meta"], frames[1].buffer, self.cfg, images.numpy(), labels.numpy()
            )
        except ValueError as e:
            raise RemoteError("malformed", f"crop-segment reply: {e}") from None
        return Batch(images.permute(0, 3, 1, 2), labels, torch.from_numpy(ids))

    def _encoded(self, header: dict, frames):
        from datasvc.loaders.dali import dali_inputs

        blob = frames[1].buffer
        jpegs, labels, ids, geo = [], [], [], []
        offset = 0
        for sid, label, _h, _w, size, *g in header["meta"]:
            jpegs.append(blob[offset : offset + size])
            offset += size
            labels.append(label)
            ids.append(sid)
            geo.append(Crop(g[0], g[1], g[2], g[3], bool(g[4])) if self.cfg.train else tuple(g))
        return dali_inputs(self.cfg, jpegs, labels, ids, geo)

    def stats(self) -> dict:
        return self.client.call("stats")["stats"]

    def close(self) -> None:
        if self.client.endpoints:
            self.client.close()


def _skipped_entries(header: dict) -> list[dict]:
    """A reply's ``skipped`` list, checked: each entry ``{id, shard, record, reason}``."""
    entries = header.get("skipped") or []
    ok = isinstance(entries, list) and all(
        isinstance(e, dict)
        and type(e.get("id")) is int
        and type(e.get("record")) is int
        and isinstance(e.get("shard"), str)
        and isinstance(e.get("reason"), str)
        for e in entries
    )
    if not ok:
        raise RemoteError(
            "malformed", f"reply's skipped list is not a list of records: {entries!r}"[:300]
        )
    return [{k: e[k] for k in ("id", "shard", "record", "reason")} for e in entries]
