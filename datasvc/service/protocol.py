"""The wire format: multipart ZeroMQ messages, a msgpack header carrying the protocol version
first, then raw buffers sent without copies. Never pickle; every request field is validated."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from typing import Literal, get_args

import msgpack

from datasvc.augment import TransformConfig
from datasvc.corrupt import ON_CORRUPT, OnCorrupt

PROTOCOL_VERSION = 1
MAX_REQUEST_BYTES = 64 * 1024  # ZMQ_MAXMSGSIZE on the server's socket: requests are tiny
MAX_BATCH = 4096
MAX_IMAGE_SIZE = 1024
MAX_WORLD = 65536
#: What a request asks for: ``batch`` decoded uint8 images; ``samples`` encoded bytes + crops;
#: ``segments`` (train only) per image the restart segments covering its crop, as a small JPEG,
#: with the crop moved into it (``datasvc.segments``); ``stats`` the server's counters; ``ping``
#: its packs and limits.
Op = Literal["batch", "samples", "segments", "stats", "ping"]
OPS: tuple[str, ...] = get_args(Op)
#: Python field name → its shorter key on the wire (the header keeps protocol version 1's keys).
WIRE_KEYS = {"world_size": "world"}


#: Defaults of the work a server accepts per request (``datasvc serve --max-batch-mb`` and
#: ``--max-eval-resize``): a decoded batch of at most 256 MiB (n x S x S x 3 bytes), an eval
#: resize (shorter side before the center crop) of at most 2048 px.
DEFAULT_MAX_BATCH_MB = 256
DEFAULT_MAX_EVAL_RESIZE = 2048


class ProtocolError(Exception):
    """A request the server refuses; ``code`` is a short machine-readable name."""

    def __init__(self, code: str, message: str, request_id=None):
        super().__init__(message)
        self.code = code
        self.request_id = request_id  # the request's id, when its header could be read


@dataclass(frozen=True)
class BatchRequest:
    """Everything that determines a batch: the server keeps no progress state."""

    pack: str
    split: str
    train: bool
    image_size: int
    seed: int
    epoch: int
    rank: int
    world_size: int
    batch_size: int
    batch: int
    op: Op = "batch"
    transform: TransformConfig | None = None  # None: the defaults for train/image_size
    #: The corrupt-record policy (``datasvc.corrupt``): "skip" leaves damaged records out of
    #: the reply and lists them in its header's ``skipped``; "raise" answers an error reply
    #: with code "corrupt" and the record in ``record``. Absent on the wire: "raise".
    on_corrupt: OnCorrupt = "raise"

    def transform_config(self) -> TransformConfig:
        return self.transform or TransformConfig(train=self.train, image_size=self.image_size)

    def key(self) -> tuple:
        """Identifies the epoch listing this request indexes into."""
        return (
            self.pack,
            self.split,
            self.train,
            self.seed,
            self.epoch,
            self.rank,
            self.world_size,
            self.batch_size,
        )


_INT_FIELDS = {
    "image_size": (8, MAX_IMAGE_SIZE),
    "seed": (0, 2**63 - 1),
    "epoch": (0, 10**7),
    "rank": (0, MAX_WORLD - 1),
    "world_size": (1, MAX_WORLD),
    "batch_size": (1, MAX_BATCH),
    "batch": (0, 2**40),
}


def pack_header(obj: dict) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, **obj}, use_bin_type=True)


# Requests are small: a server unpacks them within these bounds. Replies (a client's view)
# may carry a class list or a batch's sample metadata.
_REQUEST_LIMITS = {"max_str_len": 4096, "max_bin_len": 4096, "max_array_len": 64, "max_map_len": 64}


def unpack_header(frame: bytes, request: bool = True) -> dict:
    """A header frame → dict; checks the version first and names both on mismatch."""
    try:
        header = msgpack.unpackb(frame, raw=False, **(_REQUEST_LIMITS if request else {}))
    except Exception as e:  # noqa: BLE001 - any undecodable header
        raise ProtocolError(
            "malformed", f"header is not valid msgpack ({type(e).__name__})"
        ) from None
    if not isinstance(header, dict):
        raise ProtocolError("malformed", "header must be a msgpack map")
    v = header.get("v")
    if v != PROTOCOL_VERSION:
        raise ProtocolError(
            "version",
            f"protocol version {v!r} is not supported; this peer speaks {PROTOCOL_VERSION}",
        )
    return header


def parse_request(frames: list) -> tuple[dict, BatchRequest | None]:
    """Validate a client's frames → (header, BatchRequest or None for stats/ping)."""
    if not frames:
        raise ProtocolError("malformed", "a request is one frame, got none")
    header = unpack_header(bytes(frames[0]))
    try:
        if len(frames) != 1:
            raise ProtocolError("malformed", f"a request is one frame, got {len(frames)}")
        return header, _validate(header)
    except ProtocolError as e:
        e.request_id = header.get("id")
        raise


