"""Guided decoding with a small model (GeDi rule): omega = 0 is plain, omega > 0 steers towards the class."""

from __future__ import annotations

import dataclasses

import pytest

import argen
from argen.errors import InvalidRequestError
from argen.strategies import make_strategy

GUIDE = "tiny-random@1"
POS, NEG = "good and kind: ", "bad, cruel!\n"
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "music",
    "paper",
    "glass",
    "tiger",
    "winter",
    "coffee",
    "lamp",
    "ocean",
    "violin",
    "desert",
    "candle",
    "forest",
    "mirror",
    "rocket",
    "garden",
    "thunder",
]
PROMPTS = [f"Prompt {i}: {w}" for i, w in enumerate(WORDS)]


def spec(omega: float, guide=GUIDE, rule="gedi") -> dict:
    return {
        "name": "guided",
        "guide_model": guide,
        "omega": omega,
        "positive_prefix": POS,
        "negative_prefix": NEG,
        "rule": rule,
    }


@pytest.mark.parametrize("options", [dict(), dict(temperature=0.9, top_p=0.95, seed=4, repetition_penalty=1.2)])
def test_omega_zero_is_plain(tiny, tiny_gpt2, options):
    for gen, guide in ((tiny, GUIDE), (tiny_gpt2, "tiny-random-gpt2@1")):
        for prompt in PROMPTS[:4]:
            plain = gen.generate(prompt, max_new_tokens=24, **options)
            for rule in ("gedi", "genarm"):
                guided = gen.generate(prompt, max_new_tokens=24, strategy=spec(0.0, guide, rule), **options)
                assert guided.token_ids == plain.token_ids


@pytest.mark.parametrize(("rule", "omega"), [("gedi", 4.0), ("genarm", 1.0)])
def test_guidance_raises_the_class_log_prob(tiny, rule, omega):
    """Over 20 prompts, the guide's log P(positive | output) is higher for guided outputs than for plain ones."""
    scorer = tiny.prepare_strategy(spec(0.0))
    plain = [scorer.class_log_prob(tiny.generate(p, max_new_tokens=24).token_ids) for p in PROMPTS]
    guided_runs = [tiny.generate(p, max_new_tokens=24, strategy=spec(omega, rule=rule)) for p in PROMPTS]
    guided = [scorer.class_log_prob(r.token_ids) for r in guided_runs]
    assert len(PROMPTS) == 20
    assert sum(guided) / 20 > sum(plain) / 20 + 0.1, (sum(plain) / 20, sum(guided) / 20)
    assert sum(g > p for g, p in zip(guided, plain)) >= 15
    # the score recorded during decoding is the same quantity
    assert guided_runs[0].extras["guided"]["class_log_prob"] == pytest.approx(guided[0], abs=1e-4)


def test_guide_passes_are_counted(tiny):
    out = tiny.generate("count", max_new_tokens=10, strategy=spec(1.0))
    assert out.stats.forward_passes == 1 + 10  # the base model: prefill + one per token
    assert out.stats.draft_passes == 1 + 10  # the guide: both control prefixes in one packed pass, then one a step
    assert out.stats.tokens_per_forward == 1.0


def test_counterfactual_of_a_guided_output(tiny):
    options = dict(max_new_tokens=16, temperature=1.0, seed=9, strategy=spec(2.0))
    out = tiny.generate("steer", **options)
    assert tiny.counterfactual(out).token_ids == out.token_ids
    cf = tiny.counterfactual(out, {6: 90})
    assert cf.token_ids == tiny.generate("steer", intervene={6: 90}, **options).token_ids
    assert cf.extras["guided"]["class_log_prob"] == pytest.approx(
        tiny.generate("steer", intervene={6: 90}, **options).extras["guided"]["class_log_prob"], abs=1e-4
    )


def test_guide_object_forms(tiny):
    guide = argen.load(GUIDE)
    by_name = tiny.generate("forms", max_new_tokens=8, strategy=spec(3.0))
    for obj in (guide, guide.model):
        assert tiny.generate("forms", max_new_tokens=8, strategy=spec(3.0, obj)).token_ids == by_name.token_ids


@pytest.mark.parametrize(
    "bad",
    [
        {"omega": -1},
        {"omega": "x"},
        {"positive_prefix": ""},
        {"negative_prefix": 3},
        {"guide_model": 12},
        {"rule": "nope"},
    ],
)
def test_bad_options(bad):
    with pytest.raises(InvalidRequestError):
        make_strategy(spec(1.0) | bad)


def test_guide_must_share_the_tokenizer(tiny):
    class Shifted:
        """The byte tokenizer with every id moved by one: same vocabulary size, different ids."""

        def __init__(self, inner):
            self.inner = inner

        def __call__(self, text, **kw):
            return {"input_ids": [(t + 1) % 320 for t in self.inner(text, **kw)["input_ids"]]}

    guide = argen.load(GUIDE).model
    strategy = make_strategy(spec(1.0, dataclasses.replace(guide, tokenizer=Shifted(guide.tokenizer))))
    with pytest.raises(InvalidRequestError, match="tokenizer"):
        tiny.generate("x", max_new_tokens=2, strategy=strategy)
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        tiny.generate("x", max_new_tokens=2, strategy=spec(1.0, _other_vocab()))


def _other_vocab():
    from argen.models.llama import LlamaRuntime
    from argen.models.loading import LoadedModel
    from argen.models.tiny import byte_tokenizer, tiny_llama

    hf = tiny_llama(2, vocab_size=330)
    return LoadedModel("other", LlamaRuntime(hf.config, hf.state_dict()), byte_tokenizer(), lambda: hf, set())
