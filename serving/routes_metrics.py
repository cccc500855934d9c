"""``GET /metrics``: the API's Prometheus metrics (see :mod:`serving.api_metrics`)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

__all__ = ["router"]

router = APIRouter(tags=["operations"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description="Requests and handler time per route, lists by source, fallbacks, model swaps and "
    "version, catalog size; Prometheus text format.",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text exposition."}},
)
async def metrics(request: Request) -> Response:
    serving = getattr(request.app.state, "serving", None)
    body = serving.metrics.render() if serving is not None else b""
    return Response(body, media_type=CONTENT_TYPE_LATEST)
