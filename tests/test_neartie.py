"""The one near-tie rule (`argen.neartie`), shared by the bench, the tests and the verifier's count:
its positive branch on a constructed real near-tie, and each way of missing it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import Oracle, assert_same_or_near_tie

from argen.api import Generator
from argen.bench.questions import Question
from argen.models.llama import LlamaRuntime
from argen.models.loading import LoadedModel
from argen.models.tiny import byte_tokenizer, tiny_llama
from argen.neartie import NEAR_TIE, top2_at
from benchmarks.harness.report import summarize
from benchmarks.harness.runner import judge
from benchmarks.harness.systems import Output

PROMPT = [257, 72, 105, 258, 10]
AT = 2  # the output position made a near-tie


def tied_model(gap: float):
    """tiny-random with one lm_head row edited so that, at output position AT of its own greedy
    continuation, the runner-up's logit sits exactly `gap` below the winner's: a real near-tie in
    the model's logits, not a stubbed number. Returns (model, greedy continuation, winner, runner-up)."""
    model = tiny_llama(0)
    ref: list[int] = []
    for _ in range(AT):
        ref.append(top2_at(model, PROMPT, ref)[0][0])
    (a, b), _ = top2_at(model, PROMPT, ref)
    with torch.no_grad():
        h = model.model(torch.tensor([PROMPT + ref])).last_hidden_state[0, -1]
        model.lm_head.weight[b] = model.lm_head.weight[a] - gap * h / (h @ h)
    ref = []
    for _ in range(AT + 3):
        ref.append(top2_at(model, PROMPT, ref)[0][0])
    ids, values = top2_at(model, PROMPT, ref[:AT])
    assert ids == [a, b] and values[0] - values[1] == pytest.approx(gap, abs=5e-6)
    return model, ref, a, b


def bench_verdict(model, ref: list[int], output: list[int]) -> dict:
    systems = [
        SimpleNamespace(name="hf", reference=None, exact=True),
        SimpleNamespace(name="exact", reference="hf", exact=True),
    ]
    outputs = {"hf": Output(ref, 1.0, len(ref)), "exact": Output(output, 1.0, len(output))}
    return judge(Question(1, "qa", "x"), PROMPT, systems, systems, outputs, model)


def test_a_near_tie_is_excused_by_the_bench_and_the_tests_alike():
    model, ref, a, b = tied_model(0.5 * NEAR_TIE)
    flipped = ref[:AT] + [b, 7, 7]  # took the runner-up at the tie, then anything
    record = bench_verdict(model, ref, flipped)
    d = record["systems"]["exact"]["divergence"]
    assert d["near_tie"] is True and d["position"] == AT and d["top2"] == [a, b]
    described = [
        {"name": "hf", "kind": "hf", "dtype": "float32", "exact": True, "reference": None},
        {"name": "exact", "kind": "argen", "dtype": "float32", "exact": True, "reference": "hf"},
    ]
    row = next(r for r in summarize([record], described)["rows"] if r["system"] == "exact")
    assert row["near_ties"] == 1 and row["real_divergences"] == 0
    assert assert_same_or_near_tie(model, PROMPT, flipped, ref) is True
    assert assert_same_or_near_tie(model, PROMPT, ref, ref) is False


@pytest.mark.parametrize("case", ["gap too wide", "a third token", "output cut short"])
def test_what_is_not_a_near_tie(case):
    gap = 5 * NEAR_TIE if case == "gap too wide" else 0.5 * NEAR_TIE
    model, ref, a, b = tied_model(gap)
    third = next(t for t in range(10, 300) if t not in (a, b))
    output = {"gap too wide": ref[:AT] + [b], "a third token": ref[:AT] + [third], "output cut short": ref[:AT]}[case]
    d = bench_verdict(model, ref, output)["systems"]["exact"]["divergence"]
    assert d["near_tie"] is False and d["position"] == AT
    with pytest.raises(AssertionError, match="not a near-tie"):
        assert_same_or_near_tie(model, PROMPT, output, ref)


@pytest.mark.parametrize("gap, counted", [(0.5 * NEAR_TIE, True), (5 * NEAR_TIE, False)])
def test_the_verifier_counts_near_ties_by_the_same_rule(gap, counted):
    """`Stats.near_ties` counts accepted greedy drafts at a near-tie with the same threshold."""
    model, ref, _, _ = tied_model(gap)
    gen = Generator(
        LoadedModel("tied", LlamaRuntime(model.config, model.state_dict()), byte_tokenizer(), lambda: model, {258})
    )
    plain = gen.generate(PROMPT, max_new_tokens=len(ref), ignore_eos=True)
    assert plain.token_ids == ref
    out = gen.generate(PROMPT, max_new_tokens=len(ref), ignore_eos=True, strategy=Oracle(ref, wrong_every=99))
    assert out.token_ids == ref and out.stats.draft_tokens_accepted >= AT
    assert (out.stats.near_ties >= 1) is counted


@pytest.mark.parametrize("gap", [0.5 * NEAR_TIE, 0.9 * NEAR_TIE, 0.1 * NEAR_TIE])
def test_the_verifier_rejects_the_runner_up_drafted_at_a_near_tie(gap):
    """At a constructed near-tie (the runner-up's logit exactly `gap` below the winner's, gap under
    NEAR_TIE), a draft of the runner-up is rejected and the output is plain greedy's, token for
    token: the near-tie rule excuses a floating-point flip when two outputs are compared, it never
    lets the verifier accept a token that is not the argmax. Guards against a greedy verifier that
    accepts a draft within NEAR_TIE of the argmax (no other test drafts the runner-up)."""
    model, ref, a, b = tied_model(gap)
    gen = Generator(
        LoadedModel("tied", LlamaRuntime(model.config, model.state_dict()), byte_tokenizer(), lambda: model, {258})
    )
    plain = gen.generate(PROMPT, max_new_tokens=len(ref), ignore_eos=True)
    assert plain.token_ids == ref and ref[AT] == a
    runner_up = Oracle(ref[:AT] + [b] + ref[AT + 1 :], wrong_every=99)  # drafts b where plain takes a
    out = gen.generate(PROMPT, max_new_tokens=len(ref), ignore_eos=True, strategy=runner_up)
    assert out.token_ids == ref, f"the verifier accepted the runner-up {b} at the near-tie (plain takes {a})"
    s = out.stats
    assert s.draft_tokens_proposed > s.draft_tokens_accepted >= AT  # the drafts before the tie accepted, b not
