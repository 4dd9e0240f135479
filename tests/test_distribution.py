"""Exact sampling, computed exactly: every speculative strategy's output distribution over the first
three tokens equals plain sampling's, on a model with a three-token vocabulary where every random
draw can be enumerated (`exact.py`), through the real `generate()` (Engine, proposer, `drafting.py`,
`verify.py`, cache bookkeeping between steps), also under top-k, top-p and min-p, against a reference
that filters the model's own logits independently. Positive controls: small deliberate biases in the
rules, which the same check must catch.

Power: the distributions are computed, not sampled, so the check has no sampling error. It
requires every next-token probability, after every prefix (the first token, pairs and triples),
to agree with the model's own within 0.1% relative (float32 kernels differ by ~1e-4 relative here).
A 5% relative shift in any of them is 50 times that: it fails with certainty (power 1), and a
correct strategy passes with certainty (α = 0: the check is deterministic).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from exact import Enumerator, assert_same_distribution, check_keys
from scipy.stats import norm

import argen.strategies.speculative.draft_head as draft_head
import argen.strategies.speculative.draft_model as draft_model
import argen.strategies.speculative.drafting as drafting
import argen.strategies.speculative.verify as verify
from argen.api import Generator
from argen.models.draft_head import DraftHeadRuntime
from argen.models.llama import LlamaRuntime
from argen.models.loading import LoadedModel
from argen.models.tiny import byte_tokenizer, tiny_llama
from argen.recipes.draft_head import Recipe, new_head
from argen.sampling import gumbel_noise, position_seed, uniform

V = 3  # vocabulary: small enough to enumerate every draw, large enough for a residual to matter
PROMPT = [0, 1, 2, 1, 0, 1, 2, 1]  # repeats, so lookup proposers find drafts
N_TOKENS = 3


def tiny_v(seed: int) -> Generator:
    """A tiny Llama over V tokens; logits scaled so the distributions are far from uniform."""
    model = tiny_llama(seed, vocab_size=V, hidden_size=32, intermediate_size=64, pad_token_id=None,
                       bos_token_id=None, eos_token_id=None)  # fmt: skip
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    runtime = LlamaRuntime(model.config, model.state_dict())
    return Generator(LoadedModel(f"tiny-v{V}@{seed}", runtime, byte_tokenizer(), lambda: model, {V + 1}))


@pytest.fixture(scope="module")
def target() -> Generator:
    return tiny_v(0)


@pytest.fixture(scope="module")
def drafter() -> Generator:
    return tiny_v(1)  # another model: its q differs from the target's p, so drafts are also rejected


@pytest.fixture(scope="module")
def head(target) -> DraftHeadRuntime:
    """A draft head for the target (seeded, untrained: its top-2 trees hold the target's token often,
    not always), scoring all three tokens."""
    return DraftHeadRuntime(new_head(target.runtime, Recipe()), torch.arange(V), target.runtime)


def reference(gen: Generator, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
              presence: float = 0.0, frequency: float = 0.0) -> dict[tuple, float]:  # fmt: skip
    """P(first N_TOKENS tokens) straight from the Hugging Face model's logits: with OpenAI's penalties,
    token j's logit at step t first loses c * frequency + (c > 0) * presence, c its count in seq[:t];
    then softmax(logits / T) over the top_k tokens, then the fewest likeliest tokens that cover top_p
    (a token is kept while those before it cover less than top_p), then those at least min_p times the
    likeliest, each renormalized, multiplied along every sequence. Nothing of argen's sampler is used."""
    out = {}
    for seq in itertools.product(range(V), repeat=N_TOKENS):
        ids = torch.tensor([PROMPT + list(seq)])
        with torch.inference_mode():
            logits = gen.model.hf_model(ids).logits[0, len(PROMPT) - 1 : -1].double()
            for t in range(N_TOKENS):
                for j in set(seq[:t]):
                    logits[t, j] -= seq[:t].count(j) * frequency + presence
        logits = logits / temperature
        prob = 1.0
        for t, tok in enumerate(seq):
            p = logits[t].softmax(-1).numpy()
            keep = np.ones(V, dtype=bool)
            if top_k:
                keep &= p >= np.sort(p)[-top_k]
            p = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
            covered = 0.0
            for i in np.argsort(-p, kind="stable"):
                keep[i] &= covered < top_p
                covered += p[i]
            p = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
            keep &= p >= min_p * p.max()
            prob *= (np.where(keep, p, 0) / np.where(keep, p, 0).sum())[tok]
        out[seq] = float(prob)
    return out


