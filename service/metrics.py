"""Prometheus metrics of the service, on a registry of its own (several apps may share a process in tests).

With several workers (service/workers.py) every process writes its values to files in
PROMETHEUS_MULTIPROC_DIR and an exposition reads them all: counters and histograms add up, and each
gauge says how its workers' values combine."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from service.state import StateHolder
from service.workers import metrics_are_shared

BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.shared = metrics_are_shared()  # several workers write where any of them reads
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
        self.index_items = Gauge(
            "diffgap_index_items", "vectors in the loaded index", registry=self.registry, multiprocess_mode="livemax"
        )
        self.batched = Gauge(
            "diffgap_batcher_queries",
            "queries run through the micro-batcher since start",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.batches = Gauge(
            "diffgap_batcher_batches",
            "model batches the micro-batcher ran",
            registry=self.registry,
            multiprocess_mode="livesum",
        )

    def track(self, holder: StateHolder) -> None:
        """The gauges from the service's state: on /metrics, and after each request when the workers'
        metrics are shared (the worker answering /metrics cannot read another's state)."""
        state = holder.state
        if state is not None:
            self.index_items.set(state.store.ntotal)
        self.batched.set(holder.batcher.requests_run)
        self.batches.set(holder.batcher.batches_run)

    def exposition(self) -> bytes:
        """The text /metrics answers: this process's registry, or every worker's files when shared."""
        if self.shared:
            gathered = CollectorRegistry()
            multiprocess.MultiProcessCollector(gathered)
            return generate_latest(gathered)
        return generate_latest(self.registry)

    def observe_stages(self, timings_ms: dict[str, float]) -> None:
        for stage, ms in timings_ms.items():
            self.stage.labels(stage).observe(ms / 1000)
