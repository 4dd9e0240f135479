"""`bild`: Big Little Decoder (Kim et al., 2023): the small model decodes, the large one takes over
where the small one is unsure and corrects what it got wrong.

A step:

1. The small model decodes while its own top probability is at least `fallback` (the *fallback
   policy*), at most `max_pending` tokens (and no further than the request's end or an EOS).
2. The large model runs ONE pass over the pending token and every small-model token since its last
   pass. The *rollback policy* discards the small model's tokens from the first one whose
   cross-entropy under the large model, -log p_large(token), exceeds `rollback` nats, and puts the
   large model's own token there. If none is rolled back and the small model fell back, the large
   model's token for the position it fell back at follows.

The tokens a step returns are final (they stream), and both caches are cut back to them. Every
token is drawn by the request's sampler (its noise at that output position) from the distribution
of the model that decides it. Bounds: `fallback` 1 falls back at every token and `rollback` 0
rolls back every token the large model does not hold certain: both are the large model's own
decoding under greedy; `fallback` 0 with no rollback (its largest value) is the small model's.
Lossy; `state.extras["bild"]` records the large model's share, fallbacks, rollbacks and passes.
"""

from __future__ import annotations

import torch

from argen.strategies.base import DecodeState, Step
from argen.strategies.small_large import CACHED, SmallLarge, top_prob

MAX_PENDING = 64  # small-model tokens a large pass checks at most (its rows)
MAX_ROLLBACK = 1000.0  # nats: no token's cross-entropy in float32 logits comes near it (no rollback)


class BiLD(SmallLarge):
    name = "bild"

    def __init__(
        self, small: object = CACHED, fallback: float = 0.6, rollback: float = 3.0, max_pending: int = 10
    ) -> None:
        super().__init__(small)
        if not 0.0 <= fallback <= 1.0:
            raise ValueError(
                "fallback (the small model's top probability under which the large one decides) must be between 0 and 1"
            )
        if not 0.0 <= rollback <= MAX_ROLLBACK:
            raise ValueError(
                f"rollback (nats of cross-entropy under the large model) must be between 0 and {MAX_ROLLBACK:g}"
            )
        if not isinstance(max_pending, int) or isinstance(max_pending, bool) or not 1 <= max_pending <= MAX_PENDING:
            raise ValueError(f"max_pending must be an integer between 1 and {MAX_PENDING}")
        self.fallback, self.rollback, self.max_pending = float(fallback), float(rollback), max_pending

    def kv_slack(self) -> int:
        return 1 + self.max_pending

    def start(self, state: DecodeState) -> None:
        super().start(state)
        state.memo.record |= {"fallbacks": 0, "rollbacks": 0}

    def falls_back(self, logits: torch.Tensor) -> bool:
        # 1 falls back always: a float32 softmax may round a confident top probability to exactly 1.
        return self.fallback >= 1.0 or top_prob(logits) < self.fallback

    def step(self, state: DecodeState) -> Step:
        m = state.memo
        logits = yield from self.small_catch_up(state)
        limit = min(self.max_pending, state.remaining)
        drafts: list[int] = []
        fell_back = False
        while True:
            if self.falls_back(logits):
                fell_back = True
                break
            drafts.append(self.decide(state, logits, drafts))
            if len(drafts) >= limit or drafts[-1] in state.eos_ids:
                break  # a forced check: the last draft is pending, the large model checks the ones before
            logits = yield from self.small_pass(state, drafts[-1:])
        # The large model's pass: it predicts every draft, and the position after them if it fell back.
        base = state.cache.lengths[0]
        large = yield from self.large_pass(state, drafts if fell_back else drafts[:-1])
        kept, from_large = list(drafts), 0
        for j, token in enumerate(drafts):
            if -float(torch.log_softmax(large[j].float(), dim=-1)[token]) > self.rollback:
                kept = drafts[:j] + [self.decide(state, large[j], drafts[:j])]
                m.record["rollbacks"] += 1
                from_large = 1
                break
        else:
            if fell_back:
                kept.append(self.decide(state, large[len(drafts)], drafts))
                m.record["fallbacks"] += 1
                from_large = 1
        # Both caches keep the sequence up to the new pending token (the last kept) and nothing after.
        state.cache.truncate(base + len(kept))
        m.cache.truncate(min(m.cache.lengths[0], len(state.tokens) + len(kept) - 1))
        self.tally(state, len(kept), from_large)
        return kept
