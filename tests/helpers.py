"""Test helpers: reference greedy decoding with Hugging Face, and the near-tie check."""

from __future__ import annotations

import torch

from argen.strategies.plain import Plain

NEAR_TIE = 1e-4


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = hf_model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    new = out[0, len(prompt_ids) :].tolist()
    for i, t in enumerate(new):
        if t in eos_ids:
            return new[: i + 1]
    return new


def top2_gap(hf_model, ids: list[int]) -> float:
    """Gap between the two largest next-token logits after `ids`, per the HF model."""
    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids])).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def assert_same_or_near_tie(hf_model, prompt_ids, got: list[int], want: list[int]) -> bool:
    """Equal token for token, or diverging first where the reference's top-2 logits are within
    NEAR_TIE (a floating-point flip, allowed by the design); returns True if a near-tie occurred."""
    if got == want:
        return False
    n = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    gap = top2_gap(hf_model, prompt_ids + want[:n])
    assert gap < NEAR_TIE, f"diverged at new token {n} ({got[n : n + 3]} vs {want[n : n + 3]}) with top-2 gap {gap:.2e}"
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
