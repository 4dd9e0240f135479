"""Presses that choose by attention: H2O (the attention each position has received), SnapKV (an
observation window of the newest queries) and PrefixKV (H2O's choice with a count of its own per layer)."""

from __future__ import annotations

import torch

from argen.cache.press_base import PRESS_CHUNK, Press, keep_slots, read
from argen.cache.records import attention_received
from argen.checks import number_option


class _ByAttention(Press):
    """A press that scores positions by the attention they have received (`SeqKV.attention`) and keeps
    the `heavy` share of its budget by that score, the newest positions for the rest."""

    def __init__(self, budget: float, heavy: float, chunk: int) -> None:
        super().__init__(budget, chunk)
        self.heavy = number_option("heavy", heavy, 0.0, 1.0, " (the share of the kept positions chosen by attention)")

    def prepare(self, cache) -> None:
        if self.changes_cache:
            cache.attention = torch.zeros(0)

    def recent(self, target: int) -> int:
        """The newest positions kept (the newest always is)."""
        return max(1, target - round(self.heavy * target))


class H2O(_ByAttention):
    """Heavy hitters + recent window (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient
    Generative Inference of Large Language Models"): every position's score is the attention it has
    received so far, accumulated over the queries that saw it; a press keeps the `heavy` share of the
    budget with the highest scores and the newest positions for the rest. As in the paper, each layer
    and kv head keeps its own heavy hitters (`per_head`): they share one block table, so each keeps
    the same number of slots, and slot j may hold a different position in each (attention does not
    care where a held key came from: RoPE rotated it when it was written, and every held key is in
    the past of every new query). `per_head=False` sums the scores over layers and heads and keeps the
    same positions everywhere. Observing the attention takes torch's forward path (the fused C
    forward does not compute the weights)."""

    name = "h2o"
    paper = "Zhang et al. 2023, arXiv:2306.14048"

    def __init__(
        self, budget: float = 0.5, heavy: float = 0.5, per_head: bool = True, chunk: int = PRESS_CHUNK
    ) -> None:
        super().__init__(budget, heavy, chunk)
        if not isinstance(per_head, bool):
            raise ValueError(f"per_head must be true or false; got {per_head!r}")
        self.per_head = per_head

    def apply(self, cache, n: int) -> int:
        length = cache.lengths[0]
        if not self.due(length, n, cache.pool.block_size):
            return 0
        attention = cache.attention
        if attention is None or attention.dim() != 3 or attention.shape[-1] != length:
            raise RuntimeError("h2o needs the attention its cache received: call prepare(cache) before the prefill")
        target = self.target(n)
        recent = self.recent(target)
        layers, heads = attention.shape[:2]
        scores = attention[..., : length - recent]
        if not self.per_head:
            scores = scores.sum((0, 1), keepdim=True)
        heavy = scores.topk(target - recent, dim=-1).indices.sort(-1).values.expand(layers, heads, -1)
        tail = torch.arange(length - recent, length).expand(layers, heads, -1)
        kept = torch.cat([heavy, tail], -1)  # [layers, kv heads, target]: the slots' positions
        attention = attention.gather(-1, kept)
        keep_slots(cache, kept)
        cache.attention = attention
        return length - target


