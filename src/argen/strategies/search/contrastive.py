"""Contrastive search (Su et al. 2022, "A Contrastive Framework for Neural Text Generation").

Among the `top_k` most likely next tokens v, emit the one maximising
    (1 - alpha) * p(v | context) - alpha * max_j cos(h_v, h_j),
where h_v is v's final hidden state (after the final norm, as the runtimes return it and as
Hugging Face's implementation uses `hidden_states[-1]`) when appended to the context, and h_j
ranges over the hidden states of every context token, prompt included. alpha = 0 is greedy.

One forward pass per token. A step feeds the pending token and the k candidates as k siblings of
one tree (each candidate sees the context, the pending token and itself; all at the same
position): that pass yields every candidate's hidden state and its next-token logits. The
winner's logits give the next step's candidates, its hidden state joins the history, and the
cache keeps only the pending token's keys/values (the winner is the new pending token, recomputed
as the root of the next step's tree), as the pending-token convention requires.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from argen.checks import number_option
from argen.strategies.base import DecodeState, Start, Step, Strategy, run
from argen.strategies.search.beam import refuse_logprobs, require_greedy


def degeneration_penalty(candidates: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """max_j cos(candidate_i, history_j) for each candidate ([k, H] against [N, H]) -> [k]."""
    return (F.normalize(candidates.float(), dim=-1) @ F.normalize(history.float(), dim=-1).T).max(-1).values


def contrastive_scores(probs: torch.Tensor, penalty: torch.Tensor, alpha: float) -> torch.Tensor:
    return (1 - alpha) * probs - alpha * penalty


@dataclass
class ContrastiveMemo:
    history: torch.Tensor  # [N, H]: hidden states of the tokens so far
    logits: torch.Tensor  # the pending token's next-token logits


class Contrastive(Strategy):
    name = "contrastive"
    exact = False
    needs_prompt_hidden = True
    takes_forced_tokens = False  # it picks its own candidate, not the sampler's token

    def __init__(self, top_k: int = 4, alpha: float = 0.6) -> None:
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError("top_k must be an integer >= 1 (the candidates compared at each step)")
        self.top_k = top_k
        self.alpha = number_option("alpha", alpha, 0, 1, " (0 is greedy; the paper uses 0.5-0.6)")

    def check(self, runtime, prompt_len: int, params) -> None:
        require_greedy(params, "contrastive search")
        refuse_logprobs(params, "contrastive search")

    def kv_slack(self) -> int:
        # A step feeds the pending token and the top_k candidates after the sequence.
        return 1 + self.top_k

    def start(self, state: DecodeState) -> Start:
        cache = state.cache
        # The pending (last prompt) token's logits and hidden state; then drop its keys/values again.
        length = cache.lengths[0]
        out = yield from run(state.feed([state.tokens[-1]], num_logits=1))
        cache.truncate(length)
        prompt_hidden = state.prompt_hidden if state.prompt_hidden is not None else out.hidden[:0]
        # history: hidden states [N, H] of the tokens so far; logits: the pending token's next-token logits
        state.memo = ContrastiveMemo(torch.cat([prompt_hidden, out.hidden]).float(), out.requested_logits()[-1])

    def step(self, state: DecodeState) -> Step:
        m = state.memo
        processed = state.sampler.process(m.logits, state.tokens)
        probs = processed.softmax(-1)
        k = min(self.top_k, probs.shape[-1])
        top_p, top_ids = probs.topk(k)
        allowed = processed[top_ids] > float("-inf")  # banned tokens are never candidates
        allowed[0] = True
        candidates = top_ids.tolist()
        start = state.cache.lengths[0]
        positions = [start + state.position_shift] + [start + 1 + state.position_shift] * k
        mask = torch.eye(k + 1, dtype=torch.bool)
        mask[:, 0] = True  # every candidate sees the pending token, and itself
        # Logits for the candidates only: the pending token's are already known (m.logits).
        out = yield from run(state.feed([state.tokens[-1]] + candidates, mask=mask, positions=positions, num_logits=k))
        cand_hidden = out.hidden[1:].float()
        scores = contrastive_scores(top_p, degeneration_penalty(cand_hidden, m.history).to(top_p.device), self.alpha)
        scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
        best = int(scores.argmax())
        state.cache.truncate(start + 1)  # keep the pending token; the winner becomes the next pending one
        m.history = torch.cat([m.history, cand_hidden[best : best + 1]])
        m.logits = out.requested_logits()[best]
        return [candidates[best]]
