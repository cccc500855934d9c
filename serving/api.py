"""The HTTP API: one FastAPI app, route groups in their own modules.

:func:`create_app` only wires: it opens the shared resources in the app's
lifespan, installs the JSON error handlers, mounts ``/health`` and includes the
router of every module in :data:`ROUTER_MODULES` (each exposes ``router``; the
collector is ``serving.collector``). A route group reaches the resources through
``request.app.state``:

==========================  ==========================================================
``state.settings``          :class:`~features.settings.Settings` of the process
``state.endpoints``         broker and Redis addresses (``kafka_bootstrap``, ``redis_url``)
``state.producer``          :class:`~features.producer.EventProducer` (source
                            ``"collector"``); unstarted while Kafka is unreachable
``state.redis``             ``redis.asyncio.Redis`` client
``state.kafka_error``       last reason Kafka could not be reached, or ``None``
``state.max_batch``         collector limit: events per request
``state.max_body_bytes``    collector limit: request body bytes
``state.batch_window_s``    request coalescing window of user lists (see :mod:`serving.runtime`)
``state.batch_max``         most user lists per coalesced Redis read / ``recommend_many`` call
==========================  ==========================================================

Every error answer is JSON ``{"error": <name>, "message": <what was expected>, ...}``.
When Kafka is unreachable at start-up the app still starts (``/health`` answers
503 and the collector 503 with ``Retry-After``) and keeps reconnecting in the
background, so an orchestrator's readiness probe sees the outage instead of a
crash loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any, Literal, Protocol

import orjson
import redis.asyncio as aioredis
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from features.errors import LiftrecError, StackUnavailable
from features.events import REJECT_REASONS, CatalogItem, Event
from features.producer import EventProducer
from features.settings import Settings
from serving.batching import DEFAULT_MAX_BATCH as DEFAULT_BATCH_MAX
from serving.batching import DEFAULT_WINDOW_S
from serving.runtime import DEFAULT_HOLD_S

__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_BODY_BYTES",
    "ROUTER_MODULES",
    "EndpointsLike",
    "ErrorBody",
    "FastPath",
    "JsonResponse",
    "LiftrecApp",
    "create_app",
    "error_response",
    "exception_response",
    "send_json",
]

log = logging.getLogger(__name__)

#: Route-group modules; each defines ``router: fastapi.APIRouter`` and may define ``fast_path``
#: (a :data:`FastPath` the app tries before FastAPI's middleware stack, see :class:`LiftrecApp`).
ROUTER_MODULES: tuple[str, ...] = (
    "serving.collector",
    "serving.routes_recs",
    "serving.routes_profile",
    "serving.routes_metrics",
)

#: Most events in one ``POST /v1/events`` request (default of :func:`create_app`).
DEFAULT_MAX_BATCH = 1000
#: Largest ``POST /v1/events`` body in bytes (default of :func:`create_app`).
DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024

#: Seconds between reconnection attempts while Kafka is unreachable.
RECONNECT_INTERVAL_S = 2.0
#: Longest a health probe waits for Kafka or Redis.
HEALTH_TIMEOUT_S = 2.0


class EndpointsLike(Protocol):
    """Where the broker and Redis are (``liftrec.stack.Endpoints`` fits)."""

    @property
    def kafka_bootstrap(self) -> str: ...

    @property
    def redis_url(self) -> str: ...


class JsonResponse(Response):
    """A JSON answer serialized with orjson."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)


_JSON_TYPE = (b"content-type", b"application/json")


