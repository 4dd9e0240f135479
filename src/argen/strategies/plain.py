"""Plain autoregressive decoding: one forward pass, one token."""

from __future__ import annotations

from argen.strategies.base import DecodeState, Step, Strategy, run


class Plain(Strategy):
    name = "plain"

    def step(self, state: DecodeState) -> Step:
        out = yield from run(state.feed([state.tokens[-1]], num_logits=1))
        return [state.sample(out.requested_logits()[-1], state.n_generated)]
