"""The HTTP layer: OpenAI-compatible routes over the Scheduler, errors in OpenAI's shape.

Handlers only parse, check and translate: `params.build_request` turns a body into an argen
Request (every 400 comes from there, before anything is queued; it tokenizes, so it runs in a
worker thread, never on the event loop), the Scheduler runs it, and the handler turns the Events
it receives into a JSON response or server-sent events. Middleware turns requests away before
that: a Host not allowed (400), a missing or wrong API key (401), a body too large (413).
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sse_starlette import EventSourceResponse
from sse_starlette.sse import AppStatus
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware

import argen
from argen.api import Generator
from argen.engine import Event, Request, Result
from argen.engine.pacing import PREFILL_SLOWDOWN
from argen.errors import ArgenError
from argen.logprobs import TokenLogprob
from argen.server import protocol as p
from argen.server import tokenization
from argen.server.companions import Companions
from argen.server.errors import APIError, validation_message
from argen.server.grammar_sandbox import GrammarSandbox
from argen.server.guards import DEFAULT_MAX_BODY_BYTES, APIKey, BodyLimit
from argen.server.limits import Limits
from argen.server.logprob_shape import Tokens, chat_logprobs, completion_logprobs, prompt_logprob_entry
from argen.server.metrics import Metrics
from argen.server.params import Policy, build_requests, max_prompt_chars
from argen.server.scheduler import PREFILL_CHUNK, STEP_TOKENS, Draining, QueueFull, Scheduler, Ticket
from argen.server.tools import ToolMode, calls_from_output, tool_mode

log = logging.getLogger("argen.server")
ERROR_RESPONSES = {
    status: {"model": p.ErrorResponse, "description": text}
    for status, text in [(400, "a parameter is invalid or unsupported (the message says which)"),
                         (401, "the API key is missing or wrong (only when the server has one)"),
                         (404, "the model is not served here"), (413, "the body is larger than the server's limit"),
                         (422, "the body does not match the schema"),
                         (429, "the queue is full; retry after Retry-After seconds"),
                         (503, "the server is shutting down")]
}  # fmt: skip
DISCONNECT_POLL_S = 0.5
SSE_EVENT = {  # one server-sent event of a stream
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "description": "a JSON chunk (chat.completion.chunk or text_completion; "
                            "an error object if generation fails), or [DONE] at the end"}},
}  # fmt: skip


def create_app(gen: Generator, *, model_id: str | None = None, max_batch: int = 32, max_queue: int = 128,
               max_tokens_limit: int | None = None, limits: Limits | None = None,
               companions: Companions | None = None, api_key: str | None = None,
               allowed_hosts: list[str] | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               prefill_chunk: int | None = PREFILL_CHUNK, step_tokens: int | None = STEP_TOKENS,
               prefix_caching: bool = True, kv_blocks: int | None = None,
               allowed_origins: list[str] | None = None, grammars: GrammarSandbox | None = None,
               prefill_slowdown: float | None = PREFILL_SLOWDOWN) -> FastAPI:  # fmt: skip
    """A FastAPI app serving `gen`. Its scheduler thread starts with the app (or on the first
    request) and, at shutdown, finishes the requests in flight before it stops. `companions` are
    the draft and guide models requests may name (default: only the served model itself),
    `limits` cap the strategy options, `api_key` (if any) is required on every route but /health
    and the API description, `allowed_hosts` (if any) are the Host names accepted, `allowed_origins`
    (if any) the web origins whose pages may call the API from a browser (CORS), `grammars` where
    clients' grammars are compiled first (default: a GrammarSandbox with its default bounds)."""
    model_id = model_id or gen.name
    context = gen.runtime.info.max_positions
    limit = min(max_tokens_limit or context, context)
    policy = Policy(model_id, limit, limits or Limits(), companions or Companions(model_id, gen.model),
                    max_prompt_chars(gen), max_batch=max_batch)  # fmt: skip
    metrics = Metrics()
    tokens = Tokens(gen.tokenizer)  # token texts and bytes, for log-probs
    scheduler = Scheduler(gen.engine, metrics, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
                          step_tokens=step_tokens, prefix_caching=prefix_caching, kv_blocks=kv_blocks,
                          prefill_slowdown=prefill_slowdown)  # fmt: skip
    grammars = grammars or GrammarSandbox(gen.engine.grammars)
    # sse-starlette would cut every stream on SIGTERM; we drain them instead (uvicorn waits for them).
    AppStatus.disable_automatic_graceful_drain()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        grammars.start()
        yield
        grammars.close()
        await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="argen", version=argen.__version__,
                  description="OpenAI-compatible API over argen, with continuous batching.", lifespan=lifespan)  # fmt: skip
    app.state.scheduler, app.state.metrics, app.state.generator, app.state.grammars = scheduler, metrics, gen, grammars

    # -- middleware (added innermost first): Host, CORS, then the API key, then the body's size --
    def rejected(path: str, status: int) -> None:
        metrics.requests.labels(_endpoint_of(path), f"rejected_{status}").inc()

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, rejected=rejected)
    if api_key:
        app.add_middleware(APIKey, key=api_key, rejected=rejected)
    if allowed_origins:
        # Outside the key check: a browser's preflight (OPTIONS) carries no key, and its answer gives
        # nothing away; the request that follows still needs the key.
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)  # fmt: skip
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    # -- errors --------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: HTTPRequest, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: HTTPRequest, exc: RequestValidationError):
        message, param = validation_message(jsonable_encoder(exc.errors()))
        metrics.requests.labels(_endpoint(request), "rejected_422").inc()
        return APIError(422, message, param=param, code="invalid_body").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: HTTPRequest, exc: StarletteHTTPException):
        message = {404: f"no route {request.method} {request.url.path}; see /docs for the API",
                   405: f"{request.method} is not allowed on {request.url.path}; see /docs"}.get(exc.status_code, str(exc.detail))  # fmt: skip
        return APIError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None,
                        headers=getattr(exc, "headers", None)).response()  # fmt: skip

    @app.exception_handler(Exception)
    async def _internal(request: HTTPRequest, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, f"internal error: {exc!r}", code="internal_error").response()

    # -- routes --------------------------------------------------------------------------------
    def completion_responses(model) -> dict:
        ok = {"model": model, "description": "the completion, or with stream=true server-sent events "
              "(one JSON chunk per `data:` line, then `data: [DONE]`)",
              "content": {"text/event-stream": {"schema": SSE_EVENT}}}  # fmt: skip
        return {200: ok, **ERROR_RESPONSES}

    @app.post("/v1/completions", response_model=None, responses=completion_responses(p.CompletionResponse))
    async def completions(body: p.CompletionRequest, request: HTTPRequest) -> Response:
        return await generate(body, request, "completions")

    @app.post("/v1/chat/completions", response_model=None,
              responses=completion_responses(p.ChatCompletionResponse))  # fmt: skip
    async def chat_completions(body: p.ChatCompletionRequest, request: HTTPRequest) -> Response:
        return await generate(body, request, "chat")

    created = p.now()
    card = p.ModelCard(id=model_id, created=created, context_length=context)

    @app.get("/v1/models", response_model=p.ModelList)
    async def models() -> p.ModelList:
        return p.ModelList(data=[card])

    @app.get("/v1/models/{name:path}", response_model=p.ModelCard, responses={404: ERROR_RESPONSES[404]})
    async def model(name: str) -> p.ModelCard:
        if name != model_id:
            raise APIError(404, f"the model {name[:200]!r} does not exist here; this server serves {model_id!r}",
                           param="model", code="model_not_found")  # fmt: skip
        return card

    # -- vLLM's tokenizer routes (tokenization.py) -------------------------------------------------
    @app.post("/tokenize", response_model=p.TokenizeResponse, responses=ERROR_RESPONSES)
    async def tokenize(body: p.TokenizeRequest) -> p.TokenizeResponse:
        return await asyncio.to_thread(tokenization.tokenize, gen, body, policy)

    @app.post("/detokenize", response_model=p.DetokenizeResponse, responses=ERROR_RESPONSES)
    async def detokenize(body: p.DetokenizeRequest) -> p.DetokenizeResponse:
        return await asyncio.to_thread(tokenization.detokenize, gen, body, policy)

    info = tokenization.tokenizer_info(gen)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        return info

    @app.get("/health", response_model=p.Health, responses={503: {"model": p.Health}})
    async def health() -> JSONResponse:
        status = "draining" if scheduler.draining else "ok"
        body = p.Health(status=status, model=model_id, running=scheduler.n_running, waiting=scheduler.n_waiting)
        return JSONResponse(p.dump(body), status_code=503 if scheduler.draining else 200)

    # What /metrics shows: this server's registry (a Ray Serve replica swaps in every replica's, distributed.py).
    app.state.render_metrics = metrics.render

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def prometheus() -> Response:
        return Response(await asyncio.to_thread(app.state.render_metrics), media_type=CONTENT_TYPE_LATEST)

    # -- generation ----------------------------------------------------------------------------
    async def generate(body, request: HTTPRequest, endpoint: str) -> Response:
        try:
            if scheduler.draining:
                raise Draining()
            # Tokenizing (and the chat template) is CPU work: off the event loop.
            built = await asyncio.to_thread(build_requests, gen, body, policy, compile_grammar=False)
            if len(built) > max_batch + max_queue:  # would never fit, however long the client waits
                raise APIError(400, f"prompt holds {len(built)} prompts but this server holds at most "
                               f"{max_batch + max_queue} requests at once (running and waiting); send fewer at a time",
                               param="prompt", code="limit_exceeded")  # fmt: skip
            await grammars.compile(built[0])  # a client's grammar: in a child first, bounded (grammar_sandbox.py)
            for other in built[1:]:  # one body, one response_format: its prompts share the compiled grammar
                other.matcher = built[0].matcher
            tickets = scheduler.submit_all(built, endpoint)  # a list of prompts: one ticket each, batched together
        except APIError as exc:
            metrics.requests.labels(endpoint, f"rejected_{exc.status}").inc()
            raise
        except QueueFull:
            metrics.requests.labels(endpoint, "rejected_429").inc()
            wait = scheduler.retry_after()
            raise APIError(429, f"the server is busy ({max_batch} sequences running, {max_queue} waiting); "
                           f"retry in {wait} s", code="queue_full", headers={"Retry-After": str(wait)}) from None  # fmt: skip
        except Draining:
            metrics.requests.labels(endpoint, "rejected_503").inc()
            raise APIError(503, "the server is shutting down and takes no new requests; retry elsewhere or later",
                           code="shutting_down") from None  # fmt: skip
        shape = shape_of(endpoint, model_id, gen, body, built, tokens, [t.id for t in tickets])
        if body.stream:
            return EventSourceResponse(stream(tickets, shape, body.stream_options or p.StreamOptions()), sep="\n")
        results = await collect(tickets, request)
        return JSONResponse(shape.response(results))

    async def collect(tickets: list[Ticket], request: HTTPRequest) -> list[Result]:
        """Wait for every prompt's n Results (they share one queue); a client that hangs up cancels the
        generation (checked every DISCONNECT_POLL_S, whether or not tokens are arriving)."""
        loop = asyncio.get_running_loop()
        next_check = loop.time() + DISCONNECT_POLL_S
        results: list[Result] = []
        queue, expected = tickets[0].queue, sum(t.request.n for t in tickets)
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), max(0.01, next_check - loop.time()))
                except asyncio.TimeoutError:
                    item = None
                if isinstance(item, Result):
                    results.append(item)
                    if len(results) == expected:
                        return results
                if isinstance(item, Exception):
                    cancel(tickets)
                    raise _generation_error(item)
                if loop.time() >= next_check:
                    next_check = loop.time() + DISCONNECT_POLL_S
                    if await request.is_disconnected():
                        cancel(tickets)
                        raise APIError(499, "client closed the request", code="client_closed")
        except asyncio.CancelledError:
            cancel(tickets)
            raise

    def cancel(tickets: list[Ticket]) -> None:
        for ticket in tickets:
            scheduler.cancel(ticket)

    async def stream(tickets: list[Ticket], shape: _Shape, options: p.StreamOptions):
        """Server-sent events; if the client disconnects, sse-starlette cancels this generator and
        the `finally` takes the sequences out of the batch. With continuous_usage_stats every chunk
        carries the usage so far."""
        finished = False
        results: list[Result] = []
        held: dict[tuple, list[Event]] = {}  # with tools: each choice's events, until it finishes
        queue, expected = tickets[0].queue, sum(t.request.n for t in tickets)
        usage = shape.usage_counter() if options.continuous_usage_stats else None
        try:
            if shape.chat:  # each choice's first delta names the role, as OpenAI's
                for index in range(tickets[0].request.n):
                    yield json.dumps(shape.chunk(p.Delta(role="assistant", content=""), None, None, index, usage))
            while True:
                item = await queue.get()
                if isinstance(item, Event) and usage is not None:
                    usage.add(item)
                if isinstance(item, Event) and shape.tools is not None:
                    # Tool calls are parsed from the whole output: it comes in one chunk at the end.
                    held.setdefault((item.index, item.sample_index), []).append(item)
                    if item.finish_reason:
                        yield json.dumps(shape.tool_chunk(held.pop((item.index, item.sample_index)), usage))
                elif isinstance(item, Event):
                    if (echoed := shape.echo_chunk(item, usage)) is not None:  # the prompt first (and its log-probs)
                        yield json.dumps(echoed)
                    ids = item.token_ids if shape.token_ids else None
                    if item.text or ids or item.finish_reason or (shape.tokens and item.token_ids) or usage:
                        content = p.Delta(content=item.text) if shape.chat else item.text
                        yield json.dumps(shape.chunk(content, item.finish_reason, ids, item, usage))
                elif isinstance(item, Result):
                    results.append(item)
                    if len(results) < expected:
                        continue
                    finished = True
                    if options.include_usage:
                        yield json.dumps(shape.usage_chunk(results))
                    break
                else:
                    finished = True
                    cancel(tickets)
                    yield json.dumps(_generation_error(item).body())
                    break
            yield "[DONE]"
        finally:
            if not finished:
                cancel(tickets)

    original_openapi = app.openapi

    def openapi() -> dict:
        """The generated schema (cached by FastAPI), plus what only this server knows: the model id
        and the max_tokens limit."""
        schema = original_openapi()
        for name in ("CompletionRequest", "ChatCompletionRequest"):
            properties = schema["components"]["schemas"][name]["properties"]
            properties["model"]["enum"] = [model_id]
            for field in ("max_tokens", "max_completion_tokens"):
                if field in properties:
                    properties[field]["anyOf"][0]["maximum"] = limit
            properties["n"]["maximum"] = min(policy.limits.max_n, max_batch, limit)
        return schema

    app.openapi = openapi
    return app


