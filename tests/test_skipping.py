"""Lossy compute skipping (strategies/skipping/) and the drift measures (benchmarks/harness/drift.py,
drift_bench.py): what must hold exactly (the settings that skip nothing equal plain decoding;
SkipDecode's monotone invariant; the runtime's FFN statistic) and the measures on known cases."""

from __future__ import annotations

import json
import math

import pytest
import torch

from argen.errors import InvalidRequestError
from argen.models.runtime import Plan, Segment
from argen.strategies import make_strategy
from argen.strategies.skipping import FFNSkip, SkipDecode
from benchmarks.harness.drift import Agreement, NLLScorer, agreement, answer_recall

PROMPTS = ["hello world", "the cat sat on the mat", "abc abc abc"]


def _ids(results) -> list[list[int]]:
    return [r.token_ids for r in results]


@pytest.fixture(scope="module")
def plain(tiny):
    return _ids(tiny.generate(PROMPTS, max_new_tokens=24, temperature=0, ignore_eos=True))


def _run(tiny, strategy, prompts=PROMPTS, n=24):
    return tiny.generate(prompts, strategy=strategy, max_new_tokens=n, temperature=0, ignore_eos=True)


# -- SkipDecode --------------------------------------------------------------------------------------------
def test_skip_decode_with_every_layer_equals_plain_in_a_batch(tiny, plain):
    n = tiny.runtime.info.n_layers
    out = _run(tiny, {"name": "skip-decode", "min_layers": n, "max_layers": n, "decay_tokens": 1})
    assert _ids(out) == plain
    assert out[0].extras["skip_decode"]["mean_layers"] == n


def test_skip_decode_skips_nested_layers_in_a_batch(tiny, plain):
    strategy = SkipDecode(min_layers=1, decay_tokens=8, levels=4)
    n = tiny.runtime.info.n_layers
    plans = [strategy.plan_at(t, n) for t in range(40)]
    runs = [strategy.layers_at(t, n) for t in range(40)]
    assert runs == sorted(runs, reverse=True) and runs[0] == n and runs[-1] == 1
    assert len(set(plans)) <= strategy.levels  # few distinct plans: few packed passes per round
    skipped = [set() if p is None else {i for i in range(n) if not p.attn[i]} for p in plans]
    assert all(a <= b for a, b in zip(skipped, skipped[1:])), "skip sets must grow along the output"
    assert all(0 not in s for s in skipped), "keep_bottom=1 keeps layer 0"
    out = _run(tiny, strategy)
    assert all(r.extras["skip_decode"]["mean_layers"] < n for r in out)
    assert _ids(out) != plain  # it is lossy: the tiny model's output changes
    assert all(r.stats.draft_passes == 0 for r in out)  # the partial model's passes are the output's
    alone = _run(tiny, strategy, PROMPTS[1:2])
    assert alone[0].token_ids == out[1].token_ids  # a batch does not change a sequence's schedule


class _Rising(SkipDecode):
    """A broken schedule: fewer layers first, then more (a layer skipped early runs later)."""

    def layers_at(self, index: int, n_layers: int) -> int:
        return 1 if index < 3 else n_layers


def test_skip_decode_invariant_raises_on_a_rising_schedule(tiny):
    with pytest.raises(RuntimeError, match="invariant broken at output position 3"):
        _run(tiny, _Rising(min_layers=1), PROMPTS[:1], n=8)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"min_layers": 3, "max_layers": 2}, "must not exceed max_layers"),
        ({"levels": 1}, "levels must be"),
        ({"levels": 10**9}, "levels must be"),
        ({"decay_tokens": 0}, "decay_tokens must be"),
        ({"min_layers": 2.5}, "min_layers must be"),
        ({"min_layers": True}, "min_layers must be"),
    ],
)
def test_skip_decode_options_are_checked(options, message):
    with pytest.raises(InvalidRequestError, match=message):
        make_strategy({"name": "skip-decode", **options})


def test_skip_decode_refuses_what_the_model_cannot_run(tiny, tiny_gpt2):
    with pytest.raises(InvalidRequestError, match="has 4 layers"):
        _run(tiny, {"name": "skip-decode", "min_layers": 1, "max_layers": 99}, PROMPTS[:1], n=2)
    with pytest.raises(InvalidRequestError, match="keep_bottom"):
        _run(tiny, {"name": "skip-decode", "min_layers": 1, "keep_bottom": 2}, PROMPTS[:1], n=2)
    with pytest.raises(InvalidRequestError, match="native runtime"):
        tiny_gpt2.generate("hi", strategy="skip-decode", max_new_tokens=2)


