"""The service with real processes on 127.0.0.1: exact-once over ranks, kill -9 and restart,
failover between servers, a fuzzer beside a valid client, CURVE refusal; builders killed and
replaced, bounded work, a greedy client, failed starts, drain on SIGTERM, SIGHUP, and clients
that do not wait forever."""

from __future__ import annotations

import itertools
import os
import random
import re
import signal
import threading
import time

import msgpack
import pytest
import torch
import zmq

from datasvc.loaders import create_loader
from datasvc.packs import open_pack
from datasvc.service.client import AuthenticationError, BatchClient, NoServerError, RemoteError
from datasvc.service.local import LocalServer
from datasvc.service.protocol import PROTOCOL_VERSION, BatchRequest, request_header

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(clean_pack):
    with LocalServer([clean_pack], workers=1) as s:
        yield s


def remote(endpoint, pack="pack", **kw):
    kw.setdefault("batch_size", 8)
    kw.setdefault("image_size", 64)
    kw.setdefault("request_timeout", 5.0)
    kw.setdefault("dead_after", 30.0)
    return create_loader("remote", endpoint, pack=pack, **kw)


def run(loader, limit=None):
    with loader:
        return list(itertools.islice(loader, limit))


@pytest.mark.parametrize("train", [True, False])
def test_two_ranks_exact_once(server, clean_pack, train):
    split = "train" if train else "val"
    n = len(open_pack(clean_pack).split(split))
    ids = []
    counts = []
    for rank in range(2):
        got = run(
            remote(server.endpoint, split=split, train=train, rank=rank, world_size=2, batch_size=5)
        )
        counts.append(len(got))
        ids += [i for b in got for i in b.ids.tolist()]
    assert len(ids) == len(set(ids))
    if train:
        assert counts[0] == counts[1] and n - len(ids) < 10
    else:
        assert sorted(ids) == list(range(n))


def _same_as_custom(endpoint, clean_pack):
    ours = run(remote(endpoint, seed=5))
    local = run(
        create_loader("custom", clean_pack, batch_size=8, image_size=64, seed=5, num_workers=1)
    )
    assert len(ours) == len(local) > 0
    for a, b in zip(ours, local):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.images, b.images)


def test_same_batches_as_custom(server, clean_pack):
    _same_as_custom(server.endpoint, clean_pack)


@pytest.mark.parametrize("engine", ["thread", "process"])
def test_engines_same_batches(clean_pack, engine):
    with LocalServer([clean_pack], workers=2, extra=["--engine", engine]) as s:
        _same_as_custom(s.endpoint, clean_pack)
        s.stop()
        assert s.proc.returncode == 0, "SIGTERM stops the server cleanly"


def test_kill9_and_restart_mid_epoch(clean_pack):
    """The clients finish the epoch with exactly the ids and pixels of an uninterrupted run."""
    with LocalServer([clean_pack], workers=1, extra=["--engine", "process"]) as first:
        endpoint = first.endpoint
        reference = [run(remote(endpoint, rank=r, world_size=2, seed=9)) for r in range(2)]
        loaders = [
            remote(endpoint, rank=r, world_size=2, seed=9, request_timeout=1.0, credits=1)
            for r in range(2)
        ]
        iters = [iter(l) for l in loaders]
        got = [[next(it) for _ in range(2)] for it in iters]
        first.kill()
    # The server comes back 2.5 s later, after the clients' requests have timed out.
    second = LocalServer([clean_pack], workers=1, bind=endpoint)
    timer = threading.Timer(2.5, second.start)
    timer.start()
    try:
        for r, it in enumerate(iters):
            got[r] += list(it)
    finally:
        timer.join()
        second.stop()
    for l in loaders:
        l.close()
    for r in range(2):
        assert len(got[r]) == len(reference[r])
        for a, b in zip(got[r], reference[r]):
            assert torch.equal(a.ids, b.ids) and torch.equal(a.images, b.images)
    assert loaders[0].client.retries > 0  # the lost requests were asked again


