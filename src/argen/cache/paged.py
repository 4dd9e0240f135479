"""Paged KV memory: fixed-size blocks shared by every sequence of a runtime, a block table per
sequence, prefix caching, copy-on-write forks (as vLLM's `KVCacheManager` and SGLang's radix cache).

- `BlockPool` owns the storage, `k` and `v` [layers, kv heads, blocks, block size, head dim] (a
  sequence's keys for one head gather into one contiguous [positions, head dim] view). The
  tensors are allocated once at their largest (`max_blocks`) with `torch.empty`, so the operating
  system commits memory only for the blocks written; freed blocks are reused first (a stack), so the
  blocks in use stay few and compact.
- `SeqKV` is one sequence's cache: its block table and length. It has the old single-row KVCache's
  interface (`lengths`, `reserve`, `truncate`, `move_slots`, byte accounting), so strategies see no
  difference, plus `fork` (beams, drafts that share a prefix) with copy-on-write.
- A quantizing press (`kv-quant`, `gear`) moves a sequence's oldest whole blocks into a compressed
  store (`SeqKV.quantized`, cache/quant.py) and gives the blocks back: the block table then starts
  at position `SeqKV.offset`, and attention reads the store (dequantized one layer at a time) before
  the blocks.
- A per-layer press (`prefix-kv`) moves everything a sequence holds into a front with a length of its
  own in each layer (`LayerFront`, cache/layer_front.py), laid out in the pool's blocks by layer
  shares; the blocks then hold the positions written since.
- Prefix caching: a full block whose tokens follow a known prefix is addressed by a hash of (the
  previous block's hash, its tokens, its positions). A new sequence with the same prompt start reuses
  those blocks instead of computing them. Blocks nobody holds stay cached until space is needed, and
  then the least recently used goes first. Space is needed before the pool would write a block it
  has never written: the cache lives in memory the sequences have already used and never grows the
  process (a server's resident set stays at the most its running requests held at once).
"""

from __future__ import annotations

import hashlib
import sys
from collections import OrderedDict

import torch

from argen.cache.kv import QueryRecord
from argen.cache.layer_front import LayerFront
from argen.cache.quant import QuantizedKV, compress

BLOCK_SIZE = 16  # positions per block (vLLM's default): short requests waste at most 15 slots each


class KVCacheFull(RuntimeError):
    """Every block is held by a running sequence."""


