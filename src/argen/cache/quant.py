"""Quantized KV storage for the quantizing presses (`kv-quant`, `gear` in press.py): the compressed
front of a sequence's cache, held as real low-bit codes, dequantized one layer at a time when a
forward pass reads it.

Layout (KIVI's, Liu et al. 2024, arXiv:2402.02750, which GEAR builds on): positions are compressed
in groups of `GROUP` consecutive positions; keys are quantized per channel (each head dimension
has its own scale over the group's positions, since key outliers sit in fixed channels), values
per token (a scale over each position's head dimension). Asymmetric min-max codes of 8, 4 or 2
bits are packed into bytes; scales and zero points are fp16.

GEAR (Kang et al. 2024, arXiv:2403.05527) adds, per layer, head and group: a sparse matrix of
outliers (the largest-magnitude `outliers` fraction of entries, kept exactly in fp16 and removed
before quantizing) and a rank-`rank` approximation (fp16 factors) of what quantization left over.
`X ~ dequant(quant(X - S)) + A @ B + S`.

Everything is a plain tensor with a leading [layers, kv heads, groups] shape, so a store grows by
concatenation (a new object: forks of a sequence may share the old one) and its bytes are the sum
of its tensors' bytes, reported per part.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

GROUP = 64  # positions per quantization group (a multiple of the paged cache's block size)
BITS = (2, 4, 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2**bits [..., D] -> bytes [..., D * bits / 8] (8 // bits codes per byte)."""
    per = 8 // bits
    if per == 1:
        return codes
    c = codes.reshape(*codes.shape[:-1], -1, per).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    if per == 1:
        return packed
    shifts = torch.arange(per, dtype=torch.uint8) * bits
    return ((packed.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(*packed.shape[:-1], -1)


def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max quantization of x over `dim`: (packed codes, fp16 scale, fp16 minimum).
    The codes are computed from the fp16 scale and minimum, the ones dequantization will use."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).clamp_min(1e-6).half()
    lo = lo.half()
    codes = torch.round((x - lo.float()) / scale.float()).clamp_(0, levels).to(torch.uint8)
    return pack(codes, bits), scale, lo


def dequantize(packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack(packed, bits).float() * scale.float() + lo.float()


@dataclass(frozen=True)
class Part:
    """One of keys or values, compressed: tensors [layers, heads, groups, ...]."""

    codes: torch.Tensor  # [L, H, G, GROUP, D * bits / 8] uint8
    scale: torch.Tensor  # keys [L, H, G, 1, D], values [L, H, G, GROUP, 1] fp16
    lo: torch.Tensor
    a: torch.Tensor  # low-rank factors [L, H, G, GROUP, r] and [L, H, G, r, D] fp16 (r may be 0)
    b: torch.Tensor
    where: torch.Tensor  # outliers: flat indices into a group's GROUP * D entries [L, H, G, k] int16
    value: torch.Tensor  # [L, H, G, k] fp16

    def layer(self, i: int, bits: int) -> torch.Tensor:
        """Layer i dequantized [H, G * GROUP, D] (float32)."""
        x = dequantize(self.codes[i], self.scale[i], self.lo[i], bits)  # [H, G, GROUP, D]
        if self.a.shape[-1]:
            x += self.a[i].float() @ self.b[i].float()
        heads, groups, group, dim = x.shape
        if self.where.shape[-1]:
            x = x.view(heads, groups, group * dim).scatter_(2, self.where[i].long(), self.value[i].float())
        return x.view(heads, groups * group, dim)

    def nbytes(self) -> dict[str, int]:
        def size(*ts: torch.Tensor) -> int:
            return sum(t.numel() * t.element_size() for t in ts)

        return {
            "codes": size(self.codes),
            "scales": size(self.scale, self.lo),
            "low_rank": size(self.a, self.b),
            "outliers": size(self.where, self.value),
        }


def compress_part(x: torch.Tensor, bits: int, per_channel: bool, rank: int, outliers: float) -> Part:
    """x [L, H, G * GROUP, D] float -> a Part (keys: per_channel, values: per token)."""
    L, H, n, D = x.shape
    x = x.float().reshape(L, H, n // GROUP, GROUP, D)
    flat = x.reshape(L, H, n // GROUP, GROUP * D)
    k = round(outliers * GROUP * D)
    where = flat.abs().topk(k, dim=-1).indices if k else flat.new_zeros(L, H, n // GROUP, 0, dtype=torch.long)
    value = flat.gather(-1, where).half()
    inliers = flat.scatter(-1, where, 0.0).view_as(x) if k else x
    codes, scale, lo = quantize(inliers, bits, dim=-2 if per_channel else -1)
    if rank:
        residual = inliers - dequantize(codes, scale, lo, bits)
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        a, b = (u[..., :rank] * s[..., None, :rank]).half(), vh[..., :rank, :].half()
    else:
        a, b = x.new_zeros(L, H, n // GROUP, GROUP, 0).half(), x.new_zeros(L, H, n // GROUP, 0, D).half()
    return Part(codes, scale, lo, a, b, where.to(torch.int16), value)


@dataclass(frozen=True)
class QuantizedKV:
    """The compressed front of one sequence's cache: `positions` positions, keys and values."""

    bits: int
    k: Part
    v: Part

    @property
    def positions(self) -> int:
        return self.k.codes.shape[2] * GROUP

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k.layer(i, self.bits), self.v.layer(i, self.bits)

    def nbytes_by_part(self) -> dict[str, int]:
        k, v = self.k.nbytes(), self.v.nbytes()
        return {name: k[name] + v[name] for name in k}

    @property
    def nbytes(self) -> int:
        return sum(self.nbytes_by_part().values())

    def extend(self, other: QuantizedKV) -> QuantizedKV:
        """A new store: this one's groups, then other's."""

        def cat(a: Part, b: Part) -> Part:
            return Part(*(torch.cat([getattr(a, f.name), getattr(b, f.name)], 2) for f in fields(Part)))

        return QuantizedKV(self.bits, cat(self.k, other.k), cat(self.v, other.v))


def compress(k: torch.Tensor, v: torch.Tensor, bits: int, rank: int = 0, outliers: float = 0.0) -> QuantizedKV:
    """Keys and values [L, H, m, D] (m a multiple of GROUP) -> their compressed store."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}; got {bits!r}")
    return QuantizedKV(
        bits, compress_part(k, bits, True, rank, outliers), compress_part(v, bits, False, rank, outliers)
    )