class SnapKV(Press):
    """An observation window (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before
    Generation"): the last `window_size` queries' attention, summed over them (and over the query heads of
    each kv head), smoothed along the positions by average pooling of width `kernel` (a kept position
    brings its neighbours' context), picks each layer and kv head's positions; the window's own
    positions stay. The queries are the ones fed last (the cache keeps the newest `window_size`,
    `SeqKV.window`), so while decoding the window slides over the newest tokens; with `chunk=0` the
    prompt is pressed once with its own last queries, as in the paper (and kvpress). Per head: slot j
    may hold a different position in each, as for `h2o`. The window may hold draft queries a
    verifier rejected (prompt-lookup): they only shape the scores."""

    name = "snapkv"
    paper = "Li et al. 2024, arXiv:2404.14469"

    def __init__(self, budget: float = 0.5, window_size: int = 32, kernel: int = 7, chunk: int = PRESS_CHUNK) -> None:
        super().__init__(budget, chunk)
        if isinstance(window_size, bool) or not isinstance(window_size, int) or not 1 <= window_size <= 1024:
            raise ValueError(f"window_size must be a whole number of queries from 1 to 1024; got {window_size!r}")
        if isinstance(kernel, bool) or not isinstance(kernel, int) or not (1 <= kernel <= 63 and kernel % 2):
            raise ValueError(f"kernel must be an odd whole number from 1 to 63 (positions pooled); got {kernel!r}")
        self.window_size, self.kernel = window_size, kernel

    def prepare(self, cache) -> None:
        if self.changes_cache:
            cache.window = QueryWindow(self.window_size)

    def apply(self, cache, n: int) -> int:
        length = cache.lengths[0]
        if not self.due(length, n, cache.pool.block_size):
            return 0
        if cache.window is None:
            raise RuntimeError("snapkv needs the queries its cache was fed: call prepare(cache) before the prefill")
        target = self.target(n)
        recent = min(self.window_size, target)
        k, _ = cache.gathered()
        scores = cache.window.scores(k, length)[..., : length - recent]  # [layers, kv heads, candidates]
        if self.kernel > 1:
            pad = self.kernel // 2
            scores = torch.nn.functional.avg_pool1d(
                scores.flatten(0, 1)[:, None], self.kernel, 1, pad, count_include_pad=False
            )[:, 0].view(scores.shape)
        heavy = scores.topk(target - recent, dim=-1).indices.sort(-1).values
        tail = torch.arange(length - recent, length).expand(*heavy.shape[:2], -1)
        keep_slots(cache, torch.cat([heavy, tail], -1))
        cache.window.renumber(length - recent, length - target)
        return length - target


class QueryWindow:
    """The newest `size` queries a cache was fed, per layer [rows, heads, head dim] (rotated, as
    attention sees them), with the slot each was written to: SnapKV's observation window. Each layer
    keeps its own rows (a layer-skipping plan may skip a layer's attention for some tokens)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.queries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (queries, their slots)

    @property
    def slots(self) -> torch.Tensor:
        return self.queries[0][1] if 0 in self.queries else torch.zeros(0, dtype=torch.long)

    def add(self, layer: int, q: torch.Tensor, first_slot: int) -> None:
        new = torch.arange(first_slot, first_slot + q.shape[0])
        old_q, old_slots = self.queries.get(layer, (q.new_zeros(0, *q.shape[1:]).float(), new[:0]))
        self.queries[layer] = (torch.cat([old_q, q.float()])[-self.size :], torch.cat([old_slots, new])[-self.size :])

    def scores(self, keys: torch.Tensor, length: int) -> torch.Tensor:
        """The attention the window's queries give each slot of `keys` [layers, kv heads, length, dim],
        summed over them and over each kv head's query heads [layers, kv heads, length]. A query sees
        the slots up to its own; one whose slot is past the cache's length (a rejected draft) is left out."""
        layers, kv_heads, _, dim = keys.shape
        out = []
        for i in range(layers):
            q, slots = self.queries.get(i, (keys.new_zeros(0, kv_heads, dim), torch.zeros(0, dtype=torch.long)))
            valid = slots < length
            visible = torch.arange(length)[None] <= slots[valid][:, None]  # [rows, length]
            out.append(attention_received(q[valid], keys[i], visible, False))
        return torch.stack(out)

    def renumber(self, tail: int, removed: int) -> None:
        """After a press that kept the slots from `tail` on at the end and removed `removed` before them:
        the queries of those slots move with them; the others' positions are gone."""
        for i, (q, slots) in self.queries.items():
            keep = slots >= tail
            self.queries[i] = (q[keep], slots[keep] - removed)

    def fork(self) -> QueryWindow:
        other = QueryWindow(self.size)
        other.queries = dict(self.queries)  # tensors are replaced, never written in place
        return other


