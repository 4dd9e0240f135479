"""The OpenAI response bodies: `Shape` builds a completion's or chat completion's response, stream
chunks and usage from argen's Events and Results (the server's routes and `argen batch` both use it,
so the two never drift apart); `generation_error` is the APIError a failed generation answers."""

from __future__ import annotations

from typing import Any, cast

from argen.api import Generator
from argen.engine import Event, Request, Result
from argen.errors import ArgenError
from argen.logprobs import TokenLogprob
from argen.server import protocol as p
from argen.server.errors import APIError
from argen.server.logprob_shape import Tokens, chat_logprobs, completion_logprobs, prompt_logprob_entry
from argen.server.tools import ToolMode, calls_from_output, tool_mode


def generation_error(exc: Exception) -> APIError:
    if isinstance(exc, ArgenError):  # a grammar that trips a limit on the text written so far names its field
        return APIError(400, str(exc), param="response_format" if str(exc).startswith("response_format") else None)
    return APIError(500, f"generation failed: {exc!r}", code="internal_error")


def _prompt_texts(gen: Generator, body, built: list[Request]) -> list[str] | None:
    """Each prompt as the text of an `echo` completion: as sent, or decoded from its token ids."""
    if not getattr(body, "echo", False):
        return None
    sent = (
        body.prompt
        if isinstance(body.prompt, list) and body.prompt and not isinstance(body.prompt[0], int)
        else [body.prompt]
    )
    return [
        prompt if isinstance(prompt, str) else _decoded(gen, request.prompt_ids)
        for prompt, request in zip(sent, built, strict=True)
    ]


def _decoded(gen: Generator, ids: list[int]) -> str:
    # A list of ids decodes to one string (transformers types decode for a batch too).
    return cast(str, gen.tokenizer.decode(ids, skip_special_tokens=True))


def shape_of(
    endpoint: str, model_id: str, gen: Generator, body, built: list[Request], tokens: Tokens, indices: list[int]
) -> Shape:
    """How the responses to `body` look; `indices`: each prompt's index in the batch (its Events' and
    Results' `index`)."""
    params = built[0].params
    return Shape(
        endpoint,
        model_id,
        body.return_token_ids,
        [cast(int, r.params.seed) for r in built],  # SamplingParams.validate() drew any missing seed
        tokens if params.logprobs is not None or body.prompt_logprobs is not None else None,
        _prompt_texts(gen, body, built),
        [r.prompt_ids for r in built],
        tool_mode(body) if endpoint == "chat" else None,
        n=body.n,
        indices=indices,
        echo_logprobs=getattr(body, "logprobs", None) if getattr(body, "echo", False) else None,
        prompt_logprobs=body.prompt_logprobs,
        origins=body.return_origins,
        edit=getattr(body, "edit", None) is not None,
    )


def edit_report(result: Result) -> p.EditReport:
    """What a prompt edit reused of its prefill (engine/request.py's Stats)."""
    s = result.stats
    return p.EditReport(
        prompt_tokens=s.prompt_tokens,
        cached_tokens=s.cached_prompt_tokens,
        moved_tokens=s.edit_moved_tokens,
        prefill_saved=round(s.prefill_saved, 4),
        fallback=s.edit_fallback or None,
    )


# Strategies whose per-request record (Result.extras[name], numbers only) a choice's stats show.
RECORDED_STRATEGIES = ("bild", "fs-gen", "srgen")


def stats_of(result: Result) -> dict[str, Any]:
    """What return_origins shows of how a choice was decoded: engine/request.py's Stats, and the strategy
    (with its record, for those that keep one: the large model's share of a small-and-large pair, where srgen fired)."""
    record = result.extras.get(result.strategy) if result.strategy in RECORDED_STRATEGIES else None
    return {"strategy": result.strategy} | result.stats.as_dict() | ({"strategy_record": record} if record else {})


def _finish(reason: str | None, calls: list) -> str | None:
    """OpenAI's finish_reason: "tool_calls" when the model stopped after calling."""
    return "tool_calls" if calls and reason == "stop" else reason


def _top(records, k: int | None) -> list:
    """Log-prob records with at most k alternatives each (one scoring serves asks for different k)."""
    return [
        r if r is None or k is None or len(r.top) <= k else TokenLogprob(r.token, r.logprob, r.top[:k], r.rank)
        for r in records
    ]


class UsageCounter:
    """The usage so far of a streamed request (continuous_usage_stats)."""

    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens, self.completion_tokens = prompt_tokens, 0

    def add(self, event: Event) -> None:
        self.completion_tokens += len(event.token_ids)

    def usage(self) -> p.Usage:
        return p.Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
        )


