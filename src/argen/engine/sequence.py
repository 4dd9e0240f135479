"""One request's passage through the decode loop: its state, its prefill progress, its strategy's
step in flight, and the bookkeeping of text, stop conditions and statistics."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Generator

import torch

from argen.cache.paged import SeqKV
from argen.cache.pie import EditSplice
from argen.engine.request import Event, Request, Result, Stats
from argen.sampling import Sampler
from argen.strategies import DecodeState, Strategy
from argen.strategies.base import Feed, Feeds, Outs
from argen.textstream import TextStream


class Emit:
    """Yielded by a sequence's driver between feeds: a step's tokens for the Engine to accept, and
    where each came from (request.ORIGINS)."""

    __slots__ = ("tokens", "origins")

    def __init__(self, tokens: list[int], origins: list[str]) -> None:
        self.tokens, self.origins = tokens, origins


def step_origins(n: int, accepted: int, verified: bool) -> list[str]:
    """The origins of a step's n tokens from its counters: a step that verified drafts emits the
    accepted drafts first, then the token the verification pass chose; any other step decided its
    tokens by its own passes."""
    if not verified:
        return ["step"] * n
    accepted = min(accepted, n)
    return ["draft"] * accepted + ["verify"] * (n - accepted)


@dataclasses.dataclass
class PendingEdit:
    """A prompt edit's splice, waiting for the prefill to reach the edit's end: `source` holds the
    previous prompt's cached blocks, of which `moved` positions from `splice.old_end` on move in."""

    splice: EditSplice
    source: SeqKV
    moved: int


