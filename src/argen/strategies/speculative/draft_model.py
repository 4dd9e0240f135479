"""Speculative decoding with a separate, smaller draft model (Leviathan et al.; Chen et al.), and
with several drafts verified together under sampling (SpecTr).

The draft model keeps its own KV cache. It lags the target by the tokens accepted since its last
pass; each step first feeds it those (one pass), then draws the chain. Any model with the target's
vocabulary works: the engine below the tokenizer sees only ids, so the check is that both give
logits over the same vocabulary size; sharing a tokenizer is the caller's promise.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

from argen.cache.kv import KVCache
from argen.errors import InvalidRequestError
from argen.models.runtime import ModelRuntime
from argen.strategies.base import DecodeState, Feed, Feeds, Outs, run
from argen.strategies.companions import companion_runtime, is_companion, unresolved
from argen.strategies.speculative.base import Speculative, SpeculativeMemo
from argen.strategies.speculative.drafting import draw_chain
from argen.strategies.speculative.tree import DraftTree


@dataclass
class DraftModelMemo(SpeculativeMemo):
    runtime: ModelRuntime | None = None  # the draft model's runtime
    cache: KVCache | None = None  # the draft's cache: a prefix of the sequence


class DraftModel(Speculative):
    Memo = DraftModelMemo
    name = "draft-model"
    companion_options = {"draft": "draft"}

    def __init__(self, draft: object = None, max_draft: int = 4, num_drafts: int = 1, adaptive: bool = True) -> None:
        super().__init__(max_draft, adaptive)
        if draft is None:
            raise ValueError("give the draft model: draft=SOURCE (a model source such as a directory or 'tiny-random')")
        if not is_companion(draft):
            raise ValueError(
                "draft must be a model source (e.g. 'tiny-random@1' or a directory), a Generator, a "
                f"LoadedModel or a runtime; got {type(draft).__name__}"
            )
        if not isinstance(num_drafts, int) or num_drafts < 1:
            raise ValueError("num_drafts must be an integer >= 1")
        self.draft, self.num_drafts = draft, num_drafts
        self._draft_runtime: ModelRuntime | None = None  # resolved by the API or the server: prepare()

    def options(self) -> dict:
        draft = self.draft  # a loaded model is recorded by its name
        return super().options() | {
            "draft": draft if isinstance(draft, str) else getattr(draft, "name", type(draft).__name__)
        }

    def max_tree_nodes(self) -> int:
        return self.max_draft * self.num_drafts

    def prepare(self, base, companions: dict | None = None) -> None:
        """Called by the API or the server with the draft model they resolved (`companions["draft"]`)."""
        draft = (companions or {}).get("draft")
        if draft is None:
            raise unresolved(self.name, "draft")
        self._draft_runtime = companion_runtime(draft)
        _check_vocab(base.runtime, self._draft_runtime)

    def check(self, runtime, prompt_len: int, params) -> None:
        if self._draft_runtime is not None:  # else start() says it was never resolved
            _check_vocab(runtime, self._draft_runtime)

    def start(self, state: DecodeState) -> None:
        if self._draft_runtime is None:
            raise unresolved(self.name, "draft")
        super().start(state)
        m = state.memo
        m.runtime = self._draft_runtime
        m.cache = state.new_cache(m.runtime, state.cache.max_len)

    @staticmethod
    def _feed(m, tokens: list[int]) -> Feed:
        start = m.cache.lengths[0]
        return Feed(list(tokens), list(range(start, start + len(tokens))), None, None, 1, m.cache, m.runtime, True)

    def propose(self, state: DecodeState, k: int) -> Generator[Feeds, Outs, DraftTree]:
        m = state.memo
        # Catch up: the draft cache holds a prefix of the sequence; feed the rest, pending included.
        out = yield from run(self._feed(m, state.tokens[m.cache.lengths[0] :]))
        first = out.requested_logits()[-1]
        base = m.cache.lengths[0]
        chains = 1 if state.sampler.params.greedy else self.num_drafts
        tree = DraftTree()
        for chain in range(chains):
            drafts, probs = yield from draw_chain(
                state, k, lambda token: self._feed(m, [token]), chain=chain, first_logits=first
            )
            m.cache.truncate(base)  # every chain starts from the same prefix
            parent = -1
            for depth, token in enumerate(drafts):
                parent = tree.add(token, parent)
                if probs:
                    tree.draft_probs = (tree.draft_probs or []) + [probs[depth]]
        return tree

    def observe(self, state: DecodeState, verdict) -> None:
        # Keep what the draft cache holds of the new sequence: the old tokens (pending included).
        cache = state.memo.cache
        cache.truncate(min(cache.lengths[0], len(state.tokens)))


def _check_vocab(target, drafter) -> None:
    if target.info.vocab_size != drafter.info.vocab_size:
        raise InvalidRequestError(
            f"the draft model's vocabulary ({drafter.info.vocab_size} tokens) differs from the target's "
            f"({target.info.vocab_size}); use a draft model with the same tokenizer"
        )
