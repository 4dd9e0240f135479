"""ModelRuntime invariants: parity with Hugging Face, cache truncation, masks, plans, batching."""

from __future__ import annotations

import pytest
import torch

from argen.models.runtime import Plan


def full_logits(gen, ids: list[int]) -> torch.Tensor:
    cache = gen.runtime.new_cache(1, len(ids) + 8)
    logits, _ = gen.runtime.forward(torch.tensor([ids]), torch.arange(len(ids))[None], cache)
    return logits[0]


def hf_logits(gen, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return gen.model.hf_model(torch.tensor([ids])).logits[0]


def test_native_matches_hf_on_tiny(tiny):
    ids = tiny.encode("The quick brown fox jumps over the lazy dog")
    assert (full_logits(tiny, ids) - hf_logits(tiny, ids)).abs().max() < 1e-4


@pytest.mark.real
def test_native_matches_hf_on_default_model(real):
    ids = real.encode("Explain why the sky is blue, in two sentences.")
    diff = (full_logits(real, ids) - hf_logits(real, ids)).abs().max().item()
    assert diff < 1e-4


@pytest.mark.real
def test_incremental_decode_matches_hf_on_default_model(real):
    """Token-by-token decoding through the cache gives HF's logits at every position."""
    ids = real.encode("Name three primary colours.")
    cache = real.runtime.new_cache(1, len(ids))
    real.runtime.forward(torch.tensor([ids[:-6]]), torch.arange(len(ids) - 6)[None], cache, num_logits=0)
    steps = [
        real.runtime.forward(torch.tensor([[t]]), torch.tensor([[p]]), cache)[0][0, -1]
        for p, t in enumerate(ids[-6:], start=len(ids) - 6)
    ]
    assert (torch.stack(steps) - hf_logits(real, ids)[-6:]).abs().max() < 1e-4


@pytest.mark.parametrize("model", ["tiny", "tiny_gpt2"])
def test_truncate_then_recompute_equals_never_extending(model, request):
    gen = request.getfixturevalue(model)
    rt = gen.runtime
    ids = gen.encode("Truncation must be invisible")
    n = len(ids)
    cache = rt.new_cache(1, n + 16)
    rt.forward(torch.tensor([ids]), torch.arange(n)[None], cache, num_logits=0)
    # Extend with a junk draft, roll it back, then feed the real continuation.
    rt.forward(torch.tensor([[5, 6, 7, 8]]), torch.arange(n, n + 4)[None], cache, num_logits=0)
    cache.truncate(n)
    after, _ = rt.forward(torch.tensor([[9, 10]]), torch.arange(n, n + 2)[None], cache)
    fresh = rt.new_cache(1, n + 16)
    rt.forward(torch.tensor([ids]), torch.arange(n)[None], fresh, num_logits=0)
    never, _ = rt.forward(torch.tensor([[9, 10]]), torch.arange(n, n + 2)[None], fresh)
    assert torch.equal(after, never)
    assert cache.lengths == fresh.lengths == [n + 2]


@pytest.mark.parametrize("model", ["tiny", "tiny_gpt2"])
def test_tree_mask_matches_separate_branches(model, request):
    """Two branches scored in one pass with a tree mask equal each branch scored alone."""
    gen = request.getfixturevalue(model)
    rt = gen.runtime
    ids = gen.encode("Trees")
    n = len(ids)
    # tree: root r, then branch A (a1, a2) and branch B (b1), all after the root
    tree = [11, 21, 22, 31]
    parents = [-1, 0, 1, 0]
    mask = torch.zeros(4, 4, dtype=torch.bool)
    for i, p in enumerate(parents):
        mask[i, i] = True
        while p >= 0:
            mask[i, p] = True
            p = parents[p]
    depth = torch.tensor([[0, 1, 2, 1]]) + n
    cache = rt.new_cache(1, n + 8)
    rt.forward(torch.tensor([ids]), torch.arange(n)[None], cache, num_logits=0)
    tree_logits, _ = rt.forward(torch.tensor([tree]), depth, cache, mask=mask)
    for branch, rows in (([11, 21, 22], [0, 1, 2]), ([11, 31], [0, 3])):
        alone = full_logits(gen, ids + branch)[n:]
        assert (tree_logits[0, rows] - alone).abs().max() < 1e-4


def test_plan_skips_layers(tiny):
    rt = tiny.runtime
    ids = tiny.encode("plan")
    n_layers = rt.info.n_layers
    cache = rt.new_cache(1, 64)
    full, _ = rt.forward(torch.tensor([ids]), torch.arange(len(ids))[None], cache, plan=Plan.full(n_layers))
    assert torch.equal(full, full_logits(tiny, ids).unsqueeze(0))
    skipped, _ = rt.forward(
        torch.tensor([ids]),
        torch.arange(len(ids))[None],
        rt.new_cache(1, 64),
        plan=Plan.skipping(n_layers, layers=[1], ffn_only=[2]),
    )
    assert not torch.allclose(full, skipped)
    # Skipping everything leaves the embeddings untouched but for the final norm and head.
    none = Plan((False,) * n_layers, (False,) * n_layers)
    _, hidden = rt.forward(torch.tensor([ids]), torch.arange(len(ids))[None], rt.new_cache(1, 64), plan=none)
    embed = torch.nn.functional.embedding(torch.tensor([ids]), rt.embed)
    from argen.models.llama import rms_norm

    assert torch.allclose(hidden, rms_norm(embed, rt.norm, rt.eps))


def test_batched_rows_of_different_lengths_match_single(tiny):
    rt = tiny.runtime
    prompts = [tiny.encode("short"), tiny.encode("a rather longer prompt than the other")]
    caches = rt.new_cache(2, 128)
    for ids, cache in zip(prompts, caches):
        rt.forward(torch.tensor([ids]), torch.arange(len(ids))[None], cache, num_logits=0)
    nxt = torch.tensor([[40], [41]])
    pos = torch.tensor([[len(prompts[0])], [len(prompts[1])]])
    batched, _ = rt.forward(nxt, pos, caches)
    for r, ids in enumerate(prompts):
        alone = full_logits(tiny, ids + [40 + r])[-1]
        assert (batched[r, -1] - alone).abs().max() < 1e-4


def test_packed_segments_of_any_length_match_running_alone(tiny):
    """One packed pass over a prefill chunk, a 3-token chain and a decode step of three sequences
    gives each what it gets alone (the rows of one pass never see each other's keys)."""
    from argen.models.runtime import Segment

    rt = tiny.runtime
    seqs = [tiny.encode("one sequence"), tiny.encode("another, longer sequence of text"), tiny.encode("x y")]
    feeds = [(seqs[0][:5], seqs[0][5:]), (seqs[1][:-3], seqs[1][-3:]), (seqs[2][:-1], seqs[2][-1:])]
    caches = rt.new_cache(3, 128)
    for (head, _), cache in zip(feeds, caches):
        rt.forward(torch.tensor([head]), torch.arange(len(head))[None], cache, num_logits=0)
    outs = rt.forward_packed(
        [
            Segment(c, tail, list(range(len(head), len(head) + len(tail))), None, None)
            for (head, tail), c in zip(feeds, caches)
        ]
    )
    for (head, tail), out in zip(feeds, outs):
        alone = full_logits(tiny, head + tail)[-len(tail) :]
        assert out.logits.shape == alone.shape and (out.logits - alone).abs().max() < 1e-4


def test_cache_reports_bytes_and_overflow(tiny):
    cache = tiny.runtime.new_cache(1, 10)
    info = tiny.runtime.info
    assert cache.bytes_per_position() == 2 * info.n_layers * info.n_kv_heads * info.head_dim * 4
    with pytest.raises(ValueError, match="overflow"):
        tiny.runtime.forward(torch.zeros(1, 11, dtype=torch.long), torch.arange(11)[None], cache)
