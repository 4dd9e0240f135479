"""Running a batch job's requests through the continuous-batching loop.

A line means what the same HTTP request to `argen serve` means: its body is checked by the server's
pydantic model and `build_request` (same 400s, same defaults), and its response body is built by
the server's `responses.Shape`. The requests then run in one DecodeBatch, admitted in input order by the
engine's Scheduler, as the server admits them: up to `max_batch` sequences at once (a request's n
samples are n), each only when KV memory for its worst case is free. Lines finish out of order; `JobRunner.run` yields each one's output line as it finishes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import cast

from pydantic import ValidationError

from argen.api import Generator, ModelSpec
from argen.engine import DecodeBatch, Event, Failure, Request, Result
from argen.engine.scheduler import PREFILL_CHUNK, STEP_TOKENS, Scheduler, Waiting
from argen.jobs.lines import Job, error_line, ok_line
from argen.server import protocol as p
from argen.server.companions import Companions
from argen.server.errors import APIError, validation_message
from argen.server.limits import Limits
from argen.server.logprob_shape import Tokens
from argen.server.params import Policy, build_request, max_prompt_chars
from argen.server.responses import generation_error, shape_of

log = logging.getLogger("argen.batch")
Body = p.ChatCompletionRequest | p.CompletionRequest
BODIES: dict[str, type[Body]] = {"chat": p.ChatCompletionRequest, "completions": p.CompletionRequest}


def make_policy(
    gen: Generator, model_id: str, limits: Limits | None = None, companions: Companions | None = None
) -> Policy:
    """What a batch line may ask for: the same policy `create_app` builds for the server."""
    context = gen.runtime.info.max_positions
    return Policy(
        model_id, context, limits or Limits(), companions or Companions(model_id, gen.model), max_prompt_chars(gen)
    )


@dataclass(frozen=True)
class RunnerOptions:
    """What a JobRunner is made from, plain values (they travel to Ray workers, which load the model
    themselves). `draft_models` / `guide_models` / `draft_heads` / `caad_stores` / `small_models`: `NAME=SOURCE`
    companions lines may name."""

    model: ModelSpec
    model_id: str
    max_batch: int = 32
    prefill_chunk: int | None = PREFILL_CHUNK
    step_tokens: int | None = STEP_TOKENS
    prefix_caching: bool = True
    draft_models: tuple[str, ...] = ()
    guide_models: tuple[str, ...] = ()
    draft_heads: tuple[str, ...] = ()
    caad_stores: tuple[str, ...] = ()
    small_models: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)


def make_runner(options: RunnerOptions) -> JobRunner:
    """A JobRunner over a freshly loaded model (in this process or a Ray worker)."""
    gen = options.model.load_text()
    companions = Companions.load(
        gen,
        options.model_id,
        list(options.draft_models),
        list(options.guide_models),
        list(options.draft_heads),
        list(options.caad_stores),
        list(options.small_models),
    )
    return JobRunner(
        gen,
        make_policy(gen, options.model_id, options.limits, companions),
        max_batch=options.max_batch,
        prefill_chunk=options.prefill_chunk,
        step_tokens=options.step_tokens,
        prefix_caching=options.prefix_caching,
    )


class JobRunner:
    def __init__(
        self,
        gen: Generator,
        policy: Policy,
        max_batch: int = 32,
        prefill_chunk: int | None = PREFILL_CHUNK,
        step_tokens: int | None = STEP_TOKENS,
        prefix_caching: bool = True,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.gen, self.policy, self.max_batch = gen, policy, max_batch
        self.prefill_chunk, self.step_tokens, self.prefix_caching = prefill_chunk, step_tokens, prefix_caching
        self.generated = 0  # requests admitted to the decode loop (resume tests count them)
        self.tokens = Tokens(gen.tokenizer)  # token texts, for log-probs

    def build(self, job: Job) -> tuple[Request, Body] | APIError:
        """The job's Request and parsed body, or the error the server would answer."""
        if job.error is not None:
            return job.error
        try:
            body = BODIES[job.endpoint].model_validate(job.body)
        except ValidationError as exc:
            message, param = validation_message(exc.errors(include_url=False, include_context=False))
            return APIError(422, message, param=param, code="invalid_body")
        if body.stream:
            return APIError(
                400,
                "stream is not supported in a batch line; leave it out (or false)",
                param="stream",
                code="unsupported_parameter",
            )
        try:
            return build_request(self.gen, body, self.policy), body
        except APIError as exc:
            return exc
        except Exception as exc:  # a bug, not the line's fault: say so on that line and go on
            log.exception("building the request of line %s failed", job.line)
            return APIError(500, f"internal error: {exc!r}", code="internal_error")

    def run(self, jobs: Iterable[Job], on_tokens: Callable[[int], None] | None = None) -> Iterator[tuple[Job, dict]]:
        """(job, output line) for every job, as each finishes. `on_tokens(n)`: n tokens were generated."""
        batch = DecodeBatch(
            self.gen.engine,
            token_budget=self.step_tokens,
            prefill_chunk=self.prefill_chunk,
            prefix_caching=self.prefix_caching,
        )
        scheduler = Scheduler(batch, max_sequences=self.max_batch)  # the server's admission
        running: dict[int, tuple[Job, Body, Request]] = {}
        finished: dict[int, list[Result]] = {}  # samples done of requests with n > 1
        pending = iter(jobs)
        exhausted = False
        try:
            while True:
                # Admit in input order while the scheduler takes them; one job at most is built ahead
                # (a file of a million lines is read as it runs).
                while True:
                    if not exhausted and not scheduler.waiting:
                        job = next(pending, None)
                        if job is None:
                            exhausted = True
                        else:
                            built = self.build(job)
                            if isinstance(built, APIError):
                                yield job, error_line(job, built)
                            else:
                                request, body = built
                                scheduler.add(Waiting(job.index, request, (job, body)))
                        continue
                    taken = scheduler.take()
                    if not taken:
                        break
                    for entry in taken:
                        job, body = cast(tuple[Job, Body], entry.owner)  # the owner this loop gave it
                        try:
                            scheduler.admit(entry)
                        except Exception as exc:
                            yield job, error_line(job, generation_error(exc))
                            continue
                        running[job.index] = (job, body, cast(Request, entry.request))  # jobs are text
                        self.generated += 1
                if not running:
                    return
                for item in scheduler.step():
                    if isinstance(item, Event):
                        if on_tokens is not None and item.token_ids:
                            on_tokens(len(item.token_ids))
                    elif isinstance(item, Result):
                        # A request with n samples finishes when all n Results are in.
                        done = finished.setdefault(item.index, [])
                        done.append(item)
                        job, body, request = running[item.index]
                        if len(done) == body.n:
                            del running[item.index], finished[item.index]
                            yield job, ok_line(job, self.response_body(job, body, request, done))
                    elif isinstance(item, Failure):
                        job, _, _ = running.pop(item.index)
                        finished.pop(item.index, None)
                        batch.remove([s for s in batch.sequences if s.index == item.index])
                        yield job, error_line(job, generation_error(item.error))
        finally:
            batch.remove(list(batch.sequences))

    def response_body(self, job: Job, body: Body, request: Request, results: list[Result]) -> dict:
        """The body the server would answer (its `shape_of`, so the two never drift apart)."""
        return shape_of(
            job.endpoint, self.policy.model_id, self.gen, body, [request], self.tokens, [job.index]
        ).response(results)
