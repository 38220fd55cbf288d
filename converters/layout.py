"""The JPEG layouts a pack stores images in (the write side of the segmented layout).

``segmented`` re-encodes a JPEG's DCT coefficients losslessly with a restart marker every few
MCUs (``datasvc._jpegcrop.transcode``), so that a crop entropy-decodes only the segments it
covers; ``original`` keeps the file's bytes. The reader (``datasvc.decode``) needs to know
nothing of this: any baseline JPEG decodes, and the crop decoder finds restart markers itself.
"""

from __future__ import annotations

from typing import Literal, get_args

from datasvc.decode import DecodeError

try:
    from datasvc import _jpegcrop
except ImportError:  # the optional extension was not built
    _jpegcrop = None

#: How a conversion stores JPEGs that pass the audit.
JpegLayout = Literal["segmented", "original"]
JPEG_LAYOUTS: tuple[str, ...] = get_args(JpegLayout)


def _extension():
    if _jpegcrop is None:
        raise RuntimeError("the segmented JPEG layout needs the datasvc._jpegcrop extension")
    return _jpegcrop


def segment_interval(width: int, mcu_width: int = 16) -> int:
    """Restart interval (MCUs) of the segmented layout for an image ``width`` px wide, as
    ``_jpegcrop.transcode`` picks it (about 8 segments per MCU row)."""
    return _extension().restart_interval(-(-width // mcu_width))


def transcode_segmented(data: bytes) -> bytes:
    """A JPEG → the same coefficients in the segmented layout (lossless). Every scan is
    entropy-decoded on the way: corrupt or truncated data raises ``DecodeError``."""
    try:
        return _extension().transcode(data)
    except ValueError as e:
        raise DecodeError(str(e)) from None
