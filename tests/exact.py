"""Exact output distributions of argen's real sampling code, by enumerating every random draw.

Every draw argen makes goes through two functions of `argen.sampling`: `gumbel_noise` (Gumbel-max:
argmax(logits + noise) is a draw from softmax(logits)) and `uniform` (compared with an acceptance
probability). `Enumerator` puts branch points in their place, in every module that draws:
- `logits + noise`, then `.argmax()`, branches over every token, with its softmax probability
  under the logits the code itself computed (tokens filtered to -inf get none);
- `uniform(...) < t` branches into True (probability t) and False (1 - t).
`distribution(run)` then runs `run` once per path through those branches (depth first, each run
from scratch, replaying the choices made so far) and adds up {outcome: probability}: the exact
distribution of what the code returns, for whatever the code computes. A bias anywhere (the
draft's q, the acceptance ratio, the residual, the bookkeeping between steps) moves it; nothing
is sampled, so there is no sampling error to hide behind.

Each draw is a fresh branch: independent noise. The code promises as much by drawing every target
decision from its own (seed, position, stream) key and drafts from streams of their own; the
enumerator records the keys so that `check_keys` can hold the code to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field

import torch

import argen.sampling
import argen.strategies.speculative.drafting as drafting
import argen.strategies.speculative.verify as verify


@dataclass
class _Path:
    choices: list[int] = field(default_factory=list)  # chosen option per branch point, replayed
    options: list[list[tuple[int, float]]] = field(default_factory=list)  # this run's branch points
    keys: list[tuple[str, int, int, int]] = field(default_factory=list)  # (who, seed, position, stream)


class _Noise:
    def __init__(self, enum: Enumerator) -> None:
        self.enum = enum

    def __radd__(self, logits: torch.Tensor) -> _Perturbed:
        return _Perturbed(self.enum, logits)


class _Perturbed:
    def __init__(self, enum: Enumerator, logits: torch.Tensor) -> None:
        self.enum, self.logits = enum, logits

    def argmax(self, dim: int | None = None) -> torch.Tensor:
        probs = torch.softmax(self.logits.double().flatten(), -1).tolist()
        return torch.tensor(self.enum.branch(probs))


class _Uniform:
    def __init__(self, enum: Enumerator) -> None:
        self.enum = enum

    def __lt__(self, threshold) -> bool:
        t = min(1.0, max(0.0, float(threshold)))
        return self.enum.branch([t, 1.0 - t]) == 0


class Enumerator:
    def __init__(self) -> None:
        self.path = _Path()
        self.depth = 0

    def branch(self, weights: list[float]) -> int:
        options = [(i, w) for i, w in enumerate(weights) if w > 0]
        if self.depth == len(self.path.choices):
            self.path.choices.append(0)
        assert self.path.choices[self.depth] < len(options), "a replayed run branched differently"
        self.path.options.append(options)
        choice = options[self.path.choices[self.depth]][0]
        self.depth += 1
        return choice

    def _gumbel(self, who: str):
        def gumbel_noise(seed, position, size, device="cpu", stream=0):
            self.path.keys.append((who, seed, position, stream))
            return _Noise(self)

        return gumbel_noise

    def _uniform(self, seed, position, stream):
        self.path.keys.append(("target", seed, position, stream))
        return _Uniform(self)

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        saved = (argen.sampling.gumbel_noise, verify.gumbel_noise, verify.uniform, drafting.gumbel_noise)
        argen.sampling.gumbel_noise = verify.gumbel_noise = self._gumbel("target")
        verify.uniform = self._uniform
        drafting.gumbel_noise = self._gumbel("draft")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # thousands of tiny passes: one thread is many times faster here
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            argen.sampling.gumbel_noise, verify.gumbel_noise, verify.uniform, drafting.gumbel_noise = saved

    def distribution(self, run: Callable[[], tuple[Hashable, dict]]) -> Distribution:
        """`run()` returns (outcome, extras); extras' numbers are averaged with the path weights."""
        out = Distribution()
        self.path = _Path()
        with self.patched():
            while True:
                self.path.options, self.path.keys, self.depth = [], [], 0
                outcome, extras = run()
                assert self.depth == len(self.path.choices), "a run ended before replaying its path"
                weight = 1.0
                for options, choice in zip(self.path.options, self.path.choices, strict=True):
                    weight *= options[choice][1]
                out.add(outcome, weight, extras)
                out.keys.append(list(self.path.keys))
                # Depth first: advance the deepest branch point that has an option left.
                while self.path.choices and self.path.choices[-1] + 1 >= len(
                    self.path.options[len(self.path.choices) - 1]
                ):
                    self.path.choices.pop()
                if not self.path.choices:
                    return out
                self.path.choices[-1] += 1


@dataclass
class Distribution:
    probs: dict = field(default_factory=dict)
    expected: dict = field(default_factory=dict)  # extras averaged over paths
    keys: list[list[tuple[str, int, int, int]]] = field(default_factory=list)  # per path
    runs: int = 0

    def add(self, outcome: Hashable, weight: float, extras: dict) -> None:
        self.runs += 1
        self.probs[outcome] = self.probs.get(outcome, 0.0) + weight
        for k, v in extras.items():
            self.expected[k] = self.expected.get(k, 0.0) + weight * float(v)


def conditionals(joint: dict[tuple, float]) -> dict[tuple, float]:
    """P(x_t = v | x_<t) for every prefix with positive probability, keyed by prefix + (v,)."""
    marginal: dict[tuple, float] = {}
    for seq, p in joint.items():
        for t in range(len(seq) + 1):
            marginal[seq[:t]] = marginal.get(seq[:t], 0.0) + p
    return {seq: p / marginal[seq[:-1]] for seq, p in marginal.items() if seq and marginal[seq[:-1]] > 0}


def assert_same_distribution(got: dict[tuple, float], want: dict[tuple, float], rel: float = 1e-3) -> None:
    """Every next-token probability, given every prefix (first token, pairs, triples), agrees
    within `rel` relative: a shift of 5% in any of them is 50 times what this lets through."""
    assert abs(sum(got.values()) - 1) < 1e-6 and abs(sum(want.values()) - 1) < 1e-6
    g, w = conditionals(got), conditionals(want)
    for seq in sorted(set(g) | set(w)):
        a, b = g.get(seq, 0.0), w.get(seq, 0.0)
        assert abs(a - b) <= rel * b + 1e-9, f"P({seq[-1]} | prefix {seq[:-1]}) is {a:.6f}, should be {b:.6f}"


def check_keys(dist: Distribution) -> None:
    """On every path: no target decision reuses a (seed, position, stream) key, and no draft draw
    shares a key with a target draw (either would make draws that must be independent the same)."""
    for keys in dist.keys:
        target = [k[1:] for k in keys if k[0] == "target"]
        assert len(target) == len(set(target)), f"a target noise key is drawn twice on one path: {target}"
        shared = set(target) & {k[1:] for k in keys if k[0] == "draft"}
        assert not shared, f"draft draws share noise keys with target draws: {sorted(shared)}"
