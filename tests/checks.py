"""The invariant checks, one function each, used by the tests of the real code and by the positive
controls in test_controls.py, which run them on deliberately broken variants and assert that they
fail: a check that passes a broken variant could not have caught the bug it is there for."""

from __future__ import annotations

import itertools

import torch

import argen.setprompt
from argen.engine import DecodeBatch, Event, Failure, Request, Result
from argen.neartie import divergence, first_difference
from argen.sampling import Sampler, SamplingParams, gumbel_noise
from argen.setprompt import PromptLayout, SetPrompt


def check_greedy_identical(gen, prompt, strategy, max_new_tokens: int = 40) -> Result:
    """Greedy output under `strategy` equals plain greedy output, token for token."""
    plain = gen.generate(prompt, max_new_tokens=max_new_tokens, ignore_eos=True)
    out = gen.generate(prompt, max_new_tokens=max_new_tokens, ignore_eos=True, strategy=strategy)
    n = first_difference(out.token_ids, plain.token_ids)
    assert n is None, (
        f"differs from plain greedy at new token {n}: {out.token_ids[n : n + 3]} vs {plain.token_ids[n : n + 3]}"
    )
    return out


def check_cache_matches_prefill(gen, prompt, strategy, max_new_tokens: int = 40, atol: float = 1e-4, **params) -> int:
    """After every step the cache holds exactly the tokens but the pending one, with the keys and
    values a fresh prefill of those tokens computes (up to float32 kernel order: even plain decoding
    differs from a one-pass prefill by ~3e-5). Returns the number of draft tokens accepted. The
    request runs in the Engine's decode loop, round by round; the cache is looked at whenever a step
    has just emitted its tokens (the next step's feeds are asked for, not yet run)."""
    strategy = gen.prepare_strategy(strategy)  # companions (a draft model) resolved, as generate does
    request = Request(
        gen.encode(prompt), SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, **params), strategy
    )
    batch = DecodeBatch(gen.engine, prefix_caching=False)
    seq = batch.admit(0, request)
    while batch:
        items = batch.step()
        failed = [item for item in items if isinstance(item, Failure)]
        assert not failed, f"the request failed: {failed[0].error!r}"
        emitted = any(isinstance(item, Event) and item.token_ids for item in items)
        if not emitted or seq.finish_reason is not None:
            continue
        cache, tokens = seq.state.cache, seq.state.tokens
        n = cache.lengths[0]
        assert n == len(tokens) - 1, f"the cache holds {n} positions for {len(tokens) - 1} tokens"
        fresh = gen.runtime.new_cache(1, n + 1)
        gen.runtime.forward(torch.tensor([tokens[:-1]]), torch.arange(n)[None], fresh, num_logits=0)
        for name, got, want in zip(("k", "v"), cache.gathered(), fresh.gathered()):
            assert torch.allclose(got, want, atol=atol), (
                f"cached {name} differs from a fresh prefill by {(got - want).abs().max():.2e}"
            )
        fresh.free()
    return seq.state.counters.draft_accepted


def next_logits(runtime, layout: PromptLayout) -> torch.Tensor:
    """Logits after the whole prompt, fed as the Engine feeds it (masked prefill + pending token)."""
    n = len(layout.ids)
    cache = runtime.new_cache(1, n)
    ids, pos = torch.tensor([layout.ids]), torch.tensor([layout.positions])
    runtime.forward(ids[:, :-1], pos[:, :-1], cache, mask=layout.mask[:-1, :-1], num_logits=0)
    logits, _ = runtime.forward(ids[:, -1:], pos[:, -1:], cache, num_logits=1)
    cache.free()
    return logits[0, -1]


def set_layouts(tokenizer, prefix: str, members: list[str], suffix: str, canonical: bool, chat: bool = True):
    """The layout of every permutation of the members (through the module attribute, so that a
    control can swap in a broken layout)."""
    return [
        argen.setprompt.set_prompt_layout(tokenizer, SetPrompt(prefix, list(p), suffix), chat=chat, canonical=canonical)
        for p in itertools.permutations(members)
    ]


def check_order_independent(runtime, layouts: list[PromptLayout], atol: float) -> float:
    """Every layout gives the same next-token logits within `atol`; returns the largest difference.
    Meaningful on layouts that keep the members in the given order (canonical=False): sorted,
    every permutation is the same input and this cannot fail."""
    logits = [next_logits(runtime, lay) for lay in layouts]
    worst = max((logits[0] - x).abs().max().item() for x in logits)
    assert worst <= atol, f"member order changes the next-token logits by {worst:.2e} (> {atol:g})"
    return worst


def teacher_forced_logits(gen, prompt_ids: list[int], output: list[int]) -> torch.Tensor:
    """The model's next-token logits before each output token ([len(output), V]), in one pass."""
    ids = prompt_ids + output
    cache = gen.runtime.new_cache(1, len(ids))
    logits, _ = gen.runtime.forward(torch.tensor([ids]), torch.arange(len(ids))[None], cache)
    return logits[0, len(prompt_ids) - 1 : len(ids) - 1]


def check_counterfactual(gen, original: Result, t: int, token: int) -> Result:
    """The Gumbel-max counterfactual: replayed without an intervention, the original exactly; under
    do(x_t = token), the original up to t, then every later token drawn with the original's noise
    for its position (argmax(processed logits + gumbel_noise(seed, i))) under the new context."""
    replay = gen.counterfactual(original)
    n = first_difference(replay.token_ids, original.token_ids)
    assert n is None, f"a replay without intervention differs from the original at token {n}"
    cf = gen.counterfactual(original, {t: token})
    assert cf.token_ids[:t] == original.token_ids[:t] and cf.token_ids[t] == token
    params = SamplingParams(**original.extras["replay"]["params"])
    sampler = Sampler(params)
    logits = teacher_forced_logits(gen, cf.prompt_ids, cf.token_ids)
    for i in range(t + 1, len(cf.token_ids)):
        processed = sampler.process(logits[i], cf.prompt_ids + cf.token_ids[:i])
        drawn = int((processed + gumbel_noise(original.seed, i, processed.shape[-1])).argmax())
        assert drawn == cf.token_ids[i], f"token {i} of the counterfactual was not drawn with the original noise"
    return cf


def check_same_as_plain_and_hf(hf_model, prompt_ids: list[int], out: list[int], plain: list[int], hf: list[int]) -> int:
    """Greedy output token for token equal to argen plain's and to HF generate()'s on the same prompt,
    a divergence excused only by the one near-tie rule (`argen.neartie`, judged on HF's logits).
    Returns how many near-ties excused a divergence."""
    near_ties = 0
    for name, reference in (("HF generate()", hf), ("argen plain", plain)):
        n = first_difference(out, reference)
        if n is None:
            continue
        d = divergence(hf_model, prompt_ids, out, reference, n)
        assert d["near_tie"], (
            f"differs from {name} at new token {n} ({out[n : n + 3]} vs {reference[n : n + 3]}), "
            f"not at a near-tie: HF top-2 {d['top2']}, logit gap {d['gap']:.2e}"
        )
        near_ties += 1
    return near_ties
