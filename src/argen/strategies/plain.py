"""Plain autoregressive decoding: one forward pass, one token."""

from __future__ import annotations

from argen.strategies.base import DecodeState, Strategy


class Plain(Strategy):
    name = "plain"
    batchable = True

    def step(self, state: DecodeState) -> list[int]:
        logits, _ = state.forward([state.tokens[-1]], num_logits=1)
        return [state.sample(logits[0, -1], state.n_generated)]
