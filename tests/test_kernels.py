"""argen's CPU kernels and the quantized fast path (models/kernels, quant.py, fused.py, gguf_weights.py).

Tolerances: the kernels multiply exactly the fp32 weights that dequantization gives (tested bit for
bit), in fp32, summing in a fixed order (cpu_kernels.c): each block of 32 products by one fma chain
from 0, then the block sums in order, then the bias. A value's error against exact arithmetic is then
at most gamma(K/32 + 32) * (sum_k |x_k w_k| + |bias|), gamma(n) = n u / (1 - n u), u = 2^-24: every
product passes through at most 32 roundings in its block's chain, K/32 - 1 in the blocks' sum and one
for the bias. Against a float64 reference (whose own error is ~1e-16 relative) that is the bound.
"""

from __future__ import annotations

import ctypes

import pytest
import torch
from checks import check_greedy_identical
from helpers import Oracle

import argen
from argen.models import kernels
from argen.models.quant import QuantMatmul, QuantWeight, pack, quantize, unpack
from argen.models.runtime import Plan, Segment

FORMATS = ["q4_0", "q4_1", "q8_0"]
# Odd row counts (not multiples of 8 or 16), one to 48 blocks, and more rows than one chunk of groups
# (512 rows at width 8, 1024 at 16) so chunks end part-way and threads split inside them.
SHAPES = [(1, 32), (3, 64), (5, 32), (7, 96), (33, 64), (130, 160), (40, 1536), (1100, 64)]
U = 2.0**-24


def isas() -> list[str]:
    """Every kernel build this CPU can run: AVX2 / AVX-512 where present, and the portable C builds
    always (at AVX2's width, and at AVX-512's: the AVX-512 kernels' arithmetic on any CPU)."""
    best = kernels.pick_isa()
    native = {"avx512vnni": ["avx512vnni", "avx512", "avx2"], "avx512": ["avx512", "avx2"], "avx2": ["avx2"]}
    return native.get(best, []) + ["scalar", "scalar16"]


def run(lib, mm: QuantMatmul, x: torch.Tensor, threads: int) -> torch.Tensor:
    y = torch.empty(x.shape[0], mm.out_features)
    lib.lib.argen_qmatmul(
        ctypes.byref(mm.struct), threads, x.data_ptr(), x.shape[0], x.shape[1], y.data_ptr(), mm.out_features
    )
    return y


