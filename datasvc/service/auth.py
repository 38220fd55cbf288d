"""CurveZMQ keys and the loopback rule: plain TCP only on loopback or with ``--insecure``."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from urllib.parse import urlparse

from datasvc.errors import UserError


def write_keypair(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Create ``DIR/NAME.key`` (public) and ``DIR/NAME.key_secret`` (secret, mode 600)."""
    import zmq.auth

    d = Path(directory)
    for existing in (d / f"{name}.key", d / f"{name}.key_secret"):
        if existing.exists():
            # Overwriting a pair would lock out every peer that trusts the old public key.
            raise UserError(
                f"{existing} already exists",
                "choose another --name or folder, or delete the old pair to replace it",
            )
    d.mkdir(parents=True, exist_ok=True)
    pub, sec = zmq.auth.create_certificates(str(d), name)
    os.chmod(sec, 0o600)
    return Path(pub), Path(sec)


def load_keypair(path: str | os.PathLike) -> tuple[bytes, bytes | None]:
    """(public, secret) from a key file written by ``datasvc keys``."""
    import zmq.auth

    return zmq.auth.load_certificate(str(path))


def is_loopback(endpoint: str) -> bool:
    """True for tcp endpoints on 127.0.0.0/8, ::1 or localhost, and for ipc/inproc."""
    if not endpoint.startswith("tcp://"):
        return endpoint.startswith(("ipc://", "inproc://"))
    host = urlparse(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', an interface name or a host name: beyond loopback
