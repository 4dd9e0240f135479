"""Log-probabilities of tokens: one record per token, taken from one row of logits.

Which distribution: for generated tokens, the log_softmax of the *processed* logits the token was
drawn from (`Sampler.process`: repetition penalty, logit_bias, bans, a response_format's grammar mask, then temperature and
top-k / top-p / min-p; under greedy decoding none of the last four applies, so with no processor on
it is the model's own log-softmax). Filtered-out tokens have -inf. For prompt tokens (prompt
scoring), the log_softmax of the raw model logits at the position before them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from argen.errors import InvalidRequestError

MAX_TOP_LOGPROBS = 20  # alternatives per token at most (OpenAI's top_logprobs bound)
# Prompt rows projected to the vocabulary at once when scoring a prompt: a chunk's worth ([512, 49152]
# float32 logits, then their log-softmax) took 100s of MB at a time; 64 rows take 12.6 MB an array.
SCORING_ROWS = 64


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # the k most likely (id, logprob), best first
    rank: int | None = None  # 1 + how many tokens are likelier (vLLM's rank); None: not computed

    def as_dict(self) -> dict:
        return {"token": self.token, "logprob": self.logprob, "top": [list(t) for t in self.top], "rank": self.rank}


def check_top(value, name: str) -> None:
    """None (off) or an integer in 0..MAX_TOP_LOGPROBS, else an InvalidRequestError naming `name`."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(
            f"{name} must be null (off) or an integer in 0..{MAX_TOP_LOGPROBS} (how many "
            f"alternatives to list per token; 0: the chosen token's log-prob only)"
        )


def _top(logp: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """The k best (id, logprob) of each row of `logp` [T, V]."""
    if k == 0:
        return [[] for _ in range(logp.shape[0])]
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]


def token_logprob(processed: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """The record of `token` drawn from one row of processed logits [V], with the k best alternatives."""
    logp = torch.log_softmax(processed.float(), dim=-1)
    return TokenLogprob(token, float(logp[token]), _top(logp[None], k)[0], int((logp > logp[token]).sum()) + 1)


def rows_logprobs(logits: torch.Tensor, next_tokens: list[int], k: int) -> list[TokenLogprob]:
    """Records for a run of tokens: row i of `logits` [T, V] is the raw model's prediction of
    next_tokens[i] (prompt scoring)."""
    n = len(next_tokens)
    if n == 0:
        return []
    logp = torch.log_softmax(logits[:n].float(), dim=-1)
    chosen = logp.gather(-1, torch.tensor(next_tokens, device=logp.device)[:, None])
    ranks = ((logp > chosen).sum(-1) + 1).tolist()
    return [
        TokenLogprob(t, lp, top, rank)
        for t, lp, top, rank in zip(next_tokens, chosen[:, 0].tolist(), _top(logp, k), ranks, strict=True)
    ]


def prompt_logprobs(head, hidden: torch.Tensor, next_tokens: list[int], k: int) -> list[TokenLogprob]:
    """Records for a run of prompt tokens from the final hidden states [T, H] of the rows before them
    (row i predicts next_tokens[i]); `head` maps hidden states to logits. SCORING_ROWS rows at a time,
    so the memory a prompt's scoring takes does not grow with its prefill chunk."""
    records: list[TokenLogprob] = []
    for start in range(0, len(next_tokens), SCORING_ROWS):
        rows = next_tokens[start : start + SCORING_ROWS]
        records += rows_logprobs(head(hidden[start : start + len(rows)]), rows, k)
    return records
