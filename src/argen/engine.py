"""The Engine: runs requests through a strategy, streams token events, applies stop conditions,
and records statistics. It is the only layer that knows about tokenizer text."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch

from argen.errors import InvalidRequestError
from argen.sampling import Sampler, SamplingParams
from argen.strategies import DecodeState, Strategy
from argen.textstream import TextStream

DRAFT_SLACK = 64  # cache positions reserved past max_new_tokens for drafts being verified


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    strategy: Strategy
    # Optional explicit prompt layout (set-based prompting): positions and a [T, T] attention mask.
    prompt_positions: list[int] | None = None
    prompt_mask: torch.Tensor | None = None


@dataclass
class Stats:
    new_tokens: int = 0
    prompt_tokens: int = 0
    forward_passes: int = 0  # target passes, the prefill's included
    prefill_passes: int = 0
    draft_passes: int = 0
    draft_tokens_proposed: int = 0
    draft_tokens_accepted: int = 0
    near_ties: int = 0
    prefill_seconds: float = 0.0
    wall_seconds: float = 0.0
    peak_kv_bytes: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """New tokens per target forward pass after the prefill (1.0 for plain decoding)."""
        decode_passes = self.forward_passes - self.prefill_passes
        return self.new_tokens / decode_passes if decode_passes > 0 else float(self.new_tokens)

    def as_dict(self) -> dict:
        return asdict(self) | {
            "tokens_per_s": self.tokens_per_s,
            "tokens_per_forward": self.tokens_per_forward,
        }


@dataclass
class Event:
    index: int  # which request of the batch
    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "stop" (EOS or stop string) | "length" | None while running


@dataclass
class Result:
    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    finish_reason: str
    stats: Stats
    seed: int
    strategy: str
    extras: dict = field(default_factory=dict)  # strategy-specific records (e.g. sampling noise)
    index: int = 0  # position of the request in its batch

    def as_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_ids": self.prompt_ids,
            "finish_reason": self.finish_reason,
            "seed": self.seed,
            "strategy": self.strategy,
            "stats": self.stats.as_dict(),
        }


class _Sequence:
    """Per-request bookkeeping around a DecodeState: text, stop conditions, stats."""

    def __init__(self, index: int, request: Request, state: DecodeState, tokenizer, eos_ids: set[int]) -> None:
        self.index, self.request, self.state = index, request, state
        self.text = TextStream(tokenizer, request.params.stop)
        self.eos_ids = set() if request.params.ignore_eos else eos_ids
        self.finish_reason: str | None = None
        self.stats = Stats(prompt_tokens=len(request.prompt_ids))
        self.started = time.perf_counter()

    def accept(self, new_ids: list[int]) -> Event:
        """Append a step's tokens, cut at EOS / max tokens / a stop string, and make the event."""
        state = self.state
        new_ids = new_ids[: state.remaining]
        for i, t in enumerate(new_ids):
            if t in self.eos_ids:
                new_ids, self.finish_reason = new_ids[: i + 1], "stop"
                break
        state.tokens.extend(new_ids)
        if self.finish_reason is None and state.remaining <= 0:
            self.finish_reason = "length"
        delta = self.text.push(state.output)
        if self.text.stopped_at is not None:
            kept = state.prompt_len + self.text.stopped_at
            new_ids = new_ids[: max(0, len(new_ids) - (len(state.tokens) - kept))]
            del state.tokens[kept:]
            self.finish_reason = "stop"
        if self.finish_reason is not None:
            delta += self.text.flush()
        return Event(self.index, new_ids, delta, self.finish_reason)

    def result(self, strategy: Strategy) -> Result:
        c, s = self.state.counters, self.stats
        s.new_tokens = self.state.n_generated
        s.forward_passes, s.draft_passes = c.forward_passes, c.draft_passes
        s.draft_tokens_proposed, s.draft_tokens_accepted, s.near_ties = (
            c.draft_proposed,
            c.draft_accepted,
            c.near_ties,
        )
        s.wall_seconds = time.perf_counter() - self.started
        s.peak_kv_bytes = s.peak_kv_bytes or self.state.cache.peak_bytes
        return Result(self.text.text, self.state.output, list(self.request.prompt_ids), self.finish_reason or "length",
                      s, self.request.params.seed, strategy.name, self.state.extras, self.index)  # fmt: skip


