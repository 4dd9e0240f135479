"""argen's CPU kernels and the quantized fast path (models/kernels, quant.py, fused.py, gguf_weights.py).

Tolerances: the kernels multiply exactly the fp32 weights that dequantization gives (tested bit for
bit), in fp32 with another summation order than a dense matmul. For a dot product of length K the
rounding error is below ~K * 2^-24 * sum|w x|; with K <= 1536 and unit-scale random data that is
~1e-4 of sum|w x|, so against a float64 reference we allow 1e-4 relative to sum|w x|.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

import argen
from argen.models import kernels
from argen.models.quant import QuantMatmul, QuantWeight, quantize
from argen.models.runtime import Plan

FORMATS = ["q4_0", "q4_1", "q8_0"]
SHAPES = [(1, 32), (3, 64), (5, 32), (7, 96), (33, 64), (130, 160)]  # odd row counts, several block counts
ROWS = [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17]


def isas() -> list[str]:
    """Every instruction set this CPU can run: the scalar C path always, AVX2 / AVX-512 where present."""
    best = kernels.pick_isa()
    return {"avx512": ["avx512", "avx2", "scalar"], "avx2": ["avx2", "scalar"]}.get(best, ["scalar"])


def run(lib, mm: QuantMatmul, x: torch.Tensor, threads: int) -> torch.Tensor:
    y = torch.empty(x.shape[0], mm.out_features)
    lib.lib.argen_qmatmul(ctypes.byref(mm.struct), threads, x.data_ptr(), x.shape[0], x.shape[1], y.data_ptr(),
                          mm.out_features)  # fmt: skip
    return y


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_matches_float64_on_odd_shapes_and_is_batch_invariant(isa, fmt):
    lib = kernels.library(isa)
    assert lib is not None and lib.isa == isa
    gen = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        weight = quantize(torch.randn(n, k, generator=gen), fmt)
        dense = weight.dequantize().double()
        mm = QuantMatmul(weight, torch.randn(n, generator=gen), lib=lib)
        for rows in ROWS:
            x = torch.randn(rows, k, generator=gen)
            y = run(lib, mm, x, threads=2)
            want = x.double() @ dense.T + mm.bias.double()
            bound = 1e-4 * ((x.double().abs() @ dense.abs().T) + 1)
            assert ((y.double() - want).abs() <= bound).all(), (n, k, rows)
            for i in range(rows):  # each row alone, on one thread: the very same bits
                assert torch.equal(run(lib, mm, x[i : i + 1].contiguous(), threads=1)[0], y[i]), (n, k, rows, i)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_is_exact_and_the_same_in_c_and_torch(fmt):
    weight = quantize(torch.randn(40, 96), fmt)
    assert torch.equal(weight.dequantize(), weight._dequantize_torch())
    # The defining formula, evaluated in float64 (exact for these magnitudes) then rounded once.
    n, k = weight.shape
    d = weight.d.double().repeat_interleave(32, dim=1)
    if fmt == "q8_0":
        q = weight.qs.double()
        want = d * q
    else:
        packed = weight.qs.view(n, k // 32, 16)
        q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).reshape(n, k).double()
        want = d * (q - 8) if fmt == "q4_0" else d * q + weight.m.double().repeat_interleave(32, dim=1)
    assert torch.equal(weight.dequantize(), want.float())


def test_quantize_round_trip_error_is_within_half_a_step():
    w = torch.randn(16, 64)
    for fmt, levels in (("q8_0", 127), ("q4_1", 15)):
        q = quantize(w, fmt)
        step = q.d.float().repeat_interleave(32, dim=1)
        assert ((q.dequantize() - w).abs() <= 0.5 * step + 1e-3 * w.abs().max()).all(), fmt
        assert levels  # (the step is the block's range over the code levels)


def test_quant_weight_rows_and_cat_move_whole_rows():
    a, b = quantize(torch.randn(4, 64), "q4_1"), quantize(torch.randn(3, 64), "q4_1")
    both = QuantWeight.cat([a, b])
    assert torch.equal(both.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    order = torch.tensor([2, 0, 3, 1])
    assert torch.equal(a.rows(order).dequantize(), a.dequantize()[order])
    with pytest.raises(ValueError, match="formats"):
        QuantWeight.cat([a, quantize(torch.randn(2, 64), "q8_0")])


# -- the fused forward ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["q4_1", "q8_0"])
def tiny_q(request):
    return argen.load("tiny-random", quant=request.param)


def dense_twin(gen_q):
    """The same quantized weights, dequantized, on torch's path: the reference for the fused one."""
    rt = gen_q.runtime
    twin = argen.load("tiny-random", quant="none")
    state = {}
    for i, layer in enumerate(rt.layers):
        for name, mm in (("qkv", layer.qkv), ("o", layer.o), ("gate_up", layer.gate_up), ("down", layer.down)):
            state[(i, name)] = mm.qweight.dequantize()
    for i, layer in enumerate(twin.runtime.layers):
        for name in ("qkv", "o", "gate_up", "down"):
            setattr(layer, name, type(layer.qkv)(state[(i, name)]))
    twin.runtime.embed = rt.embed_q.dequantize() if rt.embed_q is not None else rt.embed
    twin.runtime.lm_head = type(twin.runtime.lm_head)(rt.lm_head.qweight.dequantize())
    return twin.runtime


