"""datasvc: ImageNet packs, fast loaders, and a ZeroMQ batch service for DDP trainers."""

__version__ = "0.1.0"

from datasvc.packs import open_pack  # noqa: E402

__all__ = ["open_pack", "__version__"]
