"""Beam search, and conditional beam search (the best output that is not degenerate).

Beam search cannot emit anything before it ends (the best hypothesis is only known then), so the
whole search runs inside the first `step`, which returns the winning output at once. Each beam
has its own copy-on-write fork of the prompt's KV cache (they share every block until one writes
into it); every round is ONE packed pass over the beams' pending tokens, and as beams are re-ranked
each new beam forks the cache of the beam it continues.

Bookkeeping follows Hugging Face `generate(num_beams=...)` (transformers 5), so the outputs match:
- score of a running beam: the sum of its tokens' log-probs (log_softmax of fp32 logits after the
  sampler's processors: repetition penalty and bans, none by default);
- each step takes the top `(1 + #EOS ids) * num_beams` continuations over all beams. EOS
  continuations (and every continuation at the length limit) among the first `num_beams` become
  finished hypotheses, scored `sum_logprobs / len ** length_penalty` (len counts the output tokens,
  EOS included); the best `num_beams` non-EOS continuations are the next beams;
- `early_stopping`: True stops as soon as `num_beams` hypotheses have finished; False stops when
  the best running beam's score at the current length cannot beat the worst kept hypothesis (HF's
  heuristic); "never" uses the exact bound (for length_penalty > 0, the longest allowed length).
"""

from __future__ import annotations

from collections.abc import Generator

import torch

from argen.checks import number_option
from argen.errors import InvalidRequestError
from argen.strategies.base import DecodeState, Feed, Feeds, Outs, Step, Strategy, run_all

NEG = -1.0e9  # HF's "impossible" score: finite, so sums and comparisons stay well defined


LENGTH_PENALTY_MAX = 20.0  # scores divide by length ** length_penalty, which must stay a finite float


def _check_common(num_beams: int, length_penalty: float, early_stopping) -> None:
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError("num_beams must be an integer >= 1")
    number_option(
        "length_penalty",
        length_penalty,
        -LENGTH_PENALTY_MAX,
        LENGTH_PENALTY_MAX,
        " (0: sum of log-probs; 1: mean log-prob per token)",
    )
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):  # 1 is not True here
        raise ValueError("early_stopping must be true, false or 'never'")


def require_greedy(params, name: str) -> None:
    if not params.greedy:
        raise InvalidRequestError(f"{name} is deterministic; use temperature 0 (or a sampling strategy)")


def refuse_logprobs(params, name: str) -> None:
    # The search ranks whole hypotheses (or candidates by a score that is not a probability): no token
    # is drawn from a distribution whose log-prob could be reported.
    if params.logprobs is not None:
        raise InvalidRequestError(
            f"{name} does not report log-probs (its tokens are not drawn from one "
            "distribution); leave logprobs out, or use plain or a speculative strategy"
        )


