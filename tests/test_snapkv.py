"""SnapKV (cache/press_attention.py `SnapKV`): the observation window's scores are the attention Hugging
Face's eager attention gives from the newest queries, and a press keeps each head's best-scored
positions after pooling, plus the window. (Budget 1 = no press, true positions, composition with
prompt-lookup and beam, admission: test_press.py, which runs every press.)"""

from __future__ import annotations

import torch

from argen.cache.press import QueryWindow, SnapKV, make_press
from argen.models.runtime import Segment

GREEDY = {"temperature": 0.0, "ignore_eos": True}


def hf_attention(gen, prompt: list[int]) -> torch.Tensor:
    """HF eager attention weights [layers, heads, queries, keys] on the same weights."""
    hf = gen.model.hf_model
    hf.config._attn_implementation = "eager"
    try:
        with torch.inference_mode():
            attentions = hf(torch.tensor([prompt]), output_attentions=True).attentions
    finally:
        hf.config._attn_implementation = "sdpa"
    return torch.stack(attentions)[:, 0].float()


def test_the_window_scores_are_hf_eager_attention_from_the_newest_queries(tiny):
    """A prefill of 40 tokens and 3 steps, window 8: the scores are the weights the last 8 queries gave
    each key (summed over them and over each kv head's query heads); rejected-draft queries (slots past
    the cache) are left out."""
    prompt = [(13 * i) % 90 + 3 for i in range(43)]
    runtime, info = tiny.runtime, tiny.runtime.info
    cache = runtime.new_cache(1, 64)
    make_press({"name": "snapkv", "budget": 0.5, "window_size": 8}).prepare(cache)
    runtime.forward_packed([Segment(cache, prompt[:40], list(range(40)), None, 0)])
    for i in range(40, 43):
        runtime.forward_packed([Segment(cache, [prompt[i]], [i], None, 1)])
    assert cache.window.slots.tolist() == list(range(35, 43))
    k, _ = cache.gathered()
    got = cache.window.scores(k, 43)
    per_head = hf_attention(tiny, prompt)[:, :, 35:].sum(2)  # [layers, heads, keys]
    expected = per_head.view(info.n_layers, info.n_kv_heads, -1, 43).sum(2)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    # A query past the cache's length (a draft the verifier rejected, then truncated) is not counted.
    only_first = cache.window.scores(k[:, :, :41], 41)
    expected = hf_attention(tiny, prompt[:41])[:, :, 35:41].sum(2).view(info.n_layers, info.n_kv_heads, -1, 41).sum(2)
    assert torch.allclose(only_first, expected, atol=1e-4)
    cache.free()


def test_snapkv_keeps_each_heads_pooled_best_and_the_window(tiny):
    info = tiny.runtime.info
    L, H, D = info.n_layers, info.n_kv_heads, info.head_dim
    g = torch.Generator().manual_seed(0)
    cache = tiny.runtime.new_cache(1, 256)
    k, v = torch.randn(L, H, 100, D, generator=g), torch.randn(L, H, 100, D, generator=g)
    cache.rewrite(0, k, v)
    scores = torch.rand(L, H, 100, generator=g) * 0.01
    best = {(l, h): int(torch.randint(5, 85, (1,), generator=g)) for l in range(L) for h in range(H)}
    for (l, h), p in best.items():
        scores[l, h, p] = 10.0  # pooled with kernel 3, p and its two neighbours score highest

    class Fixed(QueryWindow):
        def scores(self, keys, length):
            return scores[..., :length]

    cache.window = Fixed(4)
    cache.window.queries = {0: (torch.zeros(4, H, D), torch.arange(96, 100))}
    removed = SnapKV(budget=0.07, window_size=4, kernel=3).apply(cache, 100)  # 7 kept: 3 pooled best + 4 window
    assert removed == 93 and cache.lengths[0] == 7
    got_k, got_v = cache.gathered()
    for (l, h), p in best.items():
        kept = [p - 1, p, p + 1, 96, 97, 98, 99]
        assert torch.equal(got_k[l, h], k[l, h, kept]) and torch.equal(got_v[l, h], v[l, h, kept])
    assert cache.window.slots.tolist() == [3, 4, 5, 6]  # the window follows its positions
    # Control: without pooling, only the peak and the next-best random positions are kept.
    cache.rewrite(0, k, v)
    cache.window.queries = {0: (torch.zeros(4, H, D), torch.arange(96, 100))}
    SnapKV(budget=0.07, window_size=4, kernel=1).apply(cache, 100)
    assert not torch.equal(cache.gathered()[0][0, 0, :3], k[0, 0, [best[0, 0] - 1, best[0, 0], best[0, 0] + 1]])
    cache.free()


def test_snapkv_on_the_engine_differs_from_h2o_and_forks_its_window(tiny):
    prompt = [(11 * i) % 251 + 3 for i in range(300)]
    outs = {
        name: tiny.generate(
            prompt, max_new_tokens=20, press={"name": name, "budget": 0.3, "chunk": 0}, **GREEDY
        ).token_ids
        for name in ("snapkv", "h2o")
    }
    assert outs["snapkv"] != outs["h2o"]
    results = tiny.generate(prompt, n=2, max_new_tokens=16, temperature=0.8, seed=4, press="snapkv")
    again = tiny.generate(prompt, max_new_tokens=16, temperature=0.8, seed=results[1].seed, press="snapkv")
    assert again.token_ids == results[1].token_ids
