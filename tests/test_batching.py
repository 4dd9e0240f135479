"""The one decode loop below the server: paged KV memory (blocks, forks, prefix caching), and
DecodeBatch running every strategy's sequences together, joining and leaving, with outputs identical
to running each alone."""

from __future__ import annotations

import pytest
import torch
from helpers import BrokenOnThirdStep

from argen.cache.paged import BlockPool, KVCacheFull, SeqKV
from argen.engine import DecodeBatch, Event, Failure, Request, Result
from argen.sampling import SamplingParams
from argen.strategies import make_strategy


def _pool(blocks: int = 8, size: int = 4) -> BlockPool:
    return BlockPool(n_layers=2, n_kv_heads=1, head_dim=2, max_blocks=blocks, block_size=size)


def _write(cache: SeqKV, n: int, value: float) -> None:
    """Append n positions whose keys are `value` (as a forward pass would, through reserve)."""
    start = cache.lengths[0]
    cache.reserve(n)
    slots = cache.slots(start, n)
    size = cache.pool.block_size
    cache.pool.k[:, :, slots // size, slots % size] = value
    cache.pool.v[:, :, slots // size, slots % size] = -value
    cache.lengths[0] = start + n


def _keys(cache: SeqKV) -> torch.Tensor:
    slots = cache.slots(0, cache.lengths[0])
    size = cache.pool.block_size
    return cache.pool.k[0, 0, slots // size, slots % size, 0]


def test_blocks_are_taken_as_needed_and_given_back_on_truncate():
    pool = _pool()
    cache = SeqKV(pool, max_len=20)
    _write(cache, 6, 1.0)
    assert len(cache.blocks) == 2 and pool.held == 2 and cache.held_bytes == 2 * pool.bytes_per_block()
    cache.truncate(3)
    assert len(cache.blocks) == 1 and pool.held == 1 and _keys(cache).tolist() == [1.0] * 3
    with pytest.raises(ValueError, match="overflow"):
        cache.reserve(30)
    cache.free()
    assert pool.held == 0 and len(pool.free) == pool.max_blocks


def test_a_pool_made_under_inference_mode_can_be_edited_outside_it():
    """The first pass to need a runtime's pool may run under inference mode (building a CAAD store);
    strategies then edit the cache in place outside it (move_slots after a verified draft tree).
    Seen failing when BlockPool allocated its tensors in whatever mode its caller ran: the draft-head
    tests failed with "Inplace update to inference tensor" after the CAAD tests on the shared model."""
    with torch.inference_mode():
        pool = _pool()
    cache = SeqKV(pool, max_len=20)
    _write(cache, 3, 1.0)
    cache.move_slots([2], 1)
    assert _keys(cache).tolist() == [1.0, 1.0, 1.0]


def test_fork_shares_blocks_until_a_write_copies_them():
    pool = _pool()
    a = SeqKV(pool, max_len=20)
    _write(a, 6, 1.0)  # one full block and half of a second
    b = a.fork()
    assert b.blocks == a.blocks and pool.held == 2
    _write(b, 1, 2.0)  # writes into the shared half-full block: b gets its own copy of it
    assert b.blocks[0] == a.blocks[0] and b.blocks[1] != a.blocks[1] and pool.held == 3
    assert _keys(a).tolist() == [1.0] * 6 and _keys(b).tolist() == [1.0] * 6 + [2.0]
    a.free()
    assert pool.held == 2 and _keys(b).tolist() == [1.0] * 6 + [2.0]


def test_prefix_blocks_are_found_by_hash_and_evicted_least_recently_used():
    pool = _pool(blocks=4)
    tokens, positions = list(range(10)), list(range(10))
    first = SeqKV(pool, max_len=16)
    _write(first, 9, 5.0)
    first.register_prefix(tokens, positions)  # two full blocks of 4 become findable
    second = SeqKV(pool, max_len=16)
    assert second.attach_prefix(tokens[:9], positions[:9]) == 8 and second.blocks == first.blocks[:2]
    assert _keys(second).tolist() == [5.0] * 8
    other = SeqKV(pool, max_len=16)
    assert other.attach_prefix([9, 9, 9, 9, 9], list(range(5))) == 0  # another prefix: no hit
    first.free()
    second.free()  # the cached blocks stay, held by nobody, until space is needed
    assert pool.held == 0 and len(pool.evictable) == 2
    taken = [pool.allocate() for _ in range(4)]  # needs every block: the cached ones are evicted
    assert len(set(taken)) == 4 and not pool.evictable and not pool.by_hash
    with pytest.raises(KVCacheFull, match="full"):
        pool.allocate()


def test_the_prefix_cache_reuses_written_memory_before_it_writes_a_new_block():
    """A long-running server's memory stays at the most its requests held at once (issue 24): a
    cached block nobody holds is taken before a block never written, a freed one before either."""
    pool = _pool(blocks=8)
    first = SeqKV(pool, max_len=16)
    _write(first, 9, 5.0)  # blocks 0-2 written
    first.register_prefix(list(range(9)), list(range(9)))  # two full blocks cached
    first.free()
    assert pool.written == 3 and len(pool.evictable) == 2 and pool.free[-1] == 2  # block 2: freed, not cached
    assert pool.allocate() == 2  # the freed block first
    assert pool.allocate() in (0, 1) and len(pool.evictable) == 1  # then the oldest cached one, not block 3
    assert pool.written == 3
    pool.drop_cached()
    assert [pool.allocate() for _ in range(2)] in ([0, 3], [1, 3])  # fresh memory only once nothing is cached
    assert pool.written == 4


def _request(tiny, prompt: str, n: int, strategy="plain") -> Request:
    ids = tiny.encode(prompt, chat=False)
    return Request(ids, SamplingParams(max_new_tokens=n), make_strategy(strategy))


def test_requests_join_a_running_batch_and_match_running_alone(tiny):
    prompts = [
        ("a first prompt", 30),
        ("second", 12),
        ("the third one is longer than the others", 20),
        ("4", 25),
        ("fifth and last", 9),
    ]
    alone = [tiny.generate(p, chat=False, max_new_tokens=n).token_ids for p, n in prompts]
    held_before = tiny.runtime.kv_pool().held  # (the session's model: other tests may hold blocks)
    batch = DecodeBatch(tiny.engine, prefix_caching=False)
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
    assert tiny.runtime.kv_pool().held == held_before and batch.reserved_blocks == 0  # every block given back


def test_removing_a_sequence_leaves_the_others_unchanged(tiny):
    alone = tiny.generate("keep me", chat=False, max_new_tokens=20).token_ids
    batch = DecodeBatch(tiny.engine)
    keep = batch.admit(0, _request(tiny, "keep me", 20))
    drop = batch.admit(1, _request(tiny, "drop me after a few steps", 20))
    out = []
    for step in range(25):
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


def test_every_strategy_decodes_in_the_same_passes_and_one_failure_stays_alone(tiny):
    text = "abc abc abc abc abc"
    specs = [
        "plain",
        "prompt-lookup",
        "ngram",
        {"name": "jacobi", "adaptive": False},
        "contrastive",
        {"name": "beam", "num_beams": 3},
        {"name": "layer-skip", "skip_layers": [1]},
    ]
    held_before = tiny.runtime.kv_pool().held
    batch = DecodeBatch(tiny.engine)
    for i, spec in enumerate(specs):
        batch.admit(i, _request(tiny, text, 16, spec))
    broken = Request(tiny.encode("x", chat=False), SamplingParams(max_new_tokens=20), BrokenOnThirdStep())
    batch.admit(len(specs), broken)
    out, failures = _drain(batch)
    for i, spec in enumerate(specs):
        assert out[i] == tiny.generate(text, chat=False, max_new_tokens=16, strategy=spec).token_ids, spec
    assert [(f.index, str(f.error)) for f in failures] == [(len(specs), "boom")] and len(out[len(specs)]) == 2
    assert tiny.runtime.kv_pool().held == held_before  # beams' forks, drafts' slots: every block given back


def test_hf_adapter_sequences_run_in_one_loop(tiny_gpt2):
    prompts = [("first", 12), ("a second prompt", 7)]
    batch = DecodeBatch(tiny_gpt2.engine)
    for i, (p, n) in enumerate(prompts):
        batch.admit(i, _request(tiny_gpt2, p, n))
    out, failures = _drain(batch)
    assert not failures
    for i, (p, n) in enumerate(prompts):
        assert out[i] == tiny_gpt2.generate(p, chat=False, max_new_tokens=n).token_ids


def test_chunked_prefill_lets_short_prompts_go_first_and_changes_no_output(tiny):
    long_prompt = "a long prompt " * 30
    batch = DecodeBatch(tiny.engine, token_budget=64, prefill_chunk=32, prefix_caching=False)
    batch.admit(0, _request(tiny, long_prompt, 5))
    batch.admit(1, _request(tiny, "short", 5))
    first_tokens: dict[int, int] = {}
    rounds = 0
    out: dict[int, list[int]] = {}
    while batch:
        rounds += 1
        for item in batch.step():
            if isinstance(item, Event) and item.token_ids:
                first_tokens.setdefault(item.index, rounds)
                out.setdefault(item.index, []).extend(item.token_ids)
    assert first_tokens[1] < first_tokens[0]  # the short prompt does not wait for the long one's prefill
    assert first_tokens[0] > len(tiny.encode(long_prompt, chat=False)) // 32  # the long one took chunks
    assert out[1] == tiny.generate("short", chat=False, max_new_tokens=5).token_ids
    assert len(out[0]) == 5


def test_admission_reserves_the_worst_case_kv(tiny):
    batch = DecodeBatch(tiny.engine)
    request = _request(tiny, "how many blocks", 40)
    need = batch.blocks_needed(request)
    pool = tiny.runtime.kv_pool()
    assert need == -(-(len(request.prompt_ids) + 40) // pool.block_size)
    assert batch.can_admit(request) and not batch.can_admit(request, pending_blocks=pool.max_blocks)
    batch.admit(0, request)
    assert batch.reserved_blocks == need
    _drain(batch)
    assert batch.reserved_blocks == 0


STRATEGIES = [
    "plain",
    "prompt-lookup",
    "ngram",
    {"name": "jacobi", "adaptive": False},
    "layer-skip",
    {"name": "draft-model", "draft": "tiny-random@1", "num_drafts": 2, "adaptive": False},
    "contrastive",
    {"name": "beam", "num_beams": 3},
    {"name": "guided", "guide_model": "tiny-random@1", "omega": 2.0},
]


@pytest.mark.parametrize("spec", STRATEGIES, ids=lambda s: s if isinstance(s, str) else s["name"])
def test_eight_concurrent_requests_of_a_strategy_equal_running_each_alone(tiny, spec):
    prompts = [f"request {i}: " + "the cat sat on the mat. " * (1 + i % 3) for i in range(8)]
    sampled = spec in ("plain", "prompt-lookup") or (isinstance(spec, dict) and spec["name"] == "draft-model")
    options = {"temperature": 0.8, "seed": 11} if sampled else {}  # sampled too, where the strategy samples
    alone = [tiny.generate(p, chat=False, max_new_tokens=12, strategy=spec, **options).token_ids for p in prompts]
    together = tiny.generate(prompts, chat=False, max_new_tokens=12, strategy=spec, **options)
    assert [r.token_ids for r in together] == alone


def test_drafts_are_priced_as_a_share_of_the_batchs_pass():
    """Alone, a draft whose tokens are likely accepted pays; in a batch of 16 where a pass costs in
    proportion to its rows (a CPU pass bound by arithmetic), the same draft does not."""
    from argen.strategies.speculative.adaptive import BUCKETS, CostModel, DraftLength, best_tree_size

    cost = CostModel.__new__(CostModel)  # a cost model without calibration: 10 ms + 4 ms a row
    cost.seconds, cost.head_seconds = {b: 0.010 + 0.004 * b for b in BUCKETS}, 0.0
    length = DraftLength(max_draft=4, cost=cost, prior=0.8)
    assert length.choose(4) >= 2 and length.choose(4, batch=16) == 0
    assert best_tree_size([0.8, 0.6, 0.4], cost) >= 2 and best_tree_size([0.8, 0.6, 0.4], cost, batch=16) == 0
    assert cost.shared(1, batch=16) == pytest.approx((0.010 + 0.004 * 16) / 16)


def test_strategies_see_how_many_sequences_share_the_round(tiny):
    seen = []
    real = make_strategy("prompt-lookup")

    class Recording(type(real)):
        def step(self, state):
            seen.append(state.batch_size)
            return (yield from super().step(state))

    batch = DecodeBatch(tiny.engine, prefix_caching=False)
    for i in range(3):
        batch.admit(i, Request(tiny.encode(f"abc abc {i}", chat=False), SamplingParams(max_new_tokens=4), Recording()))
    _drain(batch)
    assert max(seen) == 3 and min(seen) >= 1


def _finish(batch: DecodeBatch) -> dict[int, Result]:
    results = {}
    while batch:
        for item in batch.step():
            if isinstance(item, Result):
                results[item.index] = item
    return results


def test_a_shared_prefix_is_computed_once_even_when_the_second_request_arrives_mid_prefill(tiny):
    """Two prompts sharing 80 tokens (5 blocks), prefilled in 32-token chunks, so the chunk of tokens
    64-95 holds the last shared block and the first tokens of each prompt's own. The second prompt
    arrives while the first is prefilling: it never computes a block the first is computing, takes
    all five shared blocks, and decodes exactly what it decodes alone."""
    shared = [(7 * i) % 250 + 3 for i in range(80)]
    prompts = [shared + [11 + i for i in range(20)], shared + [40 + i for i in range(24)]]
    alone = [tiny.generate(p, max_new_tokens=6).token_ids for p in prompts]
    batch = DecodeBatch(tiny.engine, prefill_chunk=32, token_budget=None)
    batch.admit(0, Request(prompts[0], SamplingParams(max_new_tokens=6), make_strategy("plain")))
    batch.step()  # the first computes tokens 0-31
    batch.admit(1, Request(prompts[1], SamplingParams(max_new_tokens=6), make_strategy("plain")))
    results = _finish(batch)
    assert [results[i].token_ids for i in (0, 1)] == alone
    assert results[0].stats.cached_prompt_tokens == 0 and results[1].stats.cached_prompt_tokens == 80


def test_control_without_prefix_caching_nothing_is_taken(tiny):
    shared = [(7 * i) % 250 + 3 for i in range(80)]
    batch = DecodeBatch(tiny.engine, prefill_chunk=32, token_budget=None, prefix_caching=False)
    for i, tail in enumerate(([11, 12], [21, 22])):
        batch.admit(i, Request(shared + tail, SamplingParams(max_new_tokens=2), make_strategy("plain")))
    assert all(r.stats.cached_prompt_tokens == 0 for r in _finish(batch).values())


def test_a_prompt_differing_at_any_one_position_of_a_block_takes_only_the_blocks_before_it(tiny):
    """The prefix-cache key stands for every token of its block: a prompt that differs from a cached
    one at any single position of the first two blocks (each position in turn, the last of each
    block included) takes only the blocks before that position, never the block holding it nor any
    later one, and decodes exactly what a fresh prefill gives. Control: the cached prompt itself
    takes all three full blocks. Guards against a key that ignores one token of its block (say
    `tokens[i * size : (i + 1) * size - 1]`): two such prompts would share KV and decode otherwise."""
    size = tiny.runtime.kv_pool().block_size
    base = [(7 * i) % 250 + 3 for i in range(3 * size + 5)]  # three full blocks and a partial one

    def run(prompt: list[int]) -> Result:
        batch = DecodeBatch(tiny.engine)  # prefix caching on: blocks stay registered in the pool
        batch.admit(0, Request(prompt, SamplingParams(max_new_tokens=6), make_strategy("plain")))
        return _finish(batch)[0]

    run(base)  # registers the base prompt's full blocks
    again = run(base)
    assert again.stats.cached_prompt_tokens == 3 * size  # the control: a true prefix is found
    variants = []
    for j in range(2 * size):
        variants.append(list(base))
        variants[j][j] = (base[j] + 1) % 250 + 3
    cached = DecodeBatch(tiny.engine)  # all at once, each taking what the pool has registered
    fresh = DecodeBatch(tiny.engine, prefix_caching=False)  # the same prompts, every block computed
    for i, prompt in enumerate([base, *variants]):
        for batch in (cached, fresh):
            batch.admit(i, Request(prompt, SamplingParams(max_new_tokens=6), make_strategy("plain")))
    got, want = _finish(cached), _finish(fresh)
    assert got[0].token_ids == want[0].token_ids == again.token_ids
    for j in range(2 * size):
        taken = got[j + 1].stats.cached_prompt_tokens
        assert taken == size * (j // size), f"a prompt differing at position {j} took {taken} cached tokens"
        assert got[j + 1].token_ids == want[j + 1].token_ids, f"differing at position {j}: not a fresh prefill's output"