class Beam(Strategy):
    name = "beam"
    exact = False
    whole_output_in_one_step = True
    takes_forced_tokens = False  # the beams are scored and kept by the search, not drawn by the sampler

    def __init__(self, num_beams: int = 4, length_penalty: float = 1.0, early_stopping: bool | str = True) -> None:
        _check_common(num_beams, length_penalty, early_stopping)
        self.num_beams = num_beams
        self.length_penalty = float(length_penalty)
        self.early_stopping = early_stopping if early_stopping == "never" else bool(early_stopping)

    # Conditional beam search overrides this: the next tokens a beam may not take.
    def banned(self, output: list[int], eos_ids: frozenset[int]) -> list[int]:
        return []

    def check(self, runtime, prompt_len: int, params) -> None:
        require_greedy(params, f"{self.name} search")
        refuse_logprobs(params, f"{self.name} search")
        if not runtime.capabilities.paged_kv:
            raise InvalidRequestError(
                f"{self.name} search forks the KV cache into one copy-on-write cache per beam, which needs the "
                "native runtime (load the model with runtime='native'; Llama-family models only)"
            )

    def step(self, state: DecodeState) -> Step:
        """The whole search, one packed pass over the beams per round (so a long search does not hold
        up the other sequences of a batch); then the best hypothesis at once."""
        tokens, logprob, score = yield from self.search(state)
        state.extras.update(beam_score=score, beam_logprob=logprob)
        return tokens

    def search(self, state: DecodeState) -> Generator[Feeds, Outs, tuple[list[int], float, float]]:
        """The best hypothesis (output tokens, sum of log-probs, score). Each beam is a fork of the
        prompt's cache (copy-on-write: beams share every block until they write into it)."""
        n_beams = self.num_beams
        eos, limit, lp = state.eos_ids, state.remaining, self.length_penalty
        keep = (1 + max(1, len(eos))) * n_beams  # enough continuations to always refill the beams
        start = state.cache.lengths[0]  # the prompt minus its pending last token
        outputs: list[list[int]] = [[] for _ in range(n_beams)]
        scores = torch.full((n_beams,), NEG)
        scores[0] = 0.0  # the beams start identical: only the first one may expand at step 0
        pending = [state.tokens[-1]] * n_beams
        caches = [state.fork(state.cache)]  # at step 0 every beam is the same: one row is enough
        finished: list[tuple[float, float, list[int]]] = []  # (score, sum of log-probs, tokens), best first
        improvable = True
        for cur in range(limit):
            position = [start + cur + state.position_shift]
            outs = yield from run_all(
                [Feed([pending[b]], position, num_logits=1, cache=c) for b, c in enumerate(caches)]
            )
            logits = torch.stack([o.requested_logits()[-1] for o in outs]).expand(n_beams, -1)
            logp = self._log_probs(state, logits, outputs)
            total = (logp + scores[:, None]).reshape(-1)
            top, index = total.topk(min(keep, total.numel()))
            rows, toks = (index // logp.shape[-1]).tolist(), (index % logp.shape[-1]).tolist()
            at_limit = cur + 1 == limit
            ends = [at_limit or t in eos for t in toks]
            full = len(finished) == n_beams
            if improvable and not (full and self.early_stopping is True):
                for j in range(n_beams):
                    if ends[j] and top[j] > NEG / 2:
                        hyp = outputs[rows[j]] + [toks[j]]
                        finished.append((top[j].item() / len(hyp) ** lp, top[j].item(), hyp))
                finished = sorted(finished, key=lambda h: -h[0])[:n_beams]
            if at_limit:
                break
            nxt = [j for j in range(len(toks)) if not ends[j]][:n_beams]
            outputs = [outputs[rows[j]] + [toks[j]] for j in nxt]
            scores = top[nxt].clone()
            pending = [toks[j] for j in nxt]
            # Beam j continues row rows[j]: a fork of that row's cache; the old forks are dropped.
            forks = [state.fork(caches[min(rows[j], len(caches) - 1)]) for j in nxt]
            for c in caches:
                state.drop(c)
            caches = forks
            full = len(finished) == n_beams
            if full:
                length = limit if (self.early_stopping == "never" and lp > 0) else cur + 1
                improvable = improvable and scores[0].item() / length**lp > finished[-1][0]
            if not improvable or (full and self.early_stopping is True):
                break
        for c in caches:
            state.drop(c)
        if not finished:  # every continuation was banned (a vocabulary smaller than the bans)
            raise InvalidRequestError(f"{self.name} search found no allowed hypothesis; relax its options")
        score, logprob, best = finished[0]
        return best, logprob, score

    def _log_probs(self, state: DecodeState, logits: torch.Tensor, outputs: list[list[int]]) -> torch.Tensor:
        prompt = state.tokens
        rows = [state.sampler.process(logits[r], prompt + out) for r, out in enumerate(outputs)]
        logp = torch.log_softmax(torch.stack(rows).float(), dim=-1).cpu()
        for r, out in enumerate(outputs):
            banned = self.banned(out, state.eos_ids)
            if banned:
                logp[r, banned] = NEG
        return logp


class ConditionalBeam(Beam):
    """Beam search over non-degenerate outputs only: the highest-scoring output that is not empty
    and has no repeated n-gram. Degenerate continuations are removed from the candidates (their
    log-prob set to -1e9) before ranking; the others keep their unnormalised model log-probs, so the
    search targets argmax p(y) over the allowed set, which is also the mode of p(y | y allowed).

    A hypothesis is degenerate when
    - it ends (EOS) with fewer than `min_length` tokens before the EOS (min_length=1: not empty), or
    - some `loop_ngram` consecutive tokens of the output occur twice in it (a loop of any period
      shows up as such a repeat once it has run for loop_ngram + period tokens). The prompt is not
      counted: copying from the prompt is fine.
    """

    name = "conditional-beam"

    def __init__(
        self,
        num_beams: int = 4,
        length_penalty: float = 1.0,
        early_stopping: bool | str = True,
        min_length: int = 1,
        loop_ngram: int = 4,
    ) -> None:
        super().__init__(num_beams, length_penalty, early_stopping)
        if not isinstance(min_length, int) or min_length < 0:
            raise ValueError("min_length must be an integer >= 0 (output tokens required before EOS)")
        if not isinstance(loop_ngram, int) or loop_ngram < 1:
            raise ValueError("loop_ngram must be an integer >= 1 (the n-gram size that may not repeat)")
        self.min_length = min_length
        self.loop_ngram = loop_ngram

    def banned(self, output: list[int], eos_ids: frozenset[int]) -> list[int]:
        banned = list(eos_ids) if len(output) < self.min_length else []
        n = self.loop_ngram
        if len(output) >= n - 1:
            prefix = output[len(output) - (n - 1) :]
            banned += [output[i + n - 1] for i in range(len(output) - n + 1) if output[i : i + n - 1] == prefix]
        return banned
