"""The service at fleet scale on 127.0.0.1: 64 ranks against one server, servers joining and
leaving a running job through the endpoints file, one pack per job, crop-segment transport."""

from __future__ import annotations

import concurrent.futures
import io
import time

import numpy as np
import pytest
import torch
from PIL import Image

from converters.convert import ConvertConfig, convert
from datasvc.loaders import create_loader
from datasvc.service.client import PackMismatchError
from datasvc.service.local import LocalServer

pytestmark = pytest.mark.timeout(120)


def write_small_tree(root, classes: int, per_class: int, size=(40, 32), seed=0):
    """``classes`` x ``per_class`` small RGB JPEGs: enough samples for 64 ranks, cheap to build."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / "train" / f"n{c:08d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, "JPEG", quality=85)
            (d / f"img_{i:05d}.JPEG").write_bytes(buf.getvalue())
    return root


@pytest.fixture(scope="module")
def small_pack(tmp_path_factory):
    """512 train images of 40x32 in 4 classes."""
    tree = write_small_tree(tmp_path_factory.mktemp("small-tree"), 4, 128)
    out = tmp_path_factory.mktemp("small-pack") / "small"
    convert(tree, out, ConvertConfig(format="lmdb", shards=2), progress=False)
    return out


def rank_ids(endpoint, rank, world, pack="small", **kw):
    kw.setdefault("batch_size", 2)
    kw.setdefault("image_size", 32)
    loader = create_loader(
        "remote", endpoint, pack=pack, rank=rank, world_size=world, seed=1, dead_after=60, **kw
    )
    with loader:
        return [i for b in loader for i in b.ids.tolist()]


def test_64_ranks_one_server_listing_computed_once_per_builder(small_pack):
    world = 64
    with LocalServer([small_pack], workers=2) as server:
        with concurrent.futures.ThreadPoolExecutor(world) as pool:
            per_rank = list(pool.map(lambda r: rank_ids(server.endpoint, r, world), range(world)))
        stats = server.raw_stats()
    flat = [i for ids in per_rank for i in ids]
    assert sorted(flat) == list(range(512)), "every sample exactly once over the job"
    assert {len(ids) for ids in per_rank} == {8}
    assert stats["listings_by_builder"] == {"0": 1, "1": 1}, "one listing per builder per epoch"


def reference_batches(pack, **kw):
    loader = create_loader(
        "custom", pack, batch_size=4, image_size=32, seed=1, num_workers=1, engine="thread", **kw
    )
    with loader:
        return [(b.ids.clone(), b.images.clone()) for b in loader]


def consume(loader, at: int, action, pause: float = 0.03):
    """Iterate ``loader``, calling ``action()`` after batch ``at``; pause between batches so
    that the epoch outlasts a server's start. → (batches, requests sent per server, when
    each server got its first request)."""
    got = []
    with loader:
        for i, b in enumerate(loader):
            got.append((b.ids.clone(), b.images.clone()))
            if i == at:
                action()
            time.sleep(pause)
        served = {ep.address: ep.requests for ep in loader.client.endpoints}
        first = {ep.address: ep.first_request_at for ep in loader.client.endpoints}
        return got, served, first


def assert_same_epoch(got, reference):
    assert len(got) == len(reference)
    ids = [i for g, _ in got for i in g.tolist()]
    assert len(ids) == len(set(ids)), "nothing delivered twice"
    for (gi, gx), (ri, rx) in zip(got, reference):
        assert torch.equal(gi, ri) and torch.equal(gx, rx), "bit-identical batches"


def file_loader(path, **kw):
    kw.setdefault("request_timeout", 2.0)
    return create_loader(
        "remote",
        f"file:{path}",
        pack="small",
        batch_size=4,
        image_size=32,
        seed=1,
        refresh=0.3,
        dead_after=30,
        **kw,
    )


def test_second_server_joins_mid_epoch_through_endpoints_file(small_pack, tmp_path):
    endpoints = tmp_path / "endpoints"
    announce = ["--announce", str(endpoints)]
    reference = reference_batches(small_pack)
    with LocalServer([small_pack], workers=1, extra=announce) as a:
        second = LocalServer([small_pack], workers=1, extra=announce)
        loader = file_loader(endpoints)
        try:
            up_at = []  # when the new server is listening (and announced)
            got, served, first = consume(
                loader, 5, lambda: (second.start(), up_at.append(time.monotonic()))
            )
            assert len(endpoints.read_text().split()) == 2
            b_stats = second.raw_stats()
        finally:
            second.stop()
    assert_same_epoch(got, reference)
    assert served[second.endpoint] > 0 and served[a.endpoint] > 0
    assert first[second.endpoint] - up_at[0] < 10, "a new server gets requests within 10 s"
    assert b_stats["batches"] >= 10, "the new server serves a share of the remaining batches"
    assert endpoints.read_text().split() == [], "each server withdrew itself on stop"


def test_drained_server_loses_nothing(small_pack, tmp_path):
    endpoints = tmp_path / "endpoints"
    announce = ["--announce", str(endpoints)]
    reference = reference_batches(small_pack)
    with LocalServer([small_pack], workers=1, extra=announce) as a:
        with LocalServer([small_pack], workers=1, extra=announce) as b:
            loader = file_loader(endpoints, credits=2)
            got, after, _ = consume(loader, 8, b.stop)  # SIGTERM: b withdraws and stops
        assert endpoints.read_text().split() == [a.endpoint]
    assert_same_epoch(got, reference)
    assert b.endpoint not in after, "the drained server was dropped from the job"


def test_one_job_one_pack(small_pack, clean_pack, tmp_path):
    endpoints = tmp_path / "endpoints"
    with LocalServer([small_pack], workers=1, extra=["--announce", str(endpoints)]):
        # the same name, another pack: must not feed this job
        with LocalServer([f"small={clean_pack}"], workers=1) as other:
            loader = file_loader(endpoints)
            with loader:
                it = iter(loader)
                first = [next(it) for _ in range(3)]
                with open(endpoints, "a") as f:
                    f.write(other.endpoint + "\n")
                rest = []
                for b in it:  # slowly: the file is re-read and the server answers meanwhile
                    rest.append(b)
                    time.sleep(0.03)
                refused = dict(loader.client.refused)
            other_stats = other.raw_stats()
            t0 = time.monotonic()
            with pytest.raises(PackMismatchError, match="has no pack 'nope'"):
                create_loader("remote", other.endpoint, pack="nope", dead_after=30)
            assert time.monotonic() - t0 < 10, "a server without the pack fails fast"
    assert len(first) + len(rest) == 512 // 4
    assert "different pack under the name 'small'" in refused[other.endpoint]
    assert other_stats["batches"] == 0


def test_crop_segment_transport_same_pixels_whole_epoch(clean_pack):
    """decode="client": the server sends each train crop's restart segments and the client
    decodes them; a whole epoch equals server decoding bit for bit, in under half the bytes."""
    runs = {}
    with LocalServer([clean_pack], workers=1) as server:
        for mode in ("server", "client"):
            loader = create_loader(
                "remote",
                server.endpoint,
                pack="pack",
                batch_size=8,
                image_size=224,
                seed=3,
                decode=mode,
                num_workers=2,
            )
            with loader:
                loader.set_epoch(1)
                batches = [(b.ids.clone(), b.images.clone(), b.labels.clone()) for b in loader]
                runs[mode] = batches, loader.client.bytes_received
        stats = server.raw_stats()
    (server_batches, server_bytes), (client_batches, client_bytes) = runs["server"], runs["client"]
    assert len(client_batches) == len(server_batches) == 64 // 8
    for (ai, ax, al), (bi, bx, bl) in zip(server_batches, client_batches):
        assert torch.equal(ai, bi) and torch.equal(al, bl)
        assert torch.equal(ax, bx), "crop segments decode to the server's pixels"
    assert client_bytes < server_bytes / 2, (client_bytes, server_bytes)
    assert stats["errors"] == 0


def test_crop_segments_refused_for_eval_requests(clean_pack):
    from datasvc.service.client import BatchClient, RemoteError
    from datasvc.service.protocol import BatchRequest

    with LocalServer([clean_pack], workers=1) as server:
        client = BatchClient(server.endpoint, pack="pack", dead_after=10)
        try:
            req = BatchRequest("pack", "val", False, 64, 0, 0, 0, 1, 4, 0, "segments")
            with pytest.raises(RemoteError, match="for train requests"):
                list(client.fetch([req]))
        finally:
            client.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_prometheus_metrics_and_status_table(small_pack, capsys):
    pytest.importorskip("prometheus_client")
    from datasvc.cli import main as cli_main
    from datasvc.service.client import BatchClient, RemoteError
    from datasvc.service.protocol import BatchRequest

    port = free_port()
    extra = ["--metrics-port", str(port), "--metrics-addr", "127.0.0.1"]
    with LocalServer([small_pack], workers=1, extra=extra) as server:
        ids = rank_ids(server.endpoint, 0, 4)  # 64 batches of 2
        client = BatchClient(server.endpoint, pack="small", dead_after=10)
        try:
            bad = BatchRequest("small", "train", True, 32, 0, 0, 0, 1, 2, 10**6)
            with pytest.raises(RemoteError, match="range"):
                list(client.fetch([bad]))
        finally:
            client.close()
        m = scrape(port)
        assert cli_main(["status", server.endpoint, "tcp://127.0.0.1:1", "--once",
                         "--interval", "0.2", "--timeout", "1"]) == 0  # fmt: skip
    assert m[("datasvc_images_served_total", ())] == len(ids) == 128
    assert m[("datasvc_requests_total", (("outcome", "ok"),))] == 64
    assert m[("datasvc_requests_total", (("outcome", "range"),))] == 1
    assert m[("datasvc_request_latency_seconds_count", ())] == 64
    assert m[("datasvc_queue_depth", ())] == 0
    assert 0 <= m[("datasvc_batches_copied_total", ())] < m[("datasvc_batches_served_total", ())]
    clients = [k for k in m if k[0] == "datasvc_client_images_total"]
    assert 1 <= len(clients) <= 33 and sum(m[k] for k in clients) == 128
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ["endpoint", "state", "uptime"]
    assert lines[1].split()[:2] == [server.endpoint, "up"] and lines[1].split()[6] == "128"
    assert lines[2].split()[:2] == ["tcp://127.0.0.1:1", "down"]


def test_per_builder_metrics_from_the_endpoint(small_pack):
    """Per-builder gauges, labelled by builder index only: busy seconds adding up to the
    global figure, a killed builder's restart counted on its own index, nothing in flight at
    rest."""
    pytest.importorskip("prometheus_client")
    import os
    import signal

    port = free_port()
    extra = ["--metrics-port", str(port), "--metrics-addr", "127.0.0.1"]
    with LocalServer([small_pack], workers=2, extra=extra) as server:
        assert len(rank_ids(server.endpoint, 0, 4)) == 128
        victim = server.raw_stats()["builder_pids"][1]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            st = server.raw_stats()
            if st["builder_restarts"] == 1 and victim not in st["builder_pids"]:
                if None not in st["builder_pids"]:
                    break
            time.sleep(0.1)
        assert len(rank_ids(server.endpoint, 1, 4)) == 128  # the replacement serves too
        m = scrape(port)
    per = {k[1]: v for k, v in m.items() if k[0] == "datasvc_per_builder_restarts_total"}
    assert per == {(("builder", "0"),): 0, (("builder", "1"),): 1}
    busy = [v for k, v in m.items() if k[0] == "datasvc_per_builder_busy_seconds_total"]
    assert len(busy) == 2 and sum(busy) == pytest.approx(
        m[("datasvc_builder_busy_seconds_total", ())]
    )
    fractions = [v for k, v in m.items() if k[0] == "datasvc_per_builder_busy_fraction"]
    assert len(fractions) == 2 and all(0 <= f <= 1 for f in fractions) and sum(fractions) > 0
    in_flight = [v for k, v in m.items() if k[0] == "datasvc_per_builder_tasks_in_flight"]
    assert in_flight == [0, 0]
    listings = [v for k, v in m.items() if k[0] == "datasvc_per_builder_listings"]
    assert len(listings) == 2 and max(listings) >= 1


def test_load_benchmark_memory_windows():
    """The load run's memory report: the start-up ramp is left out of the window comparison,
    and a two-minute run also compares its first minute with its last."""
    from benchmarks.fleet import memory_summary

    mb = 2**20

    def sample(t):  # 100 MB at start, 150 MB once started (after 5 s), +1 MB a minute after
        anon = 100 * mb if t < 5 else 150 * mb + int(t / 60 * mb)
        return (float(t), {"anon": anon, "file": 10 * mb, "shmem": mb})

    short = memory_summary([sample(t) for t in range(60)], 60)
    assert short["anon_mb_10s_window_after_10s_warmup"] == pytest.approx(150.24, abs=0.01)
    assert short["anon_mb_last_10s_window"] == pytest.approx(150.91, abs=0.01)
    assert short["last_window_over_first_after_warmup"] == pytest.approx(1.0045, abs=1e-4)
    assert "last_minute_over_first_minute" not in short
    long = memory_summary([sample(t) for t in range(120)], 120)
    assert long["anon_mb_first_minute"] == pytest.approx(146.32, abs=0.01)  # with start-up
    assert long["anon_mb_last_minute"] == pytest.approx(151.49, abs=0.01)
    assert long["last_minute_over_first_minute"] == pytest.approx(151.49 / 146.32, abs=1e-4)
