"""What only real weights show, on the default model: greedy output of plain decoding and of every
speculative proposer equals Hugging Face generate() token for token, on prompts from every Spec-Bench
category, with drafts that the verifier actually accepts and rejects."""

from __future__ import annotations

import pytest
from checks import check_same_as_plain_and_hf
from conftest import SPEC_BENCH
from helpers import PROPOSERS, assert_same_or_near_tie, hf_greedy

from argen.bench.questions import bench_questions
from argen.neartie import NEAR_TIE, top2_at

pytestmark = pytest.mark.real

N_TOKENS = 48


def test_default_model_answers_the_readme_question(real):
    out = real.generate("What is the capital of France?", max_new_tokens=32)
    assert "Paris" in out.text


@pytest.fixture(scope="module")
def questions():
    """The two shortest of the first ten questions of each of Spec-Bench's six categories (MT-bench's
    eight counted as one and sampled round-robin, as the bench does): every category, short prefills."""
    chosen = []
    by_category: dict[str, list] = {}
    for q in bench_questions(SPEC_BENCH, None, 10, mt_bench_as_one=True):
        by_category.setdefault(q.category, []).append(q)
    for qs in by_category.values():
        chosen += sorted(qs, key=lambda q: len(q.prompt))[:2]
    assert len(by_category) == 6
    return chosen


@pytest.fixture(scope="module")
def references(real, questions):
    """Per question: prompt ids, HF generate()'s greedy tokens, argen plain's greedy tokens."""
    out = []
    for q in questions:
        ids = real.encode(q.prompt)
        hf = hf_greedy(real.model.hf_model, ids, N_TOKENS, real.model.eos_ids)
        out.append((ids, hf, real.generate(ids, max_new_tokens=N_TOKENS).token_ids))
    return out


def test_plain_greedy_identical_to_hf_generate(real, references):
    near_ties = sum(
        check_same_as_plain_and_hf(real.model.hf_model, ids, plain, plain, hf) for ids, hf, plain in references
    )
    assert near_ties <= 2


def test_control_a_real_divergence_fails_the_check(real, references):
    """The check above, on HF's own output with one token swapped for the runner-up where the
    top-2 logits are far apart, must fail."""
    ids, hf, _ = references[0]
    at = next(
        i for i in range(len(hf)) if (v := top2_at(real.model.hf_model, ids, hf[:i])[1])[0] - v[1] > 10 * NEAR_TIE
    )
    swapped = hf[:at] + [top2_at(real.model.hf_model, ids, hf[:at])[0][1]] + hf[at + 1 :]
    with pytest.raises(AssertionError, match="not at a near-tie"):
        check_same_as_plain_and_hf(real.model.hf_model, ids, swapped, hf, hf)


@pytest.mark.parametrize("name", PROPOSERS)
def test_every_proposer_matches_plain_and_hf_with_drafts_accepted_and_rejected(real, references, draft, name):
    spec = PROPOSERS[name] | ({"draft": draft} if name == "draft-model" else {})
    # The draft model (the default minus six layers) makes a step cost about five plain ones: one
    # question per category keeps the suite within its time.
    references = references[::2] if name == "draft-model" else references
    accepted_on, rejected, near_ties = 0, 0, 0
    for ids, hf, plain in references:
        out = real.generate(ids, max_new_tokens=N_TOKENS, strategy=spec)
        near_ties += check_same_as_plain_and_hf(real.model.hf_model, ids, out.token_ids, plain, hf)
        s = out.stats
        accepted_on += s.draft_tokens_accepted >= 1
        rejected += s.draft_tokens_proposed - s.draft_tokens_accepted
    assert accepted_on >= len(references) / 2, (
        f"{name} accepted a draft token on only {accepted_on} of {len(references)}"
    )
    assert rejected > 0 and near_ties <= 2


def test_the_exact_path_decodes_as_fp32_token_for_token(real, real_fp32, references):
    """The default path (`quant="exact"`: the GGUF's blocks, C kernels) against `quant="none"` (the
    same weights dequantized to fp32, torch's path) on the 12 questions, 48 greedy tokens each:
    identical token for token, a divergence excused only by the one near-tie rule (`argen.neartie`,
    judged on HF's logits). The fast-path table (docs/fast-path.md) says 30/30; this is its test. Guards against
    any fidelity loss on the exact path (a scale, a block or a rounding that fp32 does not have)."""
    assert real.quant == "exact" and real_fp32.quant == "none"
    near_ties = 0
    for ids, _, exact in references:  # the default path's greedy tokens, decoded there
        reference = real_fp32.generate(ids, max_new_tokens=N_TOKENS).token_ids
        near_ties += assert_same_or_near_tie(real.model.hf_model, ids, exact, reference)
    assert near_ties <= 1


@pytest.fixture(scope="module")
def real_head(real):
    """A head distilled from the default model: the cached default recipe's if `argen distill-draft`
    ran here, else a tiny recipe's (16 prompts x 48 tokens, 3 epochs from the last layer: about a
    minute on 2 cores, cached for the next run). The tiny head drafts poorly (about 1% of its tree
    nodes accepted), which is enough here: these tests check exactness, with drafts accepted and
    rejected, not speed. It is kept outside `draft-heads/`: there, as the only head cached for the
    model, `draft-head` would take it as the user's (and the draft ceiling did, before it asked for
    the default recipe's)."""
    from argen.models.sources import cache_dir
    from argen.recipes.draft_head import Recipe, distill, head_path, load_draft_head

    path = head_path(real.runtime, Recipe())
    if not path.is_file():
        tiny = Recipe(prompts=16, max_new_tokens=48, epochs=3, init="last-layer")
        path = cache_dir() / "test-draft-heads" / head_path(real.runtime, tiny).name
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            distill(real, tiny, progress=False, path=path)
    return load_draft_head(real.runtime, path, "default")


def test_draft_head_matches_plain_and_hf_with_drafts_accepted_and_rejected(real, references, real_head):
    spec = {"name": "draft-head", "head": real_head, "adaptive": False}
    accepted_on, rejected, near_ties = 0, 0, 0
    for ids, hf, plain in references[::2]:  # one question per category (each runs twice: fixed and adaptive)
        out = real.generate(ids, max_new_tokens=N_TOKENS, strategy=spec)
        near_ties += check_same_as_plain_and_hf(real.model.hf_model, ids, out.token_ids, plain, hf)
        s = out.stats
        accepted_on += s.draft_tokens_accepted >= 1
        rejected += s.draft_tokens_proposed - s.draft_tokens_accepted
        adaptive = real.generate(ids, max_new_tokens=N_TOKENS, strategy={"name": "draft-head", "head": real_head})
        assert adaptive.token_ids == out.token_ids
    # The tiny head's drafts are mostly rejected: what matters is that both verdicts occur on real weights.
    assert accepted_on >= 2, f"draft-head accepted a draft token on only {accepted_on} of 6 questions"
    assert rejected > 0 and near_ties <= 2


def test_draft_head_sampling_reproduces_plain_sampling_for_the_same_seed(real, references, real_head):
    for seed, (ids, _, _) in enumerate(references[:4]):
        params = dict(max_new_tokens=N_TOKENS, temperature=0.8, top_p=0.95, seed=seed)
        plain = real.generate(ids, **params)
        out = real.generate(ids, strategy={"name": "draft-head", "head": real_head}, **params)
        assert out.token_ids == plain.token_ids
