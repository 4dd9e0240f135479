"""Decoders for the image-token models (models.py's contract), batched over images.

Every decoder is a generator (`Steps`) that yields before each forward pass of the target model (for
speculative sampling: before each round of drafts and their verifying pass), so that after a first
`next` each `next` runs one pass, the last one ending the decode; it returns a `Decoded`: the tokens and, per
image, the forward passes of the target model (and of the draft) that the image took part in, the
figure the benchmarks compare. `run(steps)` drives one to its end (the Python API); the engine's decode
loop advances an image batch one step a round beside the text rows (engine/images.py).

Randomness is per row: image row i draws only from its own `torch.Generator` (`gens[i]`; a request's
are `row_generators(seed, n)`, one per image, from (seed, image index)), and only while it has
something to draw. So an image's pixels depend on its own label and generator, never on which other
rows share its batch or where it sits in it: requests of different clients can be decoded together.

AR models:
- `ar_plain`: one pixel a pass, n_pixels passes.
- `ar_speculative`: draft-model speculative sampling (Leviathan et al. 2023; Chen et al. 2023): the
  draft proposes up to k pixels, the target scores them in one pass, pixel j is kept with probability
  min(1, p/q) and the first rejected one is resampled from norm(max(p - q, 0)); when all are kept a
  bonus pixel is drawn from p. The output distribution is exactly the target's (tests/test_digits.py).
  With `relax` (a `Lantern`), LANTERN's relaxed acceptance (Jang et al., ICLR 2025): lossy; with a
  `gsd.Grouped`, grouped speculative decoding (So et al., ICCV 2025): lossy.
- `ar_jacobi`: speculative Jacobi decoding (Teng et al. 2024), no draft model: every undecided pixel
  holds a guess with the distribution q it was drawn from (uniform at first); each pass scores the
  whole image, keeps guesses in order with probability min(1, p/q) as speculative sampling does,
  resamples the first rejected one from norm(max(p - q, 0)), and redraws every later guess from this
  pass's conditionals (their new q). Exact, like speculative sampling: a guess is a proposal drawn
  before the coins that judge it.
Masked-diffusion models:
- `diffusion_plain`: one pixel a pass, at a uniformly random masked position (ancestral order).
- `diffusion_confidence`: Fast-dLLM's confidence-threshold parallel decoding (Wu et al. 2025): every
  masked pixel whose most likely level has probability >= threshold is decoded in the same pass
  (its level drawn from the model's distribution there); when none is, the most confident one is.
  With `block` > 0, semi-autoregressive block decoding (Fast-dLLM, SDAR's decoding order): blocks of
  `block` pixels in raster order (8: image rows), only the first block with masked pixels eligible.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, fields
from typing import Protocol, TypeVar

import numpy as np
import torch


@dataclass
class Decoded:
    tokens: torch.Tensor  # (batch, n_pixels) int64 in 0..n_levels-1
    target_passes: torch.Tensor  # (batch,) forward passes of the target each image was in
    draft_passes: torch.Tensor  # (batch,) forward passes of the draft (0 without one)

    def rows(self, start: int, end: int) -> Decoded:
        """Images start..end-1 of the batch (every per-image field sliced)."""
        return type(self)(**{f.name: getattr(self, f.name)[start:end] for f in fields(self)})


T = TypeVar("T")
Steps = Generator[None, None, Decoded]  # a decode: yields before each target pass, returns the images


def run(steps: Generator[None, None, T]) -> T:
    """Drive a decode (`Steps`) to its end and return what it returns."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def row_generators(seed: int, rows: int) -> list[torch.Generator]:
    """One generator per image of a request: image i's from (seed, i), mixed by numpy's SeedSequence
    (so neighbouring seeds or images give unrelated streams)."""
    states = (np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0] for i in range(rows))
    return [torch.Generator().manual_seed(int(state)) for state in states]


def pick(gens: Sequence[torch.Generator], which: torch.Tensor) -> list[torch.Generator]:
    """The generators of the rows `which` selects (a bool mask or indices)."""
    index = which.nonzero().squeeze(1) if which.dtype == torch.bool else which
    return [gens[i] for i in index.tolist()]