# -- FFN-SkipLLM -------------------------------------------------------------------------------------------
def test_ffn_skip_with_an_unreachable_threshold_equals_plain_in_a_batch(tiny, plain):
    assert _ids(_run(tiny, FFNSkip(threshold=math.inf))) == plain
    assert _ids(_run(tiny, {"name": "ffn-skip", "threshold": 2.0})) == plain


def test_ffn_skip_skips_similar_blocks_in_a_batch(tiny, plain):
    strategy = FFNSkip(threshold=0.7, measure_tokens=2, check_every=5, max_skip=0.5)
    out = _run(tiny, strategy)
    for r in out:
        record = r.extras["ffn_skip"]
        assert record["skipped_ffn_blocks"] > 0 and record["checks"] >= 3  # re-measured every 5 tokens
        assert r.stats.draft_passes == 0
    assert _ids(out) != plain
    with pytest.raises(InvalidRequestError, match="native runtime"):
        make_strategy("ffn-skip").check(type("R", (), {"capabilities": _no_plans()})(), 4, None)


def _no_plans():
    from argen.models.runtime import Capabilities

    return Capabilities(paged_kv=False, layer_plans=False)


def test_ffn_skip_choice_respects_threshold_and_cap():
    cos = torch.tensor([[0.5, 0.99, 0.97, 0.995], [0.5, 0.99, 0.97, 0.995]])
    assert FFNSkip(threshold=0.96, max_skip=0.5).choose(cos, 4) == Plan.skipping(4, ffn_only=[3, 1])
    assert FFNSkip(threshold=0.96, max_skip=1.0).choose(cos, 4) == Plan.skipping(4, ffn_only=[1, 2, 3])
    assert FFNSkip(threshold=0.999).choose(cos, 4) is None


@pytest.mark.parametrize(
    "options, message",
    [
        ({"threshold": float("nan")}, "finite number"),
        ({"measure_tokens": 0}, "measure_tokens must be"),
        ({"measure_tokens": 10**6}, "measure_tokens must be"),
        ({"max_skip": 1.5}, "max_skip"),
    ],
)
def test_ffn_skip_options_are_checked(options, message):
    with pytest.raises(InvalidRequestError, match=message):
        make_strategy({"name": "ffn-skip", **options})


def test_runtime_ffn_cos_statistic(tiny):
    """cos(x, x + ffn(x)) per token and layer, for the segments that ask; the same value whether the
    segment runs alone or beside another; 1 where the plan skips the FFN."""
    runtime = tiny.runtime
    layer = runtime.layers[1]
    caches = [runtime.new_cache(1, 32) for _ in range(3)]
    try:
        alone = runtime.forward_packed([Segment(caches[0], [5, 6, 7], [0, 1, 2], None, 1, True)])[0]
        both = runtime.forward_packed(
            [Segment(caches[1], [5, 6, 7], [0, 1, 2], None, 1, True), Segment(caches[2], [9, 9], [0, 1], None, 1)],
            Plan.skipping(runtime.info.n_layers, ffn_only=[2]),
        )
        assert alone.ffn_cos.shape == (3, runtime.info.n_layers) and both[1].ffn_cos is None
        assert torch.allclose(alone.ffn_cos[:, :2], both[0].ffn_cos[:, :2], atol=1e-5)
        assert (both[0].ffn_cos[:, 2] == 1).all() and (alone.ffn_cos[:, 2] < 1).all()
        assert layer is runtime.layers[1] and ((alone.ffn_cos > -1) & (alone.ffn_cos <= 1 + 1e-6)).all()
    finally:
        for cache in caches:
            cache.free()


# -- drift measures ----------------------------------------------------------------------------------------
def test_agreement_known_cases():
    assert agreement([1, 2, 3, 4], [1, 2, 3, 4]) == Agreement(4, 1.0)
    assert agreement([1, 2, 3, 4], [1, 2, 9, 4]) == Agreement(2, 0.75)
    assert agreement([1, 2, 3, 4], [1, 2]) == Agreement(2, 0.5)
    assert agreement([], []) == Agreement(0, 1.0)


