"""Prometheus metrics of a running ``datasvc serve`` (``--metrics-port``), read from the
broker's counters when scraped, so serving pays nothing for them.

Label sets are bounded: ``outcome`` takes one of ``OUTCOMES``; ``builder`` is a builder's
index (0 to ``--workers`` - 1: a replacement takes over its index); ``client`` names at most
``MAX_CLIENT_SERIES`` clients (those that received most images), the rest summed as ``other``.
Needs ``prometheus_client`` (the ``metrics`` extra).
"""

from __future__ import annotations

import bisect
import logging
import time

log = logging.getLogger(__name__)

#: Request latency buckets (seconds, from a request's arrival to its reply leaving).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Every request ends as one of these (an error reply's code, or ``ok``).
OUTCOMES = (
    "ok", "busy", "draining", "limit", "range", "field", "pack", "split", "op", "malformed",
    "version", "build", "crash", "corrupt", "other",
)  # fmt: skip
MAX_CLIENT_SERIES = 32


def outcome_label(code: str | None) -> str:
    """A reply's error code (None: success) → its bounded ``outcome`` label."""
    if code is None:
        return "ok"
    return code if code in OUTCOMES else "other"


class LatencyHistogram:
    """Cumulative-bucket counts of request latencies, kept by the broker."""

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last: above every bucket
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, n in zip([*map(str, self.buckets), "+Inf"], self.counts):
            total += n
            out.append((bound, total))
        return out


class BrokerCollector:
    """Yields the broker's metrics at scrape time. ``broker`` needs ``stats`` (a ``Stats``),
    ``queue_depth()``, ``tasks_in_flight()`` and ``config.builders``."""

    def __init__(self, broker):
        self.broker = broker

    def collect(self):
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        b = self.broker
        st = b.stats
        yield CounterMetricFamily("datasvc_images_served", "Images served", value=st.images)
        yield CounterMetricFamily("datasvc_bytes_served", "Reply bytes sent", value=st.bytes)
        yield CounterMetricFamily("datasvc_batches_served", "Batches served", value=st.batches)
        yield CounterMetricFamily(
            "datasvc_batches_copied",
            "Batches sent as a copy (their client already had one on its way from a slot)",
            value=st.copied,
        )
        req = CounterMetricFamily("datasvc_requests", "Requests by outcome", labels=["outcome"])
        for outcome in OUTCOMES:
            req.add_metric([outcome], st.outcomes.get(outcome, 0))
        yield req
        yield GaugeMetricFamily("datasvc_queue_depth", "Requests waiting", value=b.queue_depth())
        yield GaugeMetricFamily("datasvc_builders", "Batch builders", value=b.config.builders)
        yield CounterMetricFamily(
            "datasvc_builder_busy_seconds", "Seconds builders spent building", value=st.busy_s
        )
        up = max(1e-9, time.time() - st.started)
        yield GaugeMetricFamily(
            "datasvc_builder_busy_fraction",
            "Builder busy time over uptime x builders, since start",
            value=st.busy_s / (up * b.config.builders),
        )
        yield CounterMetricFamily(
            "datasvc_builder_restarts", "Builders replaced after dying", value=st.restarts
        )
        h = HistogramMetricFamily(
            "datasvc_request_latency_seconds", "Request arrival to reply sent"
        )
        h.add_metric([], st.latency.cumulative(), sum_value=st.latency.sum)
        yield h
        yield from self._builders(b, up, CounterMetricFamily, GaugeMetricFamily)
        yield from self._clients(st, CounterMetricFamily)

    @staticmethod
    def _builders(b, up: float, CounterMetricFamily, GaugeMetricFamily):
        """The same figures per builder index (``datasvc_per_builder_*{builder="i"}``)."""
        st = b.stats
        busy = CounterMetricFamily(
            "datasvc_per_builder_busy_seconds", "Seconds spent building", labels=["builder"]
        )
        fraction = GaugeMetricFamily(
            "datasvc_per_builder_busy_fraction",
            "Busy time over uptime, since start",
            labels=["builder"],
        )
        restarts = CounterMetricFamily(
            "datasvc_per_builder_restarts", "Times replaced after dying", labels=["builder"]
        )
        in_flight = GaugeMetricFamily(
            "datasvc_per_builder_tasks_in_flight", "Tasks being built now", labels=["builder"]
        )
        listings = GaugeMetricFamily(
            "datasvc_per_builder_listings",
            "Epoch listings its current process has computed",
            labels=["builder"],
        )
        computed = dict(st.listings)  # a copy: the broker adds keys as builders report
        for i, n in enumerate(b.tasks_in_flight()):
            label = [str(i)]
            busy.add_metric(label, st.busy_s_by_builder[i])
            fraction.add_metric(label, st.busy_s_by_builder[i] / up)
            restarts.add_metric(label, st.restarts_by_builder[i])
            in_flight.add_metric(label, n)
            listings.add_metric(label, computed.get(i, 0))
        yield from (busy, fraction, restarts, in_flight, listings)

    def _clients(self, st, CounterMetricFamily):
        images = CounterMetricFamily(
            "datasvc_client_images", "Images per client", labels=["client"]
        )
        nbytes = CounterMetricFamily("datasvc_client_bytes", "Bytes per client", labels=["client"])
        errors = CounterMetricFamily(
            "datasvc_client_errors", "Errors per client", labels=["client"]
        )
        rows = sorted(st.clients.as_dict().items(), key=lambda kv: -kv[1]["images"])
        other = {"images": 0, "bytes": 0, "errors": 0}
        for i, (client, c) in enumerate(rows):
            if i < MAX_CLIENT_SERIES:
                label = client[:16]
                images.add_metric([label], c["images"])
                nbytes.add_metric([label], c["bytes"])
                errors.add_metric([label], c["errors"])
            else:
                for k in other:
                    other[k] += c[k]
        if len(rows) > MAX_CLIENT_SERIES:
            images.add_metric(["other"], other["images"])
            nbytes.add_metric(["other"], other["bytes"])
            errors.add_metric(["other"], other["errors"])
        yield images
        yield nbytes
        yield errors


def start_metrics_server(broker, port: int, addr: str = "0.0.0.0"):
    """Serve ``/metrics`` on ``addr:port`` from a thread; → the registry."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        raise RuntimeError(
            "--metrics-port needs prometheus_client: pip install 'datasvc[metrics]'"
        ) from None
    registry = CollectorRegistry()
    registry.register(BrokerCollector(broker))
    start_http_server(port, addr=addr, registry=registry)
    log.info("metrics on http://%s:%d/metrics", addr, port)
    return registry
