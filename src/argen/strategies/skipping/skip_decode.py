"""SkipDecode (Del Corro et al. 2023, "SkipDecode: Autoregressive Skip Decoding with Batching and
Caching for Efficient LLM Inference"): each output position runs a number of layers that decreases
monotonically along the output, skipping the lower / middle layers, so that a layer skipped at a
position is skipped at every later one and its missing keys/values are never read.

The prompt runs every layer. Output position t runs `layers_at(t)` layers: a linear ramp from
`max_layers` down to `min_layers` over `decay_tokens` outputs, as a staircase of `levels` values (the
engine runs one packed pass per distinct plan, so a batch of sequences at different positions
costs at most `levels` passes a round). The first `keep_bottom` layers always run; the skipped ones
are the next `n_layers - layers_at(t)`, so the skip sets are nested as t grows.

A skipped attention block writes no keys/values for its layer at that position (the slot exists,
the cache length advances as usual); the invariant that no later position runs that layer is
checked at every step (`check_nested`), and a schedule that breaks it raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from argen.errors import InvalidRequestError
from argen.models.runtime import Plan
from argen.strategies.base import DecodeState, Step, Strategy, run

MAX_LEVELS = 16


def _whole(name: str, value, low: int) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
        raise ValueError(f"{name} must be a whole number >= {low} (or unset); got {value!r}")


def check_nested(skipped_before: set[int], plan: Plan, index: int) -> None:
    """Raise if `plan` runs a layer that an earlier output position skipped: that layer's keys and
    values at the earlier position were never computed, and attention would read garbage."""
    stale = sorted(i for i in skipped_before if plan.attn[i])
    if stale:
        raise RuntimeError(
            f"SkipDecode invariant broken at output position {index}: layer(s) {stale} would run, but an "
            "earlier position skipped them (their keys/values there were never computed); the "
            "schedule of layers per position must not increase"
        )


@dataclass
class SkipDecodeMemo:
    skipped: set = field(default_factory=set)  # layers skipped so far (each later plan skips them too)
    layers_run: int = 0


class SkipDecode(Strategy):
    name = "skip-decode"
    exact = False

    def __init__(
        self,
        min_layers: int | None = None,
        max_layers: int | None = None,
        decay_tokens: int = 128,
        levels: int = 4,
        keep_bottom: int = 1,
    ) -> None:
        _whole("min_layers", min_layers, 1)
        _whole("max_layers", max_layers, 1)
        _whole("decay_tokens", decay_tokens, 1)
        _whole("keep_bottom", keep_bottom, 0)
        if not isinstance(levels, int) or isinstance(levels, bool) or not 2 <= levels <= MAX_LEVELS:
            raise ValueError(f"levels must be a whole number from 2 to {MAX_LEVELS}; got {levels!r}")
        if min_layers is not None and max_layers is not None and min_layers > max_layers:
            raise ValueError(
                f"min_layers ({min_layers}) must not exceed max_layers ({max_layers}): the number of "
                "layers per position may only decrease along the output"
            )
        self.min_layers, self.max_layers, self.decay_tokens = min_layers, max_layers, decay_tokens
        self.levels, self.keep_bottom = levels, keep_bottom

    def _bounds(self, n_layers: int) -> tuple[int, int]:
        top = n_layers if self.max_layers is None else self.max_layers
        bottom = max(1, n_layers // 2) if self.min_layers is None else self.min_layers
        return min(bottom, top), top

    def check(self, runtime, prompt_len: int, params) -> None:
        if not runtime.capabilities.layer_plans:
            raise InvalidRequestError(
                "skip-decode needs the native runtime (Llama-family models); use another strategy"
            )
        n = runtime.info.n_layers
        for name, value in (("min_layers", self.min_layers), ("max_layers", self.max_layers)):
            if value is not None and value > n:
                raise InvalidRequestError(f"{name} is {value}, but the model has {n} layers; give at most {n}")
        low, _ = self._bounds(n)
        if self.keep_bottom > low:
            raise InvalidRequestError(
                f"keep_bottom ({self.keep_bottom}) must not exceed min_layers ({low}): the kept "
                "bottom layers always run"
            )

    def layers_at(self, index: int, n_layers: int) -> int:
        """Layers run for output position `index`: the linear ramp from max to min over decay_tokens,
        as a staircase of `levels` evenly spaced values, each held for an equal share of decay_tokens
        (the same mean as the ramp), then min_layers."""
        low, top = self._bounds(n_layers)
        level = min(self.levels - 1, index * self.levels // self.decay_tokens)
        return top - (top - low) * level // (self.levels - 1)

    def plan_at(self, index: int, n_layers: int) -> Plan | None:
        run = self.layers_at(index, n_layers)
        if run >= n_layers:
            return None
        skipped = range(self.keep_bottom, self.keep_bottom + n_layers - run)
        return Plan.skipping(n_layers, layers=skipped)

    def start(self, state: DecodeState) -> None:
        state.memo = SkipDecodeMemo()

    def step(self, state: DecodeState) -> Step:
        m, n_layers, index = state.memo, state.runtime.info.n_layers, state.n_generated
        plan = self.plan_at(index, n_layers)
        if plan is not None:
            check_nested(m.skipped, plan, index)
            m.skipped |= {i for i in range(n_layers) if not plan.attn[i]}
        elif m.skipped:
            check_nested(m.skipped, Plan.full(n_layers), index)
        feed = state.feed([state.tokens[-1]], plan=plan, num_logits=1)
        feed.draft = False  # the partial model's token is the output: a target pass, not a draft
        out = yield from run(feed)
        m.layers_run += n_layers if plan is None else sum(plan.attn)
        state.extras["skip_decode"] = {"mean_layers": m.layers_run / (index + 1), "n_layers": n_layers}
        return [state.sample(out.requested_logits()[-1], index)]
