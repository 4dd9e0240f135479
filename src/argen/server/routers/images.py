"""/v1/images/generations: OpenAI's images API over the image-token models the operator serves
(`argen serve --image-model digits-ar`). The body is checked here (every 400 before queueing); the
request waits in the server's one line beside text requests and its images are decoded in the
engine's loop, as rows of an image batch (engine/images.py); a client that hangs up is dropped (from
the line, or its images' result is not sent)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi import Request as HTTPRequest

from argen.engine import ImageRequest, ImagesDone
from argen.errors import ArgenError
from argen.server import protocol as p
from argen.server.errors import ERROR_RESPONSES, APIError
from argen.server.images import check_size, labels_of, response
from argen.server.scheduler import Draining, QueueFull
from argen.server.state import Served

DISCONNECT_POLL_S = 0.5
router = APIRouter()


@router.post("/v1/images/generations", response_model=p.ImagesResponse, responses=ERROR_RESPONSES)
async def generate_images(body: p.ImageGenerationRequest, request: HTTPRequest, served: Served) -> p.ImagesResponse:
    metrics, scheduler = served.metrics, served.scheduler
    try:
        gen = served.image_models.get(body.model)
        if gen is None:
            names = ", ".join(served.image_models) or "none (argen serve --image-model NAME serves one)"
            raise APIError(
                404,
                f"the image model {body.model[:200]!r} is not served here; image models: {names}",
                param="model",
                code="model_not_found",
            )
        check_size(body, int(round(gen.model.n_pixels**0.5)))
        labels = labels_of(body, gen.model.n_classes)
        strategy = body.strategy.model_dump() if isinstance(body.strategy, p.StrategySpec) else body.strategy
        strategy = strategy or "plain"
        images = ImageRequest(gen, labels, strategy, body.seed)
        try:  # the decoder's own checks (strategy, options, seed), before the request waits in line
            images.check()
        except ArgenError as exc:
            raise APIError(400, str(exc), param="strategy") from None
        (ticket,) = scheduler.submit_all([images], "images")
    except APIError as exc:
        metrics.requests.labels("images", f"rejected_{exc.status}").inc()
        raise
    except QueueFull:
        metrics.requests.labels("images", "rejected_429").inc()
        wait = scheduler.retry_after()
        raise APIError(
            429, f"the server is busy; retry in {wait} s", code="queue_full", headers={"Retry-After": str(wait)}
        ) from None
    except Draining:
        metrics.requests.labels("images", "rejected_503").inc()
        raise APIError(503, "the server is shutting down and takes no new requests", code="shutting_down") from None
    while True:
        try:
            item = await asyncio.wait_for(ticket.queue.get(), DISCONNECT_POLL_S)
            break
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                scheduler.cancel(ticket)
                raise APIError(499, "client closed the request", code="client_closed") from None
    if isinstance(item, ArgenError):  # checked above, so a surprise; still the client's request
        raise APIError(400, str(item), param="strategy")
    if not isinstance(item, ImagesDone):
        raise item if isinstance(item, Exception) else RuntimeError(f"unexpected item {item!r}")
    return response(item.result, body, gen.model.n_levels)
