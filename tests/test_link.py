"""Two hosts on one machine: the server in one network namespace, the client in another,
joined by a veth pair shaped to 1 Gbit/s; faults by taking the link down."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from benchmarks import netns
from benchmarks.link_client import image_digest
from datasvc.loaders import create_loader
from datasvc.service.local import LocalServer

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.slow,  # a server and a client process each: ~15 s a test on 2 cores
    pytest.mark.skipif(netns.unavailable() is not None, reason=str(netns.unavailable())),
]


@pytest.fixture
def link():
    """A fresh shaped link for each test, deleted on every exit path."""
    with netns.Link(rate="1gbit") as made:
        yield made
    assert (
        made.server_ns
        not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    ), "the namespaces are gone"


def serve_in(link, pack):
    return LocalServer(
        [pack],
        workers=1,
        bind=f"tcp://{link.server_ip}:*",
        extra=["--insecure"],  # the link exists only between our two namespaces
        prefix=link.exec_prefix(link.server_ns),
    )


def client_in(link, endpoint, *args):
    cmd = [sys.executable, "-m", "benchmarks.link_client", endpoint, "--pack", "pack", *args]
    return link.popen(link.client_ns, cmd, stdout=subprocess.PIPE, text=True)


def reference_digests(pack, image_size, seed):
    loader = create_loader(
        "custom", pack, batch_size=8, image_size=image_size, seed=seed, num_workers=1,
        engine="thread",
    )  # fmt: skip
    with loader:
        return [(b.ids.tolist(), image_digest(b.images)) for b in loader]


def finish(proc, timeout=120) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-2000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("decode", ["server", "client"])
def test_epoch_over_the_shaped_link(link, clean_pack, decode):
    reference = reference_digests(clean_pack, 96, 2)
    with serve_in(link, clean_pack) as server:
        assert server.endpoint.startswith(f"tcp://{link.server_ip}:")
        before = link.tx_bytes(link.server_ns)
        got = finish(
            client_in(link, server.endpoint, "--decode", decode, "--batch-size", "8",
                      "--image-size", "96", "--seed", "2")
        )  # fmt: skip
        sent = link.tx_bytes(link.server_ns) - before
    assert list(zip(got["ids"], got["digests"])) == [(i, d) for i, d in reference]
    received = got["bytes_per_image"] * 64
    assert sent >= received, "the batches crossed the veth link"


def test_link_down_5s_mid_epoch_exactly_once(link, clean_pack):
    reference = reference_digests(clean_pack, 64, 4)
    with serve_in(link, clean_pack) as server:
        proc = client_in(
            link, server.endpoint, "--batch-size", "8", "--image-size", "64", "--seed", "4",
            "--request-timeout", "2", "--dead-after", "60", "--pause", "0.2",
        )  # fmt: skip
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        deadline = time.monotonic() + 60
        while not any(x.startswith("batch 2") for x in lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        link.down()
        time.sleep(5)
        link.up()
        proc.wait(timeout=120)
        reader.join(timeout=10)
    assert proc.returncode == 0
    got = json.loads(lines[-1])
    assert list(zip(got["ids"], got["digests"])) == [(i, d) for i, d in reference]
    assert max(got["waits"]) >= 4.0, "the epoch did wait for the link"
