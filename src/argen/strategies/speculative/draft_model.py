"""Speculative decoding with a separate, smaller draft model (Leviathan et al.; Chen et al.), and
with several drafts verified together under sampling (SpecTr).

The draft model keeps its own KV cache. It lags the target by the tokens accepted since its last
pass; each step first feeds it those (one pass), then draws the chain. Any model with the target's
vocabulary works: the engine below the tokenizer sees only ids, so the check is that both give
logits over the same vocabulary size; sharing a tokenizer is the caller's promise.
"""

from __future__ import annotations

import torch

from argen.errors import InvalidRequestError
from argen.strategies.base import DecodeState
from argen.strategies.speculative.base import Speculative
from argen.strategies.speculative.drafting import draw_chain
from argen.strategies.speculative.tree import DraftTree


def draft_runtime(source, device) -> object:
    """The draft's runtime: a source is loaded once per process (`shared_model`); a Generator, a
    LoadedModel or a runtime is used as it is."""
    if not isinstance(source, str):
        return getattr(source, "runtime", source)
    from argen.models import shared_model

    return shared_model(source, device=str(device)).runtime


class DraftModel(Speculative):
    name = "draft-model"
    companion_options = {"draft": "draft"}

    def __init__(self, draft: object = None, max_draft: int = 4, num_drafts: int = 1, adaptive: bool = True) -> None:
        super().__init__(max_draft, adaptive)
        if draft is None:
            raise ValueError("give the draft model: draft=SOURCE (a model source such as a directory or 'tiny-random')")
        if not isinstance(draft, str) and not any(hasattr(draft, a) for a in ("runtime", "info")):
            raise ValueError("draft must be a model source (e.g. 'tiny-random@1' or a directory), a Generator, a "
                             f"LoadedModel or a runtime; got {type(draft).__name__}")  # fmt: skip
        if not isinstance(num_drafts, int) or num_drafts < 1:
            raise ValueError("num_drafts must be an integer >= 1")
        self.draft, self.num_drafts = draft, num_drafts

    def options(self) -> dict:
        draft = self.draft  # a loaded model is recorded by its name
        return super().options() | {
            "draft": draft if isinstance(draft, str) else getattr(draft, "name", type(draft).__name__)
        }

    def max_tree_nodes(self) -> int:
        return self.max_draft * self.num_drafts

    def check(self, runtime, prompt_len: int, params) -> None:
        if not isinstance(self.draft, str):  # a source is loaded (and then checked) by start()
            _check_vocab(runtime, draft_runtime(self.draft, runtime.device))

    def start(self, state: DecodeState) -> None:
        super().start(state)
        self._runtime = draft_runtime(self.draft, state.runtime.device)
        _check_vocab(state.runtime, self._runtime)
        self._cache = self._runtime.new_cache(1, state.cache.max_len)

    def _feed(self, tokens: list[int]) -> torch.Tensor:
        start = self._cache.lengths[0]
        ids = torch.tensor([tokens], device=self._runtime.device)
        positions = torch.arange(start, start + len(tokens), device=self._runtime.device)[None]
        logits, _ = self._runtime.forward(ids, positions, self._cache, num_logits=1)
        return logits[0, -1]

    def propose(self, state: DecodeState, k: int) -> DraftTree:
        if k == 0:
            return DraftTree()
        # Catch up: the draft cache holds a prefix of the sequence; feed the rest, pending included.
        known = self._cache.lengths[0]
        first = self._feed(state.tokens[known:])
        state.counters.draft_passes += 1
        base = self._cache.lengths[0]
        chains = 1 if state.sampler.params.greedy else self.num_drafts
        tree = DraftTree()
        for chain in range(chains):

            def feed(token: int) -> torch.Tensor:
                state.counters.draft_passes += 1
                return self._feed([token])

            drafts, probs = draw_chain(state, k, feed, chain=chain, first_logits=first)
            self._cache.truncate(base)  # every chain starts from the same prefix
            parent = -1
            for depth, token in enumerate(drafts):
                parent = tree.add(token, parent)
                if probs:
                    tree.draft_probs = (tree.draft_probs or []) + [probs[depth]]
        return tree

    def observe(self, state: DecodeState, verdict) -> None:
        # Keep what the draft cache holds of the new sequence: the old tokens (pending included).
        self._cache.truncate(min(self._cache.lengths[0], len(state.tokens)))


def _check_vocab(target, drafter) -> None:
    if target.info.vocab_size != drafter.info.vocab_size:
        raise InvalidRequestError(
            f"the draft model's vocabulary ({drafter.info.vocab_size} tokens) differs from the target's "
            f"({target.info.vocab_size}); use a draft model with the same tokenizer"
        )
