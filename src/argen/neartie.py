"""The one near-tie rule: when two greedy outputs that should be identical may differ.

Greedy decoding takes the argmax of the logits. Where the two largest logits are within NEAR_TIE
of each other, the order of floating-point operations (another kernel, batch shape or summation
order) can flip that choice: a near-tie, not a bug. A divergence is excused only when, at the
first position where the outputs differ, the reference model's top-2 logits are within NEAR_TIE
*and* the two tokens chosen there are exactly those two. Anything else is a real divergence.

The bench (`bench/runner.py`), the tests (`tests/helpers.py`) and the verifier's near-tie count
all use this module, so a divergence is judged the same way everywhere.
"""

from __future__ import annotations

import torch

NEAR_TIE = 1e-4  # top-2 logit gap under which a greedy choice is a floating-point coin flip


def gap_is_near_tie(gap: float) -> bool:
    return gap <= NEAR_TIE


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (a length mismatch counts), None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.inference_mode()
def top2_at(model, prompt_ids: list[int], prefix: list[int]) -> tuple[list[int], list[float]]:
    """The (Hugging Face) model's two best next tokens and their logits after prompt + prefix."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids) + list(prefix)], device=device)
    logits = model(input_ids=ids, use_cache=False).logits[0, -1].float()
    top = torch.topk(logits, 2)
    return top.indices.tolist(), top.values.tolist()


def is_near_tie(top2_ids: list[int], top2_logits: list[float], token: int | None, reference_token: int | None) -> bool:
    """The rule itself, on the reference's top-2 at the first differing position."""
    pair = {token, reference_token}
    return gap_is_near_tie(top2_logits[0] - top2_logits[1]) and len(pair) == 2 and pair <= set(top2_ids)


def divergence(model, prompt_ids: list[int], tokens: list[int], reference: list[int], position: int) -> dict:
    """Why `tokens` part from `reference` at `position`, judged on `model`'s logits after
    prompt + reference[:position]: a record with `near_tie` True (excused) or False (a real divergence)."""
    ids, values = top2_at(model, prompt_ids, reference[:position])
    mine = tokens[position] if position < len(tokens) else None
    theirs = reference[position] if position < len(reference) else None
    return {
        "position": position,
        "token": mine,
        "reference_token": theirs,
        "top2": ids,
        "top2_logits": values,
        "gap": values[0] - values[1],
        "near_tie": is_near_tie(ids, values, mine, theirs),
    }
