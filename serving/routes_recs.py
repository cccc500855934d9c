"""Recommendation routes: a user's list, similar items, items bought together.

The router's lifespan opens the :class:`~serving.runtime.ServingRuntime`
(model holder, catalog cache, trending, state reader) in
``app.state.serving``; it runs inside the app's own lifespan, so
``app.state.redis`` already exists.

Every list answer carries ``rec_id`` (attribution: send it back with the
events of the items clicked from the list) and ``model`` (the bundle version;
``null`` when no model is loaded and trending served). Unknown users and
items get cold-start lists, never 404. Bad parameters are 422 with a message.

A user list goes through the runtime's request coalescing
(:meth:`~serving.runtime.ServingRuntime.user_list`: concurrent requests share
one Redis read and one ``recommend_many`` call). Well-formed simple user list
requests (and item lists) are answered by :func:`fast_path` in front of
FastAPI's middleware stack with the same code; everything else takes the
FastAPI route. Measurements:
``docs/api-performance.md``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, MutableMapping
from typing import Annotated, Any
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter, FastAPI, Path, Query, Request
from pydantic import BaseModel, Field

from serving.api import ErrorBody, JsonResponse, error_response, exception_response, send_json
from serving.recommender import RecRequest
from serving.rules import RequestFilters
from serving.runtime import ListJob, ServingRuntime

__all__ = ["RecItemBody", "RecListBody", "fast_path", "router"]

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state
    runtime = ServingRuntime(state.settings, state.redis, redis_url=state.endpoints.redis_url,
                             batch_window_s=state.batch_window_s, batch_max=state.batch_max,
                             batch_hold_s=state.batch_hold_s)
    await runtime.start()
    state.serving = runtime
    log.info("recommendation routes ready model=%s", runtime.models.version)
    try:
        yield
    finally:
        await runtime.stop()


router = APIRouter(tags=["recommendations"], lifespan=_lifespan)


class RecItemBody(BaseModel):
    """One recommended item."""

    item_id: str
    score: float = Field(description="Ranker score (or source score for item lists); higher is better.")
    reason: str = Field(description='Why it is recommended, e.g. "viewed together with X", "popular in Z".')
    source: str = Field(description="Candidate source behind the reason: context, session, bought_together, "
                        "als, category, content, trending, popularity.")
    reason_item: str | None = Field(default=None, description="The item the reason names, if any.")
    features: dict[str, float] | None = Field(default=None, description="Ranker features (explain=true).")
    source_scores: dict[str, float] | None = Field(default=None,
                                                   description="Every source's score (explain=true).")


class RecListBody(BaseModel):
    """A served list."""

    rec_id: str = Field(description="Id of this list; send it back as `rec_id` on events it caused.")
    user_id: str = Field(description="The user (empty for item lists).")
    model: str | None = Field(description="Model bundle version; null when no model is loaded.")
    source: str = Field(description="Source chain that served the list, e.g. `als+session+popularity`.")
    ts: int = Field(description="When the list was made, epoch ms.")
    ranked: bool = Field(default=False, description="True when the ONNX ranker ordered the candidates.")
    items: list[RecItemBody]


_RESPONSES: dict[int | str, dict[str, Any]] = {422: {"model": ErrorBody, "description": "Bad parameter."}}


def _runtime(request: Request) -> ServingRuntime:
    return request.app.state.serving  # type: ignore[no-any-return]


def _csv(values: list[str] | None) -> list[str]:
    """Repeated and comma-separated query values, flattened, blanks dropped."""
    out: list[str] = []
    for v in values or ():
        out.extend(p.strip() for p in v.split(","))
    return [p for p in out if p]


def _bad(message: str) -> JsonResponse:
    return error_response(422, "RequestValidationError", message)


def _check_common(rt: ServingRuntime, *, k: int, ids: dict[str, str | None]) -> JsonResponse | None:
    if k > rt.settings.max_k:
        return _bad(f"query.k: must be <= {rt.settings.max_k} (got {k})")
    for where, value in ids.items():
        if value is not None and (not value.strip() or len(value) > rt.settings.max_id_len):
            return _bad(f"{where}: must be a non-blank id of at most {rt.settings.max_id_len} characters")
    return None


K = Annotated[int, Query(ge=1, le=1000, description="List length; at most `Settings.max_k` (default 100).")]
Exclude = Annotated[list[str] | None, Query(description="Item ids to leave out (repeat or comma-separate).")]


@router.get(
    "/v1/users/{user_id}/recommendations",
    summary="A user's ranked, filtered, explained list",
    description=(
        "Candidates from the ALS index, the session's co-visitation, bought-together rules, the context "
        "item's neighbours, trending and popularity; ranked by the model's ONNX ranker; purchased (within "
        "the shop's repurchase window), out-of-stock, excluded and over-shown items removed; diversified "
        "by category. Unknown users get a cold-start list. Each item carries its strongest reason; "
        "`explain=true` adds feature values and source scores. A plain request (no context item, filters, "
        "boosts or explain) is answered with the user's precomputed list when it is fresh "
        "(`Settings.api_precomputed_max_age_s`, of the current model, k items in stock); its `source` then "
        "starts with `precomputed:`."
    ),
    response_model=RecListBody,
    responses=_RESPONSES,
)
async def user_recommendations(
    request: Request,
    user_id: Annotated[str, Path(description="The user's id.")],
    k: K = 20,
    context_item: Annotated[str | None, Query(description="Item being viewed; its neighbours come first.")] = None,
    category: Annotated[list[str] | None, Query(description="Only these categories.")] = None,
    exclude: Exclude = None,
    min_price: Annotated[float | None, Query(ge=0, description="Lowest price (inclusive).")] = None,
    max_price: Annotated[float | None, Query(ge=0, description="Highest price (inclusive).")] = None,
    boost_category: Annotated[list[str] | None, Query(description="Categories to lift.")] = None,
    boost: Annotated[float, Query(ge=0, le=10, description="Lift of boosted categories, in units of the "
                                  "list's score spread.")] = 0.5,
    explain: Annotated[bool, Query(description="Add feature values and source scores.")] = False,
) -> JsonResponse:
    t0 = time.perf_counter()
    rt = _runtime(request)
    bad = _check_common(rt, k=k, ids={"path.user_id": user_id, "query.context_item": context_item})
    if bad is not None:
        return bad
    if min_price is not None and max_price is not None and min_price > max_price:
        return _bad(f"query.min_price: must be <= max_price (got {min_price} > {max_price})")
    return await _user_answer(rt, user_id, k=k, context_item=context_item, cats=_csv(category),
                              excluded=_csv(exclude), min_price=min_price, max_price=max_price,
                              boosted=_csv(boost_category), boost=boost, explain=explain, t0=t0)


async def _user_body(rt: ServingRuntime, user_id: str, *, k: int, context_item: str | None, cats: list[str],
                     excluded: list[str], min_price: float | None, max_price: float | None,
                     boosted: list[str], boost: float, explain: bool, t0: float) -> dict[str, Any]:
    """The answer body of a validated user list request (FastAPI route and :func:`fast_path`)."""
    plain = not (context_item or cats or excluded or boosted or explain
                 or min_price is not None or max_price is not None)
    if plain:
        req = rt.plain_request(k)
    else:
        filters = RequestFilters(exclude=frozenset(excluded), categories=frozenset(cats) if cats else None,
                                 min_price=min_price, max_price=max_price,
                                 boost_categories={c: boost for c in boosted})
        req = RecRequest(k=k, context_item=context_item, filters=filters, explain=explain)
    got = await rt.user_list(ListJob(user_id=user_id, request=req, plain=plain))
    if isinstance(got, dict):  # the fresh precomputed list
        rt.metrics.served_ok("user_recommendations", got["source"], short=False, model=got["model"],
                             seconds=time.perf_counter() - t0)
        return got
    rt.metrics.served_ok("user_recommendations", got.source, short=len(got.items) < k, model=got.model,
                         seconds=time.perf_counter() - t0)
    return got.to_dict()


async def _user_answer(rt: ServingRuntime, user_id: str, **kwargs: Any) -> JsonResponse:
    return JsonResponse(await _user_body(rt, user_id, **kwargs))


async def fast_path(app: Any, scope: MutableMapping[str, Any], receive: Any, send: Any) -> bool:
    """Answer a well-formed, simple list request without FastAPI's per-request machinery.

    Tried by :class:`serving.api.LiftrecApp` before its middleware stack. FastAPI's
    parameter solving and middleware layers cost about as much CPU as the rest of a
    precomputed answer (``docs/api-performance.md``). Taken here:

    * ``GET /v1/users/{user_id}/recommendations`` whose query holds only ``k`` (plain
      digits), ``context_item``, ``category``, ``exclude`` and ``explain``
      (``true``/``false``), each valid: answered by the route's own code (:func:`_user_body`);
    * ``GET /v1/items/{item_id}/similar`` and ``.../bought-together`` whose query holds
      only ``k`` and ``exclude`` (:func:`_item_body`).

    Anything else — other parameters, other spellings, a value the route would reject,
    other methods — returns False untouched and goes on to FastAPI, so the routes,
    their OpenAPI entries and every 4xx answer stay the contract. Errors are answered
    as the app's exception handlers answer them.
    """
    if scope["method"] != "GET":
        return False
    path: str = scope["path"]
    rt: ServingRuntime | None = getattr(app.state, "serving", None)
    if rt is None:
        return False
    if path.startswith(_USERS) and path.endswith(_RECS):
        args = _fast_args(rt, path[len(_USERS):-len(_RECS)], scope["query_string"])
        if args is None:
            return False
        answer = _user_body(rt, args.pop("user_id"), t0=time.perf_counter(), **args)
    elif path.startswith(_ITEMS):
        kind, item_id = _item_kind(path)
        got = None if kind is None else _fast_item_args(rt, item_id, scope["query_string"])
        if got is None:
            return False
        answer = _item_body(rt, kind, item_id, got[0], got[1], time.perf_counter())
    else:
        return False
    rt.metrics.fast_path.inc()
    try:
        body = await answer
    except Exception as err:  # noqa: BLE001 - the same JSON answers as the app's handlers
        await exception_response(err, path=path)(scope, receive, send)
        return True
    await send_json(send, orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS))
    return True


_USERS = "/v1/users/"
_RECS = "/recommendations"
_ITEMS = "/v1/items/"
_ITEM_KINDS = (("/similar", "similar"), ("/bought-together", "bought_together"))


def _item_kind(path: str) -> tuple[str | None, str]:
    """(route kind, item id) of ``/v1/items/{item_id}/similar`` or ``.../bought-together``."""
    for suffix, kind in _ITEM_KINDS:
        if path.endswith(suffix):
            return kind, path[len(_ITEMS):-len(suffix)]
    return None, ""


def _valid_id(rt: ServingRuntime, value: str) -> bool:
    return bool(value) and "/" not in value and len(value) <= rt.settings.max_id_len and bool(value.strip())


def _fast_k(rt: ServingRuntime, value: str) -> int | None:
    if value.isascii() and value.isdigit() and len(value) <= 4:
        k = int(value)
        if 1 <= k <= rt.settings.max_k:
            return k
    return None


def _fast_args(rt: ServingRuntime, user_id: str, query: bytes) -> dict[str, Any] | None:
    """The route's arguments when the request is well-formed and simple, else ``None`` (FastAPI decides)."""
    if not _valid_id(rt, user_id):
        return None
    k: int | None = 20
    context_item, explain = None, False
    cats: list[str] = []
    excluded: list[str] = []
    seen: set[str] = set()
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True) if query else ():
        if name in seen and name not in ("category", "exclude"):
            return None
        seen.add(name)
        if name == "k":
            k = _fast_k(rt, value)
            if k is None:
                return None
        elif name == "context_item" and value.strip() and len(value) <= rt.settings.max_id_len:
            context_item = value
        elif name == "category":
            cats.extend(p.strip() for p in value.split(","))
        elif name == "exclude":
            excluded.extend(p.strip() for p in value.split(","))
        elif name == "explain" and value in ("true", "false"):
            explain = value == "true"
        else:
            return None
    return {"user_id": user_id, "k": k, "context_item": context_item, "cats": [c for c in cats if c],
            "excluded": [e for e in excluded if e], "min_price": None, "max_price": None, "boosted": [],
            "boost": 0.5, "explain": explain}


