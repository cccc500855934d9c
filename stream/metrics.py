"""Prometheus metrics of the stream worker."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = ["BATCH_SECONDS", "DLQ", "EVENTS", "LAG", "LISTS_AFTER_EXPIRY", "LISTS_IN_TIME", "PAUSED", "REDIS_RETRIES",
           "REFRESHES", "REFRESH_SECONDS"]

EVENTS = Counter("liftrec_stream_events_total", "Consumed events by result", ["result"])
DLQ = Counter("liftrec_stream_dlq_total", "Records sent to the dead-letter topic", ["reason"])
BATCH_SECONDS = Histogram(
    "liftrec_stream_batch_seconds",
    "Wall time to apply one micro-batch",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
REDIS_RETRIES = Counter("liftrec_stream_redis_retries_total", "Redis calls retried after an error")
LAG = Gauge("liftrec_stream_consumer_lag", "Records in the partition not yet applied to Redis", ["partition"])
PAUSED = Gauge("liftrec_stream_paused", "1 while the worker's partitions are paused (Redis unavailable)")
REFRESHES = Counter("liftrec_stream_list_refreshes_total", "Precomputed lists recomputed")
LISTS_IN_TIME = Counter("liftrec_stream_lists_in_time_total",
                        "Refreshed lists whose user's key was still there (before the list_max_stale_ms deadline)")
LISTS_AFTER_EXPIRY = Counter("liftrec_stream_lists_after_expiry_total",
                             "Refreshed lists whose user's key was gone (expired or first list: readers went to the API)")
REFRESH_SECONDS = Histogram(
    "liftrec_stream_refresh_seconds",
    "Wall time of one batched list refresh",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
