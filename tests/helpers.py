"""Test helpers: reference greedy decoding with Hugging Face, the near-tie check, test strategies."""

from __future__ import annotations

import torch

from argen.neartie import divergence, first_difference
from argen.strategies.plain import Plain
from argen.strategies.speculative import DraftTree, Speculative

# Settings under which every proposer drafts at each step (adaptive controllers would stop drafting
# where drafts fail, and on this CPU calibration gives layer-skip nothing to skip).
PROPOSERS = {
    "prompt-lookup": {"name": "prompt-lookup", "adaptive": False},
    "ngram": {"name": "ngram", "adaptive": False},
    "jacobi": {"name": "jacobi", "adaptive": False},
    "layer-skip": {"name": "layer-skip", "skip_layers": [17], "skip_ffn": [7], "max_draft": 3, "adaptive": False},
    "draft-model": {"name": "draft-model", "max_draft": 3, "adaptive": False},
}


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
    assert d["near_tie"], (
        f"diverged at new token {n} ({got[n : n + 3]} vs {want[n : n + 3]}): HF top-2 {d['top2']}, "
        f"gap {d['gap']:.2e}; not a near-tie"
    )
    return True


class BrokenOnThirdStep(Plain):
    """Plain decoding that raises on its third step: stands for a bug only one request hits."""

    name = "test-broken"

    def __init__(self) -> None:
        self.steps = 0

    def step(self, state):
        self.steps += 1
        if self.steps == 3:
            raise RuntimeError("boom")
        return (yield from super().step(state))


class Oracle(Speculative):
    """Drafts from a known continuation, with chosen positions corrupted, as a chain or as a tree
    whose correct branch is not the first: drafts that succeed and fail exactly where we say."""

    name = "oracle"

    def __init__(self, truth: list[int], wrong_every: int = 4, tree: bool = False, max_draft: int = 6) -> None:
        super().__init__(max_draft=max_draft, adaptive=False)
        self.truth, self.wrong_every, self.tree = truth, wrong_every, tree

    def propose(self, state, k):
        done = state.n_generated
        draft = list(self.truth[done : done + k])
        for i in range(len(draft)):
            if (done + i) % self.wrong_every == self.wrong_every - 1:
                draft[i] = (draft[i] + 1) % 250
        if not self.tree or not draft:
            return DraftTree.chain(draft)
        t = DraftTree()
        decoy = t.add((draft[0] + 7) % 250, -1)  # a wrong first branch, scored in the same pass
        t.add((draft[0] + 3) % 250, decoy)
        parent = -1
        for token in draft:
            parent = t.add(token, parent)
        return t


def all_logits(hf_model, ids: list[int]) -> torch.Tensor:
    """A Hugging Face model's next-token logits [len(ids), V] after each prefix of `ids`, from scratch."""
    with torch.inference_mode():
        return hf_model(torch.tensor([ids])).logits[0].float()


def greedy_by_hand(hf_model, prompt_ids: list[int], n: int) -> list[int]:
    """Plain greedy decoding, written out: each token the argmax after the whole sequence so far."""
    seq = list(prompt_ids)
    for _ in range(n):
        seq.append(int(all_logits(hf_model, seq)[-1].argmax()))
    return seq[len(prompt_ids) :]
