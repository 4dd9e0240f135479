"""Logit parity with Hugging Face on every matmul path the runtimes take, and `Matmul`'s own paths.

Rows per pass pick the kernel: `Matmul` (fp32, quant="none") uses a GEMV on W^T for one row, oneDNN
with a prepacked weight for 2-16 rows and `F.linear` (HF's own kernel) above; the quantized fast path
(quant="exact", the default model's default) uses the fused C forward for feeds of up to 256
tokens and dequantize + GEMM above. Each path differs from HF only in summation order, so its logits must stay
within `TOLERANCE` of HF's at every position of a long prompt, where rounding has had the most
positions to accumulate.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from argen.models import matmul
from argen.models.fused import MAX_NEW_TOKENS as FUSED_MAX
from argen.models.matmul import PACKED_MAX_ROWS, Matmul

# Measured on the 1,000-token prompt below (logits of magnitude ~10-30): every path is 3e-5 to 6.6e-5
# off HF, the prefill through HF's own F.linear already 3.5e-5 (attention and norms sum in another
# order), so 1e-4 leaves a third of margin. The control below shows what it catches: one kernel off
# by 1e-5 relative.
TOLERANCE = 1e-4


@pytest.mark.parametrize("rows", [1, 2, 3, 8, PACKED_MAX_ROWS, PACKED_MAX_ROWS + 1, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_matmul_matches_f_linear_on_every_row_count(rows, bias):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 160, generator=gen)
    b = torch.randn(96, generator=gen) if bias else None
    x = torch.randn(2, rows, 160, generator=gen)[:1]  # a leading batch dimension, as the runtime feeds
    mm = Matmul(w, b)
    got = mm(x)
    assert got.shape == (1, rows, 96)
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    scale = (x.double().abs() @ w.double().abs().T) + (0 if b is None else b.double().abs())
    assert ((got.double() - want).abs() / scale).max() < 1e-6
    assert sum(t.numel() for t in mm.tensors()) <= 2 * w.numel() + 96  # W^T once, plus the packed copy


def test_matmul_without_onednn_falls_back_and_says_so(monkeypatch, caplog):
    def missing(*args):
        raise RuntimeError("no such op in this build")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", missing)
    w = torch.randn(32, 64)
    with caplog.at_level(logging.WARNING, logger=matmul.__name__):
        mm = Matmul(w)
    assert mm.packed is None
    assert "oneDNN weight packing unavailable" in caplog.text and "no such op" in caplog.text
    x = torch.randn(1, 4, 64)
    assert torch.equal(mm(x), F.linear(x, w))


def test_control_a_wrong_matmul_path_fails(monkeypatch):
    """Control: a 2-16-row path that drops the last input feature must fail the check above."""
    w = torch.randn(96, 160)
    mm = Matmul(w)
    real_call = Matmul.__call__

    def broken(self, x):
        if 1 < x.numel() // x.shape[-1] <= PACKED_MAX_ROWS:
            x = x.clone()
            x[..., -1] = 0
        return real_call(self, x)

    monkeypatch.setattr(Matmul, "__call__", broken)
    x = torch.randn(1, 4, 160)
    scale = x.double().abs() @ w.double().abs().T
    assert ((mm(x).double() - F.linear(x.double(), w.double())).abs() / scale).max() > 1e-6


# Feed sizes for the last positions of the prompt after a long prefill: one row, every packed size
# class, feeds on the fused forward up to its widest (256), and one feed past them (torch's path, as
# the prefill before them).
FEEDS = [1, 1, 2, 3, 8, PACKED_MAX_ROWS, 1, 33, 64, 80, FUSED_MAX, FUSED_MAX + 1]


def long_prompt(gen) -> list[int]:
    text = " ".join(
        f"Item {i}: the committee reviewed section {i * 7 % 13} of the report and noted"
        f" {i * 3 % 11} open questions about its budget."
        for i in range(56)
    )
    ids = gen.encode("Summarize the following notes.\n" + text)
    assert len(ids) > sum(FEEDS) + FUSED_MAX  # the prefill before the feeds is longer than the fused forward takes
    return ids


def max_diff_per_feed(gen, ids: list[int], hf_logits: torch.Tensor) -> dict[str, float]:
    rt = gen.runtime
    n = len(ids)
    start = n - sum(FEEDS)
    cache = rt.new_cache(1, n)
    prefill, _ = rt.forward(torch.tensor([ids[:start]]), torch.arange(start)[None], cache, num_logits=4)
    diffs = {f"prefill {start}": (prefill[0] - hf_logits[start - 4 : start]).abs().max().item()}
    p = start
    for size in FEEDS:
        logits, _ = rt.forward(torch.tensor([ids[p : p + size]]), torch.arange(p, p + size)[None], cache)
        key = f"{size} rows"
        diffs[key] = max(diffs.get(key, 0.0), (logits[0] - hf_logits[p : p + size]).abs().max().item())
        p += size
    return diffs


@pytest.fixture(scope="module")
def long_hf(real) -> tuple[list[int], torch.Tensor]:
    """The long prompt and Hugging Face's logits at every position of it (one forward for the tests below)."""
    ids = long_prompt(real)
    with torch.inference_mode():
        return ids, real.model.hf_model(torch.tensor([ids])).logits[0]


@pytest.mark.real
@pytest.mark.parametrize("quant", ["none", "exact"])
def test_every_path_matches_hf_logits_on_a_long_prompt(real, real_fp32, long_hf, quant):
    gen = {"exact": real, "none": real_fp32}[quant]
    assert gen.quant == quant
    ids, hf_logits = long_hf
    diffs = max_diff_per_feed(gen, ids, hf_logits)
    assert max(diffs.values()) < TOLERANCE, diffs


@pytest.mark.real
def test_control_a_one_row_kernel_off_by_1e_5_fails_parity(real_fp32, long_hf, monkeypatch):
    gen = real_fp32
    ids, hf_logits = long_hf
    real_call = Matmul.__call__

    def off(self, x):
        y = real_call(self, x)
        return y * (1 + 1e-5) if x.numel() == x.shape[-1] else y

    monkeypatch.setattr(Matmul, "__call__", off)
    diffs = max_diff_per_feed(gen, ids, hf_logits)
    assert diffs["1 rows"] > TOLERANCE, diffs
