"""Hot reload: hold the current model bundle and swap it when a new one is published.

A :class:`ModelHolder` serves one :class:`~features.bundle.Bundle` at a time.
It reloads in the background when

* an announcement arrives on the Redis channel ``model:announce`` (a
  ``redis.asyncio`` pub/sub subscriber task), or
* the registry's ``CURRENT`` file names another version (a poll every
  ``poll_interval_s`` seconds: the fallback when Redis is absent or a message
  was missed).

A new bundle is loaded and validated off the event loop (``asyncio.to_thread``)
and then installed by ONE reference assignment, so a reader that took
``holder.bundle`` keeps a complete model for as long as it uses it and never
sees a half-loaded one. A bundle that fails validation is refused with a log
line (once per version) and the old one keeps serving.

Example::

    async with ModelHolder(registry, redis_url=url, key_prefix=prefix) as models:
        bundle = models.bundle          # None until a bundle is published
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from features.bundle import VERSION_RE, Bundle
from features.errors import InvalidBundle
from features.keys import KeySchema

__all__ = ["ModelHolder"]

log = logging.getLogger(__name__)


class ModelHolder:
    """The current model bundle of one process, reloaded in the background.

    Parameters
    ----------
    registry : str or pathlib.Path
        The registry directory (``<registry>/CURRENT``, ``<registry>/<version>/``).
    redis_url : str, optional
        Subscribe to announcements on this Redis; polling alone when omitted.
    key_prefix : str, optional
        Redis key prefix (``Settings.key_prefix``).
    poll_interval_s : float, optional
        Seconds between checks of ``CURRENT`` (default 5).
    intra_op_threads : int, optional
        onnxruntime threads of each loaded ranker (default 1).
    on_swap : callable, optional
        Called with the new bundle after each swap (e.g. to clear caches).
    """

    def __init__(
        self,
        registry: str | Path,
        *,
        redis_url: str | None = None,
        key_prefix: str = "liftrec",
        poll_interval_s: float = 5.0,
        intra_op_threads: int = 1,
        on_swap: Callable[[Bundle], Any] | None = None,
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be > 0; got {poll_interval_s}")
        self.registry = Path(registry)
        self.redis_url = redis_url
        self.channel = KeySchema(key_prefix).model_announce()
        self.poll_interval_s = poll_interval_s
        self.intra_op_threads = intra_op_threads
        self.on_swap = on_swap
        self._bundle: Bundle | None = None
        self._refused: set[str] = set()
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed = asyncio.Event()
        self.swaps = 0

    @property
    def bundle(self) -> Bundle | None:
        """The bundle in use (``None`` before the first successful load)."""
        return self._bundle

    @property
    def version(self) -> str | None:
        """Version of the bundle in use."""
        return None if self._bundle is None else self._bundle.version

    def current_version(self) -> str | None:
        """The version the registry's ``CURRENT`` names (``None`` when unset)."""
        try:
            text = (self.registry / "CURRENT").read_text(encoding="utf-8").strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return text or None

    def load(self, version: str | None = None) -> bool:
        """Load + validate ``version`` (default: ``CURRENT``) and swap it in; synchronous.

        Returns
        -------
        bool
            True when a new bundle was installed; False when it already serves,
            there is nothing to load, or the bundle was refused.
        """
        version = version or self.current_version()
        if version is None or version == self.version or version in self._refused:
            return False
        if not VERSION_RE.match(version):
            log.error("model refused version=%r reason=not a version string", version)
            self._refused.add(version)
            return False
        t0 = time.perf_counter()
        try:
            bundle = Bundle.load(self.registry / version, intra_op_threads=self.intra_op_threads)
            bundle.validate()
        except InvalidBundle as err:
            self._refused.add(version)
            log.error("model refused version=%s keeps=%s reason=%s", version, self.version, err)
            return False
        old = self.version
        self._bundle = bundle  # the swap: one reference assignment
        self.swaps += 1
        log.info("model swapped version=%s previous=%s seconds=%.3f", version, old,
                 time.perf_counter() - t0)
        if self.on_swap is not None:
            try:
                self.on_swap(bundle)
            except Exception:
                log.exception("on_swap callback failed for version=%s", version)
        return True

    async def reload(self, version: str | None = None) -> bool:
        """:meth:`load` in a worker thread; concurrent reloads are serialised."""
        async with self._lock:
            return await asyncio.to_thread(self.load, version)

    async def start(self) -> None:
        """Load the current bundle, then start the poller (and the subscriber)."""
        await self.reload()
        self._tasks.append(asyncio.create_task(self._poll(), name="model-poll"))
        if self.redis_url:
            self._tasks.append(asyncio.create_task(self._subscribe(), name="model-subscribe"))

    async def wait_subscribed(self, timeout: float = 10.0) -> None:
        """Wait until the announcement subscriber listens (tests, startup checks)."""
        await asyncio.wait_for(self._subscribed.wait(), timeout)

    async def stop(self) -> None:
        """Cancel the background tasks."""
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def __aenter__(self) -> ModelHolder:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                version = self.current_version()
                if version is not None and version != self.version and version not in self._refused:
                    await self.reload(version)
            except Exception:
                log.exception("model poll failed; retrying in %.1f s", self.poll_interval_s)

    async def _subscribe(self) -> None:
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        assert self.redis_url is not None
        backoff = 0.5
        while True:
            client = aioredis.Redis.from_url(self.redis_url)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self._subscribed.set()
                backoff = 0.5
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is None or msg.get("type") != "message":
                        continue
                    version = _announced_version(msg.get("data"))
                    log.info("model announcement version=%s", version)
                    await self.reload(version)
            except (RedisError, OSError) as err:
                self._subscribed.clear()
                log.warning("model subscriber lost Redis (%s); retrying in %.1f s", err, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                with contextlib.suppress(Exception):
                    await client.aclose()


def _announced_version(data: Any) -> str | None:
    """The version in an announcement (``None`` = re-read ``CURRENT``)."""
    try:
        value = orjson.loads(data)
    except (orjson.JSONDecodeError, TypeError):
        return None
    version = value.get("version") if isinstance(value, dict) else None
    return version if isinstance(version, str) else None
