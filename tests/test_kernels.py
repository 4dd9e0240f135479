"""argen's CPU kernels and the quantized fast path (models/kernels, quant.py, fused.py, gguf_weights.py).

Which ISAs ran: every kernel test is parametrized by ISA (`[avx512]`, `[avx2]`, `[scalar]` in its id);
one this CPU cannot run is skipped with the CPU features it lacks, and is still compiled (built, not
run) by `test_kernels_compile_for_every_isa`, so an AVX2 host builds the AVX-512 kernels and vice versa.

Exactness, independent of the summation order: on weights and activations whose every product and
partial sum is exact in fp32 (power-of-two scales, small integer codes and activations), a correct
kernel returns the exact result bit for bit, whatever order it adds in; any error in a scale, a
block or the bias shows, down to one part in 2^24.

Tolerance on random data, from the arithmetic: the kernels multiply exactly the fp32 weights that
dequantization gives (tested bit for bit), in fp32, in another order than a dense matmul. Each
output is accumulated in 32 lanes (lane j: weight j of every block, one FMA per block, in block
order), the lanes are then combined (in any order), then the bias is added. A product's path
through that takes at most ceil(K/32) + 31 + 1 roundings (+1 if a product is rounded before it is
added), so |y - exact| <= gamma(n) * (sum |w x| + |bias|) with n = ceil(K/32) + 33 and
gamma(n) = n u / (1 - n u), u = 2^-24 (Higham, "Accuracy and Stability of Numerical Algorithms",
sec. 3.1). For K = 160 that is 2.3e-6 of sum |w x|, for K = 1536 4.8e-6 (the old flat 1e-4 was 21-44x
looser). A kernel that accumulated in fewer lanes, or sequentially, would need n = K/L + L + 1 for L
lanes.
"""

from __future__ import annotations

import math

import pytest
import torch

import argen
from argen.models import kernels
from argen.models.quant import QuantMatmul, QuantWeight, quantize
from argen.models.runtime import Plan

FORMATS = ["q4_0", "q4_1", "q8_0"]
SHAPES = [(1, 32), (3, 64), (5, 32), (7, 96), (33, 64), (130, 160)]  # odd row counts, several block counts
ROWS = [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17]
ISAS = list(kernels.ISA_NEEDS)  # every instruction set the kernels have a path for
LANES = 32  # accumulators per output in cpu_kernels.c: one per weight position of a block


def runnable(isa: str):
    """The kernels for `isa`, or a skip that names what this CPU lacks (they are compiled anyway)."""
    missing = kernels.missing_features(isa)
    if missing:
        pytest.skip(f"{isa} kernels compiled but not run here: this CPU lacks {', '.join(missing)}")
    lib = kernels.library(isa)
    assert lib is not None and lib.isa == isa
    return lib


def run(mm: QuantMatmul, x: torch.Tensor, threads: int) -> torch.Tensor:
    """The public wrapper (QuantMatmul, kernel rows only) on `threads` threads."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return mm(x)
    finally:
        torch.set_num_threads(saved)


def gamma(n: int) -> float:
    u = 2.0**-24
    return n * u / (1 - n * u)


def rounding_bound(x: torch.Tensor, dense: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The bound on |y - exact| from the arithmetic (module docstring), float64 [rows, N]."""
    k = x.shape[1]
    n = math.ceil(k / LANES) + (LANES - 1) + 2
    return gamma(n) * (x.double().abs() @ dense.double().abs().T + bias.double().abs())


@pytest.mark.parametrize("isa", ISAS)
def test_kernels_compile_for_every_isa(isa):
    """Every ISA the compiler targets is built (compile only) whatever this CPU can run, and the
    library holds that ISA's path: `argen_isa()`'s name for it is in the binary, the others' are not."""
    if not kernels.compiler_targets(isa):
        pytest.skip(f"the C compiler ({kernels._compiler()}) does not target {isa}")
    data = kernels.compile_kernels(isa).read_bytes()
    names = {name for name in ISAS if name.encode() + b"\0" in data}
    assert names == {isa}, f"the {isa} build holds the paths of {sorted(names)}"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("isa", ISAS)
def test_kernel_matches_float64_on_odd_shapes_and_is_batch_invariant(isa, fmt):
    lib = runnable(isa)
    gen = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        weight = quantize(torch.randn(n, k, generator=gen), fmt)
        dense = weight.dequantize().double()
        mm = QuantMatmul(weight, torch.randn(n, generator=gen), lib=lib)
        for rows in ROWS:
            x = torch.randn(rows, k, generator=gen)
            y = run(mm, x, threads=2)
            want = x.double() @ dense.T + mm.bias.double()
            error = (y.double() - want).abs()
            bound = rounding_bound(x, dense, mm.bias)
            assert (error <= bound).all(), (n, k, rows, float((error / bound).max()))
            for i in range(rows):  # each row alone, on one thread: the very same bits
                assert torch.equal(run(mm, x[i : i + 1].contiguous(), threads=1)[0], y[i]), (n, k, rows, i)


def exact_weight(n: int, k: int, fmt: str, gen: torch.Generator) -> QuantWeight:
    """Random codes with power-of-two scales (2^-3 .. 1) and, for Q4_1, minimums that are integer
    multiples of the scale: every weight is a multiple of 2^-3 of magnitude at most 127."""
    d = (2.0 ** -torch.randint(0, 4, (n, k // 32), generator=gen)).half()
    if fmt == "q8_0":
        return QuantWeight(fmt, torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8), d)
    qs = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
    m = (d.float() * -torch.randint(0, 16, d.shape, generator=gen)).half() if fmt == "q4_1" else None
    return QuantWeight(fmt, qs, d, m)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("isa", ISAS)
def test_kernel_is_exact_where_fp32_arithmetic_is(isa, fmt):
    """Weights that are multiples of 2^-3 up to 127, activations integers in [-4, 4], a bias in
    multiples of 2^-3: every product and every partial sum, in any order, is a multiple of 2^-3
    below 2^21, so exact in fp32; the kernel's output must equal the float64 result bit for bit.
    Independent of the summation order (nothing here assumes the kernels' lanes). Guards against a
    scale off by as little as one part in a million (`d * (1 + 1e-6)`), a block or a bias dropped:
    the loose tolerance on random data lets a 1e-6 scale error through."""
    lib = runnable(isa)
    gen = torch.Generator().manual_seed(1)
    for n, k in SHAPES + [(9, 1536)]:
        weight = exact_weight(n, k, fmt, gen)
        dense = weight.dequantize().double()
        bias = torch.randint(-64, 65, (n,), generator=gen) / 8.0
        mm = QuantMatmul(weight, bias.float(), lib=lib)
        for rows in (1, 3, 8, 17):
            x = torch.randint(-4, 5, (rows, k), generator=gen).float()
            want = x.double() @ dense.T + bias.double()
            assert want.abs().max() < 2**21
            y = run(mm, x, threads=2)
            assert torch.equal(y.double(), want), (n, k, rows, float((y.double() - want).abs().max()))


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