class Shape:
    """Builds the OpenAI response bodies of one endpoint (text completion or chat). Choice i x n + j
    is sample j of prompt i (OpenAI's numbering for a list of prompts), and carries its seed (the
    prompt's seed + j: argen extension). `tokens`: log-probs were asked for; `echo`: each prompt's
    text, which its completions start with; `prompt_ids`: each prompt's ids; `tools`: how a chat output
    becomes tool calls (server/tools.py); `indices`: each prompt's batch index (Events and Results
    carry it; none: one prompt); `echo_logprobs` / `prompt_logprobs`: the alternatives per prompt
    token each shape shows; `origins`: each token's origin and each choice's stats (return_origins)."""

    def __init__(
        self,
        endpoint: str,
        model_id: str,
        token_ids: bool,
        seed: int | list[int],
        tokens: Tokens | None = None,
        echo: list[str] | None = None,
        prompt_ids: list[list[int]] | None = None,
        tools: ToolMode | None = None,
        *,
        n: int = 1,
        indices: list[int] | None = None,
        echo_logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        origins: bool = False,
        edit: bool = False,
    ) -> None:
        self.chat, self.model, self.token_ids = endpoint == "chat", model_id, token_ids
        self.origins, self.edit = origins, edit
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

    def usage_counter(self) -> UsageCounter:
        return UsageCounter(sum(map(len, self.prompt_ids)))

    @staticmethod
    def usage(results: list[Result]) -> p.Usage:
        """Each prompt once (it is prefilled once), the completion tokens of every sample."""
        n_prompt = sum(len(r.prompt_ids) for r in results if r.sample_index == 0)
        n_out = sum(len(r.token_ids) for r in results)
        return p.Usage(prompt_tokens=n_prompt, completion_tokens=n_out, total_tokens=n_prompt + n_out)

    def offsets(self, index: int, echo: str | None):
        """Streaming: where choice `index`'s next output token starts in its text (after the echo)."""
        assert self.tokens is not None  # only called for log-probs, which come with `tokens`
        if index not in self._offsets:
            self._offsets[index] = self.tokens.offsets(len(echo or ""))
        return self._offsets[index]

    def _logprobs(
        self,
        ids: list[int],
        records,
        index: int = 0,
        prompt_ids: list[int] | None = None,
        prompt_records=None,
        echo: str | None = None,
    ):
        """Log-probs of `ids` in the endpoint's shape (None if not asked for); with `prompt_ids`, the
        echoed prompt's come first (a fresh offset count from 0)."""
        if self.tokens is None or records is None:
            return None
        if self.chat:
            return chat_logprobs(self.tokens, records)
        if prompt_ids is not None:
            return completion_logprobs(
                self.tokens,
                prompt_ids + ids,
                _top(prompt_records, self.echo_logprobs) + list(records),
                self.tokens.offsets(),
            )
        return completion_logprobs(self.tokens, ids, records, self.offsets(index, echo))

    def _prompt_logprobs(self, records) -> p.PromptLogprobs | None:
        """vLLM's prompt_logprobs: per prompt token (the first null), the token and the k likeliest."""
        if self.prompt_logprobs is None or records is None:
            return None
        assert self.tokens is not None  # shape_of passes `tokens` whenever prompt_logprobs is asked for
        return [None if r is None else prompt_logprob_entry(self.tokens, r, self.prompt_logprobs) for r in records]

    def response(self, results: list[Result]) -> dict:
        chat_choices: list[p.ChatChoice] = []
        completion_choices: list[p.CompletionChoice] = []
        for result in sorted(results, key=self.choice):
            index = self.choice(result)
            ids = result.token_ids if self.token_ids else None
            common: dict[str, Any] = dict(
                index=index, finish_reason=result.finish_reason, token_ids=ids, seed=result.seed
            )
            if self.origins:
                common |= dict(token_origins=result.origins, stats=stats_of(result))
            if self.chat:
                logprobs = self._logprobs(result.token_ids, result.logprobs)
                content, calls = (result.text, []) if self.tools is None else calls_from_output(result.text, self.tools)
                common["finish_reason"] = _finish(result.finish_reason, calls)
                message = p.AssistantMessage(content=content, tool_calls=calls or None)
                chat_choices.append(p.ChatChoice(message=message, logprobs=logprobs, **common))
            else:
                echo = self._echo(result)
                scored = self.echo_logprobs is not None and echo is not None
                logprobs = None
                if result.logprobs is not None or scored:
                    logprobs = self._logprobs(
                        result.token_ids,
                        result.logprobs or [],
                        index,
                        result.prompt_ids if scored else None,
                        result.prompt_logprobs,
                        echo,
                    )
                completion_choices.append(
                    p.CompletionChoice(
                        text=(echo or "") + result.text,
                        logprobs=logprobs,
                        prompt_logprobs=self._prompt_logprobs(result.prompt_logprobs),
                        **common,
                    )
                )
        if self.chat:
            return p.dump(
                p.ChatCompletionResponse(
                    id=self.id,
                    created=self.created,
                    model=self.model,
                    choices=chat_choices,
                    usage=self.usage(results),
                    prompt_logprobs=self._prompt_logprobs(results[0].prompt_logprobs),
                )
            )
        return p.dump(
            p.CompletionResponse(
                id=self.id,
                created=self.created,
                model=self.model,
                choices=completion_choices,
                usage=self.usage(results),
                argen_edit=edit_report(results[0]) if self.edit else None,
            )
        )

    def chunk(
        self,
        content,
        finish_reason: str | None,
        ids: list[int] | None,
        event: Event | int = 0,
        usage: UsageCounter | None = None,
        origins: list[str] | None = None,
    ) -> dict:
        """A stream chunk of one choice (an Event's, or choice `event` if an int); its last one (with
        the finish_reason) carries its seed. `origins`: its tokens' (default: the Event's)."""
        index = event if isinstance(event, int) else self.choice(event)
        logprobs = None
        if not isinstance(event, int):
            logprobs = self._logprobs(event.token_ids, event.logprobs, index, echo=self._echo(event))
        seed = None if finish_reason is None else self.seeds[index // self.n] + index % self.n
        common: dict[str, Any] = dict(
            index=index, finish_reason=finish_reason, token_ids=ids, seed=seed, logprobs=logprobs
        )
        if self.origins:
            common["token_origins"] = origins if origins is not None else getattr(event, "origins", None)
        now = None if usage is None else usage.usage()
        if self.chat:
            chat_choice = p.ChatChunkChoice(delta=content, **common)
            return p.dump(
                p.ChatCompletionChunk(
                    id=self.id, created=self.created, model=self.model, choices=[chat_choice], usage=now
                )
            )
        choice = p.CompletionChoice(text=content, **common)
        return p.dump(
            p.CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[choice], usage=now)
        )

    def echo_chunk(self, first: Event, usage: UsageCounter | None = None) -> dict | None:
        """A choice's first chunk with echo: the prompt's text (and its tokens' log-probs, from the
        sample's first Event). None once sent for that choice."""
        index, echo = self.choice(first), self._echo(first)
        if echo is None or index in self._echoed:
            return None
        self._echoed.add(index)
        logprobs = None
        if self.tokens is not None and first.prompt_logprobs is not None and self.echo_logprobs is not None:
            logprobs = completion_logprobs(
                self.tokens,
                self.prompt_ids[self._prompt(first)],
                _top(first.prompt_logprobs, self.echo_logprobs),
                self.tokens.offsets(),
            )
        choice = p.CompletionChoice(index=index, text=echo, finish_reason=None, logprobs=logprobs)
        return p.dump(
            p.CompletionResponse(
                id=self.id,
                created=self.created,
                model=self.model,
                choices=[choice],
                usage=None if usage is None else usage.usage(),
            )
        )

    def tool_chunk(self, events: list[Event], usage: UsageCounter | None = None) -> dict:
        """A choice's whole output under tools, as one chunk: its content and tool calls."""
        assert self.tools is not None  # called only for a chat with tools in play
        content, calls = calls_from_output("".join(e.text for e in events), self.tools)
        deltas = [p.ToolCallDelta(index=i, **call.model_dump()) for i, call in enumerate(calls)]
        ids = [t for e in events for t in e.token_ids] if self.token_ids else None
        return self.chunk(
            p.Delta(content=content, tool_calls=deltas or None),
            _finish(events[-1].finish_reason, calls),
            ids,
            self.choice(events[-1]),
            usage,
            [o for e in events for o in e.origins or []],
        )

    def stats_chunk(self, result: Result) -> dict:
        """return_origins, streaming: a finished choice's stats, in a chunk without choices."""
        cls = p.ChatCompletionChunk if self.chat else p.CompletionResponse
        stats = {"index": self.choice(result)} | stats_of(result)
        return p.dump(cls(id=self.id, created=self.created, model=self.model, choices=[], argen_stats=stats))

    def edit_chunk(self, result: Result) -> dict:
        """A prompt edit, streaming: what it reused, in a chunk without choices (after the last token)."""
        return p.dump(
            p.CompletionResponse(
                id=self.id, created=self.created, model=self.model, choices=[], argen_edit=edit_report(result)
            )
        )

    def usage_chunk(self, results: list[Result]) -> dict:
        cls = p.ChatCompletionChunk if self.chat else p.CompletionResponse
        return p.dump(cls(id=self.id, created=self.created, model=self.model, choices=[], usage=self.usage(results)))
