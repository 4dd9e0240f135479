"""Block-quantized weights (GGUF's Q4_0, Q4_1 and Q8_0) and the linear layer that applies them.

A `QuantWeight` holds a weight [N, K] the way a GGUF file does: blocks of 32 weights along K, each
with an fp16 scale `d` (and, for Q4_1, an fp16 minimum `m`) and 4- or 8-bit codes. Dequantized,
w = d * q + m (Q4_1), d * (q - 8) (Q4_0) or d * q (Q8_0), each exact in fp32, so these weights
are bit for bit those of the fp32 model that gguf-py's dequantizer makes from the same file.

`QuantMatmul` applies one with argen's CPU kernels (`kernels/cpu_kernels.c`): at load it repacks
the blocks (`pack`: the same bytes, rows interleaved in groups of the kernels' vector width so one
vector load serves that many output rows) and keeps only the packed copy. Up to
`KERNEL_MAX_ROWS` rows of activations are multiplied block by block, dequantizing in registers,
in fp32; larger inputs (prefills) dequantize the weight to fp32 once per call and use torch's
GEMM, which is faster there.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass, replace
from typing import cast

import torch
import torch.nn.functional as F

from argen.models.kernels import KernelLibrary, QWeightStruct, library

QK = 32  # weights per block
FORMATS = {"q4_0": 0, "q4_1": 1, "q8_0": 2}
# Above this many rows, the weight is dequantized (into a per-shape buffer that stays) for torch's
# GEMM. Since the outer-product tiles the block kernel keeps up with that GEMM to about 256 rows
# (benchmarks/prefill), so this only needs to cover what reaches a QuantMatmul outside the fused
# forward: the vocabulary head on prompt scoring's 64-row blocks, which then never makes the 113 MB
# fp32 copy of SmolLM2's vocabulary matrix a server would otherwise keep (issue 24's memory check).
KERNEL_MAX_ROWS = 64


@dataclass
class QuantWeight:
    fmt: str  # "q4_0" | "q4_1" | "q8_0"
    qs: torch.Tensor  # codes: uint8 [N, K/2] (two 4-bit codes a byte) or int8 [N, K]
    d: torch.Tensor  # fp16 [N, K/32]
    m: torch.Tensor | None = None  # fp16 [N, K/32], Q4_1 only

    @property
    def shape(self) -> tuple[int, int]:
        return self.d.shape[0], self.d.shape[1] * QK

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.qs, self.d, self.m) if t is not None]

    def rows(self, index) -> QuantWeight:
        """The weight's rows `index` (a permutation or a selection): whole rows move, blocks unchanged."""
        return replace(
            self,
            qs=self.qs[index].contiguous(),
            d=self.d[index].contiguous(),
            m=None if self.m is None else self.m[index].contiguous(),
        )

    @staticmethod
    def cat(weights: list[QuantWeight]) -> QuantWeight:
        """Stack weights with the same K and format along N (fused QKV and gate/up projections)."""
        if len(weights) == 1:
            return weights[0]  # no copy: a tied vocabulary head shares the embedding's blocks
        fmt = weights[0].fmt
        if any(w.fmt != fmt for w in weights):
            raise ValueError("cannot fuse weights of different formats: " + ", ".join(w.fmt for w in weights))
        # Q4_1 blocks carry their mins (m), the other formats none.
        m = None if fmt != "q4_1" else torch.cat([cast(torch.Tensor, w.m) for w in weights])
        return QuantWeight(fmt, torch.cat([w.qs for w in weights]), torch.cat([w.d for w in weights]), m)

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 [N, K], exactly as gguf-py dequantizes."""
        w = self._dequantize_torch()
        return w if out is None else out.copy_(w)

    def _dequantize_torch(self) -> torch.Tensor:
        n, k = self.shape
        d = self.d.float()[..., None]
        if self.fmt == "q8_0":
            return (self.qs.view(n, -1, QK).float() * d).view(n, k)
        q = self.qs.view(n, -1, QK // 2)
        q = torch.cat([q & 0x0F, q >> 4], dim=-1).float()  # byte j: weight j (low nibble), j + 16 (high)
        if self.fmt == "q4_0":
            return ((q - 8) * d).view(n, k)
        assert self.m is not None  # Q4_1 blocks carry their mins
        return (q * d + self.m.float()[..., None]).view(n, k)  # d * q is exact: one rounding, as fma

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` dequantized: the token embedding of a quantized (tied) vocabulary matrix."""
        flat = ids.reshape(-1)
        return self.rows(flat)._dequantize_torch().view(*ids.shape, self.shape[1])