def _endpoint(request: HTTPRequest) -> str:
    return _endpoint_of(request.url.path)


def _endpoint_of(path: str) -> str:
    return "chat" if path.endswith("/chat/completions") else "completions" if path.endswith("/completions") else "other"


def _generation_error(exc: Exception) -> APIError:
    if isinstance(exc, ArgenError):  # a grammar that trips a limit on the text written so far names its field
        return APIError(400, str(exc), param="response_format" if str(exc).startswith("response_format") else None)
    return APIError(500, f"generation failed: {exc!r}", code="internal_error")


def _prompt_texts(gen: Generator, body, built: list[Request]) -> list[str] | None:
    """Each prompt as the text of an `echo` completion: as sent, or decoded from its token ids."""
    if not getattr(body, "echo", False):
        return None
    sent = body.prompt if isinstance(body.prompt, list) and body.prompt and not isinstance(body.prompt[0], int) \
        else [body.prompt]  # fmt: skip
    return [prompt if isinstance(prompt, str) else gen.tokenizer.decode(request.prompt_ids, skip_special_tokens=True)
            for prompt, request in zip(sent, built, strict=True)]  # fmt: skip


def shape_of(endpoint: str, model_id: str, gen: Generator, body, built: list[Request], tokens: Tokens,
             indices: list[int]) -> _Shape:  # fmt: skip
    """How the responses to `body` look; `indices`: each prompt's index in the batch (its Events' and
    Results' `index`)."""
    params = built[0].params
    return _Shape(endpoint, model_id, body.return_token_ids, [r.params.seed for r in built],
                  tokens if params.logprobs is not None or body.prompt_logprobs is not None else None,
                  _prompt_texts(gen, body, built), [r.prompt_ids for r in built],
                  tool_mode(body) if endpoint == "chat" else None, n=body.n, indices=indices,
                  echo_logprobs=getattr(body, "logprobs", None) if getattr(body, "echo", False) else None,
                  prompt_logprobs=body.prompt_logprobs)  # fmt: skip


