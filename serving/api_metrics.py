"""Prometheus metrics of the HTTP API, in a registry per app (no process-global state).

``GET /metrics`` (:mod:`serving.routes_metrics`) exposes them:

=====================================  =========  ===========================================
metric                                 type       labels / meaning
=====================================  =========  ===========================================
``liftrec_api_requests_total``         counter    ``route``, ``status``
``liftrec_api_request_seconds``        histogram  ``route``: handler time
``liftrec_api_lists_total``            counter    ``route``, ``source``: first source of the
                                                  chain that served the list
``liftrec_api_fallback_total``         counter    ``reason``: ``no_model`` (no bundle),
                                                  ``short`` (list shorter than k)
``liftrec_api_model_swaps_total``      counter    bundles swapped in
``liftrec_api_model_info``             gauge      ``version`` of the bundle in use (1)
``liftrec_api_catalog_items``          gauge      items in the API's catalog cache
``liftrec_api_read_batch_size``        histogram  user list requests per coalesced Redis read
``liftrec_api_batch_size``             histogram  lists per coalesced ``recommend_many`` call
``liftrec_api_batch_wait_seconds``     histogram  ``stage`` (``read``, ``compute``): wait of a
                                                  batch's oldest request before the batch ran
``liftrec_api_compute_seconds``        histogram  run time of one coalesced ``recommend_many`` call
``liftrec_api_fast_path_total``        counter    user list requests answered without FastAPI's
                                                  parameter machinery (``FastUserLists``)
=====================================  =========  ===========================================
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ApiMetrics"]

_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ApiMetrics:
    """The API's metrics and their registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("liftrec_api_requests_total", "API requests by route and status",
                                ["route", "status"], registry=r)
        self.seconds = Histogram("liftrec_api_request_seconds", "Handler time per route", ["route"],
                                 buckets=_BUCKETS, registry=r)
        self.lists = Counter("liftrec_api_lists_total", "Served lists by the first source of their chain",
                             ["route", "source"], registry=r)
        self.fallback = Counter("liftrec_api_fallback_total", "Lists served by a fallback", ["reason"],
                                registry=r)
        self.swaps = Counter("liftrec_api_model_swaps_total", "Model bundles swapped in", registry=r)
        self.model_info = Gauge("liftrec_api_model_info", "Version of the bundle in use", ["version"],
                                registry=r)
        self.catalog_items = Gauge("liftrec_api_catalog_items", "Items in the catalog cache", registry=r)
        self.read_batch_size = Histogram("liftrec_api_read_batch_size", "User list requests per Redis read",
                                         buckets=_SIZE_BUCKETS, registry=r)
        self.batch_size = Histogram("liftrec_api_batch_size", "Lists per recommend_many call",
                                    buckets=_SIZE_BUCKETS, registry=r)
        self.batch_wait = Histogram("liftrec_api_batch_wait_seconds", "Wait of a batch's oldest request",
                                    ["stage"], buckets=_BUCKETS, registry=r)
        self.compute_seconds = Histogram("liftrec_api_compute_seconds", "Run time of one recommend_many call",
                                         buckets=_BUCKETS, registry=r)
        self.fast_path = Counter("liftrec_api_fast_path_total", "User list requests on the fast path",
                                 registry=r)
        self._wait_read = self.batch_wait.labels(stage="read")
        self._wait_compute = self.batch_wait.labels(stage="compute")
        self._version: str | None = None

    def model_swapped(self, version: str) -> None:
        """Record a swap to ``version``."""
        self.swaps.inc()
        if self._version is not None:
            self.model_info.remove(self._version)
        self.model_info.labels(version=version).set(1)
        self._version = version

    def read_batch(self, size: int, oldest_wait_s: float) -> None:
        """Record one coalesced state read (see :class:`serving.batching.Coalescer`)."""
        self.read_batch_size.observe(size)
        self._wait_read.observe(oldest_wait_s)

    def compute_batch(self, size: int, oldest_wait_s: float) -> None:
        """Record one coalesced ``recommend_many`` call."""
        self.batch_size.observe(size)
        self._wait_compute.observe(oldest_wait_s)

    def observe(self, route: str, status: int, seconds: float) -> None:
        """Count one request."""
        self.requests.labels(route=route, status=str(status)).inc()
        self.seconds.labels(route=route).observe(seconds)

    def served(self, route: str, source: str, *, short: bool, model: str | None) -> None:
        """Count one served list."""
        self.lists.labels(route=route, source=source.split("+", 1)[0]).inc()
        if model is None:
            self.fallback.labels(reason="no_model").inc()
        if short:
            self.fallback.labels(reason="short").inc()

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
