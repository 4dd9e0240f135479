"""A pressed cache's front with a length of its own in every layer (per-layer budgets, PrefixKV), held
in the block pool.

A block holds `block_size` positions of every layer and kv head: pool.k[layer, :, block]. A front
whose layers keep different counts would waste the difference in whole blocks, so it is laid out by
*units* instead: a unit is one layer's share of one block (pool.k[s, :, b], `block_size` slots of
every kv head of layer s). The front owns whole blocks, and each of their units serves whichever
layer needs it: layer l's slots are its units in order, and a unit of block b may be layer s's share
while layer l's keys sit in it (it is just memory of the right shape). So the front holds
ceil(sum over layers of ceil(length_l / block_size) / layers) blocks: the average length, rounded
up to a block, plus at most one unit per layer; its blocks count in the pool like any other, so
admission and the byte accounting stay exact.

A front is written once (by a press, from copies) and never in place after, so forks share its
blocks; only its attention scores (`scores`, H2O's and PrefixKV's: the attention each slot has
received, per layer [kv heads, length_l]) are per fork.
"""

from __future__ import annotations

import copy

import torch


class LayerFront:
    def __init__(
        self, pool, keys: list[torch.Tensor], values: list[torch.Tensor], scores: list[torch.Tensor] | None = None
    ) -> None:
        """Write each layer's keys and values [kv heads, length_l, head dim] into freshly allocated blocks."""
        self.pool = pool
        size, n_layers = pool.block_size, len(keys)
        self.lengths = [int(k.shape[1]) for k in keys]
        units = [-(-n // size) for n in self.lengths]
        self.blocks = [pool.allocate() for _ in range(-(-sum(units) // n_layers))]
        every = [(s, b) for b in self.blocks for s in range(n_layers)]  # (layer share, block): all units
        self.unit_layer: list[torch.Tensor] = []
        self.unit_block: list[torch.Tensor] = []
        start = 0
        for k, v, u in zip(keys, values, units, strict=True):
            mine = every[start : start + u]
            start += u
            self.unit_layer.append(torch.tensor([s for s, _ in mine], dtype=torch.long))
            self.unit_block.append(torch.tensor([b for _, b in mine], dtype=torch.long))
            for store, x in ((pool.k, k), (pool.v, v)):
                padded = x.new_zeros(x.shape[0], u * size, x.shape[2])
                padded[:, : x.shape[1]] = x
                store[self.unit_layer[-1], :, self.unit_block[-1]] = padded.view(x.shape[0], u, size, -1).transpose(
                    0, 1
                )
        self.scores = scores

    @property
    def positions(self) -> int:
        """The slots the front stands for in its cache's numbering (SeqKV.offset): the mean length,
        rounded up (a press makes the lengths add up to a whole multiple of the layers)."""
        return -(-sum(self.lengths) // len(self.lengths))

    def length(self, i: int) -> int:
        return self.lengths[i]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys and values [kv heads, length_i, head dim] (copies out of the pool)."""

        def read(store: torch.Tensor) -> torch.Tensor:
            units = store[self.unit_layer[i], :, self.unit_block[i]]  # [units, kv heads, block size, dim]
            return units.transpose(0, 1).flatten(1, 2)[:, : self.lengths[i]]

        return read(self.pool.k), read(self.pool.v)

    def observe(self, i: int, received: torch.Tensor) -> None:
        """Add the attention layer i's slots received [kv heads, length_i]."""
        if self.scores is not None:
            self.scores[i] += received

    @property
    def nbytes(self) -> int:
        return len(self.blocks) * self.pool.bytes_per_block()

    def fork(self) -> LayerFront:
        """The same front for a fork: the blocks are shared (retained), the scores copied."""
        other = copy.copy(self)
        for block in self.blocks:
            self.pool.retain(block)
        other.scores = None if self.scores is None else [s.clone() for s in self.scores]
        return other

    def release(self) -> None:
        for block in self.blocks:
            self.pool.release(block)
        self.blocks = []