class Engine:
    def __init__(self, runtime, tokenizer, eos_ids: set[int]) -> None:
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids

    def validate(self, request: Request) -> None:
        n, context = len(request.prompt_ids), self.runtime.info.max_positions
        if n == 0:
            raise InvalidRequestError("the prompt is empty; give at least one token of prompt")
        if n >= context:
            raise InvalidRequestError(
                f"the prompt has {n} tokens but the model's context is {context}; shorten the prompt"
            )
        vocab = self.runtime.info.vocab_size
        bad = [t for t in request.prompt_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")

    def _start(self, index: int, request: Request, cache=None) -> _Sequence:
        """Prefill all prompt tokens but the last into a fresh cache (or the given one)."""
        self.validate(request)
        prompt = request.prompt_ids
        context = self.runtime.info.max_positions
        budget = min(request.params.max_new_tokens, context - len(prompt))
        if cache is None:
            cache = self.runtime.new_cache(1, min(context, len(prompt) + budget + DRAFT_SLACK))
        state = DecodeState(self.runtime, cache, Sampler(request.params), list(prompt), len(prompt), budget)
        seq = _Sequence(index, request, state, self.tokenizer, self.eos_ids)
        state.eos_ids = frozenset(seq.eos_ids)
        t0 = time.perf_counter()
        if request.prompt_positions is not None:
            positions = torch.tensor([request.prompt_positions], device=self.runtime.device)
            state.position_shift = request.prompt_positions[-1] - (len(prompt) - 1)
            if len(prompt) > 1:
                mask = None if request.prompt_mask is None else request.prompt_mask[:-1, :-1]
                _, state.prompt_hidden = state.forward(
                    prompt[:-1], mask=mask, positions=positions[:, :-1], num_logits=0
                )
        elif len(prompt) > 1:
            _, state.prompt_hidden = state.forward(prompt[:-1], num_logits=0)
        request.strategy.start(state)
        state.prompt_hidden = None
        seq.stats.prefill_seconds = time.perf_counter() - t0
        seq.stats.prefill_passes = state.counters.forward_passes
        return seq

    def stream(self, requests: list[Request]) -> Iterator[Event | Result]:
        """Yield token Events as they are produced and each request's Result when it finishes."""
        for r in requests:
            self.validate(r)
        batchable = all(r.strategy.batchable and r.prompt_positions is None for r in requests)
        if len(requests) > 1 and batchable and hasattr(self.runtime, "layers"):
            yield from self._stream_batched(requests)
            return
        for i, request in enumerate(requests):
            seq = self._start(i, request)
            while seq.finish_reason is None:
                yield seq.accept(request.strategy.step(seq.state))
            yield seq.result(request.strategy)

    def _stream_batched(self, requests: list[Request]) -> Iterator[Event | Result]:
        """Plain decoding of many sequences in one forward pass per step; finished rows leave."""
        context = self.runtime.info.max_positions
        longest = max(len(r.prompt_ids) + r.params.max_new_tokens for r in requests)
        cache = self.runtime.new_cache(len(requests), min(context, longest + 1))
        active: list[_Sequence] = []
        for i, request in enumerate(requests):
            row = cache.row(i)
            seq = self._start(i, request, cache=row)
            cache.lengths[i] = row.lengths[0]
            seq.state.cache = cache
            active.append(seq)
        while active:
            tokens = torch.tensor([[s.state.tokens[-1]] for s in active], device=self.runtime.device)
            positions = torch.tensor([[len(s.state.tokens) - 1] for s in active], device=self.runtime.device)
            logits, _ = self.runtime.forward(tokens, positions, cache, num_logits=1)
            still = []
            for r, seq in enumerate(active):
                seq.state.counters.forward_passes += 1
                yield seq.accept([seq.state.sample(logits[r, -1], seq.state.n_generated)])
                if seq.finish_reason is None:
                    still.append(r)
                else:
                    seq.stats.peak_kv_bytes = cache.bytes_per_position() * len(seq.state.tokens)
                    yield seq.result(seq.request.strategy)
            if len(still) < len(active):
                cache.select(still)
                active = [active[r] for r in still]

    def run(self, requests: list[Request]) -> list[Result]:
        results = [item for item in self.stream(requests) if isinstance(item, Result)]
        return sorted(results, key=lambda r: r.index)
