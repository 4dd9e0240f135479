"""Continuous batching below the server: KVCache rows that come and go, and DecodeBatch admitting
requests into a running batch with outputs identical to running each alone."""

from __future__ import annotations

import torch
from helpers import BrokenOnThirdStep

from argen.cache import KVCache
from argen.engine import DecodeBatch, Event, Failure, Request, Result
from argen.sampling import SamplingParams
from argen.strategies import make_strategy


def _fill(cache: KVCache, row: int, n: int, value: float) -> None:
    cache.k[:, row, :, :n] = value
    cache.v[:, row, :, :n] = -value
    cache.lengths[row] = n


def test_add_rows_keeps_existing_rows_and_grows_length():
    cache = KVCache(2, 0, 2, 4, max_len=1)
    assert cache.add_rows(1, max_len=10) == [0]
    _fill(cache, 0, 10, 1.0)
    assert cache.add_rows(2, max_len=100) == [1, 2]  # longer rows: storage is reallocated
    assert cache.batch_size == 3 and cache.max_len >= 100 and cache.lengths == [10, 0, 0]
    assert torch.all(cache.k[:, 0, :, :10] == 1.0) and torch.all(cache.v[:, 0, :, :10] == -1.0)
    _fill(cache, 1, 5, 2.0)
    _fill(cache, 2, 7, 3.0)
    storage = cache.k.data_ptr()
    assert cache.add_rows(1) == [3] and cache.k.data_ptr() == storage  # spare room: no copy
    assert cache.lengths == [10, 5, 7, 0]


def test_select_after_add_rows_compacts_in_place():
    cache = KVCache(2, 0, 2, 4, max_len=1)
    cache.add_rows(4, max_len=8)
    for r in range(4):
        _fill(cache, r, r + 1, float(r + 1))
    storage = cache.k.data_ptr()
    cache.select([1, 3])
    assert cache.k.data_ptr() == storage and cache.batch_size == 2 and cache.lengths == [2, 4]
    assert torch.all(cache.k[:, 0, :, :2] == 2.0) and torch.all(cache.k[:, 1, :, :4] == 4.0)
    assert torch.all(cache.v[:, 1, :, :4] == -4.0)
    cache.select([1, 0])  # a reordering still works (by copy)
    assert cache.lengths == [4, 2] and torch.all(cache.k[:, 0, :, :4] == 4.0)
    assert cache.add_rows(1) == [2] and cache.lengths == [4, 2, 0]


def _request(tiny, prompt: str, n: int) -> Request:
    ids = tiny.encode(prompt, chat=False)
    return Request(ids, SamplingParams(max_new_tokens=n), make_strategy("plain"))


def test_requests_join_a_running_batch_and_match_running_alone(tiny):
    prompts = [("a first prompt", 30), ("second", 12), ("the third one is longer than the others", 20),
               ("4", 25), ("fifth and last", 9)]  # fmt: skip
    alone = [tiny.generate(p, chat=False, max_new_tokens=n).token_ids for p, n in prompts]
    batch = DecodeBatch(tiny.engine)
    got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    finished = {}
    batch.admit(0, _request(tiny, *prompts[0]))
    steps = 0
    while batch.sequences or len(finished) < len(prompts):
        if steps in (3, 4, 10, 11) and len(batch.sequences) + len(finished) < len(prompts):
            i = len(batch.sequences) + len(finished)
            batch.admit(i, _request(tiny, *prompts[i]))  # joins mid-run, at a different length
        for item in batch.step():
            if isinstance(item, Event):
                got[item.index] += item.token_ids
            else:
                assert isinstance(item, Result)
                finished[item.index] = item
        steps += 1
    for i, want in enumerate(alone):
        assert got[i] == want == finished[i].token_ids
    assert batch.cache.batch_size == 0


def test_removing_a_sequence_leaves_the_others_unchanged(tiny):
    alone = tiny.generate("keep me", chat=False, max_new_tokens=20).token_ids
    batch = DecodeBatch(tiny.engine)
    keep = batch.admit(0, _request(tiny, "keep me", 20))
    drop = batch.admit(1, _request(tiny, "drop me after a few steps", 20))
    out = []
    for step in range(20):
        if step == 5:
            batch.remove([drop])
        out += [t for item in batch.step() if isinstance(item, Event) and item.index == 0 for t in item.token_ids]
    assert out == alone and keep.finish_reason == "length" and not batch.sequences