def uniforms(gens: Sequence[torch.Generator], shape: tuple[int, ...] = ()) -> torch.Tensor:
    """(len(gens), *shape) uniforms in [0, 1), row i from gens[i]."""
    if not gens:
        return torch.zeros(0, *shape, dtype=torch.double)
    return torch.stack([torch.rand(shape, generator=g, dtype=torch.double) for g in gens])


def _probs(model, labels: torch.Tensor, pixels: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(model(labels, pixels).double() / temperature, -1)


def _draw(probs: torch.Tensor, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """One level per distribution of `probs` (rows, ..., V), row i's drawn with gens[i], by inverse
    CDF sampling: the first level whose cumulative probability exceeds u * total. Hand-written because
    torch.multinomial draws a whole tensor from one generator, and each row needs its own."""
    u = uniforms(gens, tuple(probs.shape[1:-1]))
    cdf = probs.cumsum(-1)
    target = (u * cdf[..., -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def ar_plain(model, labels: torch.Tensor, gens: Sequence[torch.Generator], temperature: float = 1.0) -> Steps:
    b, d = len(labels), model.n_pixels
    x = torch.zeros(b, d, dtype=torch.long)
    for t in range(d):
        yield
        x[:, t] = _draw(_probs(model, labels, x, temperature)[:, t], gens)
    return Decoded(x, torch.full((b,), d), torch.zeros(b, dtype=torch.long))


def accept_probability(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Speculative sampling's rule: keep a draft token with probability min(1, p/q) (q > 0: it was drawn)."""
    return torch.clamp(p / q, max=1.0)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Where a rejected draft token is resampled from: norm(max(p - q, 0)), rows (..., V)."""
    r = torch.clamp(p - q, min=0.0)
    total = r.sum(-1, keepdim=True)
    # A rejection has probability 0 where p == q; guard the division for rounding anyway.
    return torch.where(total > 0, r / total.clamp(min=1e-300), p)


class Acceptance(Protocol):
    """A relaxed acceptance rule for `ar_speculative`: judge(p, q, tok) -> (the target's mass and the
    draft's mass that decide min(1, p/q) for each row's draft token, and the tokens the resampling
    after a rejection excludes, or None for plain norm(max(p - q, 0))). `Lantern` here, gsd.Grouped."""

    def judge(
        self, p: torch.Tensor, q: torch.Tensor, tok: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...


@dataclass(frozen=True)
class Lantern:
    """LANTERN's relaxed acceptance: a draft token x is kept with probability min(1, p~(x)/q(x)), where
    p~(x) adds to p(x) the target's probability of x's nearest tokens in latent space, nearest first,
    as long as that added mass stays <= delta (at most `neighbours` of them). Each step's output
    distribution thus moves mass only within latent neighbourhoods, by at most delta in total
    variation. On a rejection, the resampling excludes x and the neighbours that lent it their mass
    (as the authors' implementation does), from norm(max(p - q, 0)).

    `order` (V, V-1): every token's other tokens, nearest first. For grey levels the latent space is
    the level itself (`grey_level_order`); a model with a learned codebook passes the order of its
    code vectors' distances."""

    order: torch.Tensor
    delta: float = 0.1
    neighbours: int = 2

    def judge(
        self, p: torch.Tensor, q: torch.Tensor, tok: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(p~(tok), q(tok), the tokens the resampling excludes: tok and its lenders) for rows (A, V)."""
        p_tok, excluded = self.relaxed(p, tok)
        excluded[torch.arange(len(tok)), tok] = True
        return p_tok, q.gather(1, tok[:, None]).squeeze(1), excluded

    def relaxed(self, p: torch.Tensor, tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(p~(tok) per row, the lending neighbours as a (rows, V) bool mask) for rows p (A, V)."""
        near = self.order[tok][:, : self.neighbours]  # (A, n)
        lent = torch.cumsum(p.gather(1, near), -1)
        ok = lent <= self.delta  # a prefix: the cumulative sum only grows
        extra = (lent * ok).max(-1).values
        mask = torch.zeros_like(p, dtype=torch.bool)
        mask.scatter_(1, near, ok)
        return p.gather(1, tok[:, None]).squeeze(1) + extra, mask


def grey_level_order(levels: int) -> torch.Tensor:
    """For each grey level, the other levels by distance |a - b| (ties: the darker first)."""
    values = torch.arange(levels)
    dist = (values[None, :] - values[:, None]).abs() * levels + values[None, :]  # distance, then level
    dist.fill_diagonal_(-1)
    return dist.argsort(-1)[:, 1:]


@torch.no_grad()
def ar_speculative(
    target,
    draft,
    labels: torch.Tensor,
    gens: Sequence[torch.Generator],
    k: int = 4,
    temperature: float = 1.0,
    relax: Acceptance | None = None,
) -> Steps:
    b, d, v = len(labels), target.n_pixels, target.n_levels
    x = torch.zeros(b, d, dtype=torch.long)
    n = torch.zeros(b, dtype=torch.long)  # pixels decoded per image
    tp = torch.zeros(b, dtype=torch.long)
    dp = torch.zeros(b, dtype=torch.long)
    while bool((n < d).any()):
        yield
        a = (n < d).nonzero().squeeze(1)
        la, xa, na, ga = labels[a], x[a].clone(), n[a], pick(gens, a)
        rows = torch.arange(len(a))
        kk = torch.clamp(d - na, max=k)  # drafts this round (>= 1)
        qs = torch.zeros(len(a), k, v, dtype=torch.double)
        for j in range(k):
            live = j < kk
            if not bool(live.any()):
                break
            pos = torch.clamp(na + j, max=d - 1)
            q = _probs(draft, la, xa, temperature)[rows, pos]
            xa[rows[live], pos[live]] = _draw(q[live], pick(ga, live))  # only rows still drafting draw
            qs[:, j] = q
            dp[a[live]] += 1
        p_all = _probs(target, la, xa, temperature)
        tp[a] += 1
        positions = torch.clamp(na[:, None] + torch.arange(k + 1)[None, :], max=d - 1)
        ps = p_all[rows[:, None], positions]  # (A, k + 1, V)
        made = torch.zeros(len(a), dtype=torch.long)  # pixels this round commits per image
        going = torch.ones(len(a), dtype=torch.bool)  # every draft so far kept
        for j in range(k):
            live = going & (j < kk)
            if not bool(live.any()):
                break
            pos = torch.clamp(na + j, max=d - 1)
            tok = xa[rows, pos]
            p_tok, q_tok, excluded = ps[rows, j, tok], qs[rows, j, tok], None
            if relax is not None:
                p_tok, q_tok, excluded = relax.judge(ps[:, j], qs[:, j], tok)
            keep = coins(ga, live) < accept_probability(p_tok, q_tok)
            kept, rejected = live & keep, live & ~keep
            p_left = ps[:, j] if excluded is None else ps[:, j].masked_fill(excluded, 0.0)
            res = residual(p_left, qs[:, j])
            if excluded is not None:  # nothing left outside the neighbourhood: fall back to p
                res = torch.where(res.sum(-1, keepdim=True) > 0, res, ps[:, j])
            xa[rows[rejected], pos[rejected]] = _draw(res[rejected], pick(ga, rejected))
            made += live.long()  # a kept draft or its resampled replacement
            going = kept
        # All drafts kept: a bonus pixel from the target's pass, where one is left.
        bonus = going & (na + kk < d)
        if bool(bonus.any()):
            pos = torch.clamp(na + kk, max=d - 1)
            xa[rows[bonus], pos[bonus]] = _draw(ps[rows, kk.clamp(max=k)][bonus], pick(ga, bonus))
            made += bonus.long()
        n[a] = na + made
        # Pixels past the committed ones are scratch: clear them (a causal model ignores them anyway).
        xa[torch.arange(d)[None, :] >= n[a][:, None]] = 0
        x[a] = xa
    return Decoded(x, tp, dp)


def coins(gens: Sequence[torch.Generator], live: torch.Tensor) -> torch.Tensor:
    """One uniform per row, drawn only for the `live` rows (the others get 1.0: never below an
    acceptance probability), so a row's draws do not depend on how long the other rows go on."""
    out = torch.ones(len(live), dtype=torch.double)
    out[live] = uniforms(pick(gens, live))
    return out


@torch.no_grad()
def ar_jacobi(
    model, labels: torch.Tensor, gens: Sequence[torch.Generator], window: int = 16, temperature: float = 1.0
) -> Steps:
    b, d, v = len(labels), model.n_pixels, model.n_levels
    q = torch.full((b, d, v), 1.0 / v, dtype=torch.double)  # each guess's proposal distribution
    x = _draw(q, gens)
    n = torch.zeros(b, dtype=torch.long)
    tp = torch.zeros(b, dtype=torch.long)
    positions = torch.arange(d)
    while bool((n < d).any()):
        yield
        a = (n < d).nonzero().squeeze(1)
        xa, qa, na, ga = x[a], q[a], n[a], pick(gens, a)
        rows = torch.arange(len(a))
        p = _probs(model, labels[a], xa, temperature)
        tp[a] += 1
        span = torch.clamp(d - na, max=window)  # guesses judged this pass (>= 1)
        made = torch.zeros(len(a), dtype=torch.long)
        going = torch.ones(len(a), dtype=torch.bool)
        for j in range(window):
            live = going & (j < span)
            if not bool(live.any()):
                break
            pos = torch.clamp(na + j, max=d - 1)
            tok = xa[rows, pos]
            keep = coins(ga, live) < accept_probability(p[rows, pos, tok], qa[rows, pos, tok])
            kept, rejected = live & keep, live & ~keep
            fresh = _draw(residual(p[rows, pos], qa[rows, pos])[rejected], pick(ga, rejected))
            xa[rows[rejected], pos[rejected]] = fresh
            made += live.long()
            going = kept
        # Every judged guess kept: this pass's conditional at the next pixel is exact, so draw it too.
        bonus = going & (na + span < d)
        if bool(bonus.any()):
            pos = torch.clamp(na + span, max=d - 1)
            xa[rows[bonus], pos[bonus]] = _draw(p[rows, pos][bonus], pick(ga, bonus))
            made += bonus.long()
        n[a] = na + made
        # Later guesses: redrawn from this pass's conditionals, which become their proposals.
        redo = positions[None, :] >= n[a][:, None]
        x[a] = torch.where(redo, _draw(p, ga), xa)
        q[a] = next_proposals(redo, p, qa)
    return Decoded(x, tp, torch.zeros(b, dtype=torch.long))


def next_proposals(redo: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jacobi: the redrawn guesses' proposal is this pass's p; the others keep theirs."""
    return torch.where(redo[..., None], p, q)


@torch.no_grad()
def diffusion_plain(model, labels: torch.Tensor, gens: Sequence[torch.Generator], temperature: float = 1.0) -> Steps:
    b, d, mask = len(labels), model.n_pixels, model.n_levels
    x = torch.full((b, d), mask, dtype=torch.long)
    rows = torch.arange(b)
    for _ in range(d):
        yield
        scores = uniforms(gens, (d,)).masked_fill(x != mask, -1.0)
        pos = scores.argmax(-1)  # a uniformly random masked pixel per image
        x[rows, pos] = _draw(_probs(model, labels, x, temperature)[rows, pos], gens)
    return Decoded(x, torch.full((b,), d), torch.zeros(b, dtype=torch.long))


@torch.no_grad()
def diffusion_confidence(
    model,
    labels: torch.Tensor,
    gens: Sequence[torch.Generator],
    threshold: float = 0.9,
    temperature: float = 1.0,
    block: int = 0,
) -> Steps:
    b, d, mask = len(labels), model.n_pixels, model.n_levels
    x = torch.full((b, d), mask, dtype=torch.long)
    tp = torch.zeros(b, dtype=torch.long)
    block_of = torch.arange(d) // block if block > 0 else torch.zeros(d, dtype=torch.long)
    while bool((x == mask).any()):
        yield
        a = (x == mask).any(-1).nonzero().squeeze(1)
        xa = x[a]
        probs = _probs(model, labels[a], xa, temperature)
        tp[a] += 1
        masked = xa == mask
        current = torch.where(masked, block_of[None, :], d).min(-1).values  # first block with masked pixels
        masked &= block_of[None, :] == current[:, None]
        conf = probs.max(-1).values.masked_fill(~masked, -1.0)
        chosen = masked & (conf >= threshold)
        best = conf.argmax(-1)
        chosen[torch.arange(len(a)), best] = True  # at least one pixel a pass
        tok = _draw(probs, pick(gens, a))
        x[a] = torch.where(chosen, tok, xa)
    return Decoded(x, tp, torch.zeros(b, dtype=torch.long))