class Sequence:
    def __init__(
        self,
        index: int,
        request: Request,
        state: DecodeState,
        tokenizer,
        eos_ids: set[int],
        prefill_positions: list[int],
        prefill_mask: torch.Tensor | None,
    ) -> None:
        self.index, self.request, self.state = index, request, state
        self.sample_index = 0  # which of the request's n samples (forks made after the prefill: 1 .. n-1)
        self.strategy: Strategy = request.strategy  # a fork runs a copy of its own
        self.reserved = 0  # worst-case KV blocks counted for this sequence (set by the DecodeBatch)
        self._tokenizer = tokenizer
        params = request.params
        self.text = TextStream(
            tokenizer,
            params.stop,
            skip_special_tokens=params.skip_special_tokens,
            include_stop=params.include_stop_str_in_output,
        )
        self.eos_ids = set() if params.ignore_eos else eos_ids
        self.ends = self.eos_ids | set(params.stop_token_ids)  # the ids that end the output
        self.finish_reason: str | None = None
        self.stats = Stats(prompt_tokens=len(request.prompt_ids))
        self.started = time.perf_counter()
        # Prefill: the prompt (and a replay's output prefix) but the pending last token.
        self.fed = list(request.prompt_ids) + list(request.output_prefix)
        self.prefill_positions, self.prefill_mask = prefill_positions, prefill_mask
        self.prefilled = 0  # tokens of fed[:-1] in the cache
        self.prompt_hidden: list[torch.Tensor] = []
        self.driver: Generator[Feeds | Emit, Outs, None] | None = None  # start + steps, once the prefill is done
        self.waiting: list[Feed] | None = None  # the feeds the driver yielded and awaits outputs for
        self.waiting_single = False  # whether it yielded one Feed (not a list)
        self.peak_kv_bytes = 0
        # Prompt scoring: records of prompt tokens 1.. filled as the prefill chunks return their logits.
        self.prompt_logprobs: list | None = None if request.prompt_logprobs is None else [None]
        self.prompt_records_sent = self.prompt_logprobs is None  # they go with the first Event
        self.origins: list[str] = []  # where each decoded output token came from (request.ORIGINS)
        self.edit: PendingEdit | None = None  # a prompt edit not yet spliced in (engine/batch.py)
        self.spliced = False  # whether a prompt edit's moved keys are in the cache

    def fork(self, sample_index: int) -> Sequence:
        """Sample `sample_index` of the request, made once the prompt is prefilled: a copy-on-write fork
        of the prefilled cache (the pending last token is not in it, so every fork starts from the same
        state), a fresh copy of the strategy (its per-request state lives in `state.memo`, set by
        `start`), and a Sampler seeded with the request's seed + sample_index, so each sample replays
        alone from its own seed."""
        state, request = self.state, self.request
        assert request.params.seed is not None  # SamplingParams.validate() drew one
        params = dataclasses.replace(state.sampler.params, seed=request.params.seed + sample_index)
        constraint = None if state.sampler.constraint is None else state.sampler.constraint.fork()
        sampler = Sampler(params, request.forced, constraint, prompt_len=state.sampler.prompt_len, eos_ids=self.eos_ids)
        forked = DecodeState(
            state.runtime,
            state.cache.fork(),
            sampler,
            list(state.tokens),
            state.prompt_len,
            state.max_new_tokens,
            state.position_shift,
            kv_evicted=state.kv_evicted,
            eos_ids=state.eos_ids,
            prompt_hidden=state.prompt_hidden,
            batch_size=state.batch_size,
            sample_index=sample_index,
            samples=state.samples,
        )
        other = Sequence(
            self.index, request, forked, self._tokenizer, self.eos_ids, self.prefill_positions, self.prefill_mask
        )
        other.sample_index, other.strategy = sample_index, copy.copy(self.strategy)
        other.started, other.prefilled = self.started, self.prefilled
        other.spliced = self.spliced  # a fork holds the moved keys too: never registered
        other.prompt_logprobs = self.prompt_logprobs  # each sample's first Event carries them
        return other

    def note_kv(self) -> None:
        """Track the most KV memory the request held at once (blocks shared by its forks count once)."""
        self.peak_kv_bytes = max(self.peak_kv_bytes, self.kv_held())

    def kv_held(self) -> int:
        """KV bytes the request holds now (caches of others' types: their peak)."""
        caches = [self.state.cache, *self.state.caches]
        paged = [c for c in caches if isinstance(c, SeqKV)]
        held = sum(c.peak_bytes for c in caches if not isinstance(c, SeqKV))
        if paged:
            blocks = {(id(c.pool), b) for c in paged for b in c.held_blocks}
            held += sum(c.pool.bytes_per_block() for c in paged[:1]) * len(blocks)
            quantized = {id(c.quantized): c.quantized_bytes for c in paged if c.quantized is not None}
            held += sum(quantized.values())  # a fork shares its parent's store until either grows it
        return held

    def press(self) -> int:
        """Run the request's KV-cache press if it is due (between steps and after prefill chunks, never
        inside a step). What it removes shifts the positions of the tokens that follow, so each keeps its
        true position (token i at i + position_shift). Returns the positions it removed."""
        press, state = self.request.press, self.state
        if press is None:
            return 0
        n = state.cache.lengths[0] + state.kv_evicted  # positions seen: the pending token is not in the cache
        removed = press.apply(state.cache, n)
        state.kv_evicted += removed
        state.position_shift += removed
        return removed

    @property
    def prefilling(self) -> bool:
        return self.driver is None

    @property
    def to_prefill(self) -> int:
        return len(self.fed) - 1 - self.prefilled

    def drive(self) -> Generator[Feeds | Emit, Outs, None]:
        """The strategy's start, then its steps, each step's tokens handed out as an Emit."""
        strategy, state = self.strategy, self.state
        started = strategy.start(state)
        if started is not None:
            yield from started
        state.prompt_hidden = None
        self.stats.prefill_seconds = time.perf_counter() - self.started
        self.stats.prefill_passes = state.counters.forward_passes
        counters = state.counters
        while self.finish_reason is None:
            pressed = self.press() > 0
            accepted, proposed = counters.draft_accepted, counters.draft_proposed
            tokens = yield from strategy.step(state)
            verified = counters.draft_proposed > proposed
            origins = step_origins(len(tokens), counters.draft_accepted - accepted, verified)
            if pressed:  # this step's own pass ran on the context the press just shortened
                origins = ["press" if o in ("step", "verify") else o for o in origins]
            yield Emit(tokens, origins)

    def accept(self, new_ids: list[int], origins: list[str] | None = None) -> Event:
        """Append a step's tokens, cut at EOS or a stop token id / max tokens / a stop string, and make
        the event. Nothing ends the output before min_tokens tokens (but max tokens). `origins`: the
        Emit's, one per token (default: "step")."""
        state, params = self.state, self.request.params
        first = state.n_generated  # output position of new_ids[0]
        new_ids = new_ids[: state.remaining]
        ended = False  # by an EOS or stop token id, whose text is left out unless include_stop_str_in_output
        for i, t in enumerate(new_ids):
            if t in self.ends and first + i >= params.min_tokens:
                new_ids, self.finish_reason, ended = new_ids[: i + 1], "stop", True
                break
        state.tokens.extend(new_ids)
        if self.finish_reason is None and state.remaining <= 0:
            self.finish_reason = "length"
        shown = state.output[:-1] if ended and not params.include_stop_str_in_output else state.output
        delta = self.text.push(shown, stops=state.n_generated >= params.min_tokens)
        if self.text.stopped_at is not None:
            kept = state.prompt_len + self.text.stopped_at
            new_ids = new_ids[: max(0, len(new_ids) - (len(state.tokens) - kept))]
            del state.tokens[kept:]
            self.finish_reason = "stop"
        if self.finish_reason is not None:
            delta += self.text.flush()
        labels = self._origins(first, len(new_ids), origins)
        self.origins += labels
        event = Event(
            self.index,
            new_ids,
            delta,
            self.finish_reason,
            self.sample_index,
            self._logprobs(first, len(new_ids)),
            origins=labels,
        )
        if not self.prompt_records_sent:
            event.prompt_logprobs, self.prompt_records_sent = self.prompt_logprobs, True
        return event

    def _origins(self, first: int, n: int, origins: list[str] | None) -> list[str]:
        """The origins of output positions first..first + n - 1 (cuts only ever drop a step's last
        tokens, so the step's first n), with what the sampler knows on top: a forced token, a grammar
        that allowed only one."""
        out = list(origins[:n]) if origins is not None else ["step"] * n
        sampler = self.state.sampler
        single = sampler.constraint.single_choice if sampler.constraint is not None else ()
        for i in range(n):
            if first + i in sampler.forced:
                out[i] = "forced"
            elif first + i in single:
                out[i] = "grammar"
        return out

    def _logprobs(self, first: int, n: int) -> list | None:
        """The sampler's records of output positions first..first + n - 1 (None if not asked for)."""
        if self.request.params.logprobs is None:
            return None
        records = self.state.sampler.logprobs
        return [records.get(i) for i in range(first, first + n)]

    def result(self) -> Result:
        c, s, state, r = self.state.counters, self.stats, self.state, self.request
        # Tokens decoded by this call: a replay's output prefix was prefilled, not decoded.
        s.new_tokens = max(0, state.n_generated - len(r.output_prefix))
        s.forward_passes, s.draft_passes = c.forward_passes, c.draft_passes
        s.draft_tokens_proposed, s.draft_tokens_accepted, s.near_ties = c.draft_proposed, c.draft_accepted, c.near_ties
        s.wall_seconds = time.perf_counter() - self.started
        s.peak_kv_bytes = self.peak_kv_bytes
        s.kv_bytes_held = self.kv_held()
        if (constraint := state.sampler.constraint) is not None:
            s.grammar_masks, s.grammar_mask_seconds = constraint.masks, constraint.mask_seconds
        strategy, params = self.strategy, state.sampler.params  # a fork's own seed
        assert params.seed is not None  # SamplingParams.validate() drew one
        # Everything a replay needs: the noise is a function of (seed, output position), so the seed,
        # the sampling parameters, the strategy and the prompt layout record it completely.
        state.extras["replay"] = {
            "params": params.as_dict(),
            "strategy": {"name": strategy.name, **strategy.options()},  # constructor options: a fresh copy
            "prompt_positions": r.prompt_positions,
            "prompt_mask": r.prompt_mask,
            "forced": dict(r.forced or {}),
            "press": None if r.press is None else r.press.spec(),
        }
        if r.press is not None:
            state.extras["press"] = {
                **r.press.spec(),
                "evicted_positions": state.kv_evicted,
                "kept_positions": state.cache.lengths[0],
            }
            if (quantized := getattr(state.cache, "quantized", None)) is not None:  # its bytes, part by part
                state.extras["press"] |= {
                    "quantized_positions": quantized.positions,
                    "quantized_bytes": quantized.nbytes_by_part(),
                }
            if (front := getattr(state.cache, "layer_front", None)) is not None:  # what each layer kept
                state.extras["press"]["layer_positions"] = list(front.lengths)
        return Result(
            self.text.text,
            state.output,
            list(r.prompt_ids),
            self.finish_reason or "length",
            s,
            params.seed,
            strategy.name,
            state.extras,
            self.index,
            self.sample_index,
            self._logprobs(0, state.n_generated),
            self.prompt_logprobs,
            list(self.origins),
        )

    def release(self) -> None:
        """Give back every cache the request holds (its own, a draft model's, beams' forks)."""
        for cache in [self.state.cache, *self.state.caches]:
            cache.free()
        if self.edit is not None:  # a prompt edit that never reached its splice
            self.edit.source.free()
            self.edit = None
