"""The KV cache contract: what the engine, the strategies and the runtimes may ask of a cache.

`KVCache` is what every cache offers (the paged `SeqKV`, and `HFCache` over transformers'
DynamicCache): its length, room, rollback (`truncate`, rejected drafts), forks (copy-on-write, for
n samples and beams), and byte accounting. `PagedKV` adds what the native runtime reads from and
writes to a paged cache in a forward pass: the block table, a pressed front before `offset`, and
the records a press keeps (the attention each key received, for H2O / prefix-kv; a window of the
newest queries, for SnapKV). A runtime reads these declared members, never probes with `getattr`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch


class KVCache(Protocol):
    """One sequence's cache (the pending last token is never in it)."""

    lengths: list[int]  # one row: positions held
    max_len: int  # positions it may hold (prompt + budget + the strategy's slack)
    peak_length: int

    @property
    def length(self) -> int: ...

    def reserve(self, new_tokens: int) -> None:
        """Make room for `new_tokens` more positions before a pass writes them."""

    def truncate(self, n: int, row: int | None = None) -> None:
        """Keep the first n positions (a rejected draft rolls back)."""

    def move_slots(self, src: list[int], dst_start: int, row: int = 0) -> None:
        """Move the given positions to dst_start.. (an accepted tree path becomes a chain)."""

    def fork(self) -> KVCache:
        """A copy-on-write copy: a sample of n, a beam, a draft branch."""

    def free(self) -> None:
        """Give everything back (the pool's blocks, a front)."""

    def bytes_per_position(self) -> int: ...

    @property
    def peak_bytes(self) -> int: ...


class Front(Protocol):
    """Positions before a paged cache's `offset`, pressed (cache/quant.py QuantizedKV, cache/layer_front.py LayerFront)."""

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys and values [kv heads, length_i, head dim]."""
        ...


class QueryRecord(Protocol):
    """The newest queries a pass feeds, per layer (SnapKV's QueryWindow, cache/press_attention.py)."""

    def add(self, layer: int, q: torch.Tensor, first_slot: int) -> None: ...

    def fork(self) -> QueryRecord: ...


class PagedKV(KVCache, Protocol):
    """A paged cache (cache/paged.py SeqKV), as the native runtime reads it in a forward pass."""

    blocks: list[int]  # the block table: position p is in blocks[(p - offset) // block_size]
    front: Front | None  # positions before `offset`, pressed (QuantizedKV or LayerFront)
    attention: torch.Tensor | None  # [layers, kv heads, positions]: attention each key received
    window: QueryRecord | None  # SnapKV's QueryWindow: the newest queries fed, per layer

    @property
    def offset(self) -> int:
        """The first position held in blocks (those before it are in `front`)."""

    @property
    def needs_own_pass(self) -> bool:
        """Whether a pass must read a front or write records (the fused C forward does neither)."""

    def slots(self, start: int, n: int) -> torch.Tensor:
        """The pool slots of positions start..start+n (block * block_size + offset in the block)."""
        ...

    def observe(self, layer: int, received: torch.Tensor) -> None:
        """Add the attention the keys received from a pass's queries in `layer` (attention records)."""
