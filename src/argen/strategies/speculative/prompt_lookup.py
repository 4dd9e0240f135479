"""Prompt lookup / input-guided aggressive decoding (IAD; Saxena's prompt lookup decoding).

Find the longest recent n-gram of the context (prompt + output so far) that occurred earlier, and
propose the tokens that followed that earlier occurrence. Free to draft; wins big where the
output copies the input (summaries, edits, RAG answers).
"""

from __future__ import annotations

from argen.strategies.base import DecodeState
from argen.strategies.speculative.base import Speculative
from argen.strategies.speculative.tree import DraftTree


def find_continuation(tokens: list[int], min_ngram: int, max_ngram: int, k: int) -> list[int]:
    """Tokens that followed the most recent earlier occurrence of the longest matching suffix."""
    return find_match(tokens, min_ngram, max_ngram, k)[0]


def find_match(tokens: list[int], min_ngram: int, max_ngram: int, k: int) -> tuple[list[int], int]:
    """(continuation, length of the n-gram that matched; 0 if none)."""
    n_tokens = len(tokens)
    for n in range(min(max_ngram, n_tokens - 1), min_ngram - 1, -1):
        suffix = tokens[n_tokens - n :]
        # Scan backwards: the most recent occurrence is the best predictor of what comes next.
        for start in range(n_tokens - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                follow = tokens[start + n : start + n + k]
                if follow:
                    return follow, n
    return [], 0


class PromptLookup(Speculative):
    name = "prompt-lookup"
    cheap_drafts = True

    def __init__(self, max_draft: int = 10, min_ngram: int = 1, max_ngram: int = 3, adaptive: bool = True) -> None:
        super().__init__(max_draft, adaptive)
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.min_ngram, self.max_ngram = min_ngram, max_ngram

    def propose(self, state: DecodeState, k: int) -> DraftTree:
        follow, n = find_match(state.tokens, self.min_ngram, self.max_ngram, k)
        tree = DraftTree.chain(follow)
        tree.key = n  # longer matches are accepted more often: track them apart
        return tree
