"""KV-cache presses: compress what a sequence's paged cache holds to a budget, a fraction of the
positions the sequence has seen (0.5 keeps half), after the prefill (after each prefill chunk) and
as decoding grows the cache.

How a press runs (engine/sequence.py `Sequence.press`): between a strategy's steps, never inside
one, so the pending-token convention holds throughout (the cache holds every kept token but the
pending last one), and a verifier's `move_slots` / `truncate` work on the pressed cache as on any
other. A press is *due* when the cache uses more blocks than its target needs; it then rewrites the
cache to exactly `target(n)` positions (`SeqKV.rewrite`: the blocks past them go back to the pool).
The removed count joins `DecodeState.position_shift` (later tokens keep their true RoPE positions:
token i sits at i + shift, and the kept keys keep the rotation they were written with) and
`DecodeState.kv_evicted` (so `n`, the positions the sequence has seen, stays known).

Every layer and head shares one block table, so a press leaves the same number of slots in all
of them (`StreamingLLM` and `KVMerger` the same positions; `H2O` each head's own). `PrefixKV` gives
each layer a count of its own, in a front laid out by layer (cache/layer_front.py). The quantizing
presses (`KVQuant`, `GEAR`) keep every position instead, and move the oldest whole groups of them
into a low-bit store (cache/quant.py). Presses are registered by name
for the API, the CLI and the server.
"""

from __future__ import annotations

import inspect
import math
from typing import ClassVar

import torch

from argen.cache.quant import BITS, GROUP
from argen.checks import number_option
from argen.errors import InvalidRequestError

# A pressed prompt is prefilled in chunks of at most this many positions, pressed after each (by
# `generate` and the server alike, so both give the same output): a long prompt's peak is then its
# pressed prefix plus one chunk, which is what lets a server hold more pressed sequences. A press's
# `chunk` option changes it; chunk 0 prefills the whole prompt unpressed and presses it once, as
# kvpress does (the peak is then the whole prompt, but the press sees every prompt query first).
PRESS_CHUNK = 128


