"""/v1/completions and /v1/chat/completions: a body becomes argen Requests (`params.build_requests`:
every 400 before anything is queued; it tokenizes, so in a worker thread, never on the event loop),
the Scheduler runs them, and the Events and Results come back as one JSON response or as
server-sent events (`responses.Shape`). A client that hangs up cancels its generation."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from argen.engine import Event, Result
from argen.server import protocol as p
from argen.server.errors import ERROR_RESPONSES, APIError
from argen.server.params import build_requests
from argen.server.responses import Shape, generation_error, shape_of
from argen.server.scheduler import Draining, QueueFull, Scheduler, Ticket
from argen.server.state import Served, ServerState

DISCONNECT_POLL_S = 0.5
SSE_EVENT = {  # one server-sent event of a stream
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "a JSON chunk (chat.completion.chunk or text_completion; "
            "an error object if generation fails), or [DONE] at the end",
        }
    },
}
router = APIRouter()


def completion_responses(model) -> dict:
    ok = {
        "model": model,
        "description": "the completion, or with stream=true server-sent events "
        "(one JSON chunk per `data:` line, then `data: [DONE]`)",
        "content": {"text/event-stream": {"schema": SSE_EVENT}},
    }
    return {200: ok, **ERROR_RESPONSES}


@router.post("/v1/completions", response_model=None, responses=completion_responses(p.CompletionResponse))
async def completions(body: p.CompletionRequest, request: HTTPRequest, served: Served) -> Response:
    return await generate(body, request, "completions", served)


@router.post("/v1/chat/completions", response_model=None, responses=completion_responses(p.ChatCompletionResponse))
async def chat_completions(body: p.ChatCompletionRequest, request: HTTPRequest, served: Served) -> Response:
    return await generate(body, request, "chat", served)


async def generate(body, request: HTTPRequest, endpoint: str, served: ServerState) -> Response:
    scheduler, metrics = served.scheduler, served.metrics
    max_batch, max_queue = served.max_batch, served.max_queue
    try:
        if scheduler.draining:
            raise Draining()
        # Tokenizing (and the chat template) is CPU work: off the event loop.
        built = await asyncio.to_thread(
            build_requests, served.gen, body, served.policy, compile_grammar=False, served=served.prompts
        )
        if len(built) > max_batch + max_queue:  # would never fit, however long the client waits
            raise APIError(
                400,
                f"prompt holds {len(built)} prompts but this server holds at most "
                f"{max_batch + max_queue} requests at once (running and waiting); send fewer at a time",
                param="prompt",
                code="limit_exceeded",
            )
        await served.grammars.compile(built[0])  # a client's grammar: in a child first, bounded (grammar_sandbox.py)
        for other in built[1:]:  # one body, one response_format: its prompts share the compiled grammar
            other.matcher = built[0].matcher
        tickets = scheduler.submit_all(built, endpoint)  # a list of prompts: one ticket each, batched together
        for made in built:  # a later request may edit these (server/edits.py)
            served.prompts.add(made.prompt_ids)
    except APIError as exc:
        metrics.requests.labels(endpoint, f"rejected_{exc.status}").inc()
        raise
    except QueueFull:
        metrics.requests.labels(endpoint, "rejected_429").inc()
        wait = scheduler.retry_after()
        raise APIError(
            429,
            f"the server is busy ({max_batch} sequences running, {max_queue} waiting); retry in {wait} s",
            code="queue_full",
            headers={"Retry-After": str(wait)},
        ) from None
    except Draining:
        metrics.requests.labels(endpoint, "rejected_503").inc()
        raise APIError(
            503, "the server is shutting down and takes no new requests; retry elsewhere or later", code="shutting_down"
        ) from None
    shape = shape_of(endpoint, served.model_id, served.gen, body, built, served.tokens, [t.id for t in tickets])
    if body.stream:
        return EventSourceResponse(
            stream(scheduler, tickets, shape, body.stream_options or p.StreamOptions()), sep="\n"
        )
    results = await collect(scheduler, tickets, request)
    return JSONResponse(shape.response(results))


async def collect(scheduler: Scheduler, tickets: list[Ticket], request: HTTPRequest) -> list[Result]:
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
                cancel(scheduler, tickets)
                raise generation_error(item)
            if loop.time() >= next_check:
                next_check = loop.time() + DISCONNECT_POLL_S
                if await request.is_disconnected():
                    cancel(scheduler, tickets)
                    raise APIError(499, "client closed the request", code="client_closed")
    except asyncio.CancelledError:
        cancel(scheduler, tickets)
        raise


def cancel(scheduler: Scheduler, tickets: list[Ticket]) -> None:
    for ticket in tickets:
        scheduler.cancel(ticket)


async def stream(scheduler: Scheduler, tickets: list[Ticket], shape: Shape, options: p.StreamOptions):
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
                if (
                    item.text
                    or ids
                    or item.finish_reason
                    or ((shape.tokens or shape.origins) and item.token_ids)
                    or usage
                ):
                    content = p.Delta(content=item.text) if shape.chat else item.text
                    yield json.dumps(shape.chunk(content, item.finish_reason, ids, item, usage))
            elif isinstance(item, Result):
                results.append(item)
                if shape.origins:
                    yield json.dumps(shape.stats_chunk(item))
                if len(results) < expected:
                    continue
                finished = True
                if shape.edit:
                    yield json.dumps(shape.edit_chunk(results[0]))
                if options.include_usage:
                    yield json.dumps(shape.usage_chunk(results))
                break
            else:
                finished = True
                cancel(scheduler, tickets)
                yield json.dumps(generation_error(item).body())
                break
        yield "[DONE]"
    finally:
        if not finished:
            cancel(scheduler, tickets)
