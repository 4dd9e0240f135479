"""The quantizing presses (`kv-quant`, `gear`; cache/quant.py): the codes round-trip within half a
step, GEAR's parts do what they claim, the bytes reported are the stored tensors' bytes exactly,
attention reads the quantized front as if it were the dequantized keys and values, nothing changes
while no group is old enough, and the presses compose with speculative and search strategies."""

from __future__ import annotations

import pytest
import torch

from argen.cache.press import make_press
from argen.cache.quant import GROUP, compress, dequantize, pack, quantize, unpack
from argen.models.runtime import Segment

GREEDY = {"temperature": 0.0, "ignore_eos": True}
PROMPTS = [[(7 * i) % 50 + 3 for i in range(150)], list(range(3, 200)), [5, 9, 11, 5, 9, 11] * 30]
STRATEGIES = ["plain", {"name": "prompt-lookup", "adaptive": False, "max_draft": 4}, {"name": "beam", "num_beams": 2}]


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_round_trip_within_half_a_step(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 64), dtype=torch.uint8)
    assert torch.equal(unpack(pack(codes, bits), bits), codes)
    assert pack(codes, bits).shape[-1] == 64 * bits // 8
    x = randn(4, GROUP, 64)
    for dim in (-1, -2):
        packed, scale, lo = quantize(x, bits, dim)
        error = (dequantize(packed, scale, lo, bits) - x).abs()
        assert bool((error <= scale.float() / 2 + 1e-4).all())  # the nearest level, on the fp16 scale


def test_gear_parts():
    """Full rank reconstructs the quantization residual (to fp16); the outliers come back exactly (to
    fp16); each part lowers the error of the plain codes."""
    k, v = randn(2, 3, 2 * GROUP, 16, seed=1), randn(2, 3, 2 * GROUP, 16, seed=2)
    k[..., 3] *= 30  # an outlier channel, as real keys have

    def error(**codec) -> float:
        q = compress(k, v, 4, **codec)
        got = torch.stack([q.layer(i)[0] for i in range(2)])
        return float((got - k).pow(2).mean() / k.pow(2).mean())

    plain, low_rank, outliers, full = error(), error(rank=4), error(outliers=0.05), error(rank=16)
    assert full < 1e-5 < plain
    assert low_rank < plain and outliers < plain
    q = compress(k, v, 2, outliers=0.02)
    got = torch.stack([q.layer(i)[0] for i in range(2)])
    largest = k.abs().flatten().topk(20).indices  # every one of them is among some group's outliers
    assert torch.equal(got.flatten()[largest], k.flatten()[largest].half().float())


@pytest.mark.parametrize("codec", [{"bits": 8}, {"bits": 4}, {"bits": 2}, {"bits": 4, "rank": 4, "outliers": 0.02}])
def test_bytes_are_the_stored_tensors(tiny, codec):
    info, pool = tiny.runtime.info, tiny.runtime.kv_pool()
    L, H, D = info.n_layers, info.n_kv_heads, info.head_dim
    held_before = pool.held
    cache = tiny.runtime.new_cache(1, 512)
    cache.rewrite(0, randn(L, H, 200, D), randn(L, H, 200, D, seed=1))
    cache.quantize_front(3 * GROUP, **codec)
    bits, rank, k = codec["bits"], codec.get("rank", 0), round(codec.get("outliers", 0) * GROUP * D)
    groups = L * H * 3
    expected = {
        "codes": 2 * groups * GROUP * D * bits // 8,
        "scales": groups * 2 * 2 * D + groups * GROUP * 2 * 2,  # keys per channel, values per token
        "low_rank": 2 * groups * (GROUP * rank + rank * D) * 2,
        "outliers": 2 * groups * k * (2 + 2),
    }
    assert cache.quantized.nbytes_by_part() == expected
    assert cache.offset == 3 * GROUP and cache.lengths[0] == 200 and len(cache.blocks) == 1  # 8 positions in blocks
    assert cache.held_bytes == pool.bytes_per_block() + sum(expected.values())
    assert pool.held - held_before == 1  # the quantized blocks went back to the pool
    with pytest.raises(ValueError, match="quantized"):
        cache.truncate(100)
    cache.free()
    assert pool.held == held_before and cache.quantized is None


def test_attention_reads_the_quantized_front(tiny):
    """A pass over a cache with a quantized front gives the logits of the same pass over blocks that
    hold the dequantized keys and values (both on torch's path); the control without the front
    differs."""
    prompt = PROMPTS[1][:150]
    runtime = tiny.runtime
    caches = [runtime.new_cache(1, 200) for _ in range(3)]
    for cache in caches:
        runtime.forward_packed([Segment(cache, prompt, list(range(150)), None, 0)])
    quantized, dequantized, control = caches
    quantized.quantize_front(2 * GROUP, bits=4, rank=2, outliers=0.02)
    k, v = quantized.gathered()
    dequantized.rewrite(0, k, v)
    control.rewrite(2 * GROUP, *(t[:, :, 2 * GROUP :] for t in dequantized.gathered()))  # no front at all
    logits = [runtime.forward_packed([Segment(c, [9], [150], None, 1, ffn_cos=True)])[0].logits for c in caches]
    assert torch.allclose(logits[0], logits[1], atol=1e-5)
    assert not torch.allclose(logits[0], logits[2], atol=1e-2)
    for cache in caches:
        cache.free()


@pytest.mark.parametrize("strategy", STRATEGIES, ids=["plain", "prompt-lookup", "beam"])
def test_quantizing_presses_compose_with_strategies(tiny, strategy):
    """While no group is older than `recent`, a quantizing press changes nothing (token-identical);
    with recent 0 every whole group is quantized, and the outputs are valid."""
    specs = [
        {"name": "kv-quant", "bits": 8, "recent": 4096},
        {"name": "gear", "recent": 4096},
        {"name": "kv-quant", "bits": 4},
        {"name": "gear", "bits": 2},
    ]
    requests = []
    for press in [None, *specs]:
        requests += tiny._requests(PROMPTS, False, strategy, {"max_new_tokens": 24, **GREEDY}, press=press)
    results = tiny.engine.run(requests)
    base, *pressed = (results[i : i + len(PROMPTS)] for i in range(0, len(results), len(PROMPTS)))
    for spec, rows in zip(specs, pressed, strict=True):
        if spec.get("recent"):
            assert [r.token_ids for r in rows] == [r.token_ids for r in base], spec
            assert all("quantized_positions" not in r.extras["press"] for r in rows)
            continue
        for prompt, r in zip(PROMPTS, rows, strict=True):
            assert len(r.token_ids) == 24 and all(0 <= t < tiny.runtime.info.vocab_size for t in r.token_ids)
            held = len(prompt) + 24 - 1
            assert r.extras["press"]["quantized_positions"] == held // GROUP * GROUP or strategy != "plain"
            assert r.stats.kv_bytes_held < r.stats.peak_kv_bytes
    assert make_press({"name": "gear"}).spec() == {"name": "gear", "bits": 4, "rank": 4, "outliers": 0.02, "recent": 0}


def test_a_quantized_sample_replays(tiny):
    """Sampled samples under a quantizing press (forks share the store until they grow it) each replay
    alone."""
    press = {"name": "gear", "bits": 4}
    results = tiny.generate(PROMPTS[0], n=3, max_new_tokens=40, temperature=0.8, seed=3, press=press)
    for r in results:
        again = tiny.generate(PROMPTS[0], max_new_tokens=40, temperature=0.8, seed=r.seed, press=press)
        assert again.token_ids == r.token_ids
