"""`x @ W^T` for one fixed weight, with the CPU kernel picked by the number of rows.

Why not just `F.linear`: on CPU its small-M GEMMs repack the weight on every call, so feeding a
speculative verifier 2-8 tokens cost 1.7-2x feeding one (SmolLM2-135M, fp32, one thread) even
though the pass is bound by reading the weights once. Body time per forward pass
(`benchmarks/pass_cost/report.md`):

    tokens fed      1      2      4      8     16
    F.linear      55 ms  91 ms  84 ms  98 ms 118 ms
    this module   40 ms  66 ms  74 ms  88 ms 110 ms

One row uses W^T stored contiguously (MKL's GEMV on that layout beats it on W: 40 vs 55 ms above); two
or more rows use oneDNN with the weight reordered once at load time, the packing torch.compile's
CPU "freezing" pass applies. Elsewhere (GPU, bf16, no oneDNN) it is plain `F.linear`.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def _onednn_pack(weight: torch.Tensor) -> torch.Tensor | None:
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, 8)  # 8: the batch-size hint for verification
    except (AttributeError, RuntimeError) as e:  # a torch build without the op: F.linear is still right
        # Said, not silent: verification passes of 2-16 rows then cost F.linear's repacking.
        log.warning(
            "oneDNN weight packing unavailable (%s: %s); 2-%d-row passes use F.linear",
            type(e).__name__,
            e,
            PACKED_MAX_ROWS,
        )
        return None


# Above this many rows (a prefill) MKL's GEMM is as fast, and it rounds as HF's model does.
PACKED_MAX_ROWS = 16


class Matmul:
    """A linear layer's weight [out, in] (and optional bias), applied as `matmul(x)`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.bias = bias
        self.packed = _onednn_pack(weight)
        self.weight_t: torch.Tensor | None = None  # [in, out] contiguous, beside the oneDNN packing
        if self.packed is not None:
            self.weight_t = weight.t().contiguous()
            self.weight = self.weight_t.t()  # a view: the weight is stored once, transposed
        else:
            self.weight = weight

    def tensors(self) -> list[torch.Tensor]:
        """What this layer holds in memory (the packed copy included)."""
        return [
            t
            for t in (self.weight_t if self.packed is not None else self.weight, self.packed, self.bias)
            if t is not None
        ]

    def digest_bytes(self) -> bytes:
        """A few bytes that identify the weight (calibration caches key on them)."""
        return self.weight[:4].float().cpu().numpy().tobytes()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.packed is None or rows > PACKED_MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        if rows == 1:
            assert self.weight_t is not None  # kept whenever the packing is
            y = x @ self.weight_t
            return y if self.bias is None else y + self.bias
        flat = x.reshape(rows, x.shape[-1])
        y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], y.shape[-1])
