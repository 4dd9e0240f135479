"""/health (503 while draining) and /metrics (Prometheus text)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from argen.server import protocol as p
from argen.server.state import Served

router = APIRouter()


@router.get("/health", response_model=p.Health, responses={503: {"model": p.Health}})
async def health(served: Served) -> JSONResponse:
    scheduler = served.scheduler
    body = p.Health(
        status="draining" if scheduler.draining else "ok",
        model=served.model_id,
        running=scheduler.n_running,
        waiting=scheduler.n_waiting,
    )
    return JSONResponse(p.dump(body), status_code=503 if scheduler.draining else 200)


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def prometheus(request: HTTPRequest) -> Response:
    # app.state.render_metrics: this server's registry, or every replica's under Ray Serve (distributed.py)
    return Response(await asyncio.to_thread(request.app.state.render_metrics), media_type=CONTENT_TYPE_LATEST)
