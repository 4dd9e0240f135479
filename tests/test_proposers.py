"""The five proposers (prompt-lookup, ngram, jacobi, layer-skip, draft-model) through the shared
verifier: greedy output equals plain greedy where drafts fail (tiny-random: its text never repeats)
and where they succeed (a tiny model without attention: its greedy output falls into a cycle),
same-seed sampling identity for deterministic drafts (the exact output distribution of every
proposer is in test_distribution.py), and a cache that holds exactly what a fresh prefill would after every step."""

from __future__ import annotations

import pytest
from checks import check_cache_matches_prefill, check_greedy_identical

from argen.api import Generator
from argen.models import tiny as tiny_models
from argen.models.llama import LlamaRuntime
from argen.models.loading import LoadedModel
from argen.strategies.speculative import skip_calibration
from argen.strategies.speculative.ngram import NGramTable

STRATEGIES = [
    {"name": "prompt-lookup"},
    {"name": "ngram"},
    {"name": "jacobi"},
    {"name": "layer-skip", "skip_layers": [1], "skip_ffn": [2]},
    {"name": "draft-model", "draft": "tiny-random@1"},
    {"name": "draft-model", "draft": "tiny-random@1", "num_drafts": 3},
]
IDS = ["prompt-lookup", "ngram", "jacobi", "layer-skip", "draft-model", "multi-draft"]


@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("spec", STRATEGIES, ids=IDS)
def test_greedy_equals_plain_where_drafts_fail(tiny, spec, adaptive):
    for prompt in ("no repeats here!", "abc abc abc abc abc abc"):
        check_greedy_identical(tiny, prompt, spec | {"adaptive": adaptive})


@pytest.mark.parametrize("spec", STRATEGIES, ids=IDS)
def test_greedy_equals_plain_where_drafts_succeed(looping, spec):
    plain = looping.generate("hello", max_new_tokens=60, ignore_eos=True)
    assert len(set(plain.token_ids)) < 30, "the looping model should cycle"
    if spec["name"] == "draft-model":
        spec = spec | {"draft": looping}  # a draft that agrees: every draft accepted
    out = check_greedy_identical(looping, "hello", spec | {"adaptive": False}, max_new_tokens=60)
    assert out.stats.draft_tokens_accepted > 0
    assert out.stats.forward_passes < plain.stats.forward_passes


@pytest.mark.parametrize("spec", STRATEGIES, ids=IDS)
def test_every_budget_length_including_steps_with_no_room_to_draft(looping, spec):
    """The last token of a budget leaves no room for a draft: the step after a drafting one must
    still work (a stale draft record once broke it)."""
    if spec["name"] == "draft-model":
        spec = spec | {"draft": looping}
    for n in range(1, 40):
        plain = looping.generate("hello", max_new_tokens=n, ignore_eos=True)
        out = looping.generate("hello", max_new_tokens=n, ignore_eos=True, strategy=spec | {"adaptive": False})
        assert out.token_ids == plain.token_ids


