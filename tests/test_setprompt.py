"""Set-based prompting: layout, order independence (tiny models and the default model), JSON, CLI."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import pytest
import torch
from checks import check_order_independent, next_logits, set_layouts

import argen
from argen.cli import main
from argen.errors import InvalidRequestError
from argen.models.llama import LlamaRuntime
from argen.setprompt import SetPrompt, set_prompt_layout

MEMBERS = ["apples and pears", "a kiwi", "three bananas, ripe"]


def float64_twin(gen) -> SimpleNamespace:
    """The same weights in a float64 native runtime: there float rounding is far below any tolerance, so a
    layout that is not canonicalised must agree to ~1e-12, which only the mask can make true."""
    hf = gen.model.hf_model
    return SimpleNamespace(
        runtime=LlamaRuntime(hf.config, hf.state_dict(), dtype=torch.float64), tokenizer=gen.tokenizer
    )


def layouts(gen, members, canonical: bool, chat: bool = True):
    return set_layouts(gen.tokenizer, "Here is a list:", members, " Which is the sweetest?", canonical, chat)


def test_layout_positions_and_mask(tiny):
    sp = SetPrompt(prefix="ab", members=["xyz", "q"], suffix="!")
    lay = set_prompt_layout(tiny.tokenizer, sp, chat=False)
    # canonical order sorts the members by their ids: "q" < "xyz" in the byte tokenizer
    assert lay.ids == tiny.encode("ab", chat=False) + tiny.encode("q", chat=False) + tiny.encode(
        "xyz", chat=False
    ) + tiny.encode("!", chat=False)
    assert lay.positions == [0, 1, 2, 2, 3, 4, 5]
    m = lay.mask
    assert m[2, :3].tolist() == [True, True, True] and not m[3:6, 2].any()  # "q" is invisible to "xyz"
    assert m[4, 3:5].tolist() == [True, True] and not m[4, 5]  # causal inside a member
    assert m[6].all()  # the suffix sees everything


@pytest.mark.parametrize("chat", [True, False])
def test_order_independent_on_tiny(tiny, chat):
    exact = [next_logits(tiny.runtime, lay) for lay in layouts(tiny, MEMBERS, canonical=True, chat=chat)]
    assert all(torch.equal(exact[0], x) for x in exact)  # sorted: the same input, so this alone proves nothing
    # Members kept in the given order: only the mask can make the permutations agree.
    check_order_independent(tiny.runtime, layouts(tiny, MEMBERS, canonical=False, chat=chat), atol=1e-4)  # float32
    twin = float64_twin(tiny)
    check_order_independent(twin.runtime, layouts(tiny, MEMBERS, canonical=False, chat=chat), atol=1e-9)
    # The same members as plain text do depend on their order: the mask is what removes it.
    plain = [
        tiny.encode("Here is a list:" + "".join(p) + " Which is the sweetest?") for p in itertools.permutations(MEMBERS)
    ]
    logits = [
        next_logits(
            tiny.runtime,
            argen.setprompt.PromptLayout(
                ids, list(range(len(ids))), torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
            ),
        )
        for ids in plain
    ]
    assert not all(torch.allclose(logits[0], x, atol=1e-3) for x in logits)


def test_generation_is_order_independent(tiny, tiny_gpt2):
    for gen in (tiny, tiny_gpt2):
        outs = [
            gen.generate(SetPrompt("Fruit:", list(p), " Pick one."), max_new_tokens=12, temperature=0.9, seed=3)
            for p in itertools.permutations(MEMBERS)
        ]
        assert all(o.token_ids == outs[0].token_ids for o in outs)
        assert outs[0].prompt_ids == gen.encode(SetPrompt("Fruit:", MEMBERS, " Pick one."))


def test_counterfactual_of_a_set_prompt(tiny):
    sp = SetPrompt("Fruit:", MEMBERS, " Pick one.")
    out = tiny.generate(sp, max_new_tokens=16, temperature=1.0, seed=2)
    assert tiny.counterfactual(out).token_ids == out.token_ids
    cf = tiny.counterfactual(out, {5: 70})
    assert cf.token_ids == tiny.generate(sp, max_new_tokens=16, temperature=1.0, seed=2, intervene={5: 70}).token_ids


def test_json_forms(tmp_path, tiny):
    sp = SetPrompt("Fruit:", MEMBERS, " Pick one.")
    assert SetPrompt.from_json(sp.to_json()) == sp
    assert SetPrompt.from_json(json.dumps(sp.to_json()["set_prompt"])) == sp
    path = tmp_path / "set.json"
    path.write_text(json.dumps(sp.to_json()))
    assert SetPrompt.from_json(str(path)) == sp
    # the dict form is a prompt wherever a string is
    assert tiny.generate(sp.to_json(), max_new_tokens=5).token_ids == tiny.generate(sp, max_new_tokens=5).token_ids
    batch = tiny.generate([sp.to_json(), "plain prompt"], max_new_tokens=5)
    assert len(batch) == 2


@pytest.mark.parametrize(
    "bad",
    [
        '{"set_prompt": {"members": []}}',
        '{"members": ["a", ""]}',
        '{"members": "ab"}',
        '{"prefix": "x", "members": ["a"], "extra": 1}',
        "{not json",
        "/no/such/file.json",
    ],
)
def test_bad_json(bad):
    with pytest.raises(InvalidRequestError):
        SetPrompt.from_json(bad)


def test_raw_set_prompt_needs_a_suffix(tiny):
    with pytest.raises(InvalidRequestError, match="suffix"):
        tiny.generate(SetPrompt("Fruit:", MEMBERS), chat=False, max_new_tokens=4)


def test_cli_set_prompt(capsys, tmp_path):
    sp = SetPrompt("Fruit:", MEMBERS, " Pick one.")
    path = tmp_path / "set.json"
    path.write_text(json.dumps(sp.to_json()))
    reordered = SetPrompt("Fruit:", MEMBERS[::-1], " Pick one.")
    base = ["generate", "--model", "tiny-random", "--device", "cpu", "--max-new-tokens", "8", "--json"]
    assert main([*base, "--set-prompt-json", str(path)]) == 0
    a = json.loads(capsys.readouterr().out)
    assert main([*base, "--set-prompt-json", json.dumps(reordered.to_json())]) == 0
    b = json.loads(capsys.readouterr().out)
    assert a["token_ids"] == b["token_ids"] and a["prompt_ids"] == b["prompt_ids"]
    assert main([*base]) == 2 and "either a PROMPT or --set-prompt-json" in capsys.readouterr().err
    assert main([*base, "hi", "--set-prompt-json", str(path)]) == 2
    capsys.readouterr()


@pytest.mark.real
def test_identical_logits_for_every_permutation_on_the_default_model(real):
    members = ["The Eiffel Tower is in Paris.", "Bananas are yellow.", "Water boils at 100 degrees Celsius."]
    exact = [next_logits(real.runtime, lay) for lay in layouts(real, members, canonical=True)]
    loose = [next_logits(real.runtime, lay) for lay in layouts(real, members, canonical=False)]
    assert len(exact) == 6 and all(torch.equal(exact[0], x) for x in exact)  # canonical order: bitwise
    # Members in the given order: equal up to float32 rounding (measured ~4e-5 on logits up to ~30, the
    # size of the float32-vs-float64 error itself), and within 1e-5 (measured 0) computed in float64.
    assert max((exact[0] - x).abs().max().item() for x in loose) <= 1e-4
    twin = float64_twin(real)
    loose64 = layouts(real, members, canonical=False)
    check_order_independent(twin.runtime, loose64, atol=1e-5)
    assert (next_logits(twin.runtime, loose64[0]) - exact[0].double()).abs().max().item() <= 1e-3
    # Plain concatenation of the same members is order dependent: the mask is what removes the order.
    concat = [
        next_logits(
            twin.runtime,
            argen.setprompt.PromptLayout(
                ids, list(range(len(ids))), torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
            ),
        )
        for ids in (
            real.encode("Here is a list:" + " ".join(p) + " Which is the sweetest?") for p in (members, members[::-1])
        )
    ]
    assert (concat[0] - concat[1]).abs().max().item() > 1e-2
    outs = {
        tuple(real.generate(SetPrompt("Facts:", list(p), " Which fact is about food?"), max_new_tokens=12).token_ids)
        for p in itertools.permutations(members)
    }
    assert len(outs) == 1