class Press:
    """A compression rule: `plan` says what the cache becomes; the rest is shared."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""

    chunk: int = PRESS_CHUNK

    def __init__(self, budget: float = 0.5, chunk: int = PRESS_CHUNK) -> None:
        self.budget = _budget(budget)
        self.chunk = _chunk(chunk)

    @property
    def changes_cache(self) -> bool:
        """Whether the press may change what the cache holds (budget 1 changes nothing): such a
        request prefills in chunks pressed one by one and takes no cached prefix."""
        return self.budget < 1

    # -- sizes ---------------------------------------------------------------------------------
    def target(self, n: int) -> int:
        """Positions kept once `n` have been seen: ceil(budget * n), at least 1 (and never more than n)."""
        return min(n, max(1, math.ceil(self.budget * n - 1e-9)))

    def due(self, length: int, n: int, block_size: int) -> bool:
        """Whether pressing frees a block: the cache (`length` positions) uses more blocks than target(n)."""
        return -(-length // block_size) > -(-self.target(n) // block_size)

    def worst_positions(self, prefill: int, total: int, chunk: int | None, growth: int, block_size: int) -> int:
        """The most positions a pressed sequence may hold at once: during the prefill (a chunk on top of
        a pressed prefix), or during a step (`growth` positions on top of a cache pressed to at most its
        target's blocks) with `total` positions seen at most. The admission reserves this."""
        def ceil_blocks(n: int) -> int:
            return -(-self.target(n) // block_size) * block_size

        peak_prefill = prefill if chunk is None else min(prefill, ceil_blocks(prefill) + chunk)
        return max(peak_prefill, ceil_blocks(total) + growth)

    # -- the rewrite ---------------------------------------------------------------------------
    def prepare(self, cache) -> None:
        """Set up a new sequence's cache before its prefill (a press that observes attention asks for it)."""

    def apply(self, cache, n: int) -> int:
        """Press `cache` (a SeqKV that stands for `n` positions) if due; returns the positions removed."""
        length = cache.lengths[0]
        if not self.due(length, n, cache.pool.block_size):
            return 0
        target = self.target(n)
        first, k, v = self.plan(cache, target)
        cache.rewrite(first, k, v)
        assert cache.lengths[0] == target, (self.name, cache.lengths[0], target)
        return length - target

    def plan(self, cache, target: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(the first position that changes, the keys and values [layers, heads, m, dim] of positions
        first .. target - 1 after the press)."""
        raise NotImplementedError

    def options(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def spec(self) -> dict:
        return {"name": self.name, **self.options()}


def read(cache, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [layers, heads, len(positions), dim] at these cache positions (copies)."""
    slots = cache.slots_of(torch.tensor(positions, dtype=torch.long))
    size = cache.pool.block_size
    return cache.pool.k[:, :, slots // size, slots % size], cache.pool.v[:, :, slots // size, slots % size]


class StreamingLLM(Press):
    """Attention sinks + a recent window (Xiao et al. 2023, "Efficient Streaming Language Models with
    Attention Sinks"): keep the first `sinks` positions and the most recent ones, evict the middle."""

    name = "streaming-llm"
    paper = "Xiao et al. 2023, arXiv:2309.17453"

    def __init__(self, budget: float = 0.5, sinks: int = 4, chunk: int = PRESS_CHUNK) -> None:
        super().__init__(budget, chunk)
        self.sinks = _count("sinks", sinks)

    def plan(self, cache, target: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        length = cache.lengths[0]
        sinks = min(self.sinks, target - 1)  # at least the newest position stays
        recent = list(range(length - (target - sinks), length))
        k, v = read(cache, recent)
        return sinks, k, v


class KVMerger(Press):
    """Merges runs of consecutive positions whose keys are alike (Wang et al. 2024, "Model Tells You
    Where to Merge: Adaptive KV Cache Merging for LLMs on Long-Context Tasks"). The similarity of
    neighbours i, i+1 is the cosine of their keys, averaged over layers and heads (one block table
    for all of them: a merge must be the same everywhere). To reach the budget, the most similar
    `length - target` neighbour pairs are joined (the paper's threshold, set where the budget
    falls), outside the first `sinks` and the last `recent` positions; each run of joined pairs is a
    merging set. A set becomes one position: keys and values averaged with Gaussian-kernel weights
    exp(-|k_i - k_p|^2 / 2 sigma^2) around its pivot p, per layer and head, sigma^2 being the set's
    mean squared distance to the pivot. The paper's pivot is the set's most-attended token; argen's
    runtime does not return attention weights, so the pivot here is the member whose key is closest
    by cosine to the set's mean key."""

    name = "kvmerger"
    paper = "Wang et al. 2024, arXiv:2407.08454"

    def __init__(self, budget: float = 0.5, sinks: int = 4, recent: int = 16, chunk: int = PRESS_CHUNK) -> None:
        super().__init__(budget, chunk)
        self.sinks = _count("sinks", sinks)
        self.recent = _count("recent", recent)

    def plan(self, cache, target: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        length = cache.lengths[0]
        sinks = min(self.sinks, target - 1)
        recent = min(self.recent, target - 1 - sinks)
        zone = list(range(sinks, length - recent))  # merged into target - sinks - recent positions
        k, v = read(cache, zone)
        unit = torch.nn.functional.normalize(k, dim=-1)
        similarity = (unit[:, :, 1:] * unit[:, :, :-1]).sum(-1).mean((0, 1))  # [len(zone) - 1]
        joined = torch.zeros(len(zone) - 1, dtype=torch.bool)
        joined[similarity.topk(length - target).indices] = True
        # Merging sets: a new set starts wherever a neighbour pair is not joined.
        set_of = torch.cat([torch.zeros(1, dtype=torch.long), (~joined).long().cumsum(0)])  # [Z]
        n_sets = int(set_of[-1]) + 1
        first = int(joined.long().argmax())  # zone index of the first set with more than one member
        merged_k, merged_v = _merge(k, v, unit, set_of, n_sets)
        tail = list(range(length - recent, length))
        tk, tv = read(cache, tail) if tail else (k[:, :, :0], v[:, :, :0])
        # Sets before `first` are single positions, unchanged: the rewrite starts at the first merged one.
        return (sinks + first, torch.cat([merged_k[:, :, first:], tk], 2),
                torch.cat([merged_v[:, :, first:], tv], 2))  # fmt: skip


def _merge(k: torch.Tensor, v: torch.Tensor, unit: torch.Tensor, set_of: torch.Tensor,
           n_sets: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Each set's keys and values [L, H, n_sets, D], Gaussian-kernel weighted around its pivot: the
    member whose key is closest by cosine to the set's mean key (averaged over layers and heads; the
    first such member on a tie). A set of one keeps its key and value exactly."""
    dtype, device = k.dtype, k.device
    k, v, unit, set_of = k.float(), v.float(), unit.float(), set_of.to(device)
    L, H, Z, D = k.shape

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, device=device)

    centroid = zeros(L, H, n_sets, D).index_add_(2, set_of, unit)
    closeness = (unit * centroid[:, :, set_of]).sum(-1).mean((0, 1))  # [Z]
    best = torch.full((n_sets,), -torch.inf, device=device).scatter_reduce(0, set_of, closeness, "amax")
    candidates = torch.where(closeness >= best[set_of], torch.arange(Z, device=device), Z)
    pivot = torch.full((n_sets,), Z, device=device).scatter_reduce(0, set_of, candidates, "amin")  # [n_sets]
    dist = (k - k[:, :, pivot[set_of]]).pow(2).sum(-1)  # [L, H, Z]
    count = zeros(n_sets).index_add_(0, set_of, torch.ones(Z, device=device))
    sigma2 = (zeros(L, H, n_sets).index_add_(2, set_of, dist) / count).clamp_min(1e-12)
    weight = torch.exp(-dist / (2 * sigma2[:, :, set_of]))
    weight = (weight / zeros(L, H, n_sets).index_add_(2, set_of, weight)[:, :, set_of]).unsqueeze(-1)
    merged_k = zeros(L, H, n_sets, D).index_add_(2, set_of, weight * k)
    merged_v = zeros(L, H, n_sets, D).index_add_(2, set_of, weight * v)
    return merged_k.to(dtype), merged_v.to(dtype)


class H2O(Press):
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

    def __init__(self, budget: float = 0.5, heavy: float = 0.5, per_head: bool = True,
                 chunk: int = PRESS_CHUNK) -> None:  # fmt: skip
        super().__init__(budget, chunk)
        self.heavy = number_option("heavy", heavy, 0.0, 1.0, " (the share of the kept positions chosen by attention)")
        if not isinstance(per_head, bool):
            raise ValueError(f"per_head must be true or false; got {per_head!r}")
        self.per_head = per_head

    def prepare(self, cache) -> None:
        if self.changes_cache:
            cache.attention = torch.zeros(0)

    def apply(self, cache, n: int) -> int:
        length = cache.lengths[0]
        if not self.due(length, n, cache.pool.block_size):
            return 0
        attention = cache.attention
        if attention is None or attention.dim() != 3 or attention.shape[-1] != length:
            raise RuntimeError("h2o needs the attention its cache received: call prepare(cache) before the prefill")
        target = self.target(n)
        recent = max(1, target - round(self.heavy * target))  # the newest position always stays
        layers, heads = attention.shape[:2]
        scores = attention[..., : length - recent]
        if not self.per_head:
            scores = scores.sum((0, 1), keepdim=True)
        heavy = scores.topk(target - recent, dim=-1).indices.sort(-1).values.expand(layers, heads, -1)
        tail = torch.arange(length - recent, length).expand(layers, heads, -1)
        kept = torch.cat([heavy, tail], -1)  # [layers, kv heads, target]: the slots' positions
        same = (kept == torch.arange(target)).all(1).all(0)  # slots that keep their position everywhere
        first = int(same.logical_not().long().argmax()) if not bool(same.all()) else target
        k, v = cache.gathered()
        index = kept[..., first:, None].expand(-1, -1, -1, k.shape[-1])
        attention = attention.gather(-1, kept)
        cache.rewrite(first, k.gather(2, index), v.gather(2, index))
        cache.attention = attention
        assert cache.lengths[0] == target, (self.name, cache.lengths[0], target)
        return length - target


class PrefixKV(Press):
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
        super().__init__(budget, chunk)
        self.heavy = number_option("heavy", heavy, 0.0, 1.0, " (the share of the kept positions chosen by attention)")

    def prepare(self, cache) -> None:
        if self.changes_cache:
            cache.attention = torch.zeros(0)

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
            raise RuntimeError("prefix-kv needs the attention its cache received: call prepare(cache) before the prefill")
        target = self.target(n)
        size = cache.pool.block_size
        slots = cache.slots(offset, length - offset)
        block_k, block_v = (t[:, :, slots // size, slots % size] for t in (cache.pool.k, cache.pool.v))
        front = cache.layer_front
        layers = range(block_k.shape[0])
        keys, values, scores = [], [], []
        for i in layers:  # each layer's slots: its front's, then the blocks'
            fk, fv = front.layer(i) if front is not None else (block_k[i, :, :0], block_v[i, :, :0])
            keys.append(torch.cat([fk, block_k[i]], 1))
            values.append(torch.cat([fv, block_v[i]], 1))
            scores.append(torch.cat([front.scores[i], attention[i]], 1) if front is not None else attention[i])
        recent = max(1, target - round(self.heavy * target))  # the newest slots stay in every layer
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


class KVQuant(Press):
    """Plain KV quantization (KIVI's layout, Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit
    Quantization for KV Cache"): keys per channel, values per token, `bits` each, in groups of
    GROUP positions. Every position is kept; the newest (up to GROUP - 1 + `recent`) stay in fp32
    blocks until a whole group is older than the `recent` newest."""

    name = "kv-quant"
    paper = "Liu et al. 2024, arXiv:2402.02750"

    def __init__(self, bits: int = 8, recent: int = 0) -> None:
        self.bits = _bits(bits)
        self.recent = _count("recent", recent)

    @property
    def budget(self) -> float:  # type: ignore[override]  # every position is kept
        return 1.0

    @property
    def changes_cache(self) -> bool:
        return True

    def codec(self) -> dict:
        return {"bits": self.bits}

    def apply(self, cache, n: int) -> int:
        """Quantize the whole groups older than the `recent` newest positions; nothing is removed."""
        m = (cache.lengths[0] - cache.offset - self.recent) // GROUP * GROUP
        if m > 0:
            cache.quantize_front(m, **self.codec())
        return 0

    def worst_positions(self, prefill: int, total: int, chunk: int | None, growth: int, block_size: int) -> int:
        # The quantized store is held outside the block pool: admission reserves every position in
        # blocks, as for no press, so a quantizing press never lets a server overcommit its memory.
        return total + growth


class GEAR(KVQuant):
    """GEAR (Kang et al. 2024, "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless
    Generative Inference of LLM"): `kv-quant`, plus a sparse matrix of the largest-magnitude
    `outliers` fraction of entries kept exactly, plus a rank-`rank` approximation of the
    quantization residual, per layer, head and group."""

    name = "gear"
    paper = "Kang et al. 2024, arXiv:2403.05527"

    def __init__(self, bits: int = 4, rank: int = 4, outliers: float = 0.02, recent: int = 0) -> None:
        super().__init__(bits, recent)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= GROUP:
            raise ValueError(f"rank must be a whole number from 0 to {GROUP}; got {rank!r}")
        self.rank = rank
        self.outliers = number_option("outliers", outliers, 0.0, 0.5, " (the fraction of entries kept exactly)")

    def codec(self) -> dict:
        return {"bits": self.bits, "rank": self.rank, "outliers": self.outliers}


PRESSES: dict[str, type[Press]] = {cls.name: cls for cls in (StreamingLLM, KVMerger, H2O, PrefixKV, KVQuant, GEAR)}


def press_options(cls: type[Press]) -> dict[str, object]:
    params = inspect.signature(cls.__init__).parameters
    return {n: p.default for n, p in params.items() if n != "self"}


def make_press(spec) -> Press | None:
    """A press from None (no press), a name (`"streaming-llm"`), a dict (`{"name": "kvmerger",
    "budget": 0.35}`) or a Press (returned as is)."""
    if spec is None or isinstance(spec, Press):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise InvalidRequestError(f"a press is a name, a dict with 'name' and its options, or a Press; got {spec!r}")
    name = spec["name"]
    if name not in PRESSES:
        raise InvalidRequestError(f"unknown press {name!r}; valid presses: {', '.join(sorted(PRESSES))}")
    cls = PRESSES[name]
    options = {k: v for k, v in spec.items() if k != "name"}
    valid = press_options(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listed = ", ".join(f"{k} (default {v!r})" for k, v in valid.items())
        raise InvalidRequestError(f"unknown option(s) {', '.join(unknown)} for press {name!r}; valid: {listed}")
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"bad option for press {name!r}: {exc}") from exc


def _budget(value) -> float:
    budget = number_option("budget", value, 0.0, 1.0, " (the fraction of positions kept, e.g. 0.5)")
    if budget <= 0:
        raise ValueError(f"budget must be more than 0 (the fraction of positions kept, e.g. 0.5); got {value!r}")
    return budget


def _bits(value) -> int:
    if value not in BITS or isinstance(value, bool):
        raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}; got {value!r}")
    return value


def _chunk(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (value == 0 or 16 <= value <= 8192):
        raise ValueError(f"chunk must be 0 (the whole prompt, then one press) or 16 to 8192 prompt positions "
                         f"per pressed prefill chunk; got {value!r}")  # fmt: skip
    return value


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a whole number >= 0; got {value!r}")
    return value