async def send_json(send: Callable[[MutableMapping[str, Any]], Awaitable[None]], body: bytes,
                    status: int = 200) -> None:
    """Send a JSON answer straight to the ASGI server: the headers and body of a :class:`JsonResponse`."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode()), _JSON_TYPE]})
    await send({"type": "http.response.body", "body": body})


#: ``async fast_path(app, scope, receive, send) -> bool``: answers a request and returns True, or
#: returns False without sending anything (the request then goes through FastAPI).
FastPath = Callable[["LiftrecApp", MutableMapping[str, Any], Any, Any], Awaitable[bool]]


class LiftrecApp(FastAPI):
    """The FastAPI app with fast paths in front of its middleware stack.

    FastAPI's middleware layers (error middleware, telemetry, body limit) and
    its per-request parameter solving cost about as much CPU as the rest of a
    precomputed list answer (``docs/api-performance.md``). A route module may
    declare a ``fast_path`` for its most frequent, well-formed requests; it is
    tried first on every HTTP request and either answers the request itself or
    leaves it, untouched, to FastAPI (so the routes, their OpenAPI entries and
    every 4xx answer stay the contract). A fast path catches its own errors and
    answers them as the app's exception handlers do (:func:`exception_response`).
    """

    fast_paths: tuple[FastPath, ...] = ()

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            for fast in self.fast_paths:
                if await fast(self, scope, receive, send):
                    return
        await super().__call__(scope, receive, send)


class ErrorBody(BaseModel):
    """Every error answer."""

    error: str = Field(description="Error class, e.g. `BadJson`, `PayloadTooLarge`, `StackUnavailable`.")
    message: str = Field(description="What went wrong and what was expected.")


def error_response(
    status: int, error: str, message: str, *, headers: dict[str, str] | None = None, **extra: Any
) -> JsonResponse:
    """The JSON error answer ``{"error", "message", **extra}`` with ``status``."""
    return JsonResponse({"error": error, "message": message, **extra}, status_code=status, headers=headers)


# -- health -------------------------------------------------------------------------


class Probe(BaseModel):
    """Reachability of one backing service."""

    ok: bool
    address: str
    error: str | None = None


class Health(BaseModel):
    """Answer of ``GET /health``."""

    status: Literal["ok", "degraded", "unavailable"] = Field(
        description="`ok`: all reachable; `degraded`: Kafka up, Redis down; `unavailable`: Kafka down."
    )
    kafka: Probe
    redis: Probe


health_router = APIRouter(tags=["operations"])


@health_router.get(
    "/health",
    summary="Liveness and reachability of Kafka and Redis",
    description=(
        "Asks the broker for cluster metadata and pings Redis, each with a short timeout. "
        "Answers **200** while Kafka is reachable (events can be accepted), even if Redis is "
        "down (`status: degraded`), and **503** when Kafka is not reachable."
    ),
    response_model=Health,
    responses={503: {"model": Health, "description": "Kafka is not reachable."}},
)
async def health(request: Request) -> JsonResponse:
    state = request.app.state
    producer: EventProducer = state.producer
    kafka = Probe(ok=True, address=producer.bootstrap)
    try:
        await producer.ping(timeout_s=HEALTH_TIMEOUT_S)
    except StackUnavailable as err:
        kafka = Probe(ok=False, address=producer.bootstrap,
                      error=state.kafka_error if not producer.started and state.kafka_error else str(err))
    redis_probe = Probe(ok=True, address=state.endpoints.redis_url)
    try:
        await asyncio.wait_for(state.redis.ping(), HEALTH_TIMEOUT_S)
    except (aioredis.RedisError, OSError, TimeoutError) as err:
        redis_probe = Probe(ok=False, address=state.endpoints.redis_url, error=str(err) or type(err).__name__)
    status = "unavailable" if not kafka.ok else ("ok" if redis_probe.ok else "degraded")
    body = Health(status=status, kafka=kafka, redis=redis_probe)
    return JsonResponse(body.model_dump(), status_code=200 if kafka.ok else 503)


# -- lifespan -----------------------------------------------------------------------


async def _keep_connecting(app: FastAPI, producer: EventProducer) -> None:
    """Retry :meth:`EventProducer.start` until Kafka answers."""
    while not producer.started:
        await asyncio.sleep(RECONNECT_INTERVAL_S)
        try:
            await producer.start()
        except StackUnavailable as err:
            app.state.kafka_error = str(err)
            log.debug("kafka still unreachable: %s", err)
    app.state.kafka_error = None
    log.info("kafka reachable again bootstrap=%s", producer.bootstrap)



@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state
    # a short linger: concurrent requests still share batches while one is in flight
    producer = EventProducer(state.endpoints.kafka_bootstrap, state.settings, source="collector",
                             linger_ms=1, connect_timeout_s=5.0, delivery_timeout_s=10.0)
    state.producer = producer
    state.redis = aioredis.Redis.from_url(
        state.endpoints.redis_url, socket_timeout=HEALTH_TIMEOUT_S, socket_connect_timeout=HEALTH_TIMEOUT_S
    )
    state.kafka_error = None
    reconnect: asyncio.Task[None] | None = None
    try:
        await producer.start()
    except StackUnavailable as err:
        state.kafka_error = str(err)
        log.warning("api started without Kafka, reconnecting every %.0f s: %s", RECONNECT_INTERVAL_S, err)
        reconnect = asyncio.create_task(_keep_connecting(app, producer), name="liftrec-kafka-reconnect")
    log.info("api ready kafka=%s redis=%s", state.endpoints.kafka_bootstrap, state.endpoints.redis_url)
    try:
        yield
    finally:
        if reconnect is not None:
            reconnect.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reconnect
        await producer.stop()
        await state.redis.aclose()


# -- errors -------------------------------------------------------------------------


def exception_response(err: Exception, *, path: str = "") -> JsonResponse:
    """The JSON answer of an exception raised while handling a request.

    A :class:`~features.errors.LiftrecError` answers its ``http_status`` with its
    detail (503 adds ``Retry-After: 5``); anything else is logged and answers 500.
    """
    if isinstance(err, LiftrecError):
        headers = {"Retry-After": "5"} if err.http_status == 503 else None
        return JsonResponse(err.to_detail(), status_code=err.http_status, headers=headers)
    log.exception("unhandled error path=%s", path, exc_info=err)
    return error_response(500, "InternalError", f"unexpected {type(err).__name__}; see the server log")


async def _on_liftrec_error(request: Request, err: Exception) -> JsonResponse:
    assert isinstance(err, LiftrecError)
    return exception_response(err, path=request.url.path)


async def _on_http_error(request: Request, err: Exception) -> JsonResponse:
    assert isinstance(err, StarletteHTTPException)
    phrase = HTTPStatus(err.status_code).phrase.replace(" ", "").replace("-", "")
    return error_response(err.status_code, phrase, str(err.detail), headers=err.headers)


async def _on_request_invalid(request: Request, err: Exception) -> JsonResponse:
    assert isinstance(err, RequestValidationError)
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in err.errors()]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"])
    return error_response(422, "RequestValidationError", f"{where}: {first['msg']}", details=errors)


async def _on_unexpected(request: Request, err: Exception) -> JsonResponse:
    return exception_response(err, path=request.url.path)


# -- OpenAPI ------------------------------------------------------------------------


def _openapi_with_contracts(app: FastAPI) -> dict[str, Any]:
    """The generated schema plus the wire contracts (Event, CatalogItem) as components."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes, tags=app.openapi_tags)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (Event, CatalogItem):
            components[model.__name__] = model.model_json_schema(
                ref_template="#/components/schemas/{model}", mode="validation"
            )
        components["Event"]["description"] = (
            "One clickstream event. Unknown extra fields are ignored; known fields are type-checked "
            "strictly. Rejection reasons: " + ", ".join(REJECT_REASONS) + "."
        )
        app.openapi_schema = schema
    return app.openapi_schema


