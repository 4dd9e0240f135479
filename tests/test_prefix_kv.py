"""Per-layer budgets (`prefix-kv`, cache/press.py PrefixKV) and the front that holds a length per layer
(cache/layer_front.py): the allotment equalizes the layers' retention and fills the budget exactly;
the front's layout in the pool round-trips and accounts its blocks; attention over a front of
different lengths per layer is the attention over the slots it holds (masked feeds included); on the
engine, the layers keep different counts that add up to the budget. (Budget 1 = no press, true
positions, composition with prompt-lookup and beam, admission: test_press.py, which runs every press.)"""

from __future__ import annotations

import pytest
import torch

from argen.cache.layer_front import LayerFront
from argen.cache.press import allot, make_press
from argen.models.runtime import Segment

GREEDY = {"temperature": 0.0, "ignore_eos": True}


def test_allot_gives_a_concentrated_layer_few_slots_and_a_spread_one_many():
    peaked = torch.tensor([[10.0, 0.1, 0.1, 0.1, 0.1, 0.1]])  # one position holds almost all its attention
    flat = torch.ones(1, 6)
    assert allot([peaked, flat], 6) == [1, 5]  # retention 0.95 after 1 slot; flat needs 5 to pass it
    assert allot([flat, flat], 6) == [3, 3]  # alike layers share evenly (ties: the earlier layer first)
    assert allot([flat, flat], 7) == [4, 3]
    assert allot([peaked, flat], 20) == [6, 6]  # never more than a layer's candidates
    # Heads: a layer's retention is its heads' mean, each head ranking its own positions.
    two_heads = torch.tensor([[5.0, 0, 0, 0], [0, 0, 0, 5.0]])
    assert allot([two_heads, torch.ones(1, 4)], 4) == [1, 3]


def test_allot_control_a_retention_not_normalized_per_layer_would_differ():
    """Control: the retention is each layer's share of its own mass: scaling a layer changes nothing."""
    a, b = torch.tensor([[3.0, 2, 1, 1]]), torch.tensor([[1.0, 1, 1, 0.5]])
    assert allot([a, b], 5) == allot([100 * a, b], 5) == allot([a, 0.01 * b], 5) == [2, 3]
    assert allot([b, b], 5) == [3, 2]  # and the shape of the ranking is what moves the counts


def ragged(info, lengths: list[int], seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(info.n_kv_heads, n, info.head_dim) for n in lengths]
    return [torch.randn(s, generator=g) for s in shapes], [torch.randn(s, generator=g) for s in shapes]


