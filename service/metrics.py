"""Prometheus metrics of the service, on a registry of its own (several apps may share a process in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "diffgap_requests", "HTTP requests", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "diffgap_request_seconds", "HTTP request latency", ["route"], buckets=BUCKETS, registry=self.registry
        )
        self.stage = Histogram(
            "diffgap_stage_seconds", "time per query stage", ["stage"], buckets=BUCKETS, registry=self.registry
        )
        self.index_items = Gauge("diffgap_index_items", "vectors in the loaded index", registry=self.registry)
        self.batched = Gauge(
            "diffgap_batcher_queries", "queries run through the micro-batcher since start", registry=self.registry
        )
        self.batches = Gauge("diffgap_batcher_batches", "model batches the micro-batcher ran", registry=self.registry)

    def observe_stages(self, timings_ms: dict[str, float]) -> None:
        for stage, ms in timings_ms.items():
            self.stage.labels(stage).observe(ms / 1000)
