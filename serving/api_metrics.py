"""Prometheus metrics of the HTTP API, in a registry per app (no process-global state).

``GET /metrics`` (:mod:`serving.routes_metrics`) exposes them:

==========================================  =========  ===========================================
metric                                      type       labels / meaning
==========================================  =========  ===========================================
``liftrec_api_requests_total``              counter    ``route``, ``status``
``liftrec_api_request_seconds``             histogram  ``route``: handler time
``liftrec_api_lists_total``                 counter    ``route``, ``source``: first source of the
                                                       chain that served the list
``liftrec_api_fallback_total``              counter    ``reason``: ``no_model`` (no bundle),
                                                       ``short`` (list shorter than k)
``liftrec_api_model_swaps_total``           counter    bundles swapped in
``liftrec_api_model_info``                  gauge      ``version`` of the bundle in use (1)
``liftrec_api_catalog_items``               gauge      items in the API's catalog cache
``liftrec_api_read_batch_size``             histogram  user list requests per coalesced Redis read
``liftrec_api_batch_size``                  histogram  lists per coalesced ``recommend_many`` call
``liftrec_api_batch_wait_seconds``          histogram  ``stage`` (``read``, ``compute``): wait of a
                                                       batch's oldest request before the batch ran
``liftrec_api_compute_seconds``             histogram  run time of one coalesced ``recommend_many`` call
``liftrec_api_compute_cpu_seconds_total``   counter    process CPU time spent in ``recommend_many`` (the
                                                       API's CPU outside it is the rest of the process's)
``liftrec_api_fast_path_total``             counter    list requests answered without FastAPI's
                                                       parameter machinery (``routes_recs.fast_path``)
``liftrec_api_gc_pause_seconds``            histogram  ``generation``: pause of one garbage
                                                       collection of the process (while watched)
==========================================  =========  ===========================================

Garbage collection pauses are observed only between :meth:`ApiMetrics.watch_gc`
and :meth:`ApiMetrics.unwatch_gc` (the runtime's lifespan): ``gc.callbacks`` is
process-global.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ApiMetrics"]

_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_GC_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25)


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
        self.compute_cpu = Counter("liftrec_api_compute_cpu_seconds_total", "Process CPU time in recommend_many",
                                   registry=r)
        self.fast_path = Counter("liftrec_api_fast_path_total", "List requests on the fast path",
                                 registry=r)
        self.gc_pause = Histogram("liftrec_api_gc_pause_seconds", "Pause of one garbage collection",
                                  ["generation"], buckets=_GC_BUCKETS, registry=r)
        self._gc_pause = [self.gc_pause.labels(generation=str(g)) for g in range(3)]
        self._gc_t0 = 0.0
        # labelled children by label values: ``labels()`` costs a few microseconds per call
        self._children: dict[tuple[str, ...], Any] = {}
        self._wait_read = self.batch_wait.labels(stage="read")
        self._wait_compute = self.batch_wait.labels(stage="compute")
        self._version: str | None = None

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            self._gc_pause[info["generation"]].observe(time.perf_counter() - self._gc_t0)

    def watch_gc(self) -> None:
        """Observe the process's garbage collection pauses (until :meth:`unwatch_gc`)."""
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def unwatch_gc(self) -> None:
        """Stop observing garbage collection pauses."""
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

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

    def _child(self, key: tuple[str, ...]) -> Any:
        """The labelled child of ``key`` = (kind, *label values), made once and kept."""
        child = self._children.get(key)
        if child is None:
            kind = key[0]
            if kind == "requests":
                child = self.requests.labels(route=key[1], status=key[2])
            elif kind == "seconds":
                child = self.seconds.labels(route=key[1])
            elif kind == "lists":
                child = self.lists.labels(route=key[1], source=key[2].split("+", 1)[0])
            else:
                child = self.fallback.labels(reason=key[1])
            if len(self._children) < 4096:   # label values come from a small set; stay bounded anyway
                self._children[key] = child
        return child

    def observe(self, route: str, status: int, seconds: float) -> None:
        """Count one request."""
        self._child(("requests", route, str(status))).inc()
        self._child(("seconds", route)).observe(seconds)

    def served(self, route: str, source: str, *, short: bool, model: str | None) -> None:
        """Count one served list (``source``: its whole chain; the first source is the label)."""
        self._child(("lists", route, source)).inc()
        if model is None:
            self._child(("fallback", "no_model")).inc()
        if short:
            self._child(("fallback", "short")).inc()

    def served_ok(self, route: str, source: str, *, short: bool, model: str | None, seconds: float) -> None:
        """:meth:`served` and :meth:`observe` of a list answered with 200."""
        self.served(route, source, short=short, model=model)
        self.observe(route, 200, seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