def _fast_item_args(rt: ServingRuntime, item_id: str, query: bytes) -> tuple[int, list[str]] | None:
    """(k, exclude) of a well-formed item list request, else ``None`` (FastAPI decides)."""
    if not _valid_id(rt, item_id):
        return None
    k: int | None = 20
    excluded: list[str] = []
    seen_k = False
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True) if query else ():
        if name == "k" and not seen_k:
            seen_k = True
            k = _fast_k(rt, value)
            if k is None:
                return None
        elif name == "exclude":
            excluded.append(value)
        else:
            return None
    return k, excluded


async def _item_body(rt: ServingRuntime, kind: str, item_id: str, k: int, exclude: list[str] | None,
                     t0: float) -> dict[str, Any]:
    """The answer body of a validated item list request (FastAPI route and :func:`fast_path`)."""
    trending = await rt.trending()
    fn = rt.recommender.similar_items if kind == "similar" else rt.recommender.bought_together
    recs = fn(item_id, k=k, bundle=rt.bundle, trending=trending, catalog=rt.catalog, exclude=_csv(exclude))
    rt.metrics.served_ok(kind, recs.source, short=len(recs.items) < k, model=recs.model,
                         seconds=time.perf_counter() - t0)
    return recs.to_dict()


async def _item_list(request: Request, kind: str, item_id: str, k: int, exclude: list[str] | None
                     ) -> JsonResponse:
    t0 = time.perf_counter()
    rt = _runtime(request)
    bad = _check_common(rt, k=k, ids={"path.item_id": item_id})
    if bad is not None:
        return bad
    return JsonResponse(await _item_body(rt, kind, item_id, k, exclude, t0))


@router.get(
    "/v1/items/{item_id}/similar",
    summary="Items similar to an item",
    description="Co-visitation, ALS factor cosine and content neighbours of the item, in stock only; "
    "unknown items get their category's popular items and trending items.",
    response_model=RecListBody,
    responses=_RESPONSES,
)
async def similar_items(request: Request, item_id: Annotated[str, Path(description="The anchor item.")],
                        k: K = 20, exclude: Exclude = None) -> JsonResponse:
    return await _item_list(request, "similar", item_id, k, exclude)


@router.get(
    "/v1/items/{item_id}/bought-together",
    summary="Items frequently bought with an item",
    description="Association-rule consequents of the item (most confident first), then its co-visitation "
    "neighbours, then its category's popular items.",
    response_model=RecListBody,
    responses=_RESPONSES,
)
async def bought_together(request: Request, item_id: Annotated[str, Path(description="The anchor item.")],
                          k: K = 20, exclude: Exclude = None) -> JsonResponse:
    return await _item_list(request, "bought_together", item_id, k, exclude)
