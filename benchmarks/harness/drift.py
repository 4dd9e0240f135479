"""Drift measures for lossy options (compute skipping, KV presses): how far a lossy continuation is
from the exact one, whatever made it lossy.

- `agreement(exact, lossy)`: greedy agreement over the output: tokens until the first divergence,
  and the share of positions where both outputs hold the same token (over the longer output).
- `NLLScorer(runtime, prompt)`: the negative log-likelihood the *full* model assigns to a
  continuation (teacher-forced, mean per token). The prompt is computed once; each continuation
  is scored in a fork of its cache where the runtime's caches fork (paged KV), else after a new
  prefill.
- `answer_recall(exact_text, lossy_text, source)`: does the answer survive? The share of the exact
  answer's key terms (capitalized words and numbers that occur in the source article) that the
  lossy answer also contains.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

PREFILL_CHUNK = 512  # prompt tokens per pass while scoring (bounded attention memory on long prompts)


@dataclass(frozen=True)
class Agreement:
    first_divergence: int  # tokens equal before the first difference (the shorter length if none)
    token_agreement: float  # positions with the same token ÷ the longer output's length (1.0: identical)


def agreement(exact: list[int], lossy: list[int]) -> Agreement:
    first = next((i for i, (a, b) in enumerate(zip(exact, lossy)) if a != b), min(len(exact), len(lossy)))
    longest = max(len(exact), len(lossy))
    same = sum(a == b for a, b in zip(exact, lossy))
    return Agreement(first, same / longest if longest else 1.0)


class NLLScorer:
    """Per-token NLL of continuations of one prompt under the full model (no plan, no press): the
    prompt's keys/values are computed once, in chunks; `score` feeds the continuation teacher-forced."""

    def __init__(self, runtime, prompt: list[int]) -> None:
        if not prompt:
            raise ValueError("a prompt needs at least one token")
        self.runtime, self.prompt = runtime, list(prompt)
        self.base = None  # the prompt's cache without its last token (forked per continuation)

    def _prefilled(self, max_len: int):
        cache = self.runtime.new_cache(1, max_len)
        head = self.prompt[:-1]
        for start in range(0, len(head), PREFILL_CHUNK):
            chunk = head[start : start + PREFILL_CHUNK]
            self._forward(chunk, start, cache, 0)
        return cache

    def _forward(self, tokens: list[int], start: int, cache, num_logits: int | None):
        ids = torch.tensor([tokens], dtype=torch.long)
        positions = torch.arange(start, start + len(tokens))[None]
        logits, _ = self.runtime.forward(ids, positions, cache, num_logits=num_logits)
        return logits

    @torch.inference_mode()
    def score(self, continuation: list[int]) -> list[float]:
        """-log p(continuation[i] | prompt + continuation[:i]) for each i, under the full model."""
        if not continuation:
            return []
        max_len = len(self.prompt) + len(continuation)
        if self.base is None and hasattr(self.runtime, "kv_pool"):  # paged caches fork: one prefill for all
            self.base = self._prefilled(self.runtime.info.max_positions)
        cache = self.base.fork() if self.base is not None else self._prefilled(max_len)
        try:
            fed = [self.prompt[-1], *continuation[:-1]]
            logits = self._forward(fed, len(self.prompt) - 1, cache, None)[0].float()
        finally:
            cache.free()
        logp = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(continuation, dtype=torch.long)
        return (-logp[torch.arange(len(continuation)), target]).tolist()

    def close(self) -> None:
        if self.base is not None:
            self.base.free()
            self.base = None

    def __enter__(self) -> NLLScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def mean_nll(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


_TERM = re.compile(r"\b(?:[A-Z][\w'-]{2,}|\d[\d,.]*)")


def answer_recall(exact_text: str, lossy_text: str, source: str) -> float | None:
    """Share of the exact answer's key terms (capitalized words or numbers, found in `source`) that
    the lossy answer contains; None when the exact answer has no such term."""
    terms = {t.rstrip(".,") for t in _TERM.findall(exact_text)} - {""}
    terms = {t for t in terms if t in source}
    if not terms:
        return None
    return sum(t in lossy_text for t in terms) / len(terms)
