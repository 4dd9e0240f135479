"""What goes in and out of the Engine: a Request, its token Events, its Result and Stats."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from argen.cache.press import Press
from argen.logprobs import TokenLogprob
from argen.sampling import SamplingParams
from argen.strategies import Strategy


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
    # Samples of this prompt: the prompt is prefilled once, then the sequence forks into `n` that share
    # its cached prompt (copy-on-write); sample i draws with seed params.seed + i (see batch.py).
    n: int = 1
    # Prompt scoring: each prompt token's log-prob under the raw model, with this many alternatives
    # (0..20; None: off). The prefill then computes logits for every prompt token, and the request
    # does not share prompt blocks with others (prefix caching).
    prompt_logprobs: int | None = None
    # A KV-cache press (cache/press.py) compressing this request's cache; None: the cache holds everything.
    press: Press | None = None
    # Prompt edits (PIE, cache/pie.py): `edit_of` is the previous prompt's ids, of which this prompt is an
    # edit; its cached keys after the edit move to their new positions instead of being computed again.
    # `cache_prompt`: this request takes and registers prefix-cache blocks even in a batch that does not
    # share prompts (`generate`), so that a later edit finds them (an edit request does so too).
    edit_of: list[int] | None = None
    cache_prompt: bool = False
    # Set by Engine.validate: a request is checked once, wherever it enters (API, server, batch).
    validated: bool = field(default=False, repr=False, compare=False)
    grammar: str | None = field(default=None, repr=False, compare=False)  # its response_format, as llguidance's
    # The grammar compiled and checked (an llguidance matcher at its start; each sequence decodes with a copy).
    matcher: object | None = field(default=None, repr=False, compare=False)


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
    kv_bytes_held: int = 0  # KV bytes the request held when it finished (blocks and quantized stores)
    cached_prompt_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
    # A prompt edit (Request.edit_of): prompt tokens whose cached keys moved to their new positions rather
    # than being computed (lossy: cache/pie.py), and why none moved when the edit could not use the cache.
    edit_moved_tokens: int = 0
    edit_fallback: str = ""
    grammar_masks: int = 0  # structured output: masks computed (one per token decided, drafts' included)
    grammar_mask_seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """New tokens per target forward pass after the prefill (1.0 for plain decoding)."""
        decode_passes = self.forward_passes - self.prefill_passes
        return self.new_tokens / decode_passes if decode_passes > 0 else float(self.new_tokens)

    @property
    def prefill_saved(self) -> float:
        """The share of the prompt's prefill (all but the pending last token) not computed: taken from
        the prefix cache or moved by a prompt edit."""
        total = self.prompt_tokens - 1
        return (self.cached_prompt_tokens + self.edit_moved_tokens) / total if total > 0 else 0.0

    def as_dict(self) -> dict:
        return asdict(self) | {
            "tokens_per_s": self.tokens_per_s,
            "tokens_per_forward": self.tokens_per_forward,
        }


# Where a token of the output came from (Event.origins, Result.origins): the decode loop reads it off
# the strategy's counters around each step (engine/sequence.py).
ORIGINS = {
    "step": "decided by a forward pass of its own (plain decoding, search, a lossy strategy's step)",
    "draft": "proposed by the strategy's drafter and accepted by the verification pass",
    "verify": "chosen by a verification pass after the drafts it accepted (the bonus or the correction)",
    "grammar": "the only token the response_format's grammar allowed",
    "forced": "set by the request (a counterfactual intervention), not drawn",
    "replayed": "a replay's output prefix: prefilled, not decided by this call",
    "press": "decided by a pass right after the request's KV-cache press evicted context",
}


@dataclass
class Event:
    index: int  # which request of the batch
    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "stop" (EOS or stop string) | "length" | None while running
    sample_index: int = 0  # which of the request's n samples
    logprobs: list[TokenLogprob | None] | None = None  # one per token id, when the request asked for them
    # The request's first Event carries the prompt's records (Request.prompt_logprobs), first one None.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    origins: list[str] | None = None  # where each token came from (ORIGINS), one per token id


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
    sample_index: int = 0  # which of the request's n samples (its seed is the request's seed + sample_index)
    # With SamplingParams.logprobs: one record per output token (None for a replay's output prefix,
    # which was not decided here). Which distribution: see argen/logprobs.py.
    logprobs: list[TokenLogprob | None] | None = None
    # With Request.prompt_logprobs: one per prompt token, the first None (nothing predicts it).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    origins: list[str] = field(default_factory=list)  # one per output token (ORIGINS)

    def as_dict(self) -> dict:
        extra = {
            name: [r.as_dict() if r else None for r in records]
            for name, records in (("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs))
            if records is not None
        }
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_ids": self.prompt_ids,
            "finish_reason": self.finish_reason,
            "seed": self.seed,
            "strategy": self.strategy,
            "stats": self.stats.as_dict(),
        } | extra


@dataclass
class Failure:
    """A sequence of a DecodeBatch that raised: it has left the batch; the others go on."""

    index: int
    error: Exception
