"""Prometheus metrics of one app, in a registry of its own."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from api.queries import steps_per_second
from lrfinder.jobs import JobStatus
from lrfinder.store import Store

JOB_STATUSES: tuple[str, ...] = JobStatus.__args__  # type: ignore[attr-defined]


class StoreCollector:
    """Reads job counts, live workers and step rates from Redis at each scrape."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def describe(self) -> list[GaugeMetricFamily]:
        """Name the metrics without reading Redis (called at registration)."""
        return [
            GaugeMetricFamily(name, "", labels=labels)
            for name, labels in (
                ("lrfinder_jobs", ["status"]),
                ("lrfinder_workers_alive", None),
                ("lrfinder_steps_per_second", None),
            )
        ]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily(
            "lrfinder_jobs", "Stored jobs by status.", labels=["status"]
        )
        counts = self.store.count_by_status()
        for status in JOB_STATUSES:
            jobs.add_metric([status], counts.get(status, 0))
        yield jobs
        yield GaugeMetricFamily(
            "lrfinder_workers_alive",
            "Workers seen in the last 30 seconds.",
            value=len(self.store.live_workers()),
        )
        yield GaugeMetricFamily(
            "lrfinder_steps_per_second",
            "Optimizer steps per second of all running jobs, over the last minute.",
            value=steps_per_second(self.store),
        )


class Metrics:
    """The app's registry: HTTP request metrics plus the store collector."""

    def __init__(self, store: Store) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lrfinder_http_requests",
            "HTTP requests by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lrfinder_http_request_seconds",
            "HTTP request duration by route template, seconds.",
            ["route"],
            registry=self.registry,
        )
        self.registry.register(StoreCollector(store))

    def observe_request(
        self, method: str, route: str, status: int, seconds: float
    ) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
