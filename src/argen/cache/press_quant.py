"""Quantizing presses: every position is kept, the oldest whole groups in a low-bit store (cache/quant.py)."""

from __future__ import annotations

from argen.cache.press_base import Press, _bits, _count
from argen.cache.quant import GROUP
from argen.checks import number_option


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
