"""FFN-SkipLLM (Jaiswal et al. 2024, "FFN-SkipLLM: A Hidden Gem for Autoregressive Decoding with
Adaptive Feed Forward Skipping"): skip the feed-forward sub-blocks that barely change the hidden
state. Attention always runs, so every layer's keys/values are written for every position and the
cache stays complete.

The trigger is the cosine similarity of each FFN block's input and output residual streams,
cos(x, x + ffn(x)), measured by full passes (`SegmentOut.ffn_cos`): the first `measure_tokens`
outputs run every block and record it; the FFNs whose mean similarity over them is at least
`threshold` (at most `max_skip` of the layers, the most similar first) are skipped for the next
`check_every` outputs, then a new measurement of `measure_tokens` full passes picks them again.
A `threshold` above 1 never skips (a cosine is at most 1): that is plain decoding, token for token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from argen.errors import InvalidRequestError
from argen.models.runtime import Plan
from argen.strategies.base import DecodeState, Step, Strategy, run

MAX_MEASURE_TOKENS = 64


@dataclass
class FFNSkipMemo:
    cos: list = field(default_factory=list)  # per-layer FFN similarities of the tokens measured so far
    decided: bool = False  # a plan was chosen from a full measurement
    plan: Plan | None = None  # the FFN blocks skipped now (None: none)
    since: int = 0  # tokens since the last measurement
    skipped_blocks: int = 0
    checks: int = 0


class FFNSkip(Strategy):
    name = "ffn-skip"
    exact = False

    def __init__(
        self, threshold: float = 0.98, measure_tokens: int = 4, check_every: int = 32, max_skip: float = 0.25
    ) -> None:
        if not isinstance(threshold, int | float) or isinstance(threshold, bool) or math.isnan(threshold):
            raise ValueError(f"threshold must be a number (a cosine; above 1 never skips); got {threshold!r}")
        for name, value, low, high in (
            ("measure_tokens", measure_tokens, 1, MAX_MEASURE_TOKENS),
            ("check_every", check_every, 1, 1 << 20),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{name} must be a whole number from {low} to {high}; got {value!r}")
        if not isinstance(max_skip, int | float) or isinstance(max_skip, bool) or not 0 <= max_skip <= 1:
            raise ValueError(f"max_skip is the largest fraction of FFN blocks skipped, from 0 to 1; got {max_skip!r}")
        self.threshold, self.measure_tokens, self.check_every, self.max_skip = (
            float(threshold),
            measure_tokens,
            check_every,
            float(max_skip),
        )

    @property
    def skips(self) -> bool:
        return self.threshold <= 1 and self.max_skip > 0

    def check(self, runtime, prompt_len: int, params) -> None:
        if self.skips and not (runtime.capabilities.layer_plans and runtime.capabilities.ffn_stats):
            raise InvalidRequestError(
                "ffn-skip needs a runtime that can skip FFN blocks and measure them (the native "
                "runtime, Llama-family models); use another strategy"
            )

    def start(self, state: DecodeState) -> None:
        state.memo = FFNSkipMemo()

    def choose(self, cos: torch.Tensor, n_layers: int) -> Plan | None:
        """The plan for the next outputs from similarities [tokens, n_layers] of the last full passes."""
        mean = cos.mean(0)
        ranked = sorted((i for i in range(n_layers) if mean[i] >= self.threshold), key=lambda i: -float(mean[i]))
        chosen = ranked[: int(self.max_skip * n_layers)]
        return Plan.skipping(n_layers, ffn_only=chosen) if chosen else None

    def step(self, state: DecodeState) -> Step:
        if not self.skips:
            out = yield from run(state.feed([state.tokens[-1]], num_logits=1))
            return [state.sample(out.requested_logits()[-1], state.n_generated)]
        m, n_layers = state.memo, state.runtime.info.n_layers
        measuring = not m.decided or m.since >= self.check_every
        if measuring:
            feed = state.feed([state.tokens[-1]], num_logits=1)
            feed.ffn_cos = True
        else:
            feed = state.feed([state.tokens[-1]], plan=m.plan, num_logits=1)  # plan None: nothing to skip
            feed.draft = False  # the partial model's token is the output: a target pass, not a draft
        out = yield from run(feed)
        if measuring:
            m.cos.append(out.requested_ffn_cos()[-1])
            if len(m.cos) >= self.measure_tokens:
                m.plan, m.decided = self.choose(torch.stack(m.cos), n_layers), True
                m.cos, m.since, m.checks = [], 0, m.checks + 1
        else:
            m.since += 1
            m.skipped_blocks += 0 if m.plan is None else n_layers - sum(m.plan.ffn)
        state.extras["ffn_skip"] = {"skipped_ffn_blocks": m.skipped_blocks, "checks": m.checks, "n_layers": n_layers}
        return [state.sample(out.requested_logits()[-1], state.n_generated)]
