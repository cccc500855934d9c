"""``GET /v1/users/{id}/profile``: the user portrait (see :mod:`serving.profile`)."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, Field

from serving.api import ErrorBody, JsonResponse, error_response
from serving.profile import build_profile
from serving.runtime import ServingRuntime

__all__ = ["ProfileBody", "router"]

router = APIRouter(tags=["users"])


class ProfileBody(BaseModel):
    """A user's profile."""

    user_id: str
    known: bool = Field(description="False for a user without any stored events (all fields are defaults).")
    top_categories: list[dict[str, Any]] = Field(description="Up to 5 `{category, share}` of recent engagement.")
    price_band: dict[str, Any] = Field(description="`band` (budget / mid / premium), `median_price`, "
                                       "`catalog_quartiles`.")
    activity: dict[str, Any] = Field(description="`events`, `sessions`, `events_7d`, `last_seen_ts`, `level`.")
    rfm: dict[str, Any] = Field(description="`recency_days`, `frequency`, `monetary`, `scores` {r, f, m}, "
                                "`segment`.")
    p_buy: float | None = Field(description="P(purchase within `p_buy_horizon_days`) = sigmoid(w . x); null "
                                "when the bundle has no profile model.")
    p_buy_horizon_days: float | None
    expected_order_value: float | None
    customer_value: float | None = Field(description="p_buy x expected_order_value / cost_to_serve.")
    features: dict[str, float] = Field(description="Inputs x of the P(buy) model.")


@router.get(
    "/v1/users/{user_id}/profile",
    summary="A user's profile: tastes, price band, activity, RFM segment, P(buy), value",
    description="Built from the user's online state (history, purchases). `p_buy` comes from a logistic "
    "model trained offline and stored with the bundle; customer value = P(buy) x expected order value / "
    "cost to serve (`Settings.cost_to_serve`). Unknown users get an empty profile, not 404.",
    response_model=ProfileBody,
    responses={422: {"model": ErrorBody, "description": "Bad user id."}},
)
async def user_profile(request: Request, user_id: Annotated[str, Path(description="The user's id.")]
                       ) -> JsonResponse:
    t0 = time.perf_counter()
    rt: ServingRuntime = request.app.state.serving
    if not user_id.strip() or len(user_id) > rt.settings.max_id_len:
        return error_response(422, "RequestValidationError",
                              f"path.user_id: must be a non-blank id of at most {rt.settings.max_id_len} characters")
    state = await rt.reader.read(user_id)
    bundle = rt.bundle
    quartiles, model = rt.profile_inputs(bundle)
    catalog = rt.catalog

    def category_of(item: str) -> str | None:
        live = catalog.category(item)
        if live or bundle is None:
            return live
        idx = bundle.items.get(item)
        return bundle.item_meta.category_name(idx) if idx >= 0 else None

    def price_of(item: str) -> float | None:
        info = catalog.get(item)
        if info is not None and info.price is not None:
            return info.price
        if bundle is None:
            return None
        idx = bundle.items.get(item)
        return float(bundle.item_meta.price[idx]) if idx >= 0 and bundle.item_meta.price[idx] > 0 else None

    body = build_profile(user_id=user_id, history=state.history, bought=state.bought,
                         now_ms=int(time.time() * 1000), category_of=category_of, price_of=price_of,
                         price_quartiles=quartiles, model=model, cost_to_serve=rt.settings.cost_to_serve,
                         event_weights=rt.settings.event_weights)
    rt.metrics.observe("user_profile", 200, time.perf_counter() - t0)
    return JsonResponse(body)
