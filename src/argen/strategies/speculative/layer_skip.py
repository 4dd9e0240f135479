"""Self-speculative drafting: the target model itself, running only some of its blocks, drafts a
chain that the full model verifies (LayerSkip / Draft & Verify; skipping only FFN sub-blocks as in
SkipDecode / FFN-SkipLLM is a special case of the same plan). Which blocks are skipped is chosen
by calibration (`skip_calibration`) unless given.

The draft's passes write keys and values into the target's own cache for the blocks they run;
the cache is truncated back before the verification pass overwrites those slots, so nothing of
the draft survives in it.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field

from argen.errors import InvalidRequestError
from argen.models.runtime import Plan
from argen.strategies.base import DecodeState, Feeds, Outs
from argen.strategies.speculative.adaptive import CostModel
from argen.strategies.speculative.base import Speculative, SpeculativeMemo
from argen.strategies.speculative.drafting import chain_tree, draw_chain
from argen.strategies.speculative.skip_calibration import Block, plan_skipping, skipped_blocks
from argen.strategies.speculative.tree import DraftTree


@dataclass
class LayerSkipMemo(SpeculativeMemo):
    blocks: list[Block] = field(default_factory=list)  # the sub-blocks the draft skips
    plan: Plan | None = None  # the draft's partial plan


class LayerSkip(Speculative):
    Memo = LayerSkipMemo
    name = "layer-skip"

    def __init__(
        self,
        max_draft: int = 6,
        skip_layers: list[int] | None = None,
        skip_ffn: list[int] | None = None,
        adaptive: bool = True,
    ) -> None:
        super().__init__(max_draft, adaptive)
        for option in (skip_layers, skip_ffn):
            if option is not None and not all(isinstance(i, int) and i >= 0 for i in option):
                raise ValueError("skip_layers and skip_ffn are lists of layer indices")
        self.skip_layers, self.skip_ffn = skip_layers, skip_ffn

    def check(self, runtime, prompt_len: int, params) -> None:
        if not runtime.capabilities.layer_plans:
            raise InvalidRequestError("layer-skip needs the native runtime (Llama-family models); use another strategy")
        n_layers = runtime.info.n_layers
        if any(i >= n_layers for i in (self.skip_layers or []) + (self.skip_ffn or [])):
            raise InvalidRequestError(f"skip_layers / skip_ffn must be below the model's {n_layers} layers")

    def start(self, state: DecodeState) -> None:
        runtime = state.runtime
        super().start(state)
        n_layers = runtime.info.n_layers
        if self.skip_layers is None and self.skip_ffn is None:
            blocks = skipped_blocks(runtime, CostModel.for_runtime(runtime), self.max_draft)
        else:
            blocks = [("attn", i) for i in self.skip_layers or []] + [
                ("ffn", i) for i in (self.skip_layers or []) + (self.skip_ffn or [])
            ]
        m = state.memo
        m.blocks = sorted(set(blocks))
        m.plan = plan_skipping(n_layers, m.blocks)
        state.extras["layer_skip"] = {"skipped_blocks": m.blocks}

    def propose(self, state: DecodeState, k: int) -> Generator[Feeds, Outs, DraftTree]:
        m = state.memo
        if not m.blocks or k == 0:
            return DraftTree()  # calibration found no skip set that pays: plain decoding
        start = state.cache.lengths[0]
        # Drafts run in the target's own cache with the partial plan, and are truncated before the
        # verification pass overwrites those slots.
        drafts, probs = yield from draw_chain(state, k, lambda token: state.feed([token], plan=m.plan, num_logits=1))
        state.cache.truncate(start)
        return chain_tree(drafts, probs)
