"""A preallocated KV cache: one tensor for keys and one for values, rows = sequences.

Each row has its own length, so sequences of different lengths decode together. Rolling back a
rejected draft is just `truncate`: slots past a row's length are never read.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * batch_size
        self.peak_length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def length(self) -> int:
        """The length of a single-sequence cache."""
        if len(self.lengths) != 1:
            raise ValueError("length is ambiguous for a batched cache; use lengths[row]")
        return self.lengths[0]

    def truncate(self, n: int, row: int | None = None) -> None:
        """Forget everything past the first `n` positions (of one row, or of every row)."""
        rows = range(len(self.lengths)) if row is None else [row]
        for r in rows:
            if n > self.lengths[r]:
                raise ValueError(f"cannot truncate row {r} of length {self.lengths[r]} to {n}")
            self.lengths[r] = n

    def move_slots(self, src: list[int], dst_start: int, row: int = 0) -> None:
        """Copy the keys/values at slots `src` to `dst_start, dst_start + 1, ...` (the accepted path
        of a draft tree is compacted this way before the rest is truncated)."""
        index = torch.tensor(src, device=self.k.device)
        dst = slice(dst_start, dst_start + len(src))
        self.k[:, row, :, dst] = self.k[:, row, :, index]
        self.v[:, row, :, dst] = self.v[:, row, :, index]

    def reserve(self, new_tokens: int) -> None:
        longest = max(self.lengths) + new_tokens
        if longest > self.max_len:
            raise ValueError(f"KV cache overflow: {longest} positions needed, {self.max_len} allocated")
        self.peak_length = max(self.peak_length, longest)

    def add_rows(self, n: int, max_len: int | None = None) -> list[int]:
        """Append `n` empty rows and grow every row to hold at least `max_len` positions; returns
        the new rows' indices. A serving loop admits requests one at a time, so storage is
        reallocated only when it is too small, and then with room to spare (rows rounded up to a
        power of two, length to a multiple of 64): the rows in use are a view of it, and `select` compacts in place."""
        rows, length = self.batch_size + n, max(self.max_len, max_len or 0)
        store = getattr(self, "_store", None)
        fits = (
            store is not None
            and self.k.data_ptr() == store[0].data_ptr()
            and store[0].shape[1] >= rows
            and store[0].shape[3] >= length
        )
        if not fits:
            n_layers, _, heads, _, dim = self.k.shape
            shape = (n_layers, 1 << (rows - 1).bit_length(), heads, -(-length // 64) * 64, dim)
            store = tuple(torch.zeros(shape, dtype=self.k.dtype, device=self.k.device) for _ in range(2))
            for new, old in zip(store, (self.k, self.v)):
                new[:, : self.batch_size, :, : self.max_len] = old
            self._store = store
        first = self.batch_size
        self.k, self.v = self._store[0][:, :rows], self._store[1][:, :rows]
        self.lengths += [0] * n
        return list(range(first, rows))

    def select(self, rows: list[int]) -> None:
        """Keep (and reorder, or repeat) the given rows: beams and finished batch rows use this."""
        store = getattr(self, "_store", None)
        if store is not None and self.k.data_ptr() == store[0].data_ptr() and rows == sorted(set(rows)):
            # Rows dropped from storage grown by add_rows: move the later rows up, used slots only.
            for j, r in enumerate(rows):
                if j != r:
                    n = self.lengths[r]
                    for t in store:
                        t[:, j, :, :n] = t[:, r, :, :n]
            self.k, self.v = store[0][:, : len(rows)], store[1][:, : len(rows)]
            self.lengths = [self.lengths[r] for r in rows]
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.k.device)
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
        self.lengths = [self.lengths[r] for r in rows]

    def row(self, r: int) -> KVCache:
        """A single-row cache sharing storage with row `r` (write back `lengths` after use)."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[:, r : r + 1], self.v[:, r : r + 1]
        view.lengths = [self.lengths[r]]
        view.peak_length = view.lengths[0]
        return view

    def bytes_per_position(self) -> int:
        n_layers, _, heads, _, dim = self.k.shape
        return 2 * n_layers * heads * dim * self.k.element_size()

    @property
    def allocated_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def used_bytes(self) -> int:
        return sum(self.lengths) * self.bytes_per_position()

    @property
    def peak_bytes(self) -> int:
        """Bytes of keys and values held at the longest point, per row, times the rows."""
        return self.peak_length * self.batch_size * self.bytes_per_position()