def test_nll_scorer_identical_zero_gap_and_a_different_output_worse(tiny):
    prompt = tiny.encode("the cat sat on the mat")
    exact = tiny.generate(prompt, max_new_tokens=12, temperature=0, ignore_eos=True).token_ids
    other = [(t + 7) % tiny.runtime.info.vocab_size for t in exact]
    with NLLScorer(tiny.runtime, prompt) as scorer:
        a, b, c = scorer.score(exact), scorer.score(list(exact)), scorer.score(other)
    assert a == b, "the same continuation must score the same: a zero NLL gap"
    assert a[0] < c[0] and sum(a) < sum(c)  # greedy tokens are the full model's argmax
    assert agreement(exact, other).token_agreement < 1
    # The scores are the full model's teacher-forced log-probs (one fresh pass over everything).
    cache = tiny.runtime.new_cache(1, len(prompt) + 12)
    logits, _ = tiny.runtime.forward(torch.tensor([prompt + exact[:-1]]), torch.arange(len(prompt) + 11)[None], cache)
    cache.free()
    logp = torch.log_softmax(logits[0, len(prompt) - 1 :].float(), -1)
    want = -logp[torch.arange(12), torch.tensor(exact)]
    assert torch.allclose(torch.tensor(a), want, atol=1e-4)


def test_answer_recall():
    article = "Alice Smith met Bob Jones in Paris in 2019."
    assert answer_recall("Alice Smith and Bob Jones, 2019.", "Alice Smith and Bob Jones in 2019", article) == 1.0
    assert answer_recall("Alice Smith and Bob Jones.", "Alice met someone.", article) == 0.25
    assert answer_recall("nothing named here", "x", article) is None


def test_drift_bench_runs_on_the_tiny_model(tmp_path, monkeypatch):
    from benchmarks.__main__ import main

    questions = tmp_path / "q.jsonl"
    rows = [
        ("summarization", "Summarize: Alice Smith met Bob Jones in Paris in 2019. They founded Acme in Oslo."),
        ("rag", "Context: The Nile is 6650 km long. Question: how long is the Nile?"),
    ]
    questions.write_text(
        "".join(json.dumps({"question_id": i, "category": c, "turns": [p]}) + "\n" for i, (c, p) in enumerate(rows))
    )
    out = tmp_path / "out"
    code = main(
        [
            "drift",
            "--model",
            "tiny-random",
            "--questions",
            str(questions),
            "--limit",
            "1",
            "--long-lengths",
            "60",
            "--max-new-tokens",
            "8",
            "--ignore-eos",
            "--config",
            "ffn-skip:threshold=0.5",
            "--config",
            '{"method": "skip-decode", "setting": "1 layer", "strategy": {"name": "skip-decode", '
            '"min_layers": 1, "decay_tokens": 1}}',
            "--out",
            str(out),
            "--allow-dirty",
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert {r["category"] for r in results["records"]} == {"summarization", "rag", "long-context"}
    exact = [r for r in results["records"] if r["method"] == "exact"]
    assert all(r["token_agreement"] == 1.0 and r["nll"] == r["nll_exact"] for r in exact)
    lossy = [r for r in results["summary"] if r["label"] == "skip-decode 1 layer" and r["category"] == "all"][0]
    assert lossy["token_agreement"] < 1 and lossy["kv_bytes"] > 0 and lossy["peak_kv_bytes"] > 0
    report = (out / "report.md").read_text()
    assert "ffn-skip threshold=0.5" in report and "cpu" in report and (out / "drift.png").stat().st_size > 0


@pytest.mark.real
def test_real_model_skipping_runs_on_the_fused_path(real):
    """SkipDecode's partial plans through the fused C forward (quantized weights) and FFN-skip's
    measuring passes through torch's, on real weights: both run, skip, and keep the first tokens."""
    prompts = ["What is the capital of France?"]
    plain = real.generate(prompts, max_new_tokens=6, temperature=0)
    skip = real.generate(
        prompts, strategy={"name": "skip-decode", "min_layers": 24, "decay_tokens": 6}, max_new_tokens=6, temperature=0
    )
    ffn = real.generate(
        prompts, strategy={"name": "ffn-skip", "threshold": 0.97, "measure_tokens": 2}, max_new_tokens=6, temperature=0
    )
    for p, s, f in zip(plain, skip, ffn):
        assert s.extras["skip_decode"]["mean_layers"] < 30 and f.extras["ffn_skip"]["skipped_ffn_blocks"] > 0
        assert s.token_ids[:2] == p.token_ids[:2] and f.token_ids[:2] == p.token_ids[:2]
