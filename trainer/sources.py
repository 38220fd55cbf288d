"""What a data source holds, asked without torch: the trainer checks its source before it imports
torch or starts a process group, so a wrong pack or server fails in a second, not after both."""

from __future__ import annotations

from trainer.config import ConfigError, DataConfig


def pack_classes(cfg: DataConfig) -> list[str] | None:
    """The class list of the data source: a local pack's, or the server's for ``remote``."""
    if cfg.backend == "remote":
        from datasvc.service.client import BatchClient, CurveKeys

        source = ",".join(cfg.source) if isinstance(cfg.source, list | tuple) else cfg.source
        o = cfg.options
        keys = o.get("curve_client_key"), o.get("curve_server_key")
        curve = CurveKeys.from_files(*keys) if any(keys) else None  # as the loader will connect
        client = BatchClient(source, dead_after=float(o.get("dead_after", 60.0)), curve=curve)
        try:
            served = client.call("ping").get("classes", {})
        finally:
            client.close()
        pack = cfg.options.get("pack")
        if pack not in served:
            raise ConfigError(
                f"data.options.pack {pack!r} is not served by {source}",
                f"give one of: {', '.join(sorted(served)) or '(none)'}",
            )
        return served[pack] or None
    if isinstance(cfg.source, list | tuple):
        return None
    from pathlib import Path

    from datasvc.packs import PackError, open_pack

    try:
        return open_pack(cfg.source).classes
    except PackError:
        root = Path(cfg.source) / cfg.train_split
        if root.is_dir():  # an ImageFolder tree (the torch backend reads those)
            return sorted(p.name for p in root.iterdir() if p.is_dir())
        raise
