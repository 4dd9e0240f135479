"""How well the default model drafts for itself with sub-blocks skipped: the agreement behind
layer-skip's calibration (`argen/strategies/speculative/skip_calibration.py`).

    python benchmarks/layer_skip/run.py [--allow-dirty]

Ranks every candidate block (the attention or FFN sub-block of each layer but the first and last)
as the calibration does, by the log-probability the full model's argmax tokens lose with that block
alone skipped, then skips growing prefixes of that ranking and measures, on the calibration texts,
how often the partial model's argmax equals the full model's (the per-token acceptance a greedy
layer-skip draft would get), and what share of the body's weights the prefix skips. Deterministic:
no timing. Writes `report.md` here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root: the `benchmarks` package (harness) is there

import argen
from argen.strategies.speculative.skip_calibration import _logits, block_bytes, plan_skipping
from benchmarks.harness.provenance import describe, provenance, script_args

HERE = Path(__file__).parent
SKIPPED = (1, 2, 4, 8, 16, 32)


def main() -> None:
    _, state = script_args(__doc__)
    torch.set_num_threads(1)
    runtime = argen.load("default").runtime
    n_layers = runtime.info.n_layers
    samples = [s for s in runtime.calibration_ids if len(s) >= 8]
    candidates = [(kind, i) for i in range(1, n_layers - 1) for kind in ("attn", "ffn")]
    # The calibration's ranking (skip_calibration.calibrate): damage on the first sample's 48 tokens.
    rank_ids = torch.tensor([samples[0][:48]])
    reference = _logits(runtime, rank_ids, None).argmax(-1)
    damage = {}
    for block in candidates:
        logp = _logits(runtime, rank_ids, plan_skipping(n_layers, [block])).log_softmax(-1)
        damage[block] = -logp.gather(-1, reference[..., None]).mean().item()
    order = sorted(candidates, key=damage.get)
    length = min(64, min(len(s) for s in samples))
    eval_ids = torch.tensor([s[:length] for s in samples])
    eval_reference = _logits(runtime, eval_ids, None).argmax(-1)
    body = sum(block_bytes(runtime, (kind, i)) for i in range(n_layers) for kind in ("attn", "ffn"))
    rows = []
    for m in SKIPPED:
        skipped = order[:m]
        agree = (_logits(runtime, eval_ids, plan_skipping(n_layers, skipped)).argmax(-1) == eval_reference).float()
        rows.append((m, agree.mean().item(), sum(block_bytes(runtime, b) for b in skipped) / body, skipped))
    shares = sorted({round(100 * block_bytes(runtime, (kind, 1)) / body, 2) for kind in ("attn", "ffn")})
    lines = [
        "# Layer-skip: how well the default model agrees with itself with blocks skipped",
        "",
        "```",
        "python benchmarks/layer_skip/run.py",
        "```",
        "",
        describe(provenance(state)),
        "",
        f"SmolLM2-135M ({n_layers} layers), float32. Ranking: damage on {rank_ids.shape[1]} tokens of the "
        f"first calibration text; agreement: {eval_ids.numel()} tokens of the {len(samples)} calibration "
        f"texts ({length} each). One block is {shares[0]}% (attention) or {shares[1]}% (FFN) of the body's "
        "weights.",
        "",
        "| blocks skipped | agreement with the full model's argmax | share of body weights skipped | blocks |",
        "| --: | --: | --: | --- |",
    ]
    for m, agreement, share, skipped in rows:
        lines.append(
            f"| {m} | {agreement:.2f} | {100 * share:.1f}% | {', '.join(f'{k}{i}' for k, i in skipped[:8])}"
            f"{' ...' if m > 8 else ''} |"
        )
    (HERE / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
