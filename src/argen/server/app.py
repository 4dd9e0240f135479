"""The HTTP app: `create_app` wires the routers (server/routers/), the middleware, the error
handlers and the OpenAPI description around one ServerState (server/state.py).

Middleware turns requests away before any route: a Host not allowed (400), a missing or wrong API
key (401), a body too large (413). Routes only parse, check and translate (see the routers).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from sse_starlette.sse import AppStatus
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware

import argen
from argen.api import Generator
from argen.engine.pacing import PREFILL_SLOWDOWN
from argen.images import ImageGenerator
from argen.server import protocol as p
from argen.server import tokenization
from argen.server.companions import Companions
from argen.server.grammar_sandbox import GrammarSandbox
from argen.server.guards import DEFAULT_MAX_BODY_BYTES, APIKey, BodyLimit
from argen.server.handlers import HANDLERS
from argen.server.limits import Limits
from argen.server.logprob_shape import Tokens
from argen.server.metrics import Metrics
from argen.server.params import Policy, max_prompt_chars
from argen.server.routers import generation, images, models, monitoring, strategies, tokenizer, web
from argen.server.scheduler import PREFILL_CHUNK, STEP_TOKENS, Scheduler
from argen.server.state import ServerState, endpoint_of


def create_app(
    gen: Generator,
    *,
    model_id: str | None = None,
    max_batch: int = 32,
    max_queue: int = 128,
    max_tokens_limit: int | None = None,
    limits: Limits | None = None,
    companions: Companions | None = None,
    api_key: str | None = None,
    allowed_hosts: list[str] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    prefill_chunk: int | None = PREFILL_CHUNK,
    step_tokens: int | None = STEP_TOKENS,
    prefix_caching: bool = True,
    kv_blocks: int | None = None,
    allowed_origins: list[str] | None = None,
    grammars: GrammarSandbox | None = None,
    prefill_slowdown: float | None = PREFILL_SLOWDOWN,
    image_models: dict[str, ImageGenerator] | None = None,
) -> FastAPI:
    """A FastAPI app serving `gen`. Its scheduler thread starts with the app (or on the first
    request) and, at shutdown, finishes the requests in flight before it stops. `companions` are
    the draft and guide models requests may name (default: only the served model itself),
    `limits` cap the strategy options, `api_key` (if any) is required on every route but /health,
    the API description and the web page's own files (`/`, `/static/...`: the page's API calls need it), `allowed_hosts` (if any) are the Host names accepted, `allowed_origins`
    (if any) the web origins whose pages may call the API from a browser (CORS), `grammars` where
    clients' grammars are compiled first (default: a GrammarSandbox with its default bounds),
    `image_models` the image-token models /v1/images/generations serves, by id (argen.images)."""
    model_id = model_id or gen.name
    context = gen.runtime.info.max_positions
    limit = min(max_tokens_limit or context, context)
    policy = Policy(
        model_id,
        limit,
        limits or Limits(),
        companions or Companions(model_id, gen.model),
        max_prompt_chars(gen),
        max_batch=max_batch,
    )
    metrics = Metrics()
    scheduler = Scheduler(
        gen.engine,
        metrics,
        max_batch=max_batch,
        max_queue=max_queue,
        prefill_chunk=prefill_chunk,
        step_tokens=step_tokens,
        prefix_caching=prefix_caching,
        kv_blocks=kv_blocks,
        prefill_slowdown=prefill_slowdown,
    )
    served = ServerState(
        gen,
        model_id,
        policy,
        scheduler,
        metrics,
        grammars or GrammarSandbox(gen.engine.grammars),
        Tokens(gen.tokenizer),
        p.ModelCard(id=model_id, created=p.now(), context_length=context),
        tokenization.tokenizer_info(gen),
        max_batch=max_batch,
        max_queue=max_queue,
        image_models=dict(image_models or {}),
    )
    # sse-starlette would cut every stream on SIGTERM; we drain them instead (uvicorn waits for them).
    AppStatus.disable_automatic_graceful_drain()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        served.grammars.start()
        yield
        served.grammars.close()
        await asyncio.to_thread(scheduler.stop)

    app = ArgenAPI(
        served,
        limit,
        title="argen",
        version=argen.__version__,
        description="OpenAI-compatible API over argen, with continuous batching.",
        lifespan=lifespan,
    )
    app.state.served = served
    app.state.scheduler, app.state.metrics, app.state.generator = scheduler, metrics, gen
    app.state.grammars = served.grammars
    # What /metrics shows: this server's registry (a Ray Serve replica swaps in every replica's, distributed.py).
    app.state.render_metrics = metrics.render
    _add_middleware(
        app,
        metrics,
        api_key=api_key,
        allowed_hosts=allowed_hosts,
        allowed_origins=allowed_origins,
        max_body_bytes=max_body_bytes,
    )
    for exc_class, handler in HANDLERS.items():
        app.add_exception_handler(exc_class, handler)
    for router in (
        generation.router,
        images.router,
        models.router,
        strategies.router,
        tokenizer.router,
        monitoring.router,
        web.router,
    ):
        app.include_router(router)
    return app


def _add_middleware(
    app: FastAPI,
    metrics: Metrics,
    *,
    api_key: str | None,
    allowed_hosts: list[str] | None,
    allowed_origins: list[str] | None,
    max_body_bytes: int,
) -> None:
    """Added innermost first: Host, CORS, then the API key, then the body's size."""

    def rejected(path: str, status: int) -> None:
        metrics.requests.labels(endpoint_of(path), f"rejected_{status}").inc()

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, rejected=rejected)
    if api_key:
        app.add_middleware(APIKey, key=api_key, rejected=rejected)
    if allowed_origins:
        # Outside the key check: a browser's preflight (OPTIONS) carries no key, and its answer gives
        # nothing away; the request that follows still needs the key.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=allowed_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            max_age=600,
        )
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)


class ArgenAPI(FastAPI):
    """The FastAPI app whose OpenAPI description adds what only this server knows: the model id and
    the max_tokens limit. (FastAPI's guide replaces `app.openapi` on the instance; overriding the
    method does the same in a way a type checker can follow.)"""

    def __init__(self, served: ServerState, max_tokens: int, **options: Any) -> None:
        super().__init__(**options)
        self._served, self._max_tokens = served, max_tokens

    def openapi(self) -> dict[str, Any]:
        schema = super().openapi()  # generated once, then cached by FastAPI
        served, limit = self._served, self._max_tokens
        for name in ("CompletionRequest", "ChatCompletionRequest"):
            properties = schema["components"]["schemas"][name]["properties"]
            properties["model"]["enum"] = [served.model_id]
            for field in ("max_tokens", "max_completion_tokens"):
                if field in properties:
                    properties[field]["anyOf"][0]["maximum"] = limit
            properties["n"]["maximum"] = min(served.policy.limits.max_n, served.max_batch, limit)
        return schema