def test_two_servers_one_killed(clean_pack):
    with LocalServer([clean_pack], workers=1) as a, LocalServer([clean_pack], workers=1) as b:
        reference = run(remote(a.endpoint, seed=4))
        loader = remote(f"{a.endpoint},{b.endpoint}", seed=4, request_timeout=1.0, credits=1)
        it = iter(loader)
        got = [next(it) for _ in range(2)]
        a.kill()
        got += list(it)
        loader.close()
    assert [x.ids.tolist() for x in got] == [x.ids.tolist() for x in reference]
    assert all(torch.equal(x.images, y.images) for x, y in zip(got, reference))


def _junk(rng: random.Random) -> list[bytes]:
    good = {
        "v": PROTOCOL_VERSION,
        "op": "batch",
        "pack": "pack",
        "split": "train",
        "train": True,
        "image_size": 64,
        "seed": 0,
        "epoch": 0,
        "rank": 0,
        "world": 1,
        "batch_size": 8,
        "batch": 0,
        "id": 1,
    }
    choice = rng.randrange(13)
    if choice == 0:
        return [os.urandom(rng.randrange(0, 200))]
    if choice == 1:
        return [msgpack.packb([1, 2, 3])]
    if choice == 2:
        return [msgpack.packb({**good, "v": 99})]
    if choice == 3:
        bad = dict(good)
        bad.pop(rng.choice([k for k in good if k != "id"]))  # "id" is optional
        return [msgpack.packb(bad)]
    if choice == 4:
        return [msgpack.packb({**good, "batch_size": 10**9})]
    if choice == 5:
        return [msgpack.packb({**good, "image_size": -3})]
    if choice == 6:
        return [msgpack.packb({**good, "batch": 10**6})]
    if choice == 7:
        return [msgpack.packb({**good, "pack": "nope"})]
    if choice == 8:
        return [msgpack.packb(good), b"extra frame"]
    if choice == 9:
        return [msgpack.packb({**good, "rank": 3, "world": 2})]
    if choice == 10:
        return [msgpack.packb({**good, "image_size": "64"})]
    if choice == 11:
        return [msgpack.packb({**good, "got": rng.choice([-1, "3", 2.5])})]
    return [msgpack.packb({**good, "op": "exec"})]


def test_fuzz_while_a_valid_client_is_served(server, clean_pack):
    rng = random.Random(0)
    ctx = zmq.Context()
    fuzzers = [ctx.socket(zmq.DEALER) for _ in range(3)]
    big = ctx.socket(zmq.DEALER)
    silent = ctx.socket(zmq.DEALER)  # asks a lot and never reads
    for s in [*fuzzers, big, silent]:
        s.linger = 0
        s.sndhwm = 10000
        s.connect(server.endpoint)
    big.send(b"x" * (1 << 20))  # over ZMQ_MAXMSGSIZE: the server drops this peer
    req = BatchRequest("pack", "train", True, 64, 0, 0, 0, 1, 8, 0)
    for i in range(200):
        silent.send(request_header(req, i))
    errors = 0
    expected = run(create_loader("custom", clean_pack, batch_size=8, image_size=64, num_workers=1))
    loader = remote(server.endpoint)
    try:
        for k, batch in enumerate(loader):
            for _ in range(20):
                rng.choice(fuzzers).send_multipart(_junk(rng))
            assert torch.equal(batch.ids, expected[k].ids)
            assert torch.equal(batch.images, expected[k].images)
        for f in fuzzers:  # malformed requests got error replies
            while f.poll(200):
                reply = msgpack.unpackb(f.recv_multipart()[0])
                assert reply["ok"] is False and reply["error"]
                errors += 1
    finally:
        loader.close()
        for s in [*fuzzers, big, silent]:
            s.close(0)
        ctx.term()
    assert errors > 50
    c = BatchClient(server.endpoint, dead_after=10)
    try:
        stats = c.call("stats")["stats"]
    finally:
        c.close()
    assert stats["errors"] >= errors and stats["batches"] > 0


