"""The Strategy interface, the feeds it asks the Engine to run, and the per-sequence state it works on.

A strategy never calls the model. Its `step(state)` is a generator: it *yields* what to feed (a
`Feed`, or a list of feeds to run in the same pass) and *receives* what the model returned for it
(a `SegmentOut`, or a list), as often as it needs, then *returns* the new token ids. The Engine
gathers every sequence's feeds of a round and runs them in one packed forward pass per runtime, so
sixteen speculative requests cost one pass a round, not sixteen.

Convention: the cache holds every token of the sequence except the last one, which is "pending";
a step feeds the pending token (plus any drafts) to the model, so no forward pass is wasted after
the final token and a verifier can score pending + drafts in one pass.

Per-request state lives in `DecodeState.memo` (set by `start`), never on the strategy object, which
holds only the request's options.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from argen.cache.kv import KVCache
from argen.models.runtime import Plan, Segment, SegmentOut
from argen.sampling import Sampler


@dataclass
class StepCounters:
    forward_passes: int = 0  # target-model passes, prefill included (counted by the Engine)
    draft_passes: int = 0  # passes of a draft (a draft model, or the target with a partial plan)
    draft_proposed: int = 0
    draft_accepted: int = 0
    near_ties: int = 0  # greedy verification accepted a token whose top-2 logits were a near-tie


@dataclass
class Feed:
    """Tokens a sequence asks to run: appended to `cache` (default: the sequence's own) on `runtime`
    (default: the target model) at `positions` (default: right after what the cache holds). `mask`
    [T, T]: which new tokens each new token sees (None: causal). `plan`: which sub-blocks run (None:
    all). `num_logits`: logits for the last that many tokens (None: all; 0: none, hidden only).
    `draft`: the pass drafts or guides (a partial plan, a draft or guide model), and is counted as a
    draft pass rather than a target pass (lossy strategies that emit a partial plan's tokens set it
    False). `ffn_cos`: also return per-layer FFN input/output similarity (`SegmentOut.ffn_cos`;
    runtimes whose capabilities declare `ffn_stats`). `features` [T, H]: input features beside the
    tokens, for a runtime that reads them (a draft head, `Segment.features`)."""

    tokens: list[int]
    positions: list[int] | None = None
    mask: torch.Tensor | None = None
    plan: Plan | None = None
    num_logits: int | None = 0
    cache: KVCache | None = None  # None: the sequence's own (the engine fills it in)
    runtime: Any = None
    draft: bool = False
    ffn_cos: bool = False
    features: torch.Tensor | None = None
    embeds: torch.Tensor | None = None  # [T, H] input embeddings in place of the tokens' (Segment.embeds)

    def segment(self) -> Segment:
        """What a runtime's `forward_packed` runs, once the feed names its cache and positions (the
        Engine fills in a strategy's own)."""
        if self.cache is None or self.positions is None:
            raise ValueError("a feed runs once its cache and positions are set (the Engine fills them in)")
        return Segment(
            self.cache,
            self.tokens,
            self.positions,
            self.mask,
            self.num_logits,
            self.ffn_cos,
            self.features,
            self.embeds,
        )


Feeds = Feed | list[Feed]
Outs = SegmentOut | list[SegmentOut]
Step = Generator[Feeds, Outs, list[int]]
Start = Generator[Feeds, Outs, None]


# The Engine answers a Feed with one SegmentOut and a list of feeds with a list of them (in order); a
# generator's send type cannot say which, so strategies yield through these two and get the type
# they asked for (the check is the Engine's contract, never expected to fail).
def run(feed: Feed) -> Generator[Feeds, Outs, SegmentOut]:
    """`out = yield from run(feed)`: the output of one feed."""
    out = yield feed
    assert isinstance(out, SegmentOut), "a Feed is answered by one SegmentOut"
    return out


def run_all(feeds: list[Feed]) -> Generator[Feeds, Outs, list[SegmentOut]]:
    """`outs = yield from run_all(feeds)`: the outputs of feeds run in the same round, in order."""
    outs = yield feeds
    assert isinstance(outs, list), "a list of feeds is answered by a list of SegmentOuts"
    return outs


@dataclass
class DecodeState:
    runtime: Any
    cache: KVCache
    sampler: Sampler
    tokens: list[int]  # prompt + output so far; the last one is not in the cache yet
    prompt_len: int
    max_new_tokens: int
    position_shift: int = 0  # position of token i is i + shift (non-zero after a set prompt or a press)
    kv_evicted: int = 0  # positions a KV-cache press removed (cache/press.py): also counted in position_shift
    counters: StepCounters = field(default_factory=StepCounters)
    extras: dict = field(default_factory=dict)  # strategy-specific records, returned with the Result
    eos_ids: frozenset[int] = frozenset()  # tokens that end the sequence (empty under ignore_eos)
    # Final hidden states [T, H] of the prefilled prompt tokens (all but the last); set by the Engine
    # for `start()` of strategies that ask for them (contrastive search), then dropped.
    prompt_hidden: torch.Tensor | None = None
    memo: Any = None  # the strategy's per-request state: a dataclass the strategy declares, set by its start
    caches: list[KVCache] = field(default_factory=list)  # every cache this request holds; freed when it ends
    # Sequences decoding in the engine's round (set by the engine): this sequence's feeds share a
    # forward pass with theirs, which changes what a draft costs (see speculative/adaptive.py).
    batch_size: int = 1
    sample_index: int = 0  # which of the request's n samples this sequence is
    # Shared by the n samples of a request whose strategy decides them together (Strategy.samples_together):
    # one dict, set by the engine after the prefill ({"n": n}); None for other strategies.
    samples: dict | None = None

    @property
    def n_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - self.n_generated

    @property
    def output(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    def positions(self, start_index: int, n: int) -> list[int]:
        first = start_index + self.position_shift
        return list(range(first, first + n))

    def feed(
        self,
        tokens: list[int],
        *,
        mask=None,
        plan: Plan | None = None,
        num_logits: int | None = 0,
        positions: list[int] | None = None,
    ) -> Feed:
        """A feed of tokens that follow what the sequence's own cache holds."""
        if positions is None:
            positions = self.positions(self.cache.lengths[0], len(tokens))
        draft = plan is not None and not plan.is_full
        return Feed(list(tokens), positions, mask, plan, num_logits, self.cache, self.runtime, draft)

    def new_cache(self, runtime, max_len: int):
        """A cache on `runtime` (a draft or guide model) that lives as long as this request."""
        cache = runtime.new_cache(1, max_len)
        self.caches.append(cache)
        return cache

    def fork(self, cache):
        """A copy of `cache` sharing its memory until written (beams); freed with the request."""
        copy = cache.fork()
        self.caches.append(copy)
        return copy

    def drop(self, cache) -> None:
        """Give back a cache made by `new_cache` or `fork` before the request ends."""
        cache.free()
        self.caches.remove(cache)

    def sample(self, logits: torch.Tensor, index: int) -> int:
        """Sample output token number `index` from `logits`, with the context before it."""
        return self.sampler.sample(logits, self.tokens[: self.prompt_len + index], index)


class Strategy:
    """One decoding algorithm: `step(state)` yields feeds and returns the next token ids (an empty
    list while a search is still running), leaving the cache holding all tokens but the last.
    `exact` strategies reproduce plain decoding (greedy: token for token; sampling: in
    distribution); lossy ones are measured by the bench."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    # Options that name another model, by the kind of model ("draft" or "guide"): the Python API
    # takes a model source there, a server only the names of models its operator loaded; both
    # resolve them (load them) and hand the models to `prepare`.
    companion_options: ClassVar[dict[str, str]] = {}
    # Whether start() reads the prompt's final hidden states (state.prompt_hidden); such sequences
    # compute their whole prompt (no prefix caching).
    needs_prompt_hidden: ClassVar[bool] = False
    # Whether the whole output comes from one step (beam search): a KV-cache press, which runs between
    # steps (cache/press.py), then compresses the prompt only, and the cache grows by the whole output.
    whole_output_in_one_step: ClassVar[bool] = False
    # Whether the request's n samples are decided together, by sample 0's step (superposed decoding):
    # the engine gives them one shared `DecodeState.samples` dict, and the others wait on it.
    samples_together: ClassVar[bool] = False
    # Whether `prepare` takes the n-gram tables of this machine's text (companions["ngrams"],
    # recipes/token_ngrams.py), which the API and the server resolve as they do companion models.
    needs_token_ngrams: ClassVar[bool] = False
    # Whether the strategy draws its tokens through the request's sampler, which holds a forced token
    # (a counterfactual intervention or a replayed prefix): searches that pick their own tokens do not,
    # and the Engine refuses such a request rather than drop what was forced.
    takes_forced_tokens: ClassVar[bool] = True

    def prepare(self, base, companions: dict | None = None) -> None:
        """Called by the API and the server with the base LoadedModel before a request is built, and the
        companion models they resolved, one per `companion_options` entry (a LoadedModel, or a runtime
        given as one): a strategy takes its runtimes here and never loads a model itself."""

    def check(self, runtime, prompt_len: int, params) -> None:
        """Raise InvalidRequestError if this request (`prompt_len` tokens, SamplingParams `params`)
        cannot run on `runtime`. The Engine calls it when it validates a request, before any work
        (the server: before the request is queued)."""

    def check_samples(self, n: int) -> None:
        """Raise InvalidRequestError if the strategy cannot give `n` samples of one prompt (the Engine
        calls it with `check`)."""

    def kv_slack(self) -> int:
        """KV-cache positions a step may use beyond prompt + max_new_tokens (a draft tree being
        verified, contrastive candidates). The Engine allots them, so no step overflows."""
        return 0

    def start(self, state: DecodeState) -> Start | None:
        """Called once the prompt is in the cache: sets up `state.memo`. May be a generator that
        yields feeds (e.g. a first pass, a guide model reading its prefixes)."""

    def step(self, state: DecodeState) -> Step:
        raise NotImplementedError

    def options(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}
