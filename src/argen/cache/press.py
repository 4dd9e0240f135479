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

Every layer and head shares one block table, so a press keeps (or merges) the same positions in
all of them. Presses are registered by name for the API, the CLI and the server.
"""

from __future__ import annotations

import inspect
import math
from typing import ClassVar

import torch

from argen.checks import number_option
from argen.errors import InvalidRequestError


class Press:
    """A compression rule: `plan` says what the cache becomes; the rest is shared."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""

    def __init__(self, budget: float = 0.5) -> None:
        self.budget = _budget(budget)

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

    def __init__(self, budget: float = 0.5, sinks: int = 4) -> None:
        super().__init__(budget)
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
    runtime does not return attention weights, so the pivot here is the set's medoid (the member
    whose key is closest by cosine to the others)."""

    name = "kvmerger"
    paper = "Wang et al. 2024, arXiv:2407.08454"

    def __init__(self, budget: float = 0.5, sinks: int = 4, recent: int = 16) -> None:
        super().__init__(budget)
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
        sets, current = [], [0]
        for i in range(1, len(zone)):
            if joined[i - 1]:
                current.append(i)
            else:
                sets.append(current)
                current = [i]
        sets.append(current)
        first = next(j for j, members in enumerate(sets) if len(members) > 1)
        keys, values = [], []
        for members in sets[first:]:
            if len(members) == 1:
                keys.append(k[:, :, members[0]])
                values.append(v[:, :, members[0]])
                continue
            mk, mv = k[:, :, members], v[:, :, members]  # [L, H, m, D]
            mu = unit[:, :, members]
            pivot = (mu @ mu.transpose(-1, -2)).mean((0, 1)).sum(-1).argmax()
            dist = (mk - mk[:, :, pivot : pivot + 1]).pow(2).sum(-1)  # [L, H, m]
            sigma2 = dist.mean(-1, keepdim=True).clamp_min(1e-12)
            weight = torch.exp(-dist / (2 * sigma2))
            weight = (weight / weight.sum(-1, keepdim=True)).unsqueeze(-1)
            keys.append((weight * mk).sum(2))
            values.append((weight * mv).sum(2))
        tail = list(range(length - recent, length))
        tk, tv = read(cache, tail) if tail else (k[:, :, :0], v[:, :, :0])
        return sinks + first, torch.cat([torch.stack(keys, 2), tk], 2), torch.cat([torch.stack(values, 2), tv], 2)


PRESSES: dict[str, type[Press]] = {cls.name: cls for cls in (StreamingLLM, KVMerger)}


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


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a whole number >= 0; got {value!r}")
    return value
