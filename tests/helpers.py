"""Test helpers: reference greedy decoding with Hugging Face, and the near-tie check."""

from __future__ import annotations

import torch

from argen.neartie import divergence, first_difference
from argen.strategies.plain import Plain


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = hf_model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    new = out[0, len(prompt_ids) :].tolist()
    for i, t in enumerate(new):
        if t in eos_ids:
            return new[: i + 1]
    return new


def assert_same_or_near_tie(hf_model, prompt_ids, got: list[int], want: list[int]) -> bool:
    """Equal token for token, or diverging first at a near-tie by the one rule the bench uses too
    (`argen.neartie`: HF's top-2 logits within NEAR_TIE there, and the two tokens chosen are those
    two); returns True if a near-tie occurred."""
    n = first_difference(got, want)
    if n is None:
        return False
    d = divergence(hf_model, prompt_ids, got, want, n)
    assert d["near_tie"], (f"diverged at new token {n} ({got[n : n + 3]} vs {want[n : n + 3]}): HF top-2 {d['top2']}, "
                           f"gap {d['gap']:.2e}; not a near-tie")  # fmt: skip
    return True


class BrokenOnThirdStep(Plain):
    """Plain decoding that raises on its third step: stands for a bug only one request hits."""

    name = "test-broken"
    batchable = False

    def __init__(self) -> None:
        self.steps = 0

    def step(self, state):
        self.steps += 1
        if self.steps == 3:
            raise RuntimeError("boom")
        return super().step(state)