def exact_outputs(gen: Generator, spec, **params):
    def run():
        r = gen.generate(PROMPT, max_new_tokens=N_TOKENS, seed=0, ignore_eos=True, strategy=spec, **params)
        s = r.stats
        return tuple(r.token_ids), {"accepted": s.draft_tokens_accepted > 0,
                                    "rejected": s.draft_tokens_accepted < s.draft_tokens_proposed}  # fmt: skip

    return Enumerator().distribution(run)


def check_exact(gen: Generator, spec, **params):
    """The invariant: the strategy's exact output distribution is the model's. Returns the
    enumeration (for the callers' checks that drafts were both accepted and rejected)."""
    dist = exact_outputs(gen, spec, **({"temperature": 1.0} | params))
    assert_same_distribution(dist.probs, reference(gen, **{k.removesuffix("_penalty"): v for k, v in params.items()}))
    check_keys(dist)
    return dist


def specs(drafter: Generator, head=None) -> dict[str, tuple[dict, dict]]:
    fixed = {"adaptive": False}  # the adaptive controllers time passes: a path would not replay
    return {
        "draft-head": ({"name": "draft-head", "head": head, "max_draft": 2, "width": 2} | fixed, {}),
        "draft-head top-k": ({"name": "draft-head", "head": head, "max_draft": 2, "width": 2} | fixed,
                             {"temperature": 0.7, "top_k": 2}),  # fmt: skip
        "plain": ({"name": "plain"}, {}),
        "prompt-lookup": ({"name": "prompt-lookup", "max_draft": 2} | fixed, {}),
        "ngram": ({"name": "ngram", "max_draft": 2} | fixed, {}),
        "jacobi": ({"name": "jacobi", "window": 2} | fixed, {}),
        "layer-skip": ({"name": "layer-skip", "skip_layers": [1], "skip_ffn": [2], "max_draft": 2} | fixed, {}),
        "draft-model": ({"name": "draft-model", "draft": drafter, "max_draft": 2} | fixed, {}),
        "draft-model top-k": ({"name": "draft-model", "draft": drafter, "max_draft": 2} | fixed,
                              {"temperature": 0.7, "top_k": 2}),  # fmt: skip
        "multi-draft": ({"name": "draft-model", "draft": drafter, "max_draft": 1, "num_drafts": 3} | fixed,
                        {"top_k": 2}),  # fmt: skip
        "multi-draft tree": ({"name": "draft-model", "draft": drafter, "max_draft": 2, "num_drafts": 2} | fixed,
                             {"top_k": 2}),  # fmt: skip
        "multi-draft pair": ({"name": "draft-model", "draft": drafter, "max_draft": 1, "num_drafts": 2} | fixed, {}),
        # Boundaries that matter, each a margin away: top_p 0.8: the first token's likeliest has 0.78,
        # so the crossing token is kept there, and after (1, 1) the first two cover 0.86, so the third
        # is dropped. min_p 0.2 at T = 0.7: after (1, 1) the second token is kept (0.21 of the
        # likeliest), after (0, 2) it is dropped (0.195). min_p 0.3 at T = 1.3: the first token's
        # runner-up is kept (0.37; at T = 1 it would be 0.28, dropped), and after (1, 1) the third
        # (0.32; 0.23 at T = 1).
        "plain top-p": ({"name": "plain"}, {"top_p": 0.8}),
        "prompt-lookup top-p": ({"name": "prompt-lookup", "max_draft": 2} | fixed, {"top_p": 0.8}),
        "draft-model top-p": ({"name": "draft-model", "draft": drafter, "max_draft": 2} | fixed, {"top_p": 0.8}),
        "plain min-p": ({"name": "plain"}, {"temperature": 0.7, "min_p": 0.2}),
        "draft-model min-p": ({"name": "draft-model", "draft": drafter, "max_draft": 2} | fixed,
                              {"temperature": 1.3, "min_p": 0.3}),  # fmt: skip
    }


