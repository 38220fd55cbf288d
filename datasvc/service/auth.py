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


def check_secret_key(path: str) -> None:
    """A server's ``--curve-secret``: a readable key file that holds a secret key."""
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"--curve-secret {path}: no such file",
            "give the .key_secret file that `datasvc keys DIR --name server` wrote",
        )
    try:
        _, secret = load_keypair(p)
    except OSError as e:
        raise UserError(f"--curve-secret {path}: {e.strerror}", "make it readable") from None
    except ValueError:
        raise UserError(
            f"--curve-secret {path} is not a key file", "give a file written by `datasvc keys`"
        ) from None
    if secret is None:
        raise UserError(
            f"--curve-secret {path} holds only a public key",
            f"give the secret one, {p.with_suffix('.key_secret').name}, next to it",
        )


def allowed_keys(folder: str) -> set[bytes]:
    """The public keys (z85) of the ``*.key`` files in ``folder``; each must parse."""
    keys = set()
    for f in sorted(Path(folder).glob("*.key")):
        try:
            keys.add(load_keypair(f)[0])
        except (OSError, ValueError) as e:
            raise UserError(
                f"--curve-allow {folder}: {f.name} is not a readable public key file ({e})",
                "replace it with a .key file written by `datasvc keys`",
            ) from None
    return keys


def check_allow_folder(folder: str) -> None:
    """``--curve-allow``: a folder with at least one client public key (an empty or misspelled
    one would start a server that refuses everyone)."""
    if not Path(folder).is_dir():
        raise UserError(
            f"--curve-allow {folder}: no such folder",
            "give the folder of allowed clients' public .key files, or --curve-allow-any",
        )
    if not allowed_keys(folder):
        raise UserError(
            f"--curve-allow {folder} holds no .key file, so every client would be refused",
            "copy the clients' public .key files there, or give --curve-allow-any",
        )