def forward(rt, ids, positions, cache, mask=None, plan=None):
    return rt.forward(torch.tensor([ids]), torch.tensor([positions]), cache, mask=mask, plan=plan)


def test_fused_forward_is_used_and_matches_torchs_path(tiny_q):
    rt = tiny_q.runtime
    assert rt.fused is not None
    ref = dense_twin(tiny_q)
    ids = tiny_q.encode("the fused forward")
    cases = [  # (feed after a prefill of ids[:-k], mask, plan)
        (1, None, None),
        (4, None, None),
        (3, torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool), None),  # a tree: siblings
        (2, None, Plan.skipping(rt.info.n_layers, layers=[1], ffn_only=[2])),
    ]
    for k, mask, plan in cases:
        outs = []
        for runtime in (rt, ref):
            cache = runtime.new_cache(1, 64)
            n = len(ids) - k
            forward(runtime, ids[:n], list(range(n)), cache)
            positions = list(range(n, len(ids))) if mask is None else [n, n + 1, n + 1]
            logits, hidden = forward(runtime, ids[n:], positions, cache, mask, plan)
            outs.append((logits, hidden, cache))
        (lq, hq, cq), (lr, hr, cr) = outs
        assert (lq - lr).abs().max() < 1e-4 and (hq - hr).abs().max() < 1e-4, (k, mask, plan)
        for got, want in zip(cq.gathered(), cr.gathered()):
            assert (got - want).abs().max() < 1e-4


def test_fused_forward_is_batch_invariant(tiny_q):
    """A chain verified in one pass, a row of a ragged batch, and one-token steps give the same bits."""
    rt = tiny_q.runtime
    ids = tiny_q.encode("batch invariance, bit for bit")
    n = len(ids) - 5
    alone, cache = [], rt.new_cache(1, 64)
    forward(rt, ids[:n], list(range(n)), cache)
    for i in range(n, len(ids)):
        alone.append(forward(rt, [ids[i]], [i], cache)[1][0, 0])
    cache2 = rt.new_cache(1, 64)
    forward(rt, ids[:n], list(range(n)), cache2)
    _, chain = forward(rt, ids[n:], list(range(n, len(ids))), cache2)
    for i, h in enumerate(alone):
        assert torch.equal(chain[0, i], h), i
    # In a batch of two rows of different lengths, the longer row's last step is the same too (its
    # prefix went in the same way: a torch prefill of ids[:n], then fused feeds).
    other = tiny_q.encode("x")
    batch = rt.new_cache(2, 64)
    for row, feeds in zip(batch, [[ids[:n], ids[n:-1]], [other[:-1]]]):
        for feed in feeds:
            forward(rt, feed, list(range(row.lengths[0], row.lengths[0] + len(feed))), row)
    _, hidden = rt.forward(torch.tensor([[ids[-1]], [other[-1]]]), torch.tensor([[len(ids) - 1], [len(other) - 1]]),
                           batch)  # fmt: skip
    assert torch.equal(hidden[0, 0], alone[-1])


def test_quant_modes_say_what_to_do_when_they_cannot_apply():
    with pytest.raises(argen.ArgenError, match="not a GGUF"):
        argen.load("tiny-random", quant="exact")
    with pytest.raises(argen.ArgenError, match="unknown quant"):
        argen.load("tiny-random", quant="int3")
    with pytest.raises(argen.ArgenError, match="native runtime"):
        argen.load("tiny-random-gpt2", quant="q8_0")
    assert argen.load("tiny-random").quant == "none"  # auto: no GGUF file, so fp32


@pytest.mark.real
def test_exact_mode_holds_the_ggufs_own_weights(real):
    """The default model's auto path is the GGUF's own blocks: bit for bit the fp32 reference's weights,
    in at most 1.3x the file's bytes, with logits within 1e-4 of Hugging Face's."""
    from argen.models import sources

    rt = real.runtime
    assert real.quant == "exact" and rt.fused is not None
    hf = real.model.hf_model
    state = hf.state_dict()
    layer = rt.layers[7]
    assert torch.equal(layer.down.qweight.dequantize(), state["model.layers.7.mlp.down_proj.weight"])
    assert torch.equal(rt.embed_q.dequantize(), state["model.embed_tokens.weight"])
    gguf_bytes = sources.default_gguf_path().stat().st_size
    assert rt.weight_bytes <= 1.3 * gguf_bytes
    ids = real.encode("Summarize the plot of Hamlet in three sentences.")
    with torch.inference_mode():
        want = hf(torch.tensor([ids])).logits[0]
    cache = rt.new_cache(1, 128)
    forward(rt, ids[:-6], list(range(len(ids) - 6)), cache)  # prefill on torch's path
    got, _ = forward(rt, ids[-6:], list(range(len(ids) - 6, len(ids))), cache)  # a 6-token fused pass
    assert (got[0] - want[-6:]).abs().max() < 1e-4