def test_error_reply_names_the_problem(server):
    c = BatchClient(server.endpoint, dead_after=10, request_timeout=5)
    try:
        req = BatchRequest("pack", "nope", True, 64, 0, 0, 0, 1, 8, 0)
        with pytest.raises(RemoteError, match="no split 'nope'"):
            list(c.fetch([req]))
    finally:
        c.close()


def test_gpu_decode_mode_with_dali_cpu_twin(server, clean_pack):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    decoded_here = run(remote(server.endpoint, decode="dali_cpu", seed=2, num_workers=1))
    decoded_there = run(remote(server.endpoint, seed=2))
    assert len(decoded_here) == len(decoded_there) > 0
    for a, b in zip(decoded_here, decoded_there):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.labels, b.labels)
        diff = (a.images.float() - b.images.float()).abs().mean()
        assert diff < 12, f"the same crops decoded elsewhere differ by {diff:.1f} levels"


def test_curve_refuses_unknown_key(tmp_path, clean_pack):
    from datasvc.service.auth import write_keypair

    allowed = tmp_path / "allowed"
    write_keypair(tmp_path / "server", "server")
    pub, _ = write_keypair(tmp_path / "clients", "alice")
    allowed.mkdir()
    (allowed / "alice.key").write_bytes(pub.read_bytes())
    write_keypair(tmp_path / "strangers", "mallory")
    extra = [
        "--curve-secret",
        str(tmp_path / "server" / "server.key_secret"),
        "--curve-allow",
        str(allowed),
    ]
    with LocalServer([clean_pack], workers=1, extra=extra) as s:
        server_pub = str(tmp_path / "server" / "server.key")
        ok = remote(
            s.endpoint,
            curve_client_key=str(tmp_path / "clients" / "alice.key_secret"),
            curve_server_key=server_pub,
        )
        assert len(run(ok, 2)) == 2
        stranger = str(tmp_path / "strangers" / "mallory.key_secret")
        cases = {
            "refused this client's CURVE key": dict(curve_server_key=server_pub),
            "the server key given is not this server's": dict(
                curve_server_key=str(tmp_path / "strangers" / "mallory.key")
            ),
        }
        for message, keys in cases.items():
            t0 = time.monotonic()
            with pytest.raises(AuthenticationError, match=f"{s.endpoint} .*{message}"):
                remote(s.endpoint, curve_client_key=stranger, dead_after=30.0, **keys)
            assert time.monotonic() - t0 < 5
        t0 = time.monotonic()
        with pytest.raises(AuthenticationError, match="refused this plain .* it expects CURVE"):
            remote(s.endpoint, dead_after=30.0)  # plain TCP to a CURVE server
        assert time.monotonic() - t0 < 5


def test_refuses_plain_tcp_beyond_loopback(clean_pack, tmp_path):
    from datasvc.cli import main

    assert main(["serve", str(clean_pack), "--bind", "tcp://0.0.0.0:0"]) == 2


def test_no_server_raises_instead_of_hanging():
    with pytest.raises(NoServerError, match="no datasvc server"):
        remote("tcp://127.0.0.1:9", dead_after=1.5)


def test_server_memory_flat_over_epochs(server):
    import psutil

    loader = remote(server.endpoint)
    proc = psutil.Process(server.pid)

    def tree_mb():
        procs = [proc, *proc.children(recursive=True)]
        return sum(p.memory_full_info().pss for p in procs) / 2**20

    sizes = []
    with loader:
        for epoch in range(4):
            loader.set_epoch(epoch)
            for _ in loader:
                pass
            sizes.append(tree_mb())
    assert max(sizes[1:]) - min(sizes[1:]) < 64, sizes


# --- builder supervision -------------------------------------------------------------------