class BlockPool:
    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_blocks: int,
        block_size: int = BLOCK_SIZE,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layers, n_kv_heads, max_blocks, block_size, head_dim)
        # Never inference tensors, even when the first pass to need the pool runs under inference
        # mode (a store build): strategies edit the cache in place outside it (move_slots).
        with torch.inference_mode(False):
            self.k = torch.empty(shape, dtype=dtype, device=device)
            self.v = torch.empty(shape, dtype=dtype, device=device)
        self.block_size, self.max_blocks = block_size, max_blocks
        self.refs = [0] * max_blocks
        self.free = list(range(max_blocks - 1, -1, -1))  # a stack: low block ids first
        self.hash_of: dict[int, bytes] = {}
        self.by_hash: dict[bytes, int] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, held by nobody; oldest first
        self.peak_held = 0
        # Blocks below this id have been written (the OS committed their memory). The free stack holds the
        # never-written ids at its bottom, highest first, and every freed (written) id above them.
        self.written = 0

    # -- accounting ----------------------------------------------------------------------------
    def bytes_per_block(self) -> int:
        n_layers, heads, _, size, dim = self.k.shape
        return 2 * n_layers * heads * size * dim * self.k.element_size()

    def bytes_per_position(self) -> int:
        return self.bytes_per_block() // self.block_size

    @property
    def held(self) -> int:
        """Blocks held by some sequence (cached blocks nobody holds are not counted)."""
        return self.max_blocks - len(self.free) - len(self.evictable)

    @property
    def held_bytes(self) -> int:
        return self.held * self.bytes_per_block()

    # -- blocks --------------------------------------------------------------------------------
    def allocate(self) -> int:
        fresh = bool(self.free) and self.free[-1] >= self.written
        if self.free and not (fresh and self.evictable):
            block = self.free.pop()
            self.written = max(self.written, block + 1)
        elif self.evictable:  # a cached block before fresh memory: the prefix cache never grows the process
            block, _ = self.evictable.popitem(last=False)  # the least recently used cached block
            del self.by_hash[self.hash_of.pop(block)]
        else:
            raise KVCacheFull(
                f"the KV cache is full: all {self.max_blocks} blocks of {self.block_size} positions "
                "are held by running sequences"
            )
        self.refs[block] = 1
        self.peak_held = max(self.peak_held, self.held)
        return block

    def retain(self, block: int) -> None:
        if self.refs[block] == 0:
            self.evictable.pop(block, None)
        self.refs[block] += 1
        self.peak_held = max(self.peak_held, self.held)

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.hash_of:
                self.evictable[block] = None  # content kept for prefix hits until space is needed
            else:
                self.free.append(block)

    def lookup(self, key: bytes) -> int | None:
        """A cached block with this prefix hash, retained for the caller; None if not cached."""
        block = self.by_hash.get(key)
        if block is not None:
            self.retain(block)
            self.evictable.pop(block, None)
        return block

    def register(self, block: int, key: bytes) -> None:
        """Make a full block findable by its prefix hash (the first block with a hash keeps it)."""
        if key in self.by_hash or block in self.hash_of:
            return
        self.by_hash[key] = block
        self.hash_of[block] = key

    def drop_cached(self) -> int:
        """Forget every cached block nobody holds (a cold prefix cache); returns how many."""
        dropped = len(self.evictable)
        for block in self.evictable:
            del self.by_hash[self.hash_of.pop(block)]
            self.free.append(block)
        self.evictable.clear()
        return dropped

    def copy_block(self, src: int, dst: int) -> None:
        self.k[:, :, dst] = self.k[:, :, src]
        self.v[:, :, dst] = self.v[:, :, src]


def new_caches(pool: BlockPool, max_len: int, batch_size: int = 1) -> SeqKV | list[SeqKV]:
    """`batch_size` empty sequences in `pool` of at most `max_len` positions each (one: the SeqKV
    itself): what a paged runtime's `new_cache` hands out."""
    caches = [SeqKV(pool, max_len) for _ in range(batch_size)]
    return caches[0] if batch_size == 1 else caches


def block_hash(previous: bytes, tokens: list[int], positions: list[int]) -> bytes:
    """The prefix-cache key of a full block: it stands for every token and position before it."""
    data = previous + b"|" + ",".join(map(str, tokens)).encode() + b"|" + ",".join(map(str, positions)).encode()
    return hashlib.blake2b(data, digest_size=16).digest()


