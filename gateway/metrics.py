"""Prometheus metrics, in base units, one registry per app (so tests and several apps don't collide).

Labels are route names, backend names and outcome labels from the closed error vocabulary: bounded sets,
never prompts, users or keys. Label children are cached so the hot path does no label lookups.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from backends.base import Backend

_M = TypeVar("_M", bound=MetricWrapperBase)

# The *_created series double the scrape size and nobody graphs them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated

# Image generation takes seconds to minutes: Prometheus' default buckets stop at 10 s.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300)
# Gateway overhead lives in the tens of microseconds to a few milliseconds.
OVERHEAD_BUCKETS = (5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 7.5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1)
# Backend stages run from a millisecond (a cached text encode, a TAESD decode) to minutes (a remote queue).
STAGE_BUCKETS = (1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


class _LoadCollector(Collector):
    def __init__(self, backends: Mapping[str, Backend]) -> None:
        self._backends = backends

    def collect(self) -> Iterable[GaugeMetricFamily]:
        in_flight = GaugeMetricFamily(
            "imagegate_backend_in_flight", "Requests in flight per backend", labels=["backend"]
        )
        queue = GaugeMetricFamily("imagegate_backend_queue_depth", "Queued requests per backend", labels=["backend"])
        wait = GaugeMetricFamily("imagegate_backend_estimated_wait_seconds", "Estimated queue wait", labels=["backend"])
        ready = GaugeMetricFamily("imagegate_backend_ready", "1 when the backend is ready", labels=["backend"])
        for name, backend in self._backends.items():
            load = backend.load()
            in_flight.add_metric([name], load.in_flight)
            queue.add_metric([name], load.queue_depth)
            wait.add_metric([name], load.est_wait_s)
            ready.add_metric([name], 1.0 if backend.ready() else 0.0)
        return [in_flight, queue, wait, ready]


class Metrics:
    def __init__(self, backends: Mapping[str, Backend] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "imagegate_requests",
            "Image requests by route, serving backend and outcome",
            ["route", "backend", "outcome"],
            registry=r,
        )
        self.duration = Histogram(
            "imagegate_request_duration_seconds",
            "Time from request to response",
            ["route", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "imagegate_gateway_overhead_seconds",
            "Time spent in the gateway itself",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.backend_latency = Histogram(
            "imagegate_backend_latency_seconds",
            "Time waiting on a backend per attempt",
            ["backend", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Stage names come from the backends' code (queue, text_encode, denoise, decode, encode, remote_queue,
        # remote_predict): a small fixed set per backend type, so a bounded label.
        self.stages = Histogram(
            "imagegate_backend_stage_seconds",
            "Stage durations reported by backends, per attempt",
            ["backend", "stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.attempts = Counter(
            "imagegate_backend_attempts", "Attempts per backend and outcome", ["backend", "outcome"], registry=r
        )
        self.fallbacks = Counter(
            "imagegate_fallbacks", "Requests served by other than their first candidate", ["route"], registry=r
        )
        self.spend = Counter(
            "imagegate_estimated_spend_usd", "Estimated spend by backend (priced requests)", ["backend"], registry=r
        )
        self.unpriced = Counter(
            "imagegate_unpriced_images", "Images served by a backend without a price", ["backend"], registry=r
        )
        if backends is not None:
            r.register(_LoadCollector(backends))
        self._children: dict[tuple[object, ...], MetricWrapperBase] = {}

    def _child(self, metric: _M, *labels: str) -> _M:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child  # type: ignore[return-value]  # keyed by the metric's id: the child is of its type

    def observe_attempt(self, backend: str, outcome: str, seconds: float, stages: Mapping[str, float]) -> None:
        self._child(self.attempts, backend, outcome).inc()
        self._child(self.backend_latency, backend, outcome).observe(seconds)
        for stage, stage_s in stages.items():
            self._child(self.stages, backend, stage).observe(stage_s)

    def observe_request(
        self,
        route: str,
        backend: str,
        outcome: str,
        total_s: float,
        gateway_s: float,
        cost: float | None,
        images: int,
        fallback: bool,
    ) -> None:
        self._child(self.requests, route, backend, outcome).inc()
        self._child(self.duration, route, outcome).observe(total_s)
        self._child(self.overhead, route).observe(gateway_s)
        if fallback:
            self._child(self.fallbacks, route).inc()
        if images and backend:
            if cost is None:
                self._child(self.unpriced, backend).inc(images)
            else:
                self._child(self.spend, backend).inc(cost)
