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


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    strategy: Strategy
    # Optional explicit prompt layout (set-based prompting): positions and a [T, T] attention mask.
    prompt_positions: list[int] | None = None
    prompt_mask: torch.Tensor | None = None
    # Counterfactual replay: output tokens taken as already generated (prefilled with the prompt, so
    # sampling resumes at output index len(output_prefix)), and do(x_t = v) interventions applied by
    # the sampler at output index t (see counterfactual.py).
    output_prefix: list[int] = field(default_factory=list)
    forced: dict[int, int] | None = None


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
        self.first_event: Event | None = None  # the output prefix of a replay, emitted before any step

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
        # Tokens decoded by this call: a replay's output prefix was prefilled, not decoded.
        s.new_tokens = max(0, self.state.n_generated - len(self.request.output_prefix))
        s.forward_passes, s.draft_passes = c.forward_passes, c.draft_passes
        s.draft_tokens_proposed, s.draft_tokens_accepted, s.near_ties = (
            c.draft_proposed,
            c.draft_accepted,
            c.near_ties,
        )
        s.wall_seconds = time.perf_counter() - self.started
        s.peak_kv_bytes = s.peak_kv_bytes or self.state.cache.peak_bytes
        r = self.request
        # Everything a replay needs: the noise is a function of (seed, output position), so the seed,
        # the sampling parameters, the strategy and the prompt layout record it completely.
        self.state.extras["replay"] = {
            "params": r.params.as_dict(),
            "strategy": {"name": strategy.name, **strategy.options()},  # constructor options: a fresh copy
            "prompt_positions": r.prompt_positions,
            "prompt_mask": r.prompt_mask,
            "forced": dict(r.forced or {}),
        }
        return Result(self.text.text, self.state.output, list(r.prompt_ids), self.finish_reason or "length",
                      s, r.params.seed, strategy.name, self.state.extras, self.index)  # fmt: skip


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
        forced = list(request.output_prefix) + list((request.forced or {}).values())
        bad = [t for t in forced if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise InvalidRequestError(f"forced token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
        if request.output_prefix and n + len(request.output_prefix) >= context:
            raise InvalidRequestError("the prompt plus the replayed output fills the model's context")
        request.strategy.check(self.runtime, n, request.params)

    def budget(self, request: Request) -> int:
        """How many tokens the request may generate: max_new_tokens, capped by the context."""
        return min(request.params.max_new_tokens, self.runtime.info.max_positions - len(request.prompt_ids))

    def batchable(self, request: Request) -> bool:
        """Whether the request can decode in a shared batch (plain decoding on the native runtime)."""
        return (request.strategy.batchable and request.prompt_positions is None and not request.output_prefix
                and hasattr(self.runtime, "layers"))  # fmt: skip

    def _start(self, index: int, request: Request, cache=None) -> _Sequence:
        """Prefill all prompt tokens but the last into a fresh cache (or the given one)."""
        self.validate(request)
        prompt = request.prompt_ids
        budget = self.budget(request)
        if cache is None:
            # Room for the whole sequence plus the strategy's worst case beyond it (a draft tree being
            # verified may take more slots than positions: the cache may be longer than the context).
            cache = self.runtime.new_cache(1, len(prompt) + budget + request.strategy.kv_slack())
        state = DecodeState(self.runtime, cache, Sampler(request.params, request.forced), list(prompt), len(prompt),
                            budget)  # fmt: skip
        seq = _Sequence(index, request, state, self.tokenizer, self.eos_ids)
        state.eos_ids = frozenset(seq.eos_ids)
        t0 = time.perf_counter()
        fed = list(prompt) + list(request.output_prefix)  # a replay's output prefix is prefilled too
        if request.prompt_positions is not None:
            # Output-prefix tokens follow the last prompt position and see everything before them.
            n, extra = len(prompt), len(request.output_prefix)
            last = request.prompt_positions[-1]
            positions = torch.tensor([list(request.prompt_positions) + list(range(last + 1, last + 1 + extra))],
                                     device=self.runtime.device)  # fmt: skip
            state.position_shift = last - (n - 1)
            mask = None
            if request.prompt_mask is not None:
                mask = torch.ones(n + extra, n + extra, dtype=torch.bool).tril()
                mask[:n, :n] = request.prompt_mask
            if len(fed) > 1:
                _, state.prompt_hidden = state.forward(fed[:-1], mask=None if mask is None else mask[:-1, :-1],
                                                       positions=positions[:, :-1], num_logits=0)  # fmt: skip
        elif len(fed) > 1:
            _, state.prompt_hidden = state.forward(fed[:-1], num_logits=0)
        if request.output_prefix:
            seq.first_event = seq.accept(list(request.output_prefix))
        request.strategy.start(state)
        state.prompt_hidden = None
        seq.stats.prefill_seconds = time.perf_counter() - t0
        seq.stats.prefill_passes = state.counters.forward_passes
        return seq

    def stream(self, requests: list[Request]) -> Iterator[Event | Result]:
        """Yield token Events as they are produced and each request's Result when it finishes."""
        for r in requests:
            self.validate(r)
        if len(requests) > 1 and all(self.batchable(r) for r in requests):
            batch = DecodeBatch(self)
            for i, request in enumerate(requests):
                batch.admit(i, request)
            while batch:
                for item in batch.step():
                    if isinstance(item, Failure):
                        raise item.error
                    yield item
            return
        for i, request in enumerate(requests):
            seq = self._start(i, request)
            if seq.first_event is not None:
                yield seq.first_event
            while seq.finish_reason is None:
                yield seq.accept(request.strategy.step(seq.state))
            yield seq.result(request.strategy)

    def run(self, requests: list[Request]) -> list[Result]:
        results = [item for item in self.stream(requests) if isinstance(item, Result)]
        return sorted(results, key=lambda r: r.index)


@dataclass
class Failure:
    """A sequence of a DecodeBatch that raised: it has left the batch; the others go on."""

    index: int
    error: Exception


class DecodeBatch:
    """A changing set of sequences decoding together. Plain sequences share one forward pass per
    step (a cache row each); others (speculative strategies, the HF adapter) take one step of their
    own per step. Sequences join between steps (`admit` prefills the prompt) and leave when they
    finish or are `remove`d, so a server can batch requests that arrive at any time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.cache = engine.runtime.new_cache(0, 1) if hasattr(engine.runtime, "layers") else None
        self.sequences: list[_Sequence] = []  # batched, in cache-row order
        self.solo: list[_Sequence] = []  # each with its own cache

    def __len__(self) -> int:
        return len(self.sequences) + len(self.solo)

    def admit(self, index: int, request: Request) -> _Sequence:
        """Prefill `request`; it decodes with the others from the next `step`."""
        if not self.engine.batchable(request):
            seq = self.engine._start(index, request)
            self.solo.append(seq)
            return seq
        self.engine.validate(request)
        [r] = self.cache.add_rows(1, len(request.prompt_ids) + self.engine.budget(request) + 1)
        row = self.cache.row(r)
        try:
            seq = self.engine._start(index, request, cache=row)
        except BaseException:
            self.cache.select(list(range(r)))
            raise
        self.cache.lengths[r] = row.lengths[0]
        seq.state.cache = self.cache
        self.sequences.append(seq)
        return seq

    def remove(self, drop: list[_Sequence]) -> None:
        """Drop sequences (finished, failed or cancelled) and their caches."""
        self.solo = [s for s in self.solo if s not in drop]
        keep = [r for r, seq in enumerate(self.sequences) if seq not in drop]
        if len(keep) == len(self.sequences):
            return
        self.sequences = [self.sequences[r] for r in keep]
        if self.sequences:
            self.cache.select(keep)
        else:  # idle: give the memory back (a long request may have grown every row)
            self.cache = self.engine.runtime.new_cache(0, 1)

    def step(self) -> list[Event | Result | Failure]:
        """One step of every sequence: an Event each, a Result for each that finished, a Failure
        for each that raised (one sequence's error never stops the others)."""
        items: list[Event | Result | Failure] = []
        done: list[_Sequence] = []

        def accept(seq: _Sequence, new_ids) -> None:
            try:
                items.append(seq.accept(new_ids() if callable(new_ids) else new_ids))
                if seq.finish_reason is not None:
                    if seq in self.sequences:
                        seq.stats.peak_kv_bytes = self.cache.bytes_per_position() * len(seq.state.tokens)
                    items.append(seq.result(seq.request.strategy))
                    done.append(seq)
            except Exception as exc:
                items.append(Failure(seq.index, exc))
                done.append(seq)

        if self.sequences:
            try:
                logits = self._forward()
            except Exception as exc:  # the shared pass failed: every batched sequence fails with it
                items += [Failure(seq.index, exc) for seq in self.sequences]
                done += self.sequences
            else:
                for r, seq in enumerate(self.sequences):
                    seq.state.counters.forward_passes += 1
                    accept(seq, lambda r=r, seq=seq: [seq.state.sample(logits[r, -1], seq.state.n_generated)])
        for seq in self.solo:
            if seq.first_event is not None:  # a replay's output prefix goes out before its first step
                items.append(seq.first_event)
                seq.first_event = None
                if seq.finish_reason is not None:
                    items.append(seq.result(seq.request.strategy))
                    done.append(seq)
                continue
            accept(seq, lambda seq=seq: seq.request.strategy.step(seq.state))
        self.remove(done)
        return items

    def _forward(self) -> torch.Tensor:
        device, active = self.engine.runtime.device, self.sequences
        tokens = torch.tensor([[s.state.tokens[-1]] for s in active], device=device)
        positions = torch.tensor([[len(s.state.tokens) - 1] for s in active], device=device)
        logits, _ = self.engine.runtime.forward(tokens, positions, self.cache, num_logits=1)
        return logits