def quantize(weight: torch.Tensor, fmt: str) -> QuantWeight:
    """Quantize an fp32 weight [N, K] (K a multiple of 32) the way llama.cpp's reference quantizers do.
    For tests and for `quant="q8_0"` / `"q4_1"` on models that come as fp32 checkpoints."""
    n, k = weight.shape
    if k % QK:
        raise ValueError(f"block quantization needs the input size to be a multiple of {QK}; got {k}")
    blocks = weight.detach().float().reshape(n, k // QK, QK)
    if fmt == "q8_0":
        amax = blocks.abs().amax(-1)
        d = (amax / 127).half()
        inv = torch.where(d.float() > 0, 1 / d.float(), torch.zeros(()))
        q = (blocks * inv[..., None]).round().clamp(-128, 127).to(torch.int8)
        return QuantWeight(fmt, q.reshape(n, k), d)
    if fmt == "q4_1":
        lo, hi = blocks.amin(-1), blocks.amax(-1)
        d, m = ((hi - lo) / 15).half(), lo.half()
        inv = torch.where(d.float() > 0, 1 / d.float(), torch.zeros(()))
        q = ((blocks - m.float()[..., None]) * inv[..., None]).round().clamp(0, 15).to(torch.uint8)
    elif fmt == "q4_0":
        idx = blocks.abs().argmax(-1, keepdim=True)
        peak = blocks.gather(-1, idx)[..., 0]  # signed value of largest magnitude, as ggml does
        d = (peak / -8).half()
        inv = torch.where(d.float() != 0, 1 / d.float(), torch.zeros(()))
        q = (blocks * inv[..., None] + 8).round().clamp(0, 15).to(torch.uint8)
        m = None
    else:
        raise ValueError(f"unknown block format {fmt!r}; use one of {', '.join(FORMATS)}")
    packed = q[..., : QK // 2] | (q[..., QK // 2 :] << 4)
    return QuantWeight(fmt, packed.reshape(n, k // 2).contiguous(), d, m)


def _codes(weight: QuantWeight) -> torch.Tensor:
    """The codes as uint8 [N, K/32, 32], in column order (Q8_0's int8 bytes as they are)."""
    n, k = weight.shape
    if weight.fmt == "q8_0":
        return weight.qs.view(torch.uint8).reshape(n, k // QK, QK)
    q = weight.qs.reshape(n, k // QK, QK // 2)
    return torch.cat([q & 0x0F, q >> 4], dim=-1)  # GGUF byte j: weight j (low nibble), j + 16 (high)


def record_bytes(fmt: str, width: int) -> int:
    """Bytes of one packed record: one block of 32 columns for a group of `width` rows."""
    return width * ({"q4_0": 18, "q4_1": 20, "q8_0": 34}[fmt])


def _segments(fmt: str, act8: bool) -> tuple[int, int]:
    """A record's codes as (segments, bytes per row in a segment): one column (or a Q4 pair) per
    segment for the fp32 path, 4 columns per segment for the a8 path's 4-byte integer dot products."""
    if act8:
        return (8, 4) if fmt == "q8_0" else (4, 4)
    return (32, 1) if fmt == "q8_0" else (16, 1)


def pack(weight: QuantWeight, width: int, chunk: int, act8: bool = False) -> torch.Tensor:
    """The kernels' layout (cpu_kernels.c): rows in groups of `width` (the last padded with zero
    rows); one record per group and block of 32 columns = the group's fp16 scales, then (Q4_1)
    minimums, then the codes in segments, `width` rows side by side in each (fp32 path: a column, or
    for Q4 columns 2p and 2p + 1 in a byte; a8 path: 4 columns a row, for Q4 columns 4u..4u+3 with
    16 + 4u..16 + 4u + 3 in the high nibbles); records ordered chunk by chunk (`chunk` groups),
    block by block within a chunk."""
    n, k = weight.shape
    groups, nb = -(-n // width), k // QK
    codes = _codes(weight)  # [n, nb, 32]
    segments, per_row = _segments(weight.fmt, act8)
    if weight.fmt != "q8_0":
        low, high = (codes[..., 0::2], codes[..., 1::2]) if not act8 else (codes[..., :16], codes[..., 16:])
        codes = low | (high << 4)
    # Q4_1 blocks carry their mins (m), the other formats none.
    mins = [cast(torch.Tensor, weight.m).reshape(n, nb, 1, 1)] if weight.fmt == "q4_1" else []
    parts = [weight.d.reshape(n, nb, 1, 1)] + mins
    parts.append(codes.reshape(n, nb, segments, per_row))
    out = []
    for part in parts:
        part = F.pad(part, (0, 0, 0, 0, 0, 0, 0, groups * width - n))  # zero rows: codes 0, scales 0
        part = part.reshape(groups, width, *part.shape[1:]).permute(0, 2, 3, 1, 4).contiguous()  # [G, nb, S, W, E]
        out.append(part.view(torch.uint8).reshape(groups, nb, -1))
    records = torch.cat(out, dim=-1)  # [G, nb, record]
    packed = torch.cat([records[c : c + chunk].transpose(0, 1).reshape(-1) for c in range(0, groups, chunk)])
    assert packed.numel() == groups * nb * record_bytes(weight.fmt, width)
    return packed


def unpack(packed: torch.Tensor, fmt: str, n: int, k: int, width: int, chunk: int, act8: bool = False) -> QuantWeight:
    """The QuantWeight that `pack` packed (its inverse)."""
    groups, nb, size = -(-n // width), k // QK, record_bytes(fmt, width)
    pieces, at = [], 0
    for c in range(0, groups, chunk):
        cg = min(chunk, groups - c)
        pieces.append(packed[at : at + nb * cg * size].view(nb, cg, size).transpose(0, 1))
        at += nb * cg * size
    records = torch.cat(pieces)  # [G, nb, record]
    scales = 2 if fmt == "q4_1" else 1
    segments, per_row = _segments(fmt, act8)

    def rows(part: torch.Tensor, dtype: torch.dtype, s: int, e: int) -> torch.Tensor:
        part = part.contiguous().view(dtype).reshape(groups, nb, s, width, e)
        return part.permute(0, 3, 1, 2, 4).reshape(groups * width, nb, s * e)[:n]

    d = rows(records[..., : 2 * width], torch.float16, 1, 1).reshape(n, nb)
    m = rows(records[..., 2 * width : 4 * width], torch.float16, 1, 1).reshape(n, nb) if scales == 2 else None
    codes = rows(records[..., 2 * scales * width :], torch.uint8, segments, per_row)
    if fmt == "q8_0":
        return QuantWeight(fmt, codes.reshape(n, k).view(torch.int8).contiguous(), d.contiguous())
    if act8:
        q = torch.cat([codes & 0x0F, codes >> 4], dim=-1)  # columns 0..15, then 16..31
    else:
        q = torch.stack([codes & 0x0F, codes >> 4], dim=-1).reshape(n, nb, QK)  # columns 2p, 2p + 1
    gguf = q[..., : QK // 2] | (q[..., QK // 2 :] << 4)
    return QuantWeight(fmt, gguf.reshape(n, k // 2).contiguous(), d.contiguous(), None if m is None else m.contiguous())


_local = threading.local()


def _scratch(n: int, k: int) -> torch.Tensor:
    """One fp32 buffer per weight shape (and thread) for dequantized prefills: reused, so it stays in
    cache, and never shared between threads that run models at once."""
    buffers = _local.__dict__.setdefault("buffers", {})
    if (n, k) not in buffers:
        buffers[(n, k)] = torch.empty(n, k)
    return buffers[(n, k)]


class QuantMatmul:
    """`x @ W^T (+ bias)` for a QuantWeight W [N, K], fp32 activations and accumulation. Holds W
    packed for the kernels (`pack`), not the QuantWeight it was made from."""

    def __init__(
        self,
        weight: QuantWeight,
        bias: torch.Tensor | None = None,
        lib: KernelLibrary | None = None,
        act8: bool = False,
    ):
        """act8: the "a8" path, activations rounded to 8 bits per block of 32 in the products (as
        llama.cpp computes; lossy), else fp32 activations (the weights' exact products)."""
        self.bias, self.act8 = bias, act8
        found = lib or library()
        if found is None:
            raise RuntimeError("QuantMatmul needs argen's CPU kernels (a C compiler); use quant='none'")
        self.lib = found
        self.fmt = weight.fmt
        self.out_features, self.in_features = weight.shape
        self.width, self.chunk = self.lib.width, self.lib.chunk
        self.packed = pack(weight, self.width, self.chunk, act8)
        self.struct = QWeightStruct(
            FORMATS[weight.fmt],
            self.width,
            self.out_features,
            self.in_features,
            self.packed.data_ptr(),
            None if bias is None else bias.data_ptr(),
            int(act8),
            0,
        )

    @property
    def qweight(self) -> QuantWeight:
        """The weight as a QuantWeight again (unpacked: a copy, for inspection and tests)."""
        return unpack(self.packed, self.fmt, self.out_features, self.in_features, self.width, self.chunk, self.act8)

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed] + ([] if self.bias is None else [self.bias])

    def digest_bytes(self) -> bytes:
        """A few bytes that identify the weight (calibration caches key on them)."""
        return self.packed[:64].numpy().tobytes()

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """W as fp32 [N, K], exactly as gguf-py dequantizes (from the packed blocks)."""
        out = torch.empty(self.out_features, self.in_features) if out is None else out
        self.lib.lib.argen_dequantize(ctypes.byref(self.struct), torch.get_num_threads(), out.data_ptr())
        return out

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of W dequantized [*ids.shape, K]: token embeddings from a tied vocabulary matrix."""
        flat = ids.reshape(-1).to(torch.int64).contiguous()
        if len(flat) and (int(flat.min()) < 0 or int(flat.max()) >= self.out_features):
            raise IndexError(f"token ids must be in [0, {self.out_features}); got {flat.min()}..{flat.max()}")
        out = torch.empty(len(flat), self.in_features)
        self.lib.lib.argen_dequantize_rows(ctypes.byref(self.struct), flat.data_ptr(), len(flat), out.data_ptr())
        return out.view(*ids.shape, self.in_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k, n = self.in_features, self.out_features
        rows = x.numel() // k
        if rows > KERNEL_MAX_ROWS:
            return F.linear(x, self.dequantize(_scratch(n, k)), self.bias)
        flat = x.reshape(rows, k)
        if flat.dtype != torch.float32 or not flat.is_contiguous():
            flat = flat.float().contiguous()
        y = torch.empty(rows, n)
        self.lib.lib.argen_qmatmul(
            ctypes.byref(self.struct), torch.get_num_threads(), flat.data_ptr(), rows, k, y.data_ptr(), n
        )
        return y.view(*x.shape[:-1], n)