class SeqKV:
    """One sequence's keys and values in a BlockPool: a block table and a length. `max_len` is the
    most positions the sequence may hold (its request's budget); reserving past it is an error.
    The slots before `offset` (0 unless a quantizing or per-layer press ran) are in `front`, not in
    blocks: a quantized store (the same positions in every layer) or a LayerFront (a length per layer,
    `offset` their mean)."""

    def __init__(self, pool: BlockPool, max_len: int) -> None:
        self.pool, self.max_len = pool, max_len
        self.blocks: list[int] = []
        self.lengths = [0]  # the KVCache interface: one row
        self.peak_length = 0
        self.hashes: list[bytes] = []  # prefix hashes of the leading full blocks that are registered
        self.front: QuantizedKV | LayerFront | None = None
        self.peak_front_bytes = 0  # the most bytes held at once, once there is a front
        # Attention each held slot has received [layers, kv heads, length], summed over the queries
        # (and the query heads of each kv head): H2O's score; None: not observed. The forward pass adds
        # to it (models/llama.py). It covers the slots in blocks; a LayerFront keeps its own.
        self.attention: torch.Tensor | None = None
        # SnapKV's observation window (cache/press_attention.py QueryWindow): the newest queries fed,
        # added by the forward pass; None: not observed.
        self.window: QueryRecord | None = None

    @property
    def offset(self) -> int:
        """The first slot held in blocks (the ones before it are in the front)."""
        return 0 if self.front is None else self.front.positions

    @property
    def needs_own_pass(self) -> bool:
        """Whether a pass reads a pressed front or writes attention records / a query window (the
        runtime then runs it in a torch pass of its own: the fused C forward does none of these)."""
        return self.front is not None or self.attention is not None or self.window is not None

    @property
    def quantized(self) -> QuantizedKV | None:
        return self.front if isinstance(self.front, QuantizedKV) else None

    @property
    def layer_front(self) -> LayerFront | None:
        return self.front if isinstance(self.front, LayerFront) else None

    @property
    def length(self) -> int:
        return self.lengths[0]

    @property
    def batch_size(self) -> int:
        return 1

    def reserve(self, new_tokens: int) -> None:
        """Room for `new_tokens` more positions: blocks are added as needed, and a block shared with
        another sequence that is about to be written is copied first (copy-on-write)."""
        length, size = self.lengths[0], self.pool.block_size
        end = length + new_tokens
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions needed, {self.max_len} allotted")
        first_written = (length - self.offset) // size
        for i in range(first_written, min(len(self.blocks), -(-(end - self.offset) // size))):
            block = self.blocks[i]
            if self.pool.refs[block] > 1 or block in self.pool.hash_of:
                fresh = self.pool.allocate()
                self.pool.copy_block(block, fresh)
                self.pool.release(block)
                self.blocks[i] = fresh
                del self.hashes[i:]
        while len(self.blocks) * size < end - self.offset:
            self.blocks.append(self.pool.allocate())
        self.peak_length = max(self.peak_length, end)
        if self.front is not None:
            self.peak_front_bytes = max(self.peak_front_bytes, self.held_bytes)

    def truncate(self, n: int, row: int | None = None) -> None:
        if n > self.lengths[0]:
            raise ValueError(f"cannot truncate a cache of length {self.lengths[0]} to {n}")
        if n < self.offset:
            if n:
                raise ValueError(
                    f"cannot truncate to {n} positions: the first {self.offset} are pressed into a front "
                    "(quantized, or a length per layer)"
                )
            if self.layer_front is not None:
                self.layer_front.release()
            self.front = None  # freeing the whole cache
        if self.attention is not None:
            self.attention = self.attention[..., : n - self.offset]
        self.lengths[0] = n
        keep = -(-(n - self.offset) // self.pool.block_size)
        # Last block first (as vLLM frees): a cached prefix is evicted from its end, so what stays
        # cached is still a prefix that a later request (or a prompt edit) can take.
        for block in reversed(self.blocks[keep:]):
            self.pool.release(block)
        del self.blocks[keep:]
        del self.hashes[n // self.pool.block_size :]

    def slots(self, start: int, n: int) -> torch.Tensor:
        """Flat slot indices (block * block_size + offset) of positions start .. start + n - 1."""
        return self.slots_of(torch.arange(start, start + n))

    def slots_of(self, positions: torch.Tensor) -> torch.Tensor:
        size = self.pool.block_size
        table = torch.tensor(self.blocks, dtype=torch.long)
        positions = positions - self.offset
        if len(positions) and int(positions.min()) < 0:
            raise ValueError(f"slots before {self.offset} are in the front: they have no block slot")
        return table[positions // size] * size + positions % size

    def move_slots(self, src: list[int], dst_start: int, row: int = 0) -> None:
        """Copy the keys/values at positions `src` to `dst_start, dst_start + 1, ...` (a draft tree's
        accepted path is compacted this way before the rest is truncated)."""
        if not src:
            return
        size = self.pool.block_size
        source, target = self.slots_of(torch.tensor(src)), self.slots(dst_start, len(src))
        for t in (self.pool.k, self.pool.v):
            t[:, :, target // size, target % size] = t[:, :, source // size, source % size]
        if self.attention is not None:
            at = dst_start - self.offset
            self.attention[..., at : at + len(src)] = self.attention[..., torch.tensor(src) - self.offset].clone()

    def append_from(self, source: SeqKV, start: int, n: int) -> None:
        """Append `source`'s positions start .. start + n - 1 (both caches in one pool; a prompt edit
        moves the keys after the edit this way, then rotates them: cache/pie.py)."""
        if source.pool is not self.pool:
            raise ValueError("both caches must be in one pool")
        if n <= 0:
            return
        first = self.lengths[0]
        self.reserve(n)
        size = self.pool.block_size
        src, dst = source.slots(start, n), self.slots(first, n)
        for t in (self.pool.k, self.pool.v):
            t[:, :, dst // size, dst % size] = t[:, :, src // size, src % size]
        self.lengths[0] = first + n

    def rewrite(self, first: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Replace positions `first` .. with `k`, `v` [layers, kv heads, m, head dim]: the cache then
        holds first + m positions (a KV-cache press). The blocks past the new length go back to the
        pool first, and a shared or registered block is copied before it is written (as `reserve`
        does), so forks and the prefix cache keep their content."""
        m = k.shape[2]
        self.truncate(first)
        self.reserve(m)
        size = self.pool.block_size
        target = self.slots(first, m)
        self.pool.k[:, :, target // size, target % size] = k
        self.pool.v[:, :, target // size, target % size] = v
        self.lengths[0] = first + m

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This sequence's keys and values [layers, kv heads, length, head dim], copied out of the blocks
        (and the quantized store, dequantized; for tests and inspection). A LayerFront's lengths differ
        per layer: read it with `layer_front.layer(i)` instead."""
        if self.layer_front is not None:
            raise ValueError("a per-layer front has a length per layer: read it with cache.layer_front.layer(i)")
        slots = self.slots(self.offset, self.lengths[0] - self.offset)
        size = self.pool.block_size
        k, v = (t[:, :, slots // size, slots % size] for t in (self.pool.k, self.pool.v))
        if self.quantized is not None:
            front = [self.quantized.layer(i) for i in range(k.shape[0])]
            k = torch.cat([torch.stack([f[0] for f in front]).to(k.dtype), k], 2)
            v = torch.cat([torch.stack([f[1] for f in front]).to(v.dtype), v], 2)
        return k, v

    def observe(self, layer: int, received: torch.Tensor) -> None:
        """Add the attention the first received.shape[-1] slots received in layer `layer` during a pass,
        per kv head [kv heads, slots] (H2O's score; a LayerFront's slots come first and keep theirs)."""
        if self.layer_front is not None:
            m = self.layer_front.length(layer)
            self.layer_front.observe(layer, received[:, :m])
            received = received[:, m:]
        attention, n = self.attention, received.shape[-1]
        if attention is None or attention.dim() != 3:
            attention = received.new_zeros(self.pool.k.shape[0], received.shape[0], 0)
        if attention.shape[-1] < n:
            attention = torch.cat([attention, attention.new_zeros(*attention.shape[:2], n - attention.shape[-1])], -1)
        attention[layer, :, :n] += received
        self.attention = attention

    def quantize_front(self, m: int, bits: int, rank: int = 0, outliers: float = 0.0) -> None:
        """Move the first `m` positions held in blocks (whole quantization groups) into the quantized
        store, and give their blocks back to the pool."""
        size = self.pool.block_size
        assert m % size == 0 and m <= self.lengths[0] - self.offset, (m, self.offset, self.lengths[0])
        assert self.layer_front is None, "a cache has one kind of front"
        if self.front is None:
            self.peak_front_bytes = self.peak_bytes  # the peak so far, all in blocks
        slots = self.slots(self.offset, m)
        k, v = (t[:, :, slots // size, slots % size] for t in (self.pool.k, self.pool.v))
        new = compress(k, v, bits, rank, outliers)
        self.front = new if self.quantized is None else self.quantized.extend(new)
        for block in self.blocks[: m // size]:
            self.pool.release(block)
        del self.blocks[: m // size]
        self.hashes.clear()  # block i no longer holds positions i * size ..: nothing more is registered
        self.peak_front_bytes = max(self.peak_front_bytes, self.held_bytes)

    def press_into_front(
        self, keys: list[torch.Tensor], values: list[torch.Tensor], scores: list[torch.Tensor] | None
    ) -> None:
        """Replace everything the cache holds with a LayerFront of these keys and values per layer
        [kv heads, length_l, head dim] (copies: the blocks they came from go back to the pool first);
        the cache then holds the front's mean length, and new positions go to blocks after it."""
        if self.front is None:
            self.peak_front_bytes = self.peak_bytes
        self.truncate(0)
        self.front = LayerFront(self.pool, keys, values, scores)
        self.lengths[0] = self.front.positions
        self.hashes.clear()
        if self.attention is not None:
            self.attention = self.attention.new_zeros(len(keys), keys[0].shape[0], 0)
        self.peak_front_bytes = max(self.peak_front_bytes, self.held_bytes)

    def fork(self) -> SeqKV:
        """A second sequence with the same content, sharing every block until one of them writes."""
        other = SeqKV(self.pool, self.max_len)
        for block in self.blocks:
            self.pool.retain(block)
        other.blocks, other.lengths, other.hashes = list(self.blocks), list(self.lengths), list(self.hashes)
        other.peak_length = self.peak_length
        # A front is never written in place: a quantized one is shared as is, a LayerFront's blocks retained.
        other.front = self.layer_front.fork() if self.layer_front is not None else self.front
        other.peak_front_bytes = self.peak_front_bytes
        other.attention = None if self.attention is None else self.attention.clone()
        other.window = None if self.window is None else self.window.fork()
        return other

    def free(self) -> None:
        self.truncate(0)

    def __del__(self) -> None:
        # The engine frees every cache it makes; this gives back the blocks of one a caller of
        # `runtime.new_cache` dropped without freeing (or an exception abandoned), so a leak cannot
        # outlive the object. Not at interpreter exit: the pool dies too, and slicing `attention`
        # there (truncate) made torch abort in THPVariable_clear (exit code 134) when a cache was
        # still alive at exit (a kept traceback, as pytest keeps its last failure's).
        if sys.is_finalizing():
            return
        try:
            if self.blocks or self.front is not None:
                self.free()
        except Exception:  # interpreter shutdown: the pool may be gone already
            pass

    # -- prefix caching ------------------------------------------------------------------------
    def attach_prefix(self, tokens: list[int], positions: list[int]) -> int:
        """Take the cached blocks that continue what this cache holds with `tokens` (at `positions`;
        both from the sequence's start); returns how many tokens are now in the cache. Only a cache
        whose every block is registered (a fresh one, or one that registered what it computed) can
        take more."""
        size = self.pool.block_size
        if self.lengths[0] != len(self.hashes) * size or self.offset:
            return self.lengths[0]
        for i in range(len(self.hashes), len(tokens) // size):
            previous = self.hashes[-1] if self.hashes else b""
            key = block_hash(previous, tokens[i * size : (i + 1) * size], positions[i * size : (i + 1) * size])
            block = self.pool.lookup(key)
            if block is None:
                break
            self.blocks.append(block)
            self.hashes.append(key)
        self.lengths[0] = len(self.blocks) * size
        self.peak_length = max(self.peak_length, self.lengths[0])
        return self.lengths[0]

    def register_prefix(self, tokens: list[int], positions: list[int]) -> None:
        """Register the full blocks now holding `tokens[:length]` for later prefix hits."""
        size = self.pool.block_size
        if self.offset:
            return
        for i in range(len(self.hashes), min(self.lengths[0], len(tokens)) // size):
            previous = self.hashes[-1] if self.hashes else b""
            key = block_hash(previous, tokens[i * size : (i + 1) * size], positions[i * size : (i + 1) * size])
            self.pool.register(self.blocks[i], key)
            self.hashes.append(key)

    # -- accounting ----------------------------------------------------------------------------
    def bytes_per_position(self) -> int:
        return self.pool.bytes_per_position()

    @property
    def quantized_bytes(self) -> int:
        return 0 if self.quantized is None else self.quantized.nbytes

    @property
    def held_blocks(self) -> list[int]:
        """The pool blocks this cache holds: its block table's and its LayerFront's."""
        return self.blocks + (self.layer_front.blocks if self.layer_front is not None else [])

    @property
    def held_bytes(self) -> int:
        return len(self.held_blocks) * self.pool.bytes_per_block() + self.quantized_bytes

    @property
    def peak_bytes(self) -> int:
        size = self.pool.block_size
        if self.front is not None:
            return self.peak_front_bytes
        return -(-self.peak_length // size) * self.pool.bytes_per_block()
