"""`fs-gen`: fast and slow collaborative decoding (Zhang et al., 2024, "Fast and Slow Generating"):
the small model decides each token unless it is uncertain, where the large model gives it.

At every token the small model reads the pending token (one pass) and its own next-token
distribution decides who speaks: with `criterion` "entropy" the large model is asked when the
entropy is at least `threshold` nats (0: every token); with "margin" when the top-1 minus top-2
probability is below `threshold` (1: every token; 0: none). A collaborative token costs the large
model one pass over every token it has not read since its last one (its cache lags the sequence
between them, as a draft model's does), so it pays for what it is asked, not for every token. Each
step returns one token, drawn by the request's sampler from the deciding model's logits. The paper
finds that fewer than 20% of tokens collaborative get most of the large model's quality.

Lossy; `state.extras["fs-gen"]` records the collaborative tokens (`large_tokens`) and their share.
"""

from __future__ import annotations

from argen.sampling import entropy
from argen.strategies.base import DecodeState, Step
from argen.strategies.small_large import CACHED, SmallLarge, margin

CRITERIA = ("entropy", "margin")
MAX_ENTROPY = 20.0  # nats: above ln(vocabulary size) for any vocabulary under 480M tokens (no token asks)


class FSGen(SmallLarge):
    name = "fs-gen"

    def __init__(self, small: object = CACHED, criterion: str = "entropy", threshold: float = 2.0) -> None:
        super().__init__(small)
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(map(repr, CRITERIA))}")
        top = MAX_ENTROPY if criterion == "entropy" else 1.0
        if not 0.0 <= threshold <= top:
            unit = " nats" if criterion == "entropy" else " (a probability margin)"
            raise ValueError(f"threshold for criterion {criterion!r} must be between 0 and {top:g}{unit}")
        self.criterion, self.threshold = criterion, float(threshold)

    def uncertain(self, logits) -> bool:
        """Whether the small model hands this token to the large one."""
        if self.criterion == "entropy":
            return entropy(logits) >= self.threshold
        # 1 asks always: a float32 softmax may round a confident top-1 to exactly 1 (margin 1).
        return self.threshold >= 1.0 or margin(logits) < self.threshold

    def step(self, state: DecodeState) -> Step:
        logits = yield from self.small_catch_up(state)
        if not self.uncertain(logits):
            token = self.decide(state, logits, [])
            self.tally(state, 1, 0)
            return [token]
        large = yield from self.large_pass(state)
        token = self.decide(state, large[-1], [])
        self.tally(state, 1, 1)
        return [token]