def _drain(batch: DecodeBatch) -> tuple[dict[int, list[int]], list[Failure]]:
    out: dict[int, list[int]] = {}
    failures = []
    while batch:
        for item in batch.step():
            if isinstance(item, Event):
                out.setdefault(item.index, []).extend(item.token_ids)
            elif isinstance(item, Failure):
                failures.append(item)
    return out, failures

def test_unbatchable_strategies_step_alongside_the_batch_and_fail_alone(tiny):
    text = "abc abc abc abc abc"
    lookup = Request(tiny.encode(text, chat=False), SamplingParams(max_new_tokens=20), make_strategy("prompt-lookup"))
    broken = Request(tiny.encode("x", chat=False), SamplingParams(max_new_tokens=20), BrokenOnThirdStep())
    batch = DecodeBatch(tiny.engine)
    batch.admit(0, _request(tiny, "plain one", 20))
    batch.admit(1, lookup)
    batch.admit(2, broken)
    assert len(batch.sequences) == 1 and len(batch.solo) == 2
    out, failures = _drain(batch)
    assert out[0] == tiny.generate("plain one", chat=False, max_new_tokens=20).token_ids
    assert out[1] == tiny.generate(text, chat=False, max_new_tokens=20).token_ids
    assert [(f.index, str(f.error)) for f in failures] == [(2, "boom")] and len(out[2]) == 2


def test_hf_adapter_sequences_step_one_by_one_in_a_batch(tiny_gpt2):
    prompts = [("first", 12), ("a second prompt", 7)]
    batch = DecodeBatch(tiny_gpt2.engine)
    for i, (p, n) in enumerate(prompts):
        batch.admit(i, _request(tiny_gpt2, p, n))
    assert batch.cache is None and len(batch.solo) == 2
    out, failures = _drain(batch)
    assert not failures
    for i, (p, n) in enumerate(prompts):
        assert out[i] == tiny_gpt2.generate(p, chat=False, max_new_tokens=n).token_ids


def test_ragged_decode_step_matches_each_row_alone(tiny, monkeypatch):
    """One token per row at different cache lengths: each row attends over its own keys only
    (LlamaRuntime._ragged_attention) and gets the logits it would get alone."""
    runtime = tiny.runtime
    prompts = [list(range(1, 6)), list(range(10, 40)), list(range(50, 62))]
    batch = runtime.new_cache(0, 1)
    batch.add_rows(len(prompts), 64)
    alone = []
    for r, ids in enumerate(prompts):
        row = batch.row(r)
        runtime.forward(torch.tensor([ids[:-1]]), torch.arange(len(ids) - 1)[None], row, num_logits=0)
        batch.lengths[r] = row.lengths[0]
        solo = runtime.new_cache(1, 64)
        runtime.forward(torch.tensor([ids[:-1]]), torch.arange(len(ids) - 1)[None], solo, num_logits=0)
        logits, _ = runtime.forward(torch.tensor([[ids[-1]]]), torch.tensor([[len(ids) - 1]]), solo, num_logits=1)
        alone.append(logits[0, -1])
    tokens = torch.tensor([[ids[-1]] for ids in prompts])
    positions = torch.tensor([[len(ids) - 1] for ids in prompts])
    calls = []
    ragged = runtime._ragged_attention
    monkeypatch.setattr(runtime, "_ragged_attention", lambda *a: calls.append(1) or ragged(*a))
    logits, _ = runtime.forward(tokens, positions, batch, num_logits=1)
    assert len(calls) == runtime.info.n_layers
    for r, want in enumerate(alone):
        torch.testing.assert_close(logits[r, -1], want, rtol=1e-4, atol=1e-4)  # batched matmuls: last bits
        assert int(logits[r, -1].argmax()) == int(want.argmax())
    assert batch.lengths == [len(ids) for ids in prompts]