def _finish(reason: str | None, calls: list) -> str | None:
    """OpenAI's finish_reason: "tool_calls" when the model stopped after calling."""
    return "tool_calls" if calls and reason == "stop" else reason


def _top(records, k: int | None) -> list:
    """Log-prob records with at most k alternatives each (one scoring serves asks for different k)."""
    return [r if r is None or k is None or len(r.top) <= k else TokenLogprob(r.token, r.logprob, r.top[:k], r.rank)
            for r in records]  # fmt: skip


class _UsageCounter:
    """The usage so far of a streamed request (continuous_usage_stats)."""

    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens, self.completion_tokens = prompt_tokens, 0

    def add(self, event: Event) -> None:
        self.completion_tokens += len(event.token_ids)

    def usage(self) -> p.Usage:
        return p.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                       total_tokens=self.prompt_tokens + self.completion_tokens)  # fmt: skip


class _Shape:
    """Builds the OpenAI response bodies of one endpoint (text completion or chat). Choice i x n + j
    is sample j of prompt i (OpenAI's numbering for a list of prompts), and carries its seed (the
    prompt's seed + j: argen extension). `tokens`: log-probs were asked for; `echo`: each prompt's
    text, which its completions start with; `prompt_ids`: each prompt's ids; `tools`: how a chat output
    becomes tool calls (server/tools.py); `indices`: each prompt's batch index (Events and Results
    carry it; none: one prompt); `echo_logprobs` / `prompt_logprobs`: the alternatives per prompt
    token each shape shows."""

    def __init__(self, endpoint: str, model_id: str, token_ids: bool, seed: int | list[int], tokens: Tokens | None = None,
                 echo: list[str] | None = None, prompt_ids: list[list[int]] | None = None,
                 tools: ToolMode | None = None, *, n: int = 1, indices: list[int] | None = None,
                 echo_logprobs: int | None = None, prompt_logprobs: int | None = None) -> None:  # fmt: skip
        self.chat, self.model, self.token_ids = endpoint == "chat", model_id, token_ids
        self.seeds = [seed] if isinstance(seed, int) else seed  # each prompt's (sample j: its seed + j)
        self.tools, self.n = tools, n
        self.id, self.created = p.new_id("chatcmpl" if self.chat else "cmpl"), p.now()
        self.tokens, self.echo, self.prompt_ids = tokens, echo, prompt_ids or []
        self.echo_logprobs, self.prompt_logprobs = echo_logprobs, prompt_logprobs
        self._prompt_of = {index: i for i, index in enumerate(indices or [])}
        self._offsets: dict = {}  # per choice (see offsets)
        self._echoed: set[int] = set()  # choices whose echo chunk was sent

    def _prompt(self, item: Event | Result) -> int:
        return self._prompt_of.get(item.index, 0)

    def choice(self, item: Event | Result) -> int:
        """The OpenAI choice index of an Event's or Result's sample."""
        return self._prompt(item) * self.n + item.sample_index

    def _echo(self, item) -> str | None:
        return None if self.echo is None else self.echo[self._prompt(item)]

    def usage_counter(self) -> _UsageCounter:
        return _UsageCounter(sum(map(len, self.prompt_ids)))

    @staticmethod
    def usage(results: list[Result]) -> p.Usage:
        """Each prompt once (it is prefilled once), the completion tokens of every sample."""
        n_prompt = sum(len(r.prompt_ids) for r in results if r.sample_index == 0)
        n_out = sum(len(r.token_ids) for r in results)
        return p.Usage(prompt_tokens=n_prompt, completion_tokens=n_out, total_tokens=n_prompt + n_out)

    def offsets(self, index: int, echo: str | None):
        """Streaming: where choice `index`'s next output token starts in its text (after the echo)."""
        if index not in self._offsets:
            self._offsets[index] = self.tokens.offsets(len(echo or ""))
        return self._offsets[index]

    def _logprobs(self, ids: list[int], records, index: int = 0, prompt_ids: list[int] | None = None,
                  prompt_records=None, echo: str | None = None):  # fmt: skip
        """Log-probs of `ids` in the endpoint's shape (None if not asked for); with `prompt_ids`, the
        echoed prompt's come first (a fresh offset count from 0)."""
        if self.tokens is None or records is None:
            return None
        if self.chat:
            return chat_logprobs(self.tokens, records)
        if prompt_ids is not None:
            return completion_logprobs(self.tokens, prompt_ids + ids,
                                       _top(prompt_records, self.echo_logprobs) + list(records),
                                       self.tokens.offsets())  # fmt: skip
        return completion_logprobs(self.tokens, ids, records, self.offsets(index, echo))

    def _prompt_logprobs(self, records) -> p.PromptLogprobs | None:
        """vLLM's prompt_logprobs: per prompt token (the first null), the token and the k likeliest."""
        if self.prompt_logprobs is None or records is None:
            return None
        return [None if r is None else prompt_logprob_entry(self.tokens, r, self.prompt_logprobs) for r in records]

    def response(self, results: list[Result]) -> dict:
        choices = []
        for result in sorted(results, key=self.choice):
            index = self.choice(result)
            ids = result.token_ids if self.token_ids else None
            common = dict(index=index, finish_reason=result.finish_reason, token_ids=ids, seed=result.seed)
            if self.chat:
                logprobs = self._logprobs(result.token_ids, result.logprobs)
                content, calls = (result.text, []) if self.tools is None else calls_from_output(result.text, self.tools)
                common["finish_reason"] = _finish(result.finish_reason, calls)
                message = p.AssistantMessage(content=content, tool_calls=calls or None)
                choices.append(p.ChatChoice(message=message, logprobs=logprobs, **common))
            else:
                echo = self._echo(result)
                scored = self.echo_logprobs is not None and echo is not None
                logprobs = None
                if result.logprobs is not None or scored:
                    logprobs = self._logprobs(result.token_ids, result.logprobs or [], index,
                                              result.prompt_ids if scored else None, result.prompt_logprobs, echo)  # fmt: skip
                choices.append(p.CompletionChoice(text=(echo or "") + result.text, logprobs=logprobs,
                                                  prompt_logprobs=self._prompt_logprobs(result.prompt_logprobs),
                                                  **common))  # fmt: skip
        if self.chat:
            return p.dump(p.ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                                   usage=self.usage(results),
                                                   prompt_logprobs=self._prompt_logprobs(results[0].prompt_logprobs)))  # fmt: skip
        return p.dump(p.CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                           usage=self.usage(results)))  # fmt: skip

    def chunk(self, content, finish_reason: str | None, ids: list[int] | None, event: Event | int = 0,
              usage: _UsageCounter | None = None) -> dict:  # fmt: skip
        """A stream chunk of one choice (an Event's, or choice `event` if an int); its last one (with
        the finish_reason) carries its seed."""
        index = event if isinstance(event, int) else self.choice(event)
        logprobs = None
        if not isinstance(event, int):
            logprobs = self._logprobs(event.token_ids, event.logprobs, index, echo=self._echo(event))
        seed = None if finish_reason is None else self.seeds[index // self.n] + index % self.n
        common = dict(index=index, finish_reason=finish_reason, token_ids=ids, seed=seed, logprobs=logprobs)
        now = None if usage is None else usage.usage()
        if self.chat:
            choice = p.ChatChunkChoice(delta=content, **common)
            return p.dump(p.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice],
                                                usage=now))  # fmt: skip
        choice = p.CompletionChoice(text=content, **common)
        return p.dump(p.CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[choice],
                                           usage=now))  # fmt: skip

    def echo_chunk(self, first: Event, usage: _UsageCounter | None = None) -> dict | None:
        """A choice's first chunk with echo: the prompt's text (and its tokens' log-probs, from the
        sample's first Event). None once sent for that choice."""
        index, echo = self.choice(first), self._echo(first)
        if echo is None or index in self._echoed:
            return None
        self._echoed.add(index)
        logprobs = None
        if self.tokens is not None and first.prompt_logprobs is not None and self.echo_logprobs is not None:
            logprobs = completion_logprobs(self.tokens, self.prompt_ids[self._prompt(first)],
                                           _top(first.prompt_logprobs, self.echo_logprobs), self.tokens.offsets())  # fmt: skip
        choice = p.CompletionChoice(index=index, text=echo, finish_reason=None, logprobs=logprobs)
        return p.dump(p.CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[choice],
                                           usage=None if usage is None else usage.usage()))  # fmt: skip

    def tool_chunk(self, events: list[Event], usage: _UsageCounter | None = None) -> dict:
        """A choice's whole output under tools, as one chunk: its content and tool calls."""
        content, calls = calls_from_output("".join(e.text for e in events), self.tools)
        deltas = [p.ToolCallDelta(index=i, **call.model_dump()) for i, call in enumerate(calls)]
        ids = [t for e in events for t in e.token_ids] if self.token_ids else None
        return self.chunk(p.Delta(content=content, tool_calls=deltas or None), _finish(events[-1].finish_reason, calls),
                          ids, self.choice(events[-1]), usage)  # fmt: skip

    def usage_chunk(self, results: list[Result]) -> dict:
        cls = p.ChatCompletionChunk if self.chat else p.CompletionResponse
        return p.dump(cls(id=self.id, created=self.created, model=self.model, choices=[], usage=self.usage(results)))