class PrefixKV(_ByAttention):
    """Per-layer budgets (after Wang et al. 2024, "PrefixKV: Adaptive Prefix KV Cache is What Vision
    Instruction-Following Models Need for Efficient Generation"): H2O's heavy hitters + recent window,
    but each layer keeps its own number of positions, allotted from how its attention is spread.
    Each layer ranks its positions by the attention they received (per kv head, as `h2o` does) and
    keeps a prefix of that ranking; PrefixKV chooses one retention ratio p for all layers, and each
    layer keeps the shortest prefix that holds p of its attention mass, p being as high as the budget
    allows. Here slot j of layer l is taken when its layer's retention before it is among the
    `budget`'s count of lowest over all layers (the same equal-p rule, which fills the budget
    exactly): a layer whose attention sits on a few positions keeps few, a layer that spreads it
    keeps many. The average over layers is the budget's, so the bytes are the same as `h2o`'s.
    Departure: the paper searches p offline on a few samples and fixes the layers' shares; here they
    are searched per sequence at every press (the search is a sort, cheap beside the forward).
    The layers' different lengths live in a LayerFront (cache/layer_front.py) in the block pool."""

    name = "prefix-kv"
    paper = "Wang et al. 2024, arXiv:2412.03409"

    def __init__(self, budget: float = 0.5, heavy: float = 0.5, chunk: int = PRESS_CHUNK) -> None:
        super().__init__(budget, heavy, chunk)

    def due(self, length: int, n: int, block_size: int, held: int | None = None) -> bool:
        """Pressing frees memory: more positions than the target, and at least a block of them in blocks."""
        return length > self.target(n) and (length if held is None else held) >= block_size

    def worst_positions(self, prefill: int, total: int, chunk: int | None, growth: int, block_size: int) -> int:
        # The front rounds each layer up to a unit (at most one block in all) and presses only once
        # a block has filled after it (one more): two blocks beyond what the base case reserves.
        return super().worst_positions(prefill, total, chunk, growth, block_size) + 2 * block_size

    def apply(self, cache, n: int) -> int:
        length, offset = cache.lengths[0], cache.offset
        if not self.due(length, n, cache.pool.block_size, length - offset):
            return 0
        attention = cache.attention
        if attention is None or attention.dim() != 3 or attention.shape[-1] != length - offset:
            raise RuntimeError(
                "prefix-kv needs the attention its cache received: call prepare(cache) before the prefill"
            )
        target = self.target(n)
        block_k, block_v = read(cache, list(range(offset, length)))
        front = cache.layer_front
        layers = range(block_k.shape[0])
        keys, values, scores = [], [], []
        for i in layers:  # each layer's slots: its front's, then the blocks'
            fk, fv = front.layer(i) if front is not None else (block_k[i, :, :0], block_v[i, :, :0])
            keys.append(torch.cat([fk, block_k[i]], 1))
            values.append(torch.cat([fv, block_v[i]], 1))
            scores.append(torch.cat([front.scores[i], attention[i]], 1) if front is not None else attention[i])
        recent = self.recent(target)  # the newest slots stay in every layer
        counts = allot([s[:, : s.shape[1] - recent] for s in scores], len(layers) * (target - recent))
        kept_k, kept_v, kept_scores = [], [], []
        for k, v, s, count in zip(keys, values, scores, counts, strict=True):
            total = s.shape[1]
            heavy = s[:, : total - recent].topk(count, dim=-1).indices.sort(-1).values
            kept = torch.cat([heavy, torch.arange(total - recent, total).expand(s.shape[0], -1)], -1)
            index = kept[..., None].expand(-1, -1, k.shape[-1])
            kept_k.append(k.gather(1, index))
            kept_v.append(v.gather(1, index))
            kept_scores.append(s.gather(1, kept))
        cache.press_into_front(kept_k, kept_v, kept_scores)
        assert cache.lengths[0] == target, (self.name, cache.lengths[0], target)
        return length - target


def allot(scores: list[torch.Tensor], total: int) -> list[int]:
    """PrefixKV's per-layer counts: `total` slots over the layers, given each layer's candidates'
    scores [kv heads, candidates]. A layer's retention after k slots is the share of its attention
    mass its heads' top k hold (mean over heads); the k-th slot of a layer is taken when the retention
    before it is among the `total` lowest of all layers' (ties: the earlier layer), i.e. every layer
    keeps the shortest prefix that reaches one common retention p, as high as `total` allows."""
    before = []
    for s in scores:
        ranked = s.float().sort(-1, descending=True).values
        mass = ranked.sum(-1, keepdim=True).clamp_min(1e-30)
        retention = (ranked.cumsum(-1) / mass).mean(0)  # after 1, 2, .. slots
        before.append(torch.cat([retention.new_zeros(1), retention[:-1]]))  # before slot 1, 2, ..
    flat = torch.cat(before)
    layer_of = torch.cat([torch.full((len(b),), i) for i, b in enumerate(before)])
    total = min(total, len(flat))
    # A stable order by (retention before, layer, rank): the prefixes stay prefixes under ties.
    order = torch.from_numpy(flat.numpy().argsort(kind="stable"))[:total]
    return torch.bincount(layer_of[order], minlength=len(scores)).tolist()
