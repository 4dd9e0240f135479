"""A small model beside the large (served) one: what `bild` and `fs-gen` share.

Both let a small model with the large model's vocabulary decide most tokens and hand a token to
the large model where the small one is unsure. The small model (option `small`, a companion of kind
"small") keeps its own KV cache, a prefix of the sequence that each step first catches up on (the
tokens it has not read, the pending one included, in one pass). The large model's cache is the
sequence's own; its passes catch up on every token it has not read in one pass too, so a run of
small-model tokens costs the large model one pass, not one each.

Lossy: the output is the large model's only where it was asked. Per-request records go to
`state.extras[<strategy name>]`: the tokens the large model produced and their share, the large
model's passes and the small model's.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from argen.cache.kv import KVCache
from argen.errors import InvalidRequestError
from argen.models.runtime import ModelRuntime
from argen.strategies.base import DecodeState, Feed, Feeds, Outs, Strategy, run
from argen.strategies.companions import companion_runtime, is_companion, unresolved

# What option `small` takes when none is given: the small model `argen distill-small` cached for the
# base model (the API and the server resolve it, recipes/small_model.py).
CACHED = "cached"


@dataclass
class SmallLargeMemo:
    small: ModelRuntime
    cache: KVCache  # the small model's: a prefix of the sequence
    record: dict = field(default_factory=dict)  # state.extras[name]


class SmallLarge(Strategy):
    """The small model's option, cache and catch-up; subclasses write `step`."""

    exact = False
    companion_options: ClassVar[dict[str, str]] = {"small": "small"}

    def __init__(self, small: object = CACHED) -> None:
        if not is_companion(small):
            raise ValueError(
                "small must be a model source ('cached': the small model `argen distill-small` cached for the "
                f"model; a directory; 'tiny-random@1'), a Generator or a LoadedModel; got {type(small).__name__}"
            )
        self.small = small
        self._small_runtime: ModelRuntime | None = None  # resolved by the API or the server: prepare()

    def prepare(self, base, companions: dict | None = None) -> None:
        small = (companions or {}).get("small")
        if small is None:
            raise unresolved(self.name, "small")
        self._small_runtime = companion_runtime(small)
        check_vocab(base.runtime, self._small_runtime)

    def check(self, runtime, prompt_len: int, params) -> None:
        if self._small_runtime is not None:  # else start() says it was never resolved
            check_vocab(runtime, self._small_runtime)

    def kv_slack(self) -> int:
        return 1  # a large pass may read one token past the ones it keeps

    def start(self, state: DecodeState) -> None:
        if self._small_runtime is None:
            raise unresolved(self.name, "small")
        cache = state.new_cache(self._small_runtime, state.cache.max_len + self.kv_slack())
        state.memo = SmallLargeMemo(self._small_runtime, cache)
        state.memo.record = state.extras[self.name] = {
            "large_tokens": 0,
            "large_share": 0.0,
            "large_passes": 0,
            "small_passes": 0,
        }

    # -- the two models' passes --------------------------------------------------------------------
    def small_pass(self, state: DecodeState, tokens: list[int]) -> Generator[Feeds, Outs, torch.Tensor]:
        """Feed the small model `tokens` after what its cache holds; its logits after the last one."""
        m = state.memo
        start = m.cache.lengths[0]
        feed = Feed(list(tokens), list(range(start, start + len(tokens))), None, None, 1, m.cache, m.small, True)
        out = yield from run(feed)
        m.record["small_passes"] += 1
        return out.requested_logits()[-1]

    def small_catch_up(self, state: DecodeState) -> Generator[Feeds, Outs, torch.Tensor]:
        """The small model's logits after the pending token (it reads every token it has not yet)."""
        return (yield from self.small_pass(state, state.tokens[state.memo.cache.lengths[0] :]))

    def large_pass(self, state: DecodeState, extra: Sequence[int] = ()) -> Generator[Feeds, Outs, torch.Tensor]:
        """One pass of the large model over every token its cache lacks (the pending one included) and
        `extra` after them; logits [len(extra) + 1, V], row j for the position after `extra[:j]`."""
        lag = state.tokens[state.cache.lengths[0] + state.kv_evicted :] + list(extra)
        out = yield from run(state.feed(lag, num_logits=len(extra) + 1))
        state.memo.record["large_passes"] += 1
        return out.requested_logits()

    def decide(self, state: DecodeState, logits: torch.Tensor, pending: list[int]) -> int:
        """The token after `state.tokens + pending`, drawn from `logits` by the request's sampler (its
        processors, its noise at that output position), whichever model gave them."""
        return state.sampler.sample(logits, state.tokens + pending, state.n_generated + len(pending))

    def tally(self, state: DecodeState, new_tokens: int, large_tokens: int) -> None:
        """Count a step's tokens: `large_tokens` of its `new_tokens` came from the large model."""
        record = state.memo.record
        record["large_tokens"] += large_tokens
        record["large_share"] = record["large_tokens"] / max(1, state.n_generated + new_tokens)

    def options(self) -> dict:
        small = self.small  # a loaded model is recorded by its name
        return super().options() | {
            "small": small if isinstance(small, str) else getattr(small, "name", type(small).__name__)
        }


def check_vocab(large, small) -> None:
    if large.info.vocab_size != small.info.vocab_size:
        raise InvalidRequestError(
            f"the small model's vocabulary ({small.info.vocab_size} tokens) differs from the large model's "
            f"({large.info.vocab_size}); use a small model with the same tokenizer"
        )


def top_prob(logits: torch.Tensor) -> float:
    """The small model's confidence: its most probable token's probability (the model's own
    distribution, before the request's sampling settings)."""
    return float(torch.softmax(logits.float(), dim=-1).max())


def margin(logits: torch.Tensor) -> float:
    """Top-1 minus top-2 probability of the model's own next-token distribution."""
    top = torch.softmax(logits.float(), dim=-1).topk(2).values
    return float(top[0] - top[1])
