"""The KV-cache press interface and what every press shares (the registry and the presses that
use it: press.py)."""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from argen.cache.quant import BITS
from argen.checks import number_option

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


def keep_slots(cache, kept: torch.Tensor) -> None:
    """Rewrite `cache` to hold, in each layer and kv head, the slots `kept` [layers, kv heads, target]
    names, in that order (from the first slot that changes anywhere)."""
    target = kept.shape[-1]
    same = (kept == torch.arange(target)).all(1).all(0)  # slots that keep their position everywhere
    first = int(same.logical_not().long().argmax()) if not bool(same.all()) else target
    k, v = cache.gathered()
    index = kept[..., first:, None].expand(-1, -1, -1, k.shape[-1])
    cache.rewrite(first, k.gather(2, index), v.gather(2, index))
    assert cache.lengths[0] == target, (cache.lengths[0], target)


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
        raise ValueError(
            f"chunk must be 0 (the whole prompt, then one press) or 16 to 8192 prompt positions "
            f"per pressed prefill chunk; got {value!r}"
        )
    return value


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a whole number >= 0; got {value!r}")
    return value