def _stats(endpoint) -> dict:
    c = BatchClient(endpoint, dead_after=10)
    try:
        return c.call("stats")["stats"]
    finally:
        c.close()


def _ping_limits(endpoint) -> dict:
    c = BatchClient(endpoint, dead_after=10)
    try:
        return c.call("ping")["limits"]
    finally:
        c.close()


def _wait_builders(endpoint, restarts: int, timeout: float = 5.0) -> dict:
    """Stats once ``restarts`` builders have been replaced and every builder runs again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = _stats(endpoint)
        if st["builder_restarts"] >= restarts and all(st["builder_pids"]):
            return st
        time.sleep(0.02)
    raise AssertionError(f"builders not replaced within {timeout}s: {st}")


def test_kill9_builders_three_times_during_an_epoch(clean_pack):
    """Three builders killed with -9 while two ranks read an epoch: every id exactly once,
    the pixels of an uninterrupted run, no request asked twice, the server still up."""
    with LocalServer([clean_pack], workers=2) as s:
        reference = [
            run(remote(s.endpoint, rank=r, world_size=2, seed=3, batch_size=4)) for r in (0, 1)
        ]
        loaders = [
            remote(s.endpoint, rank=r, world_size=2, seed=3, batch_size=4, request_timeout=20.0)
            for r in (0, 1)
        ]
        iters = [iter(l) for l in loaders]
        got: list[list] = [[], []]
        kills = 0
        for step in range(len(reference[0])):
            for r in (0, 1):
                got[r].append(next(iters[r]))
            if step in (1, 3, 5):
                victim = _stats(s.endpoint)["builder_pids"][kills % 2]
                os.kill(victim, signal.SIGKILL)
                kills += 1
                _wait_builders(s.endpoint, kills)
        for r in (0, 1):
            assert next(iters[r], None) is None
            loaders[r].close()
        st = _stats(s.endpoint)
        assert s.proc.poll() is None
        log = s.log.read_text()
    assert st["builder_restarts"] == 3 and len(st["builder_deaths"]) == 3
    assert all("SIGKILL" in d["cause"] for d in st["builder_deaths"])
    assert log.count("died, killed by SIGKILL") == 3
    assert all(l.client.retries == 0 for l in loaders), "the server rebuilt, not the client"
    ids = [i for r in (0, 1) for b in got[r] for i in b.ids.tolist()]
    assert len(ids) == len(set(ids))
    for r in (0, 1):
        assert len(got[r]) == len(reference[r])
        for a, b in zip(got[r], reference[r]):
            assert torch.equal(a.ids, b.ids) and torch.equal(a.images, b.images)


def _kill_while_building(endpoint, times: int) -> None:
    """SIGKILL the builder holding the one request in flight, ``times`` times."""
    for k in range(times):
        deadline = time.monotonic() + 10
        while True:
            st = _stats(endpoint)
            if st["builders_busy"] and st["builder_restarts"] == k and all(st["builder_pids"]):
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.005)
        os.kill(st["builder_pids"][st["builders_busy"][0]], signal.SIGKILL)


@pytest.mark.parametrize("deaths", [2, 3])
def test_request_rebuilt_after_builder_deaths_then_failed(clean_pack, deaths):
    """A slow request (64 images at 1024 px) whose builder is killed while building it: after
    two deaths another builder still delivers the same batch; the third fails it by name."""
    req = BatchRequest("pack", "train", True, 1024, 1, 0, 0, 1, 64, 0)
    expected = run(create_loader("custom", clean_pack, batch_size=64, image_size=1024, seed=1))
    with LocalServer([clean_pack], workers=1) as s:
        c = BatchClient(s.endpoint, request_timeout=60, dead_after=60)
        killer = threading.Thread(target=_kill_while_building, args=(s.endpoint, deaths))
        try:
            killer.start()
            if deaths < 3:
                ((header, frames),) = list(c.fetch([req]))
                images = torch.frombuffer(frames[1].buffer, dtype=torch.uint8)
                assert torch.equal(
                    images.view(expected[0].images.permute(0, 2, 3, 1).shape),
                    expected[0].images.permute(0, 2, 3, 1),
                )
            else:
                with pytest.raises(
                    RemoteError,
                    match=r"crash: tcp://\S+: 3 builders died building batch 0 of pack/train",
                ):
                    list(c.fetch([req]))
        finally:
            killer.join()
            c.close()
        assert s.proc.poll() is None
        assert _wait_builders(s.endpoint, deaths)["builder_restarts"] == deaths


# --- bounded work --------------------------------------------------------------------------


def _tree_rss_mb(pid: int) -> float:
    import psutil

    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def test_oversized_request_refused_by_name_without_memory(server):
    """4096 images at 1024 px (12 GiB) and an eval resize of 4096: error replies that name the
    limit, and the server's memory does not move."""
    before = _tree_rss_mb(server.pid)
    c = BatchClient(server.endpoint, request_timeout=5, dead_after=10)
    try:
        limits = c.call("ping")["limits"]
        assert limits["max_batch_mb"] == 256 and limits["max_eval_resize"] == 2048
        huge = BatchRequest("pack", "train", True, 1024, 0, 0, 0, 1, 4096, 0)
        with pytest.raises(
            RemoteError, match=r"limit: .*12288 MiB, over the server's --max-batch-mb 256"
        ):
            list(c.fetch([huge]))
        from datasvc.augment import TransformConfig

        wide = TransformConfig(train=False, image_size=64, eval_resize=4096)
        resize = BatchRequest("pack", "val", False, 64, 0, 0, 0, 1, 4, 0, transform=wide)
        with pytest.raises(
            RemoteError, match=r"eval resize 4096 px is over the server's --max-eval-resize 2048"
        ):
            list(c.fetch([resize]))
    finally:
        c.close()
    assert abs(_tree_rss_mb(server.pid) - before) < 50


