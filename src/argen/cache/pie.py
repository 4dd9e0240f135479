"""PIE (positional integrity encoding, He et al. 2024): a prompt edited after its keys and values
were cached reuses them. The positions before the edit keep their blocks, the edited span is
recomputed, and the cached keys after it move to their new positions: RoPE rotates a key at
position p by R(p), and R(p + d) = R(d) R(p), so one multiply by R(d) takes a key from p to p + d
(its old rotation removed and the new one applied at once). Values carry no position and are copied
as they are. It is lossy: the moved keys and values were computed over the old prompt (whatever
the edit changed before them is not in them), and the report says how far the output drifts.

`plan_splice` finds what changed between two token sequences; `rerotate` is the multiply;
`SeqKV.append_from` (cache/paged.py) copies the moved positions, and the runtime, which owns the
RoPE tables, rotates them (`LlamaRuntime.rotate_keys`); engine/batch.py runs the splice."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EditSplice:
    """Old tokens [kept, old_end) became new tokens [kept, new_end); everything before `kept` and after
    the two ends is the same in both (the tokens after an end sit `shift` positions later in the new
    prompt)."""

    kept: int
    old_end: int
    new_end: int

    @property
    def shift(self) -> int:
        return self.new_end - self.old_end


def plan_splice(old: list[int], new: list[int]) -> EditSplice:
    """The smallest span of tokens that differs: the longest common prefix, then the longest common
    suffix of what is left. Found on token ids (not on the edit's characters), so a tokenizer that
    merges across the edit's edges changes the span, never the result."""
    kept = 0
    limit = min(len(old), len(new))
    while kept < limit and old[kept] == new[kept]:
        kept += 1
    tail = 0
    while tail < limit - kept and old[-1 - tail] == new[-1 - tail]:
        tail += 1
    return EditSplice(kept, len(old) - tail, len(new) - tail)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rerotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Keys [..., head dim] rotated by the angles whose cosines and sines are `cos`, `sin` [head dim]
    (the rotate-half layout of HF's Llama): R(d) k."""
    return keys * cos + rotate_half(keys) * sin
