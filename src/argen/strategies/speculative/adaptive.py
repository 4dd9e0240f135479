"""Adaptive draft length: draft as many tokens as pay for themselves, down to none.

Each step picks the draft length k maximising expected tokens per second:
    E[tokens](k) / (cost of verifying 1 + k tokens + cost of drafting k tokens),
where verifying costs the transformer body over 1 + k tokens plus the vocabulary projection for
the E[tokens](k) rows the verifier walks (the verifier computes no other row's logits),
with E[tokens](k) = (1 - a^(k+1)) / (1 - a) for a per-token acceptance rate a (tracked online
with exponential forgetting) and costs measured on this runtime (a one-off calibration, refined by
timing every verification). On text where drafts fail, a falls, k drops to 0 and the step is a
plain one; a drifts back to its prior while idle, so drafting is re-tried now and then.

In a batch of B sequences decoding together, every sequence's rows share one pass, so a draft is
priced as its share of a pass of B times the rows (`CostModel.shared`: all B drafting alike): on a
CPU, where a pass of many rows is bound by arithmetic, drafts that pay alone stop paying in a big
batch (vLLM's answer to the same fact is a batch size above which it stops speculating). The
timings refine the model only from passes a sequence had to itself.
"""

from __future__ import annotations

import time

import torch

BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class CostModel:
    """Seconds per target forward pass: the transformer body as a function of the number of tokens
    fed, plus the vocabulary projection per row whose logits are used (one model per runtime)."""

    def __init__(self, runtime) -> None:
        body, self.head_seconds = self._calibrate(runtime)
        self.seconds = dict(zip(BUCKETS, body))

    @staticmethod
    def _calibrate(runtime) -> tuple[list[float], float]:
        """Timed passes on the runtime directly (a per-model measurement, not a sequence's step)."""
        context = 64
        cache = runtime.new_cache(1, context + max(BUCKETS) + 1)
        ids = torch.arange(context + max(BUCKETS))[None] % runtime.info.vocab_size
        _, hidden = runtime.forward(ids[:, :context], torch.arange(context)[None], cache, num_logits=0)
        out = []
        for t in BUCKETS:
            times = []
            for _ in range(3):
                start = time.perf_counter()
                runtime.forward(ids[:, context : context + t], torch.arange(context, context + t)[None], cache,
                                num_logits=0)  # fmt: skip
                times.append(time.perf_counter() - start)
                cache.truncate(context)
            out.append(sorted(times)[1])
        # Cost never falls with more tokens: flatten timing noise.
        for i in range(1, len(out)):
            out[i] = max(out[i], out[i - 1])
        head = []
        for _ in range(3):
            start = time.perf_counter()
            runtime.head(hidden[0, -1])
            head.append(time.perf_counter() - start)
        cache.free()
        return out, sorted(head)[1]

    @staticmethod
    def for_runtime(runtime) -> CostModel:
        """The runtime's cost model, calibrated on first use and kept in its memo."""
        return runtime.memo.get(CostModel, lambda: CostModel(runtime))

    def body(self, n_tokens: int) -> float:
        for b in BUCKETS:
            if n_tokens <= b:
                return self.seconds[b]
        return self.seconds[BUCKETS[-1]] * n_tokens / BUCKETS[-1]

    def __call__(self, n_tokens: int, rows: float = 1.0) -> float:
        """A pass feeding `n_tokens` whose logits are used for `rows` of them."""
        return self.body(n_tokens) + rows * self.head_seconds

    def shared(self, n_tokens: int, rows: float = 1.0, batch: int = 1) -> float:
        """One sequence's share of a pass where each of `batch` sequences feeds `n_tokens`."""
        return self.body(batch * n_tokens) / batch + rows * self.head_seconds

    def observe(self, n_tokens: int, rows: int, seconds: float) -> None:
        b = next((b for b in BUCKETS if n_tokens <= b), None)
        if b is not None:
            body = max(seconds - rows * self.head_seconds, 0.0)
            self.seconds[b] = 0.9 * self.seconds[b] + 0.1 * body


class DraftLength:
    """Chooses each step's draft length from the acceptance rate and the cost model."""

    def __init__(self, max_draft: int, cost: CostModel, prior: float = 0.6, forget: float = 0.8) -> None:
        self.max_draft = max_draft
        self.cost = cost
        self.prior = prior
        self.forget = forget
        self.counts: dict[object, list[float]] = {}  # draft key -> decayed [accepted, rejected]
        self.draft_seconds = 0.0  # drafting cost per token (0 for lookup proposers)

    def _counts(self, key) -> list[float]:
        return self.counts.setdefault(key, [self.prior, 1 - self.prior])

    def acceptance(self, key=None) -> float:
        accepted, rejected = self._counts(key)
        return accepted / (accepted + rejected)

    def choose(self, limit: int, key=None, batch: int = 1) -> int:
        a = min(self.acceptance(key), 0.999)
        best_k, best_rate = 0, 1.0 / self.cost.shared(1, batch=batch)
        for k in range(1, min(self.max_draft, limit) + 1):
            expected = (1 - a ** (k + 1)) / (1 - a)
            rate = expected / (self.cost.shared(1 + k, rows=expected, batch=batch) + k * self.draft_seconds)
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k

    def update(self, drafted: int, accepted: int, key=None) -> None:
        counts = self._counts(key)
        if drafted == 0:
            # A draft was available but not worth verifying: forget slowly towards the prior,
            # so that drafting is tried again later.
            counts[0] = 0.95 * counts[0] + 0.05 * self.prior
            counts[1] = 0.95 * counts[1] + 0.05 * (1 - self.prior)
            return
        counts[0] = self.forget * counts[0] + accepted
        counts[1] = self.forget * counts[1] + (1 if accepted < drafted else 0)

    def observe_draft_time(self, n_tokens: int, seconds: float) -> None:
        if n_tokens:
            self.draft_seconds = 0.8 * self.draft_seconds + 0.2 * seconds / n_tokens


def best_tree_size(path_probs: list[float], cost: CostModel, draft_seconds: float = 0.0, batch: int = 1) -> int:
    """For tree proposers: nodes are offered best first with their estimated probability of being
    accepted (the product of the acceptance estimates along their path). Keep the first n nodes
    that maximise expected tokens per second, (1 + sum of their probabilities) / cost(1 + n); n = 0
    (a plain step) when no draft pays for its verification."""
    return best_tree(path_probs, cost, draft_seconds, batch)[0]


def best_tree(path_probs: list[float], cost: CostModel, draft_seconds: float = 0.0, batch: int = 1,
              fixed_seconds: float = 0.0) -> tuple[int, float]:  # fmt: skip
    """`best_tree_size` and the rate it reaches (tokens per second), for drafting that also costs
    `fixed_seconds` whatever the number of nodes (a tree grown level by level: one drafter pass a
    level). n = 0 is a plain step, which costs no drafting."""
    best_n, best_rate = 0, 1.0 / cost.shared(1, batch=batch)
    expected = 1.0
    for n, p in enumerate(path_probs, start=1):
        expected += p
        rate = expected / (cost.shared(1 + n, rows=expected, batch=batch) + n * draft_seconds + fixed_seconds)
        if rate > best_rate:
            best_n, best_rate = n, rate
    return best_n, best_rate