CASES = ["plain", "prompt-lookup", "ngram", "jacobi", "layer-skip", "draft-model", "draft-model top-k", "multi-draft",
         "multi-draft tree", "multi-draft pair", "plain top-p", "prompt-lookup top-p", "draft-model top-p", "plain min-p",
         "draft-model min-p", "draft-head", "draft-head top-k"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_output_distribution_is_exactly_plain_sampling(target, drafter, head, case):
    spec, params = specs(drafter, head)[case]
    dist = check_exact(target, spec, **params)
    if not case.startswith("plain"):  # both verifier branches carry weight, so both were checked
        assert dist.expected["accepted"] > 0.05 and dist.expected["rejected"] > 0.05, dist.expected


@pytest.mark.parametrize("case", ["plain", "prompt-lookup", "jacobi", "draft-model", "multi-draft tree"])
def test_under_presence_and_frequency_penalties_the_distribution_is_exactly_plain_sampling(target, drafter, case):
    """Penalties make each position's distribution depend on the tokens before it in the output, so a
    verifier must process every draft position with its own context; the reference applies OpenAI's
    definition to the model's logits by hand."""
    spec, params = specs(drafter)[case]
    dist = check_exact(target, spec, **params, presence_penalty=0.9, frequency_penalty=-0.6)
    if case != "plain":
        assert dist.expected["accepted"] > 0.05 and dist.expected["rejected"] > 0.05, dist.expected


# -- positive controls: the same check, on deliberately broken rules ---------------------------


def leviathan(bias: float = 0.0, accept_scale: float = 1.0):
    """Speculative sampling for one draft (what `spectr_select` does with k = 1), written out so
    that a control can break it: `bias` adds that share of p to the residual, `accept_scale`
    scales the acceptance ratio. With neither it must pass the check like the real rule."""

    def select(p, q, drafts, seed, position):
        (x,) = drafts
        ratio = accept_scale * (p[x] / q[x]).item() if q[x] > 0 else 0.0
        if verify.uniform(seed, position, stream=1) < min(1.0, ratio):
            return 0, x
        residual = (p - q).clamp_min(0) + bias * p
        noise = verify.gumbel_noise(seed, position, residual.shape[-1], residual.device)
        return None, int((residual.log() + noise).argmax())

    return select


@pytest.mark.parametrize("broken, fails", [({}, False), ({"bias": 0.02}, True), ({"accept_scale": 1.05}, True)],
                         ids=["written-out rule passes", "resampler off by 2% of p", "acceptance 5% too generous"])  # fmt: skip
def test_control_a_biased_rule_fails_the_check(target, drafter, monkeypatch, broken, fails):
    monkeypatch.setattr(verify, "spectr_select", leviathan(**broken))
    spec, params = specs(drafter)["draft-model top-k"]
    if fails:
        with pytest.raises(AssertionError, match="should be"):
            check_exact(target, spec, **params)
    else:
        check_exact(target, spec, **params)


def test_control_a_drafter_that_misreports_q_fails_the_check(target, drafter, monkeypatch):
    """Drafts drawn from q but reported to the verifier as q sharpened by 5% in log space."""

    def misreporting(*args, **kwargs):
        drafts, probs = yield from drafting.draw_chain(*args, **kwargs)
        return drafts, [(q.log() * 1.05).softmax(-1) for q in probs]

    monkeypatch.setattr(draft_model, "draw_chain", misreporting)
    spec, params = specs(drafter)["draft-model top-k"]
    with pytest.raises(AssertionError, match="should be"):
        check_exact(target, spec, **params)


def test_control_top_k_drafts_verified_as_samples_of_the_heads_q_fail_the_check(target, drafter, head, monkeypatch):
    """The draft head's tree holds its top tokens, not draws from a distribution q: a tree that
    reported a q to the verifier (here uniform) would be judged by the rule for sampled drafts,
    which is then wrong."""
    propose = draft_head.DraftHead.propose

    def with_q(self, state, k):
        tree = yield from propose(self, state, k)
        tree.draft_probs = [torch.full((V,), 1 / V) for _ in tree.tokens] if len(tree) else None
        return tree

    monkeypatch.setattr(draft_head.DraftHead, "propose", with_q)
    spec, params = specs(drafter, head)["draft-head"]
    with pytest.raises(AssertionError, match="should be"):
        check_exact(target, spec, **params)


def test_control_drafts_on_the_target_noise_stream_fail_the_key_check(target, drafter, monkeypatch):
    """Drafts drawn with the target's own noise stream are not independent of its decisions."""
    monkeypatch.setattr(drafting, "DRAFT_STREAM", 0)
    spec, params = specs(drafter)["draft-model top-k"]
    with pytest.raises(AssertionError, match="share noise keys"):
        check_exact(target, spec, **params)


# -- what the enumeration assumes of the noise ---------------------------------------------------


def test_noise_is_what_the_enumeration_assumes():
    """The enumeration treats each draw as an ideal one: Gumbel-max picks token i with probability
    softmax(l)_i, `uniform(...) < t` holds with probability t, and distinct (seed, position, stream)
    keys give independent draws. Checked here:

    - Gumbel-max, vectorised: n = 60,000 draws argmax(l + g) of `gumbel_noise` (one key, 3 × n values)
      with softmax(l) = (0.5, 0.3, 0.2), each token's count tested against n·p_i (two-sided z-test,
      α = 1e-3 Bonferroni over the 3 tokens: z* = 3.59). A 5% relative shift of the smallest
      probability (0.2 → 0.21) moves the mean by 0.01·n against a standard deviation of
      sqrt(0.16·n), i.e. 0.01·sqrt(n)/0.4 = 6.12 standard deviations: power Φ(6.12 − 3.59) = 0.994;
      larger probabilities are detected with more power.
    - `uniform`: n = 40,000 keys, P(u < t) at t = 0.25, 0.5, 0.75 (α = 1e-3 over the 3): a 5% relative
      shift at t = 0.25 is 0.0125·sqrt(n)/sqrt(0.1875) = 5.77 standard deviations: power
      Φ(5.77 − 3.59) = 0.985 (more at larger t).
    - Independence: every key argen can use for the first 2,048 positions of 64 seeds, over the
      target's streams (0, the acceptance streams 1..16) and the draft streams, maps to a distinct
      generator seed (exact; distinct torch generator seeds give independent streams).
    The powers are computed below from the same numbers and asserted, so the docstring cannot drift.
    """
    z_crit = norm.ppf(1 - 1e-3 / 3 / 2)
    p = np.array([0.5, 0.3, 0.2])
    n = 60_000
    assert norm.cdf(0.05 * p.min() * np.sqrt(n) / np.sqrt(p.min() * (1 - p.min())) - z_crit) >= 0.99
    logits = torch.tensor(np.log(p), dtype=torch.float32)
    g = gumbel_noise(seed=12345, position=0, size=3 * n).view(n, 3)
    counts = np.bincount((logits + g).argmax(-1).numpy(), minlength=3)
    z = (counts - n * p) / np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(z) < z_crit), z

    m = 40_000
    assert norm.cdf(0.05 * 0.25 * np.sqrt(m) / np.sqrt(0.25 * 0.75) - z_crit) >= 0.98
    u = np.array([uniform(seed, 3, stream=1) for seed in range(m)])
    for t in (0.25, 0.5, 0.75):
        assert abs(((u < t).sum() - m * t) / np.sqrt(m * t * (1 - t))) < z_crit

    streams = [0, *range(1, 17), *range(drafting.DRAFT_STREAM, drafting.DRAFT_STREAM + 16)]
    keys = {position_seed(seed, position, stream)
            for seed in range(64) for position in range(2048) for stream in streams}  # fmt: skip
    assert len(keys) == 64 * 2048 * len(streams)