def error_bound(x: torch.Tensor, dense: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The kernels' worst-case rounding error (see the module docstring), per output, in float64."""
    n = x.shape[1] // 32 + 32
    return n * U / (1 - n * U) * (x.double().abs() @ dense.abs().T + bias.double().abs())


@pytest.mark.parametrize("act8", [False, True], ids=["fp32", "a8"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("width, chunk", [(8, 64), (16, 64), (8, 3), (16, 2)])
def test_pack_round_trips_and_keeps_the_ggufs_bytes(fmt, width, chunk, act8):
    """`unpack(pack(w))` is w again, and the packed weight is the GGUF's bytes (padded to whole groups),
    in both layouts."""
    for n, k in [(1, 32), (9, 64), (37, 96), (130, 32)]:
        weight = quantize(torch.randn(n, k), fmt)
        packed = pack(weight, width, chunk, act8)
        back = unpack(packed, fmt, n, k, width, chunk, act8)
        assert torch.equal(back.qs, weight.qs) and torch.equal(back.d, weight.d), (n, k)
        assert (back.m is None) == (weight.m is None) and (back.m is None or torch.equal(back.m, weight.m))
        groups = -(-n // width)
        assert packed.numel() == weight.nbytes * groups * width // n


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_matches_float64_within_its_rounding_bound(isa, fmt):
    """Every output within gamma(K/32 + 32) sum|x w| of float64, on odd shapes and 1-33 rows. Fails if
    a weight is dequantized wrongly or a product is dropped or counted twice (errors ~ the values)."""
    lib = kernels.library(isa)
    assert lib is not None and lib.isa == isa
    gen = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        weight = quantize(torch.randn(n, k, generator=gen), fmt)
        dense = weight.dequantize().double()
        mm = QuantMatmul(weight, torch.randn(n, generator=gen), lib=lib)
        assert torch.equal(mm.dequantize(), weight.dequantize())  # the packed blocks, dequantized in C
        for rows in (1, 2, 3, 4, 5, 8, 9, 13, 16, 17, 33):
            x = torch.randn(rows, k, generator=gen)
            y = run(lib, mm, x, threads=2)
            want = x.double() @ dense.T + mm.bias.double()
            assert ((y.double() - want).abs() <= error_bound(x, dense, mm.bias)).all(), (n, k, rows)


def exact_weight(n: int, k: int, fmt: str, gen: torch.Generator) -> QuantWeight:
    """Random codes with power-of-two scales (2^-3 .. 1) and, for Q4_1, minimums that are integer
    multiples of the scale: every weight is a multiple of 2^-3 of magnitude at most 127."""
    d = (2.0 ** -torch.randint(0, 4, (n, k // 32), generator=gen)).half()
    if fmt == "q8_0":
        return QuantWeight(fmt, torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8), d)
    qs = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
    m = (d.float() * -torch.randint(0, 16, d.shape, generator=gen)).half() if fmt == "q4_1" else None
    return QuantWeight(fmt, qs, d, m)


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_is_exact_where_fp32_arithmetic_is(isa, fmt):
    """Weights that are multiples of 2^-3 up to 127, activations integers in [-4, 4], a bias in
    multiples of 2^-3: every product and every partial sum, in any order, is a multiple of 2^-3
    below 2^21, so exact in fp32; the kernel's output must equal the float64 result bit for bit.
    Independent of the summation order. Guards against a scale off by as little as one part in a
    million (`d * (1 + 1e-6)`), a block or a bias dropped, which a tolerance on random data lets through."""
    lib = kernels.library(isa)
    assert lib is not None and lib.isa == isa
    gen = torch.Generator().manual_seed(1)
    for n, k in SHAPES[:6] + [(9, 1536)]:
        weight = exact_weight(n, k, fmt, gen)
        dense = weight.dequantize().double()
        bias = torch.randint(-64, 65, (n,), generator=gen) / 8.0
        mm = QuantMatmul(weight, bias.float(), lib=lib)
        for rows in (1, 3, 8, 17):
            x = torch.randint(-4, 5, (rows, k), generator=gen).float()
            want = x.double() @ dense.T + bias.double()
            assert want.abs().max() < 2**21
            y = run(lib, mm, x, threads=2)
            assert torch.equal(y.double(), want), (n, k, rows, float((y.double() - want).abs().max()))


def rounded_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The a8 path's activations, as llama.cpp's q8 blocks round them: codes round(x * 127 / max|x|)
    (to nearest, ties to even) per block of 32, scale max|x| / 127. Returns codes [M, K/32, 32], scales."""
    m, k = x.shape
    blocks = x.reshape(m, k // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros(()))
    return torch.round(blocks * inv), (amax / 127)[..., 0]


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("fmt", FORMATS)
def test_a8_kernel_is_the_product_with_rounded_activations(isa, fmt):
    """The a8 path multiplies the weights by the activations rounded to 8 bits per block (llama.cpp's
    rule), with exact integer block sums and a few fp32 roundings per block: within gamma(K/32 + 4) of
    float64 on the same rounded activations. Fails if a code is rounded another way (one step off is
    d |w| of error, far above the bound) or a block's scale or minimum term is wrong."""
    lib = kernels.library(isa)
    gen = torch.Generator().manual_seed(3)
    for n, k in SHAPES:
        weight = quantize(torch.randn(n, k, generator=gen), fmt)
        mm = QuantMatmul(weight, torch.randn(n, generator=gen), lib=lib, act8=True)
        q = _codes_of(weight)  # [n, nb, 32] integer codes
        d = weight.d.double()
        m = weight.m.double() if weight.m is not None else -8 * d
        if fmt == "q8_0":
            m = torch.zeros_like(d)
        for rows in (1, 2, 5, 8, 9, 17, 33):
            x = torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 4
            qx, dx = rounded_activations(x)
            isum = torch.einsum("nbk,mbk->mnb", q.double(), qx.double())  # exact integers
            sq = qx.double().sum(-1)  # [rows, nb]
            scale_terms = d[None] * dx.double()[:, None] * isum  # [rows, n, nb]
            min_terms = m[None] * (dx.double() * sq)[:, None]
            want = (scale_terms + min_terms).sum(-1) + mm.bias.double()
            n_ops = k // 32 + 4
            bound = (
                n_ops * U / (1 - n_ops * U) * ((scale_terms.abs() + min_terms.abs()).sum(-1) + mm.bias.double().abs())
            )
            y = run(lib, mm, x, threads=2)
            assert ((y.double() - want).abs() <= bound).all(), (n, k, rows)


def _codes_of(weight: QuantWeight) -> torch.Tensor:
    n, k = weight.shape
    if weight.fmt == "q8_0":
        return weight.qs.reshape(n, k // 32, 32).to(torch.int64)
    packed = weight.qs.reshape(n, k // 32, 16)
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1).to(torch.int64)


@pytest.mark.parametrize("act8", [False, True], ids=["fp32", "a8"])
@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_rows_are_batch_invariant(isa, fmt, act8):
    """A row's outputs have the same bits alone, in a pass of 1-33 rows at any position, and on 1-3
    threads, on both paths. Fails if the summation order depends on the tile (e.g. a tile of 8 rows
    summing its blocks in another order than the one-row tile) or on where a thread's range of groups
    starts, or if the a8 path's activation rounding looked beyond the row."""
    lib = kernels.library(isa)
    gen = torch.Generator().manual_seed(1)
    for n, k in [(33, 96), (1100, 64), (40, 1536)]:
        weight, bias = quantize(torch.randn(n, k, generator=gen), fmt), torch.randn(n, generator=gen)
        mm = QuantMatmul(weight, bias, lib=lib, act8=act8)
        x = torch.randn(33, k, generator=gen)
        alone = torch.cat([run(lib, mm, x[i : i + 1].contiguous(), threads=1) for i in range(33)])
        for rows in range(1, 34):
            start = (7 * rows) % (34 - rows)  # the rows at different offsets in the pass
            threads = 1 + rows % 3
            got = run(lib, mm, x[start : start + rows].contiguous(), threads)
            assert torch.equal(got, alone[start : start + rows]), (n, k, rows, threads)


@pytest.mark.parametrize("isa", [isa for isa in kernels.ISA_FLAGS if isa not in isas()])
def test_builds_this_cpu_cannot_run_still_compile(isa, tmp_path):
    """Every build compiles on any host: the ones this CPU runs are built and checked by the tests
    above; the others (AVX-512, AVX-512 VNNI on an AVX2 machine) are compiled here, not run, so a
    change that breaks another ISA's build fails on this one. The library names its build."""
    cc = kernels._compiler()
    if cc is None:
        pytest.skip("no C compiler")
    data = kernels.build(isa, cc, tmp_path).read_bytes()
    assert isa.encode() + b"\0" in data


def test_portable_builds_give_the_native_builds_bits():
    """The portable C build at a native build's width computes the same bits (the vector layer's
    operations are the same IEEE operations per lane): at width 8 against AVX2, at width 16 against
    AVX-512 where the CPU has it. So on machines without AVX-512 the width-16 portable build runs the
    AVX-512 kernels' arithmetic, checked by the tests above."""
    pairs = {
        "avx2": [("scalar", "avx2")],
        "avx512": [("scalar", "avx2"), ("scalar16", "avx512")],
        "avx512vnni": [("scalar", "avx2"), ("scalar16", "avx512"), ("scalar16", "avx512vnni")],
    }
    pairs = pairs.get(kernels.pick_isa(), [])
    if not pairs:
        pytest.skip("no AVX2 here: the portable build is the only one")
    gen = torch.Generator().manual_seed(2)
    for portable, native in pairs:
        a, b = kernels.library(portable), kernels.library(native)
        for fmt in FORMATS:
            weight, bias = quantize(torch.randn(130, 160, generator=gen), fmt), torch.randn(130, generator=gen)
            x = torch.randn(17, 160, generator=gen)
            for act8 in (False, True):
                ya = run(a, QuantMatmul(weight, bias, lib=a, act8=act8), x, 2)
                assert torch.equal(ya, run(b, QuantMatmul(weight, bias, lib=b, act8=act8), x, 2)), (fmt, act8)


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


@pytest.fixture(
    scope="module",
    params=[(fmt, build) for fmt in ("q4_1", "q8_0") for build in ("native", "scalar16")],
    ids=lambda p: "-".join(p),
)
def tiny_q(request):
    """The tiny model quantized, on this CPU's kernels and on the portable build at AVX-512's width
    (whose arithmetic is the AVX-512 build's: so the fused forward's AVX-512 path is checked here too)."""
    fmt, build = request.param
    with pytest.MonkeyPatch.context() as mp:
        if build != "native":
            mp.setenv("ARGEN_KERNELS", build)
        gen = argen.load("tiny-random", quant=fmt)
    assert gen.runtime.fused is not None and (build == "native" or gen.runtime.fused.lib.isa == build)
    return gen


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
    _, hidden = rt.forward(
        torch.tensor([[ids[-1]], [other[-1]]]), torch.tensor([[len(ids) - 1], [len(other) - 1]]), batch
    )
    assert torch.equal(hidden[0, 0], alone[-1])


def test_fused_forward_rows_are_batch_invariant_in_passes_of_1_to_32_rows(tiny_q):
    """One sequence's decode step has the same bits alone and beside 1-31 other rows in its pass (another
    sequence's chain of new tokens), whichever tiles and threads the pass's size picks. Fails if any
    kernel's order depends on the pass (e.g. the many-row matmul tile summing differently)."""
    rt = tiny_q.runtime
    ids, other = tiny_q.encode("batch invariance in every pass size"), tiny_q.encode("other rows " * 12)
    a, b = rt.new_cache(1, 64), rt.new_cache(1, 64)
    forward(rt, ids[:-1], list(range(len(ids) - 1)), a)
    forward(rt, other[:4], list(range(4)), b)
    n = len(ids) - 1

    def step(extra: int) -> torch.Tensor:
        segs = [Segment(a, [ids[-1]], [n], None, 1)]
        if extra:
            segs.append(Segment(b, other[4 : 4 + extra], list(range(4, 4 + extra)), None, extra))
        outs = rt.forward_packed(segs)
        a.truncate(n)
        b.truncate(4)
        return torch.cat([outs[0].hidden.reshape(-1), outs[0].logits.reshape(-1)])

    alone = step(0)
    for extra in range(1, 32):
        assert torch.equal(step(extra), alone), extra


@pytest.fixture(scope="module", params=["native", "scalar16"])
def tiny_a8(request):
    """The tiny model on the a8 path (Q4_1 weights, 8-bit activations), natively and at AVX-512's width."""
    with pytest.MonkeyPatch.context() as mp:
        if request.param != "native":
            mp.setenv("ARGEN_KERNELS", request.param)
        return argen.load("tiny-random", quant="q4_1-a8")


def test_a8_path_rounds_activations_in_every_quantized_matmul(tiny_a8):
    """`-a8` sets every quantized matmul (body and head) on the a8 path: the logits of tokens fed
    through the kernels (a short prefill, then a 6-token feed) move away from the same weights'
    fp32-activation logits, by about what 8-bit rounding costs: less than rounding the weights to 8
    bits does (q8_0 against none; the same block rule on the other operand). Fails if the flag is
    lost on the way to the fused forward (drift 0)."""
    rt = tiny_a8.runtime
    assert tiny_a8.quant == "q4_1-a8" and "8-bit activations" in rt.capabilities.kernels
    assert all(m.act8 for layer in rt.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down))
    assert rt.lm_head.act8
    exact = argen.load("tiny-random", quant="q4_1").runtime
    ids = tiny_a8.encode("eight-bit activations")
    n = len(ids) - 6

    def fed(r):
        cache = r.new_cache(1, 64)
        prefill = forward(r, ids[:n], list(range(n)), cache)[0]
        return prefill, forward(r, ids[n:], list(range(n, len(ids))), cache)[0]

    (pre_a8, got), (pre, want) = fed(rt), fed(exact)
    (pre_w8, w8), (pre_dense, dense) = (fed(argen.load("tiny-random", quant=q).runtime) for q in ("q8_0", "none"))
    for a8, fp32, weights8, reference in ((pre_a8, pre, pre_w8, pre_dense), (got, want, w8, dense)):
        drift = (a8 - fp32).abs().max() / fp32.abs().max()
        assert 0 < drift < (weights8 - reference).abs().max() / reference.abs().max()


def test_exact_strategies_stay_exact_on_the_a8_path(tiny_a8):
    """Greedy speculative decoding (drafts accepted and rejected, chains and trees, prompt lookup)
    reproduces plain greedy decoding on the a8 path, token for token: a row's activation rounding and
    sums never depend on what shares its pass. Fails if the rounding scale were taken over the pass
    (all its rows) instead of each row's block."""
    for tree in (False, True):
        plain = tiny_a8.generate("Speculate", max_new_tokens=40, ignore_eos=True)
        out = check_greedy_identical(tiny_a8, "Speculate", Oracle(plain.token_ids, tree=tree))
        assert 0 < out.stats.draft_tokens_accepted < out.stats.draft_tokens_proposed
    prompt = "abc abc abc abc abc abc abc"
    plain = tiny_a8.generate(prompt, max_new_tokens=48)
    assert tiny_a8.generate(prompt, max_new_tokens=48, strategy="prompt-lookup").token_ids == plain.token_ids


def test_quant_modes_say_what_to_do_when_they_cannot_apply():
    with pytest.raises(argen.ArgenError, match="not a GGUF"):
        argen.load("tiny-random", quant="exact")
    with pytest.raises(argen.ArgenError, match="not a GGUF"):
        argen.load("tiny-random", quant="exact-a8")
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


def test_the_cpu_is_named_with_its_family_and_model():
    """Reports name the CPU; a VM's /proc/cpuinfo may say only "AMD EPYC", so the family and model
    numbers go with it (seen failing when only the model name line was read)."""
    info = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n\n"
    info += "processor\t: 1\ncpu family\t: 99\nmodel\t\t: 9\nmodel name\t: other\n"
    assert kernels.cpu_name_in(info, "x86_64") == "AMD EPYC (family 25, model 1)"
    assert kernels.cpu_name_in("", "x86_64") == "x86_64"