def test_client_fails_before_asking_over_the_limits(server):
    before = _stats(server.endpoint)["errors"]
    with pytest.raises(
        RemoteError, match=r"tcp://127.0.0.1:\d+: a batch of 2048 images at 1024x1024 px"
    ):
        remote(server.endpoint, batch_size=2048, image_size=1024, drop_last=False)
    assert _stats(server.endpoint)["errors"] == before, "the server was never asked"


# --- fairness ------------------------------------------------------------------------------


def test_greedy_client_gets_busy_others_finish(clean_pack):
    """A client that asks 10x its credits and never reads gets "busy" for the excess and its
    unread replies hold its credits (and at most one slot); three normal clients beside it
    finish their epochs with the right batches."""
    with LocalServer([clean_pack], workers=2) as s:
        credits = _ping_limits(s.endpoint)["credits"]
        ctx = zmq.Context()
        greedy = ctx.socket(zmq.DEALER)
        greedy.linger = 0
        greedy.rcvhwm, greedy.rcvbuf = 1, 1 << 16  # its libzmq stops reading too
        greedy.connect(s.endpoint)
        for i in range(10 * credits):  # 9.6 MB batches: they outgrow the socket buffers
            req = BatchRequest("pack", "train", True, 224, 7, 0, 0, 1, 64, 0)
            greedy.send(request_header(req, i + 1))
        expected = [b.ids.tolist() for b in run(remote(s.endpoint, seed=0))]
        results: dict[int, list] = {}

        def normal(r: int) -> None:
            results[r] = [b.ids.tolist() for b in run(remote(s.endpoint, seed=0))]

        threads = [threading.Thread(target=normal, args=(r,)) for r in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        st = _stats(s.endpoint)
        greedy.close(0)
        ctx.term()
    assert [results.get(r) for r in range(3)] == [expected] * 3
    assert st["busy"] >= 5 * credits
    (greedy_stats,) = [c for c in st["clients"].values() if c["busy"]]
    assert greedy_stats["busy"] == st["busy"], "only the greedy one was refused"
    assert greedy_stats["unsent"] > 0, "its unread replies hold its credits"
    assert greedy_stats["sending"] <= 1, "and one slot at most"


def test_replies_are_numbered_and_the_client_says_what_it_read(server):
    """Each batch reply carries its delivery number (``seq``); a request's ``got`` (one past the
    last it read) is what frees those replies' credits when libzmq's own notice is late. A bad
    ``got`` is an error reply, and the server serves on."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger, sock.identity = 0, b"reads-and-says-so"
    sock.connect(server.endpoint)

    def ask(n: int, got, first_id: int) -> list[dict]:
        for i in range(n):
            req = BatchRequest("pack", "train", True, 64, 0, 0, 0, 1, 8, i)
            sock.send(request_header(req, first_id + i, got))
        assert sock.poll(30_000), "no reply"
        return [msgpack.unpackb(sock.recv_multipart()[0]) for _ in range(n)]

    try:
        first = ask(2, 0, 1)
        assert [r["ok"] for r in first] == [True, True] and [r["seq"] for r in first] == [0, 1]
        (third,) = ask(1, 2, 3)
        assert third["seq"] == 2
        mine = _stats(server.endpoint)["clients"][b"reads-and-says-so".hex()]
        assert mine["delivered"] == 3 and mine["got"] == 2 and mine["unread"] <= 1
        (bad,) = ask(1, -1, 4)
        assert bad["ok"] is False and bad["error"] == "field" and "got" in bad["message"]
        (after,) = ask(1, 3, 5)
        assert after["ok"] and after["seq"] == 3
    finally:
        sock.close(0)
        ctx.term()


# --- clean start and stop ------------------------------------------------------------------


def _leftovers(marker: str) -> list[str]:
    """Processes still running whose environment carries ``marker`` (our TMPDIR)."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.environ().get("TMPDIR") == marker:
                found.append(f"{p.pid} {' '.join(p.info['cmdline'] or [])}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def _failed_start(tmp_path, *args) -> tuple[str, float]:
    """Run ``datasvc serve ARGS`` that must fail: → (its stderr, seconds it took); checks that
    it left no process and no temporary folder."""
    import subprocess
    import sys

    own_tmp = tmp_path / "tmp"
    own_tmp.mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(own_tmp))
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "datasvc.cli", "serve", *map(str, args), "--workers", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    took = time.monotonic() - t0
    time.sleep(0.2)  # a leftover builder would still be there
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    assert _leftovers(str(own_tmp)) == []
    assert list(own_tmp.iterdir()) == []
    errors = [ln for ln in r.stderr.splitlines() if ": error:" in ln]
    assert len(errors) == 1 and errors[0].startswith("datasvc serve: error: "), r.stderr
    return errors[0], took


def test_killed_server_leaves_nothing_in_tmp(clean_pack):
    """kill -9 leaves the builders' socket folder; LocalServer's stop() removes it with the
    server's own temporary folder, so a fault-test suite does not fill the machine's /tmp."""
    s = LocalServer([clean_pack], workers=1, extra=["--engine", "process"]).start()
    home = s.home
    (serve_dir,) = home.glob("datasvc-serve-*")
    assert serve_dir.name.startswith(f"datasvc-serve-{s.pid}-")
    s.kill()
    assert serve_dir.exists()  # nobody could remove it
    s.stop()
    assert not home.exists()


def test_next_server_sweeps_folders_of_dead_servers(tmp_path, monkeypatch):
    import subprocess
    import tempfile

    from datasvc.service.broker import make_serve_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = tmp_path / f"datasvc-serve-{gone.pid}-abc"
    alive = tmp_path / f"datasvc-serve-{os.getppid()}-abc"
    other = tmp_path / "datasvc-serve-notapid"
    for d in (dead, alive, other):
        d.mkdir()
    mine = make_serve_dir()
    assert not dead.exists(), "a dead server's folder is removed"
    assert alive.exists() and other.exists(), "a live server's and a stranger's are kept"
    assert mine.parent == tmp_path and mine.name.startswith(f"datasvc-serve-{os.getpid()}-")


def test_port_in_use_fails_fast_and_clean(clean_pack, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line, took = _failed_start(tmp_path, clean_pack, "--bind", f"tcp://127.0.0.1:{port}")
    assert f"cannot bind tcp://127.0.0.1:{port}: the port is in use" in line
    assert "choose another --bind" in line and took < 5


@pytest.fixture
def keys(tmp_path):
    from datasvc.service.auth import write_keypair

    write_keypair(tmp_path / "server", "server")
    pub, _ = write_keypair(tmp_path / "clients", "alice")
    (tmp_path / "allowed").mkdir()
    (tmp_path / "allowed" / "alice.key").write_bytes(pub.read_bytes())
    (tmp_path / "empty").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    "secret, allow, message",
    [
        ("server/missing.key_secret", "allowed", "missing.key_secret: no such file"),
        ("server/server.key", "allowed", "holds only a public key"),
        ("server/server.key_secret", "nowhere", "--curve-allow .*nowhere: no such folder"),
        ("server/server.key_secret", "empty", "holds no .key file, so every client"),
    ],
)
def test_bad_curve_setup_fails_fast_and_clean(clean_pack, keys, secret, allow, message):
    import re

    args = ["--curve-secret", keys / secret, "--curve-allow", keys / allow]
    line, took = _failed_start(keys, clean_pack, *args)
    assert re.search(message, line), line
    assert took < 5


def test_curve_allow_any_accepts_any_key(clean_pack, keys):
    from datasvc.service.auth import write_keypair

    write_keypair(keys / "strangers", "mallory")
    extra = ["--curve-secret", str(keys / "server" / "server.key_secret"), "--curve-allow-any"]
    with LocalServer([clean_pack], workers=1, extra=extra) as s:
        loader = remote(
            s.endpoint,
            curve_client_key=str(keys / "strangers" / "mallory.key_secret"),
            curve_server_key=str(keys / "server" / "server.key"),
        )
        assert len(run(loader, 2)) == 2


def test_sighup_rereads_the_allow_list(clean_pack, keys):
    """Bob is refused until his key is copied in and the server gets SIGHUP; Alice, removed
    the same way, is refused on her open connection."""
    from datasvc.service.auth import write_keypair

    bob_pub, _ = write_keypair(keys / "clients", "bob")
    server_key = str(keys / "server" / "server.key")
    extra = [
        "--curve-secret",
        str(keys / "server" / "server.key_secret"),
        "--curve-allow",
        str(keys / "allowed"),
    ]

    def as_(name, **kw):
        key = str(keys / "clients" / f"{name}.key_secret")
        return remote(s.endpoint, curve_client_key=key, curve_server_key=server_key, **kw)

    with LocalServer([clean_pack], workers=1, extra=extra) as s:
        alice = as_("alice")
        alice_batches = iter(alice)
        next(alice_batches)
        with pytest.raises(AuthenticationError, match="refused this client's CURVE key"):
            as_("bob")
        (keys / "allowed" / "bob.key").write_bytes(bob_pub.read_bytes())
        (keys / "allowed" / "alice.key").unlink()
        os.kill(s.pid, signal.SIGHUP)
        deadline = time.monotonic() + 5
        while "allow-list re-read" not in s.log.read_text():
            assert time.monotonic() < deadline, s.log.read_text()
            time.sleep(0.05)
        assert len(run(as_("bob"), 2)) == 2
        with pytest.raises(RemoteError, match="no longer on the server's allow-list"):
            list(alice_batches)
        alice.close()


def test_sigterm_drains_and_the_client_moves_to_the_other_server(clean_pack):
    """SIGTERM to one of two servers mid-epoch: it finishes what it holds and exits 0; the
    client gets every batch exactly once, from the other server, well before any timeout."""
    with LocalServer([clean_pack], workers=1) as a, LocalServer([clean_pack], workers=1) as b:
        reference = run(remote(b.endpoint, seed=6, batch_size=4))
        loader = remote(f"{a.endpoint},{b.endpoint}", seed=6, batch_size=4, request_timeout=30)
        it = iter(loader)
        got = [next(it) for _ in range(3)]
        t0 = time.monotonic()
        a.proc.send_signal(signal.SIGTERM)
        got += list(it)
        took = time.monotonic() - t0
        assert a.proc.wait(timeout=10) == 0
        log = a.log.read_text()
        loader.close()
    assert "draining" in log and "drained" in log
    assert took < 10, "moved on at once, not after request_timeout"
    assert [x.ids.tolist() for x in got] == [x.ids.tolist() for x in reference]
    assert all(torch.equal(x.images, y.images) for x, y in zip(got, reference))


def test_rejected_request_errors_within_request_timeout(server):
    """A request the server rejects (a negative epoch) raises at once: the error reply carries
    its id, and error replies are not progress that keeps the client waiting."""
    c = BatchClient(server.endpoint, request_timeout=3, dead_after=60)
    t0 = time.monotonic()
    try:
        with pytest.raises(RemoteError, match=r"range: .*epoch=-1 is outside"):
            list(c.fetch([BatchRequest("pack", "train", True, 64, 0, -1, 0, 1, 8, 0)]))
    finally:
        c.close()
    assert time.monotonic() - t0 < 3


def test_unreachable_endpoints_named_with_the_time_waited():
    with pytest.raises(NoServerError) as e:
        remote("tcp://127.0.0.1:9,tcp://127.0.0.1:7", dead_after=1.5)
    message = str(e.value)
    assert "tcp://127.0.0.1:9 (no connection)" in message
    assert "tcp://127.0.0.1:7 (no connection)" in message
    assert re.search(r"in 1\.\ds", message), message


class _NaySayer(threading.Thread):
    """A real ROUTER on 127.0.0.1 that answers ping properly and every batch request with the
    error ``code``, either without the request's id or with it: a server that keeps saying no."""

    def __init__(self, code: str, with_id: bool):
        super().__init__(daemon=True)
        self.code, self.with_id = code, with_id
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.stop = threading.Event()

    def run(self) -> None:
        from datasvc.service.protocol import error_header, pack_header

        while not self.stop.is_set():
            if not self.sock.poll(50):
                continue
            peer, frame = self.sock.recv_multipart()
            req = msgpack.unpackb(frame)
            if req["op"] == "ping":
                pong = {"id": req["id"], "ok": True, "op": "pong", "packs": {"pack": {"train": 64}}}
                reply = pack_header({**pong, "limits": None, "workers": 1})
            else:
                reply = error_header(req["id"] if self.with_id else None, self.code, "no")
            self.sock.send_multipart([peer, reply])
        self.sock.close(0)
        self.ctx.term()


@pytest.mark.parametrize(
    "code, with_id, raises",
    [("range", False, RemoteError), ("busy", True, NoServerError), ("busy", False, NoServerError)],
)
def test_a_server_that_keeps_saying_no_is_not_waited_on_forever(code, with_id, raises):
    """An error reply without the request's id is tied to the oldest request in flight there;
    "busy" forever is not progress: the client raises after dead_after, not never."""
    nay = _NaySayer(code, with_id)
    nay.start()
    c = BatchClient(nay.endpoint, request_timeout=30, dead_after=2, pack="pack")
    t0 = time.monotonic()
    try:
        with pytest.raises(raises):
            list(
                c.fetch(
                    [BatchRequest("pack", "train", True, 64, 0, 0, 0, 1, 8, b) for b in range(3)]
                )
            )
    finally:
        c.close()
        nay.stop.set()
        nay.join()
    assert time.monotonic() - t0 < 5