@pytest.mark.parametrize("spec", STRATEGIES[:3], ids=IDS[:3])
def test_deterministic_drafts_sample_exactly_what_plain_samples(looping, spec):
    """Seed for seed, under several sampling settings, with drafts both accepted and rejected. (The
    drawn drafts of layer-skip and draft-model change the sample but not the distribution: that is
    computed exactly in test_distribution.py.)"""
    accepted = rejected = 0
    for seed in range(12):
        params = dict(
            max_new_tokens=40,
            temperature=(0.8, 1.2)[seed % 2],
            top_k=(0, 20)[seed // 2 % 2],
            top_p=(1.0, 0.9)[seed // 4 % 2],
            seed=seed,
            ignore_eos=True,
        )
        plain = looping.generate("hello", **params)
        out = looping.generate("hello", strategy=spec | {"adaptive": False}, **params)
        assert out.token_ids == plain.token_ids, params
        accepted += out.stats.draft_tokens_accepted
        rejected += out.stats.draft_tokens_proposed - out.stats.draft_tokens_accepted
    assert accepted > 0 and rejected > 0


@pytest.mark.parametrize("spec", STRATEGIES, ids=IDS)
def test_cache_after_every_step_equals_a_fresh_prefill(looping, tiny, spec):
    accepted = 0
    for gen in (tiny, looping):
        draft = {"draft": looping} if spec["name"] == "draft-model" and gen is looping else {}
        accepted += check_cache_matches_prefill(gen, "hello", spec | draft | {"adaptive": False})
    assert accepted > 0  # the looping model accepts drafts: compaction and truncation both ran


def test_ngram_table_counts_at_least_trigrams():
    table = NGramTable(min_n=3, max_n=4)
    table.update([1, 2, 3, 1, 2, 4, 1, 2, 3])
    used, nxt = table.next_tokens([7, 1, 2], width=3)
    assert used == (1, 2) and dict(nxt) == {3: 2 / 3, 4: 1 / 3}
    used, nxt = table.next_tokens([2, 3, 1], width=3)
    assert used == (2, 3, 1) and dict(nxt) == {2: 1.0}
    assert table.next_tokens([9, 9, 9], width=3) == ((), [])


def test_layer_skip_calibration_picks_valid_blocks_and_caches_them(tmp_path, monkeypatch):
    monkeypatch.setenv("ARGEN_CACHE_DIR", str(tmp_path))
    gen = Generator(
        LoadedModel(
            "t",
            LlamaRuntime(tiny_models.tiny_llama(3).config, tiny_models.tiny_llama(3).state_dict()),
            tiny_models.byte_tokenizer(),
            None,
            {258},
        )
    )
    from argen.strategies.speculative.adaptive import CostModel

    blocks = skip_calibration.skipped_blocks(gen.runtime, CostModel.for_runtime(gen.runtime), 4)
    n = gen.runtime.info.n_layers
    assert all(kind in ("attn", "ffn") and 0 < i < n - 1 for kind, i in blocks)
    assert list(tmp_path.glob("calibration/layer-skip-*.json"))
    out = gen.generate("hello", max_new_tokens=20, strategy="layer-skip")
    assert out.token_ids == gen.generate("hello", max_new_tokens=20).token_ids


def test_jacobi_back_off_carries_over_to_the_next_request():
    """Where lookahead did not pay, the next request on the same runtime starts in back-off instead
    of paying for the same lesson again; where it did (or on a fresh runtime), it tries at once."""
    from argen.strategies.speculative.jacobi import MIN_BACKOFF, JacobiLearnt

    model = tiny_models.tiny_llama(0)
    gen = Generator(
        LoadedModel(
            "tiny-fresh",
            LlamaRuntime(model.config, model.state_dict()),
            tiny_models.byte_tokenizer(),
            lambda: model,
            {258},
        )
    )
    plain = gen.generate("abc abc", max_new_tokens=40, ignore_eos=True)
    first = gen.generate("abc abc", max_new_tokens=40, ignore_eos=True, strategy="jacobi")
    assert first.stats.draft_tokens_proposed > 0  # a fresh runtime tries lookahead at the first step
    gen.runtime.memo.get(JacobiLearnt).backoff = 64  # as left by requests where lookahead did not pay
    second = gen.generate("abc abc", max_new_tokens=40, ignore_eos=True, strategy="jacobi")
    assert second.stats.draft_tokens_proposed == 0  # 64 plain steps of cool-down cover all 40 tokens
    assert first.token_ids == second.token_ids == plain.token_ids
    gen.runtime.memo.get(JacobiLearnt).backoff = MIN_BACKOFF
    third = gen.generate("abc abc", max_new_tokens=40, ignore_eos=True, strategy="jacobi")
    assert third.stats.draft_tokens_proposed > 0


def test_strategy_option_errors_name_the_fix(tiny):
    from argen.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="draft=SOURCE"):
        tiny.generate("x", strategy="draft-model")
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        tiny.generate("x", strategy={"name": "draft-model", "draft": _other_vocabulary()})
    with pytest.raises(InvalidRequestError, match="min_n"):
        tiny.generate("x", strategy={"name": "ngram", "min_n": 2})
    with pytest.raises(InvalidRequestError, match="max_ngram of strategy 'prompt-lookup' must be an integer"):
        tiny.generate("x", strategy={"name": "prompt-lookup", "max_ngram": 2.5})
    with pytest.raises(InvalidRequestError, match="adaptive of strategy 'ngram' must be true or false"):
        tiny.generate("x", strategy={"name": "ngram", "adaptive": 3})
    with pytest.raises(InvalidRequestError, match="explore of strategy 'ngram' must be a finite number"):
        tiny.generate("x", strategy={"name": "ngram", "explore": "high"})
    assert tiny.generate("x", strategy={"name": "ngram", "explore": 1}, max_new_tokens=2).token_ids  # int for float
    gpt2 = __import__("argen").load("tiny-random-gpt2")
    with pytest.raises(InvalidRequestError, match="native runtime"):
        gpt2.generate("x", strategy={"name": "layer-skip", "skip_layers": [1]})


def _other_vocabulary() -> LlamaRuntime:
    """A draft runtime whose vocabulary differs from the tiny target's."""
    model = tiny_models.tiny_llama(0, vocab_size=300)
    return LlamaRuntime(model.config, model.state_dict())