def test_a_layer_front_round_trips_and_holds_whole_blocks(tiny):
    info, pool = tiny.runtime.info, tiny.runtime.kv_pool()
    held = pool.held
    lengths = [5, 40, 17, 1][: info.n_layers] + [16] * max(0, info.n_layers - 4)
    keys, values = ragged(info, lengths)
    front = LayerFront(pool, keys, values, [torch.zeros(info.n_kv_heads, n) for n in lengths])
    units = sum(-(-n // 16) for n in lengths)
    assert len(front.blocks) == -(-units // info.n_layers) and pool.held == held + len(front.blocks)
    assert front.nbytes == len(front.blocks) * pool.bytes_per_block()
    assert front.positions == -(-sum(lengths) // info.n_layers)
    for i in range(info.n_layers):
        k, v = front.layer(i)
        assert torch.equal(k, keys[i]) and torch.equal(v, values[i])
    twin = front.fork()  # shares the blocks, copies the scores
    twin.observe(0, torch.ones(info.n_kv_heads, lengths[0]))
    assert float(front.scores[0].sum()) == 0 and float(twin.scores[0].sum()) == info.n_kv_heads * lengths[0]
    front.release()
    assert pool.held == held + len(twin.blocks)
    assert torch.equal(twin.layer(1)[0], keys[1])
    twin.release()
    assert pool.held == held


def prefilled(gen, prompt: list[int]):
    cache = gen.runtime.new_cache(1, 256)
    gen.runtime.forward_packed([Segment(cache, prompt, list(range(len(prompt))), None, 0)])
    return cache


def feed(gen, cache, tokens: list[int], start: int, one_by_one: bool) -> torch.Tensor:
    if one_by_one:
        outs = [
            gen.runtime.forward_packed([Segment(cache, [t], [start + j], None, 1)])[0].logits[-1]
            for j, t in enumerate(tokens)
        ]
        return torch.stack(outs)
    return gen.runtime.forward_packed([Segment(cache, tokens, list(range(start, start + len(tokens))), None, None)])[
        0
    ].logits


def test_attention_over_a_front_is_attention_over_the_slots_it_holds(tiny):
    """The same kept positions in every layer: a front gives the logits of blocks rewritten to them.
    Different positions per layer: a three-token feed (a mask whose front columns are rebuilt per
    layer) gives the logits of the same tokens fed one by one (no mask), and the control, the
    equal-length front, other logits."""
    info = tiny.runtime.info
    prompt, new = [(7 * i) % 90 + 3 for i in range(40)], [5, 17, 29]
    kept = [0, 1, 2, 9, 20, 30, 35, 38, 39]
    blocks, front = prefilled(tiny, prompt), prefilled(tiny, prompt)
    k, v = blocks.gathered()
    blocks.rewrite(0, k[:, :, kept], v[:, :, kept])
    front.press_into_front(
        [k[i][:, kept] for i in range(info.n_layers)], [v[i][:, kept] for i in range(info.n_layers)], None
    )
    assert front.offset == len(kept) and front.blocks == [] and front.layer_front is not None
    want = feed(tiny, blocks, new, 40, one_by_one=False)
    assert torch.allclose(feed(tiny, front, new, 40, one_by_one=False), want, atol=1e-5)

    per_layer = [kept[: 5 + 2 * i] + [39] for i in range(info.n_layers)]  # 6, 8, .. slots
    masked, stepped = prefilled(tiny, prompt), prefilled(tiny, prompt)
    for cache in (masked, stepped):
        cache.press_into_front(
            [k[i][:, p] for i, p in enumerate(per_layer)], [v[i][:, p] for i, p in enumerate(per_layer)], None
        )
        assert cache.layer_front.lengths == [len(p) for p in per_layer]
    got = feed(tiny, masked, new, 40, one_by_one=False)
    assert torch.allclose(got, feed(tiny, stepped, new, 40, one_by_one=True), atol=1e-4)  # rows: 3 vs 1
    assert not torch.allclose(got, want, atol=1e-3)  # control: the layers' own slots were read
    for cache in (blocks, front, masked, stepped):
        cache.free()


def hf_received(gen, prompt: list[int]) -> torch.Tensor:
    """The attention each position received [layers, kv heads, positions] from Hugging Face's eager
    attention on the same weights: summed over every query and over each kv head's query heads."""
    hf, info = gen.model.hf_model, gen.runtime.info
    hf.config._attn_implementation = "eager"
    try:
        with torch.inference_mode():
            attentions = hf(torch.tensor([prompt]), output_attentions=True).attentions
    finally:
        hf.config._attn_implementation = "sdpa"
    per_head = torch.stack(attentions)[:, 0].float().sum(2)  # [layers, heads, keys]
    return per_head.view(info.n_layers, info.n_kv_heads, -1, len(prompt)).sum(2)


def prefilled_with(gen, prompt: list[int], press):
    cache = gen.runtime.new_cache(1, 256)
    if press is not None:
        press.prepare(cache)
    gen.runtime.forward_packed([Segment(cache, prompt, list(range(len(prompt))), None, 0)])
    return cache


def test_a_press_keeps_each_heads_best_scored_positions_by_hf_eager_attention(tiny):
    """A prompt of 120 tokens pressed once to 0.3: in every layer and kv head the front holds the recent
    window and, before it, positions whose attention received (from HF's eager attention, not from
    argen's record) is at least that of every position dropped; each layer's count is PrefixKV's
    allotment of those same scores (here 16 to 19: the layers differ). Which positions were kept is
    read off the front's keys, matched to an unpressed prefill's. Guards against keeping the
    lowest-scored positions (`topk(..., largest=False)`), which every test that compares the press
    with itself passes. (The smallest margin here, worst kept minus best dropped, is 0.016.)"""
    prompt = [(13 * i) % 90 + 3 for i in range(120)]
    info = tiny.runtime.info
    press = make_press({"name": "prefix-kv", "budget": 0.3})
    cache = prefilled_with(tiny, prompt, press)
    assert press.apply(cache, len(prompt)) > 0 and cache.layer_front is not None
    plain = prefilled_with(tiny, prompt, None)
    keys = plain.gathered()[0]  # [layers, kv heads, positions, D]
    scores = hf_received(tiny, prompt)
    target = press.target(len(prompt))
    recent = press.recent(target)
    candidates = len(prompt) - recent
    window = set(range(candidates, len(prompt)))
    counts = allot([scores[i, :, :candidates] for i in range(info.n_layers)], info.n_layers * (target - recent))
    assert [n - recent for n in cache.layer_front.lengths] == counts and len(set(counts)) > 1
    for i in range(info.n_layers):
        front_keys = cache.layer_front.layer(i)[0]
        for h in range(info.n_kv_heads):
            position = torch.cdist(front_keys[h], keys[i, h]).argmin(-1)
            assert torch.equal(front_keys[h], keys[i, h, position]), "a front key is no position's key"
            kept = set(position.tolist())
            assert window <= kept, (i, h)
            heavy, dropped = sorted(kept - window), sorted(set(range(candidates)) - kept)
            assert len(heavy) == counts[i]
            worst_kept, best_dropped = scores[i, h, heavy].min(), scores[i, h, dropped].max()
            assert worst_kept >= best_dropped - 2e-4, (  # (2e-4: argen's record and HF's differ by 1e-4)
                f"layer {i} head {h} kept a position scored {worst_kept:.4f} and dropped one scored {best_dropped:.4f}"
            )
    cache.free()
    plain.free()


def test_on_the_engine_the_layers_keep_their_own_counts(tiny):
    pool = tiny.runtime.kv_pool()
    prompt = [(11 * i) % 251 + 3 for i in range(300)]
    r = tiny.generate(prompt, max_new_tokens=20, press={"name": "prefix-kv", "budget": 0.3}, **GREEDY)
    press = r.extras["press"]
    counts, n_layers = press["layer_positions"], tiny.runtime.info.n_layers
    assert len(counts) == n_layers and len(set(counts)) > 1
    # After the last press the layers add up to the budget exactly (the front's mean is the budget's
    # target); the positions written since sit in blocks after it.
    seen = len(prompt) + 20 - 1
    kept = press["kept_positions"]
    front = -(-sum(counts) // n_layers)
    assert 0 <= kept - front < 16 + 1 and front == -(-(0.3 * (seen - (kept - front))) // 1)
    units = sum(-(-c // 16) for c in counts)
    blocks = -(-units // n_layers) + -(-(kept - front) // 16)
    assert r.stats.kv_bytes_held == blocks * pool.bytes_per_block()


@pytest.mark.parametrize(
    "spec, words",
    [
        ({"name": "prefix-kv", "heavy": -0.1}, "heavy must be a finite number in [0, 1]"),
        ({"name": "prefix-kv", "per_head": True}, "unknown option(s) per_head"),
    ],
)
def test_bad_prefix_kv_options(spec, words):
    from argen.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        make_press(spec)


def test_sampled_samples_share_the_front_and_replay_alone(tiny):
    prompt = [(11 * i) % 251 + 3 for i in range(200)]
    press = {"name": "prefix-kv", "budget": 0.4}
    held = tiny.runtime.kv_pool().held
    results = tiny.generate(prompt, n=3, max_new_tokens=24, temperature=0.8, seed=3, press=press)
    assert tiny.runtime.kv_pool().held == held  # every fork gave its share of the front back
    again = tiny.generate(prompt, max_new_tokens=24, temperature=0.8, seed=results[2].seed, press=press)
    assert again.token_ids == results[2].token_ids
