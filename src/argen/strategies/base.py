"""The Strategy interface and the per-sequence decoding state it works on.

Convention: the cache holds every token of the sequence except the last one, which is "pending";
a step feeds the pending token (plus any drafts) to the model, so no forward pass is wasted after
the final token and a verifier can score pending + drafts in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from argen.models.runtime import Plan
from argen.sampling import Sampler


@dataclass
class StepCounters:
    forward_passes: int = 0  # target-model passes, prefill included
    draft_passes: int = 0  # passes of a draft (a draft model, or the target with a partial plan)
    draft_proposed: int = 0
    draft_accepted: int = 0
    near_ties: int = 0  # greedy verification accepted a token whose top-2 logits were within 1e-4


@dataclass
class DecodeState:
    runtime: object
    cache: object
    sampler: Sampler
    tokens: list[int]  # prompt + output so far; the last one is not in the cache yet
    prompt_len: int
    max_new_tokens: int
    position_shift: int = 0  # position of token i is i + shift (non-zero after a set prompt)
    counters: StepCounters = field(default_factory=StepCounters)
    extras: dict = field(default_factory=dict)  # strategy-specific records, returned with the Result
    eos_ids: frozenset[int] = frozenset()  # tokens that end the sequence (empty under ignore_eos)
    # Final hidden states [1, T, H] of the prefilled prompt tokens (all but the last); set by the
    # Engine for `start()` only (contrastive search needs them), then dropped.
    prompt_hidden: torch.Tensor | None = None

    @property
    def n_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - self.n_generated

    @property
    def output(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    def positions(self, start_index: int, n: int) -> torch.Tensor:
        first = start_index + self.position_shift
        return torch.arange(first, first + n, device=self.runtime.device)[None, :]

    def forward(self, new_tokens: list[int], mask=None, plan: Plan | None = None, num_logits: int | None = None,
                positions: torch.Tensor | None = None):  # fmt: skip
        """Feed tokens that follow what the cache holds; counts target and draft passes."""
        start = self.cache.lengths[0]
        if positions is None:
            positions = self.positions(start, len(new_tokens))
        ids = torch.tensor([new_tokens], device=self.runtime.device)
        if plan is None or plan.is_full:
            self.counters.forward_passes += 1
        else:
            self.counters.draft_passes += 1
        return self.runtime.forward(ids, positions, self.cache, mask=mask, plan=plan, num_logits=num_logits)

    def sample(self, logits: torch.Tensor, index: int) -> int:
        """Sample output token number `index` from `logits`, with the context before it."""
        return self.sampler.sample(logits, self.tokens[: self.prompt_len + index], index)


class Strategy:
    """One decoding algorithm: `step(state)` returns the next >= 1 token ids and leaves the cache
    holding all tokens but the last. `exact` strategies reproduce plain decoding (greedy: token for
    token; sampling: in distribution); lossy ones are measured by the bench."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    batchable: ClassVar[bool] = False  # plain decoding can run many sequences in one forward pass
    # Options that name another model, by the kind of model ("draft" or "guide"): the Python API
    # takes a model source there, a server only the names of models its operator loaded.
    companion_options: ClassVar[dict[str, str]] = {}

    def check(self, runtime, prompt_len: int, params) -> None:
        """Raise InvalidRequestError if this request (`prompt_len` tokens, SamplingParams `params`)
        cannot run on `runtime`. The Engine calls it when it validates a request, before any work
        (the server: before the request is queued)."""

    def kv_slack(self) -> int:
        """KV-cache positions a step may use beyond prompt + max_new_tokens (a draft tree being
        verified, contrastive candidates). The Engine allocates them, so no step overflows."""
        return 0

    def start(self, state: DecodeState) -> None:
        """Called once after the prompt is in the cache."""

    def step(self, state: DecodeState) -> list[int]:
        raise NotImplementedError

    def options(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}
