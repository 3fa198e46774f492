"""Prometheus metrics of one server app (its own registry, so several apps never collide)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    """Requests by route template and status, latency, batch sizes, queue depth, load time,
    refusals by the in-flight limit."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lensforge_requests", "HTTP requests by route and status code",
                                ["route", "code"], registry=r)
        self.latency = Histogram("lensforge_request_latency_seconds", "HTTP request latency by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("lensforge_batch_size", "inputs per model call", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("lensforge_queue_depth", "inputs waiting for the model", ["model"], registry=r)
        self.load_seconds = Gauge("lensforge_model_load_seconds", "time to load and warm up the model",
                                  ["model"], registry=r)
        self.refused = Counter("lensforge_refused_requests", "requests refused before reaching a route, by reason",
                               ["reason"], registry=r)

    def observe_request(self, route: str, code: int, seconds: float) -> None:
        self.requests.labels(route, str(code)).inc()
        self.latency.labels(route).observe(seconds)

    def watch_queue(self, model: str, depth: Callable[[], int]) -> None:
        self.queue_depth.labels(model).set_function(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)