# -- the app ------------------------------------------------------------------------


def create_app(
    settings: Settings,
    endpoints: EndpointsLike,
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    batch_window_s: float = DEFAULT_WINDOW_S,
    batch_max: int = DEFAULT_BATCH_MAX,
    batch_hold_s: float = DEFAULT_HOLD_S,
) -> LiftrecApp:
    """Build the liftrec HTTP API.

    Parameters
    ----------
    settings : Settings
        Topics, validation limits and the key prefix.
    endpoints : EndpointsLike
        Broker and Redis addresses (``liftrec.stack.Endpoints``).
    max_batch : int
        Most events in one ``POST /v1/events`` request (more: 413).
    max_body_bytes : int
        Largest request body of the collector (more: 413).
    batch_window_s : float
        Longest wait of a user list request for others to share its Redis read and
        ``recommend_many`` call (seconds; 0: only requests of the same event-loop iteration).
    batch_max : int
        Most user lists per coalesced call (1: every request alone).
    batch_hold_s : float
        Longest wait of a lone list to compute for a companion when requests arrive at least that often
        (seconds; 0, the default: no wait; see :class:`serving.runtime.ServingRuntime`).

    Returns
    -------
    LiftrecApp
        The app (a FastAPI app with fast paths); the producer and the Redis client open and close with its lifespan.

    Examples
    --------
    >>> app = create_app(settings, resolve_endpoints(settings))      # doctest: +SKIP
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)                # doctest: +SKIP
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if batch_window_s < 0 or batch_max < 1 or batch_hold_s < 0:
        raise ValueError(f"batch_window_s and batch_hold_s must be >= 0 and batch_max >= 1; got {batch_window_s}, "
                         f"{batch_hold_s}, {batch_max}")
    if max_body_bytes < settings.max_payload_bytes:
        raise ValueError(f"max_body_bytes must be >= settings.max_payload_bytes "
                         f"({settings.max_payload_bytes}), got {max_body_bytes}")
    app = LiftrecApp(
        title="liftrec",
        version="0.1.0",
        summary="Streaming, real-time recommendations for online shops.",
        description="Event collector and recommendation API. Every error answer is JSON "
        "`{\"error\", \"message\", ...}`. Contracts: see the `Event` and `CatalogItem` schemas.",
        lifespan=_lifespan,
        default_response_class=JsonResponse,
    )
    app.state.settings = settings
    app.state.endpoints = endpoints
    app.state.max_batch = max_batch
    app.state.max_body_bytes = max_body_bytes
    app.state.batch_window_s = batch_window_s
    app.state.batch_max = batch_max
    app.state.batch_hold_s = batch_hold_s
    app.add_exception_handler(LiftrecError, _on_liftrec_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_request_invalid)
    app.add_exception_handler(Exception, _on_unexpected)
    app.include_router(health_router)
    for name in ROUTER_MODULES:
        module = importlib.import_module(name)
        app.include_router(module.router)
        if getattr(module, "fast_path", None) is not None:   # e.g. serving.routes_recs.fast_path
            app.fast_paths = (*app.fast_paths, module.fast_path)
    app.openapi = lambda: _openapi_with_contracts(app)  # type: ignore[method-assign]
    return app
