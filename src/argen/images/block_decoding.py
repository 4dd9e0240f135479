"""Decoders for the block-diffusion model (block_diffusion.py's contract), batched over images: steps
that yield before each pass, with per-image randomness, as decoding.py's.

Blocks (image rows) are decoded in order; within the current block, masked pixels are unmasked in
parallel. Four ways to run the passes, `cache`:

- "none": every pass recomputes the whole prefix (label, finished blocks, current block) with the
  model's block-causal forward: no cache, the reference the exact cache must equal.
- "block": SDAR's blockwise decoding (Cheng et al. 2025) with an exact block KV cache: the label's
  and each finished block's K/V are computed once (the finished block in the first pass of the next
  block, with its final pixels, in the same forward) and reused; each pass recomputes only the
  current block. Same logits as "none" (tests/test_block_diffusion.py).
- "subblock": Fast-dLLM v2's sub-block cache (Wu et al. 2025): the block is decoded sub-block by
  sub-block; once a sub-block is finished its K/V are computed once more with its final pixels and
  then reused for the rest of the block instead of recomputed. Approximate: a reused sub-block's K/V
  no longer follow the block's later pixels, which it attends to bidirectionally.
- "delayed": dKV-Cache (Ma et al. 2025): a pixel's K/V are cached one pass after it is decoded
  (the pass that sees its value; not while it is masked) and reused from then on. Approximate, as
  "subblock", per pixel instead of per sub-block.

Which pixels a pass unmasks: with `threshold`, Fast-dLLM's rule (every eligible masked pixel whose
most likely level has probability >= threshold, and at least the most confident one); with
threshold None, one uniformly random eligible pixel (plain, one pixel a pass). Eligible: the masked
pixels of the current block, or with `sub_block` > 0 of its first sub-block that has some (a
`sub_block` of the block's size or more is the whole block: nothing is reused before it is finished).

`BlockDecoded.tokens_computed`: per image, the token positions run through the model over the whole
decode (queries and commits; for "none" the whole prefix each pass): the compute a cache saves.
In a batch, the images whose pass queries fewer slots than another's are padded to the same count
(by repeating a slot): the padding is computed, shows in the wall time, and is not counted here.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass

import torch

from argen.errors import InvalidRequestError
from argen.images.decoding import Decoded, _draw, pick, uniforms

CACHES = ("none", "block", "subblock", "delayed")


@dataclass
class BlockDecoded(Decoded):
    tokens_computed: torch.Tensor  # (batch,) token positions computed by the model for the image


def _needed_first(need: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `need` (rows, block) bool: (the needed slots first, padded by repeating the first
    one, shape (rows, max count); the count per row)."""
    count = need.sum(-1)
    n = int(count.max())
    order = torch.argsort((~need).to(torch.int8), dim=-1, stable=True)[:, :n]
    pad = torch.arange(n)[None, :] >= count[:, None]
    return torch.where(pad, order[:, :1], order), count


@torch.no_grad()
def block_decode(
    model,
    labels: torch.Tensor,
    gens: Sequence[torch.Generator],
    *,
    threshold: float | None = 0.9,
    temperature: float = 1.0,
    cache: str = "block",
    sub_block: int = 0,
) -> Generator[None, None, BlockDecoded]:
    if cache not in CACHES:
        raise InvalidRequestError(f"unknown block cache {cache!r}; valid: {', '.join(CACHES)}")
    b, d, v, bs = len(labels), model.n_pixels, model.n_levels, model.block_size
    mask = v
    sub = sub_block if 0 < sub_block < bs else bs
    x = torch.full((b, d), mask, dtype=torch.long)
    passes = torch.zeros(b, dtype=torch.long)
    computed = torch.zeros(b, dtype=torch.long)
    state = model.new_state(b) if cache != "none" else None
    slot_sub = torch.arange(bs) // sub  # each slot's sub-block
    for blk in range(d // bs):
        lo, hi = blk * bs, (blk + 1) * bs
        cached = torch.zeros(b, bs, dtype=torch.bool)  # slots whose K/V this block reuses, not recomputes
        first = True
        while True:
            cur = x[:, lo:hi]
            a = (cur == mask).any(-1).nonzero().squeeze(1)
            if len(a) == 0:
                break
            m = cur[a] == mask
            yield
            if state is None:
                logits = model(labels[a], x[a, :hi])[:, lo:]
                computed[a] += 1 + hi
            else:
                order, count = _needed_first(~cached[a])
                positions = lo + order
                commit = {}
                if first:  # every image starts the block together: the commit holds for all rows
                    commit = {"labels": labels} if blk == 0 else {"commit": x[:, lo - bs : lo]}
                    computed += 1 if blk == 0 else bs
                part = state if len(a) == b else state.select(a)
                out = model.extend(part, x[a].gather(1, positions), positions, **commit)
                if part is not state:
                    state.put_slots(a, part)
                logits = torch.zeros(len(a), bs, v, dtype=out.dtype).scatter(1, order[..., None].expand(-1, -1, v), out)
                computed[a] += count
            passes[a] += 1
            first = False
            probs = torch.softmax(logits.double() / temperature, -1)
            current = torch.where(m, slot_sub[None, :], bs).min(-1).values  # first sub-block with masked pixels
            eligible = m & (slot_sub[None, :] == current[:, None])
            rows, ga = torch.arange(len(a)), pick(gens, a)
            if threshold is None:
                one = uniforms(ga, (bs,)).masked_fill(~eligible, -1.0).argmax(-1)
                chosen = torch.zeros_like(eligible)
                chosen[rows, one] = True
            else:
                conf = probs.max(-1).values.masked_fill(~eligible, -1.0)
                chosen = eligible & (conf >= threshold)
                chosen[rows, conf.argmax(-1)] = True  # at least one pixel a pass
            x[a, lo:hi] = torch.where(chosen, _draw(probs, ga), cur[a])
            # What this pass computed from final pixels, reusable from the next pass on.
            if cache == "delayed":
                cached[a] |= ~m  # queried with its value (decoded before this pass)
            elif cache == "subblock":
                left = torch.zeros(len(a), int(slot_sub[-1]) + 1, dtype=torch.long).index_add_(1, slot_sub, m.long())
                cached[a] |= (left == 0)[:, slot_sub]  # sub-blocks finished before this pass
    return BlockDecoded(x, passes, torch.zeros(b, dtype=torch.long), computed)


def decode_strategy(
    model, name: str, options: dict, labels: torch.Tensor, gens: Sequence[torch.Generator]
) -> Generator[None, None, BlockDecoded]:
    """generator.py's strategies on a block-diffusion model: "plain" (one random pixel of the current
    block a pass, block cache), "blockwise", "subblock", "dkv" (options already bounded there)."""
    t = options["temperature"]
    if name == "blockwise":
        cache = "block" if options["cache"] else "none"
        return block_decode(model, labels, gens, threshold=options["threshold"], temperature=t, cache=cache)
    if name == "subblock":
        cache = "subblock" if options["reuse"] else "block"
        return block_decode(
            model,
            labels,
            gens,
            threshold=options["threshold"],
            temperature=t,
            cache=cache,
            sub_block=options["sub_block"],
        )
    if name == "dkv":
        return block_decode(model, labels, gens, threshold=options["threshold"], temperature=t, cache="delayed")
    return block_decode(model, labels, gens, threshold=None, temperature=t, cache="block")