def _validate(header: dict) -> BatchRequest | None:
    op = header.get("op")
    if op not in OPS:
        raise ProtocolError("op", f"unknown op {op!r}; valid: {', '.join(OPS)}")
    if op in ("stats", "ping"):
        return None
    fields = {}
    for name, (lo, hi) in _INT_FIELDS.items():
        key = WIRE_KEYS.get(name, name)
        value = header.get(key)
        if type(value) is not int:
            raise ProtocolError("field", f"{key} must be an integer, got {type(value).__name__}")
        if not lo <= value <= hi:
            raise ProtocolError("range", f"{key}={value} is outside [{lo}, {hi}]")
        fields[name] = value
    if fields["rank"] >= fields["world_size"]:
        raise ProtocolError(
            "range", f"rank {fields['rank']} is not below world {fields['world_size']}"
        )
    for name in ("pack", "split"):
        value = header.get(name)
        if not isinstance(value, str) or not 0 < len(value) <= 256:
            raise ProtocolError("field", f"{name} must be a non-empty string")
        fields[name] = value
    if type(header.get("train")) is not bool:
        raise ProtocolError("field", "train must be true or false")
    transform = header.get("transform")
    if transform is not None:
        if not isinstance(transform, dict):
            raise ProtocolError("field", "transform must be a map")
        try:
            transform = TransformConfig.build(header["train"], fields["image_size"], transform)
        except (ValueError, TypeError) as e:
            raise ProtocolError("field", f"bad transform: {e}") from None
    on_corrupt = header.get("on_corrupt", "raise")
    if on_corrupt not in ON_CORRUPT:
        raise ProtocolError("field", f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
    got = header.get("got", 0)
    if type(got) is not int or got < 0:
        raise ProtocolError("field", f"got must be a non-negative integer, got {got!r}")
    return BatchRequest(
        train=header["train"], op=op, transform=transform, on_corrupt=on_corrupt, **fields
    )


def request_header(req: BatchRequest, request_id: int, got: int | None = None) -> bytes:
    """A batch request's frame. ``got``: one past the highest delivery number (a reply's
    ``seq``) the client has read from this server, which frees those replies' credits at once
    (see ``FairQueue.refusal``)."""
    body = {
        WIRE_KEYS.get(f.name, f.name): getattr(req, f.name)
        for f in dataclass_fields(req)
        if f.name != "transform"
    }
    body["transform"] = req.transform.options() if req.transform is not None else None
    if got is not None:
        body["got"] = got
    return pack_header({**body, "id": request_id})


def error_header(request_id, code: str, message: str, **extra) -> bytes:
    """An error reply; ``extra`` fields ride along (``record`` for code "corrupt")."""
    rid = request_id if isinstance(request_id, int) else None
    return pack_header({"id": rid, "ok": False, "error": code, "message": message[:2000], **extra})


@dataclass(frozen=True)
class Limits:
    """What one request may cost a server: advertised in ping, checked by the server on every
    request and by clients before they ask. ``credits``: requests a client may have queued or
    being built at once (more are answered "busy")."""

    max_batch_mb: int = DEFAULT_MAX_BATCH_MB
    max_eval_resize: int = DEFAULT_MAX_EVAL_RESIZE
    credits: int = 4

    def as_dict(self) -> dict:
        return {
            "max_batch_mb": self.max_batch_mb,
            "max_eval_resize": self.max_eval_resize,
            "credits": self.credits,
        }

    @classmethod
    def from_dict(cls, d: dict | None) -> Limits | None:
        """A ping's ``limits`` (None from a server too old to send them)."""
        if not isinstance(d, dict):
            return None
        return cls(**{k: int(d[k]) for k in ("max_batch_mb", "max_eval_resize", "credits")})

    def check(self, req: BatchRequest) -> None:
        """Raise ``ProtocolError("limit", ...)`` naming the limit that ``req`` exceeds."""
        s = req.image_size
        nbytes = req.batch_size * s * s * 3
        if req.op == "batch" and nbytes > self.max_batch_mb << 20:
            raise ProtocolError(
                "limit",
                f"a batch of {req.batch_size} images at {s}x{s} px is {nbytes / 2**20:.0f} MiB, "
                f"over the server's --max-batch-mb {self.max_batch_mb} (ask for fewer or "
                "smaller images, or start the server with a larger --max-batch-mb)",
            )
        resize = req.transform_config().resize_shorter
        if not req.train and resize > self.max_eval_resize:
            raise ProtocolError(
                "limit",
                f"eval resize {resize} px is over the server's --max-eval-resize "
                f"{self.max_eval_resize} (ask for a smaller eval_resize, or start the server "
                "with a larger --max-eval-resize)",
            )
