"""Superposed decoding (Shen et al., 2024): k drafts from one forward pass per step.

A fast path for `n > 1`: the request's n samples are the n best of k drafts decoded together. Each
step feeds ONE row: the weighted sum of the k drafts' last-token embeddings, with weights the
drafts' normalised probabilities (softmax of their scores; the paper's first choice, not a fixed
decay). The superposed pass gives one next-token distribution; each draft takes its top k tokens,
making k x k candidates scored

    draft score + log((1 - w) * p_model(token) + w * p_ngram(token | the draft's own last tokens))

and the k best are the next drafts (as in beam search, a draft may continue another's history). The
n-gram model (recipes/token_ngrams.py, this machine's text) is what tells the drafts apart: the model
sees only their superposition. A draft that ends (EOS) keeps its score and its place while it is
among the k best, and leaves the superposition. Lossy by design: the model never sees any draft's
own tokens after the first; the bench measures what that costs (benchmarks/superposed/).

Like beam search the whole output is known only at the end, so sample 0's step runs the whole
search (one packed pass a round over a copy-on-write fork of the prompt's cache) and returns its
draft; the other samples of the request (forks the Engine made after the prefill) feed nothing and
wait for it in `DecodeState.samples`, then return theirs. With k = 1 and w = 0 the one draft's
superposition is its own token's embedding, times 1.0: plain greedy decoding, token for token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch

from argen.checks import number_option
from argen.errors import ArgenError, InvalidRequestError
from argen.strategies.base import DecodeState, Feed, Feeds, Outs, Step, Strategy, run
from argen.strategies.search.beam import refuse_logprobs, require_greedy

K_MAX = 64  # drafts kept (the server caps it lower: limits.py)
NGRAM_WEIGHT_MAX = 0.99  # at 1 a token the n-gram model never saw would score log(0)


@dataclass
class Draft:
    tokens: list[int]
    score: float  # sum of the interpolated log-probabilities of its tokens
    done: bool = False  # ended with an end-of-sequence token


def superposed_embedding(embeddings: torch.Tensor, scores: list[float], live: list[bool]) -> torch.Tensor:
    """The superposed input [H]: the live drafts' last-token embeddings [k, H], weighted by their
    normalised probabilities (softmax of the scores over the live drafts)."""
    alive = torch.tensor(live)
    s = torch.tensor(scores, dtype=torch.float64).masked_fill(~alive, float("-inf"))
    weights = torch.softmax(s, dim=0).to(embeddings.dtype)
    return (weights[:, None] * embeddings)[alive].sum(0)


def expand(
    drafts: list[Draft],
    logp: torch.Tensor,
    k: int,
    weight: float,
    ngram: Callable[[int, int], float] | None,
) -> list[tuple[int, int | None, float]]:
    """The k best of the k x k candidates: (parent draft, token or None for a finished draft that stays,
    score), best first (ties: the earlier parent, then the model's order). `logp` [k, V]: each draft's
    log-probabilities from the superposed pass, or [1, V]: one row every draft shares (no processor
    read a draft's own tokens); `ngram(i, token)`: P_ngram(token | draft i)."""
    candidates: list[tuple[int, int | None, float]] = []
    tops: dict[int, tuple[list[float], list[int]]] = {}  # row -> its top k (a shared row: once)
    for i, draft in enumerate(drafts):
        if draft.done:
            candidates.append((i, None, draft.score))
            continue
        row = i if logp.shape[0] > 1 else 0
        if row not in tops:
            top = logp[row].topk(min(k, logp.shape[-1]))
            tops[row] = (top.values.tolist(), top.indices.tolist())
        for lp, tok in zip(*tops[row], strict=True):
            if lp == float("-inf"):
                continue  # banned by the sampler's processors
            if weight > 0 and ngram is not None:
                mixed = (1 - weight) * math.exp(lp) + weight * ngram(i, tok)
                lp = math.log(mixed) if mixed > 0 else float("-inf")
            candidates.append((i, tok, draft.score + lp))
    order = sorted(range(len(candidates)), key=lambda c: -candidates[c][2])  # stable: ties keep their order
    return [candidates[c] for c in order[:k]]


class Superposed(Strategy):
    name = "superposed"
    exact = False
    whole_output_in_one_step = True
    samples_together = True
    takes_forced_tokens = False  # the k drafts are kept by their scores, not drawn by the sampler
    needs_token_ngrams = True

    def __init__(self, k: int = 0, ngram_weight: float = 0.1, ngram_order: int = 3) -> None:
        if not isinstance(k, int) or not 0 <= k <= K_MAX:
            raise ValueError(f"k (drafts kept) must be an integer in 0..{K_MAX} (0: as many as the request's n)")
        number_option("ngram_weight", ngram_weight, 0.0, NGRAM_WEIGHT_MAX, " (0: the model's scores alone)")
        # The tables hold n-grams up to recipes/token_ngrams.MAX_ORDER (4) tokens.
        if not isinstance(ngram_order, int) or not 1 <= ngram_order <= 4:
            raise ValueError("ngram_order must be an integer in 1..4 (the n-gram tables hold up to 4-grams)")
        self.k = k
        self.ngram_weight = float(ngram_weight)
        self.ngram_order = ngram_order
        self._ngrams = None  # the n-gram tables, handed over by prepare (companions["ngrams"])

    def prepare(self, base, companions: dict | None = None) -> None:
        self._ngrams = (companions or {}).get("ngrams")

    def check(self, runtime, prompt_len: int, params) -> None:
        require_greedy(params, "superposed decoding")
        refuse_logprobs(params, "superposed decoding")
        if not runtime.capabilities.input_embeds or not runtime.capabilities.paged_kv:
            raise InvalidRequestError(
                "superposed decoding feeds a weighted sum of token embeddings into a fork of the paged KV cache, "
                "which needs the native runtime (load the model with runtime='native'; Llama-family models only)"
            )
        if params.response_format is not None:
            raise InvalidRequestError("superposed decoding does not follow a response_format; leave it out")

    def check_samples(self, n: int) -> None:
        if self.k and self.k < n:
            raise InvalidRequestError(
                f"superposed decoding returns the n best of its k drafts: k ({self.k}) must be at least n ({n}); "
                "raise k or leave it 0 (as many drafts as n)"
            )

    def step(self, state: DecodeState) -> Step:
        shared = state.samples if state.samples is not None else {}
        if state.sample_index > 0:
            return (yield from self._wait(state, shared))
        try:
            drafts = yield from self.search(state, max(self.k, shared.get("n", 1)))
            shared["drafts"] = drafts
        finally:
            shared.setdefault("drafts", None)  # closed or failed: the other samples must not wait forever
        best = drafts[0]
        state.extras["superposed_score"] = best.score
        return best.tokens

    def _wait(self, state: DecodeState, shared: dict) -> Generator[Feeds, Outs, list[int]]:
        """Another sample of the request: nothing to feed until sample 0's search has finished."""
        while "drafts" not in shared:
            yield []
        drafts = shared["drafts"]
        if drafts is None:
            raise ArgenError("superposed decoding's search (sample 0 of this request) failed or was stopped")
        if state.sample_index >= len(drafts):  # fewer candidates than samples (a vocabulary this small)
            return []
        draft = drafts[state.sample_index]
        state.extras["superposed_score"] = draft.score
        return draft.tokens

    def search(self, state: DecodeState, k: int) -> Generator[Feeds, Outs, list[Draft]]:
        """The k drafts, best first, each at most `state.remaining` tokens."""
        if self.ngram_weight > 0 and self._ngrams is None:
            raise InvalidRequestError(
                "superposed decoding with ngram_weight > 0 needs the n-gram tables: make the strategy with "
                "Generator.prepare_strategy (generate, stream and the server do), or set ngram_weight to 0"
            )
        runtime, eos = state.runtime, state.eos_ids
        cache = state.fork(state.cache)
        start = cache.lengths[0] + state.position_shift  # position of the pending last prompt token
        prompt = state.tokens
        out = yield from run(Feed([prompt[-1]], [start], num_logits=1, cache=cache))
        drafts = [Draft([], 0.0)]
        for cur in range(state.remaining):
            logits = out.requested_logits()[-1]
            logp = self._log_probs(state, logits, drafts)
            chosen = expand(drafts, logp, k, self.ngram_weight, self._ngram_of(prompt, drafts))
            drafts = [
                drafts[i] if tok is None else Draft([*drafts[i].tokens, tok], score, tok in eos)
                for i, tok, score in chosen
            ]
            if all(d.done for d in drafts) or cur + 1 == state.remaining:
                break
            last = torch.tensor([d.tokens[-1] for d in drafts])
            embeds = runtime.embed_tokens(last[None])[0]
            x = superposed_embedding(embeds, [d.score for d in drafts], [not d.done for d in drafts])
            feed = Feed([drafts[0].tokens[-1]], [start + 1 + cur], num_logits=1, cache=cache, embeds=x[None])
            out = yield from run(feed)
        state.drop(cache)
        return drafts

    def _log_probs(self, state: DecodeState, logits: torch.Tensor, drafts: list[Draft]) -> torch.Tensor:
        """Each draft's log-probabilities [k, V] from the pass's logits, after the sampler's processors
        (repetition penalty, bans, logit bias) on that draft's own context; [1, V] when no processor
        reads the context's tokens (the drafts are equally long, so min_tokens treats them alike)."""
        p = state.sampler.params
        if p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty:
            return torch.log_softmax(state.sampler.process(logits, state.tokens + drafts[0].tokens)[None], dim=-1)
        rows = [state.sampler.process(logits, state.tokens + d.tokens) for d in drafts]
        return torch.log_softmax(torch.stack(rows).float(), dim=-1)

    def _ngram_of(self, prompt: list[int], drafts: list[Draft]) -> Callable[[int, int], float] | None:
        tables, order = self._ngrams, self.ngram_order
        if tables is None:
            return None
        tail = prompt[-(order - 1) :] if order > 1 else []

        def prob(i: int, token: int) -> float:
            context = (tail + drafts[i].tokens)[-(order - 1) :] if order > 1 else []
            return tables.prob(context, token, order)

        return prob
