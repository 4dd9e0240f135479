"""Which blocks a layer-skip draft skips, chosen by calibration rather than by hand.

1. Rank: run the model on a sample text (`runtime.memo.calibration_ids`) once in full, then once per
   candidate block (the attention or the FFN sub-block of every layer but the first and the
   last) with only that block skipped; a block's damage is how much log-probability the full
   model's argmax tokens lose. Least damaging first.
2. Choose: for growing prefixes of that ranking, measure on all sample texts how often the
   partial model's argmax equals the full model's (the per-token acceptance a greedy draft would
   get), and estimate the speed of drafting with it from the cost model: a draft step costs the
   kept share of the body's weights plus the vocabulary projection. Keep the prefix with the
   best expected tokens per second; none if no prefix beats plain decoding.

The result depends only on the weights, so it is cached per model under the argen cache
directory (`calibration/`), and on the runtime object for the process.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch

from argen.models.runtime import Plan
from argen.models.sources import cache_dir

Block = tuple[str, int]  # ("attn" | "ffn", layer index)


@dataclass
class SkipSets:
    """The calibrated skip sets of one runtime (its memo): max_draft -> blocks."""

    by_max_draft: dict[int, list[Block]] = field(default_factory=dict)


def fingerprint(runtime) -> str:
    info = runtime.info
    digest = hashlib.sha1(repr(info).encode())
    digest.update(runtime.weight_digest())
    return digest.hexdigest()[:16]


def plan_skipping(n_layers: int, blocks: list[Block]) -> Plan:
    attn = {i for kind, i in blocks if kind == "attn"}
    ffn = {i for kind, i in blocks if kind == "ffn"}
    return Plan(tuple(i not in attn for i in range(n_layers)), tuple(i not in ffn for i in range(n_layers)))


def _logits(runtime, ids: torch.Tensor, plan: Plan | None) -> torch.Tensor:
    """Logits of whole sample texts (a measurement of the model, run on it directly)."""
    caches = runtime.new_cache(ids.shape[0], ids.shape[1])
    positions = torch.arange(ids.shape[1], device=runtime.device).expand(ids.shape[0], -1)
    logits, _ = runtime.forward(ids.to(runtime.device), positions, caches, plan=plan)
    for cache in caches if isinstance(caches, list) else [caches]:
        cache.free()
    return logits.float()


def block_bytes(runtime, block: Block) -> int:
    layer = runtime.layers[block[1]]
    matmuls = [layer.qkv, layer.o] if block[0] == "attn" else [layer.gate_up, layer.down]
    return sum(t.numel() * t.element_size() for m in matmuls for t in m.tensors())


def expected_speed(acceptance: float, draft_seconds: float, cost, max_draft: int) -> float:
    """Best tokens per second over draft lengths for a chain with per-token acceptance a."""
    a = min(acceptance, 0.999)
    best = 1.0 / cost(1)
    for k in range(1, max_draft + 1):
        expected = (1 - a ** (k + 1)) / (1 - a)
        best = max(best, expected / (cost(1 + k, rows=expected) + k * draft_seconds))
    return best


def calibrate(runtime, cost, max_draft: int, rank_tokens: int = 48, eval_tokens: int = 64) -> list[Block]:
    samples = [s for s in runtime.memo.calibration_ids if len(s) >= 8]
    n_layers = runtime.info.n_layers
    candidates = [(kind, i) for i in range(1, n_layers - 1) for kind in ("attn", "ffn")]
    if not samples or not candidates:
        return []
    rank_ids = torch.tensor([samples[0][:rank_tokens]])
    reference = _logits(runtime, rank_ids, None).argmax(-1)

    def damage(block: Block) -> float:
        logp = _logits(runtime, rank_ids, plan_skipping(n_layers, [block])).log_softmax(-1)
        return -logp.gather(-1, reference[..., None]).mean().item()

    order = sorted(candidates, key=damage)
    length = min(eval_tokens, min(len(s) for s in samples))
    eval_ids = torch.tensor([s[:length] for s in samples])
    eval_reference = _logits(runtime, eval_ids, None).argmax(-1)
    body_bytes = sum(
        block_bytes(runtime, b)
        for b in candidates + [("attn", 0), ("ffn", 0)] + [("attn", n_layers - 1), ("ffn", n_layers - 1)]
    )
    best: list[Block] = []
    best_speed = 1.0 / cost(1)
    for m in range(2, int(0.75 * len(order)) + 1, 2):
        skipped = order[:m]
        agree = _logits(runtime, eval_ids, plan_skipping(n_layers, skipped)).argmax(-1) == eval_reference
        kept = 1 - sum(block_bytes(runtime, b) for b in skipped) / body_bytes
        speed = expected_speed(agree.float().mean().item(), cost.body(1) * kept + cost.head_seconds, cost, max_draft)
        if speed > best_speed:
            best, best_speed = skipped, speed
    return best


def skipped_blocks(runtime, cost, max_draft: int) -> list[Block]:
    """The calibrated skip set for this model: from the runtime's memo, the disk cache, or calibration."""
    learnt = runtime.memo.get(SkipSets).by_max_draft
    cached = learnt.get(max_draft)
    if cached is not None:
        return cached
    path = cache_dir() / "calibration" / f"layer-skip-{fingerprint(runtime)}.json"
    try:
        blocks = [(kind, int(i)) for kind, i in json.loads(path.read_text())["skip"]]
    except (OSError, ValueError, KeyError):
        blocks = calibrate(runtime, cost, max_draft)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"skip": blocks}, indent=1))
        except OSError:
            pass  # a read-only cache only costs a re-calibration next time
    learnt[max_draft] = blocks
    return blocks
