"""report.md (and a chart) for the two-configuration serving cases (serving_cases.py)."""

from __future__ import annotations

from pathlib import Path

from argen.server.scheduler import PREFILL_CHUNK, STEP_TOKENS
from benchmarks.harness.provenance import describe

WHAT = {
    "shared-prefix": "{n} different questions (the first Spec-Bench prompts under {chars} characters) behind one "
    "{prefix}-token system prompt, arriving {gap} s apart",
    "burst": "{long} prompts of {long_tokens} tokens at once, and {short} short requests arriving {gap} s apart "
    "while they are prefilled",
    "multi-turn": "chats of {turns} turns, each turn resending the whole history",
}


def write_case_report(results: dict, out: Path) -> None:
    configs = results["configs"]
    labels = list(configs)
    kinds = sorted({k for c in configs.values() for k in c["by_kind"]})
    rows = ["| | " + " | ".join(labels) + " |", "|---|" + "--:|" * len(labels)]

    def row(name: str, values: list[str]) -> None:
        rows.append(f"| {name} | " + " | ".join(values) + " |")

    row("prompt tokens computed", [f"{configs[c]['prompt_tokens_computed']:.0f}" for c in labels])
    row("decode throughput, all requests (new tok/s)", [f"{configs[c]['throughput_tok_s']:.1f}" for c in labels])
    row("wall time (s)", [f"{configs[c]['wall_s']:.1f}" for c in labels])
    for kind in kinds:
        for key, name in (
            ("ttft_p50_s", "time to first token p50"),
            ("ttft_p99_s", "time to first token p99"),
            ("latency_p50_s", "latency p50"),
        ):
            row(f"{name}, {kind} (s)", [f"{configs[c]['by_kind'][kind][key]:.2f}" for c in labels])
    row(
        "KV bytes held ÷ needed by the lengths, over the run",
        [f"{configs[c]['kv_held_over_used']:.2f}" for c in labels],
    )
    row(
        "KV bytes held ÷ needed by the lengths, when most was needed",
        [f"{configs[c]['kv_held_over_used_at_peak']:.2f}" for c in labels],
    )
    first = configs[labels[0]]
    n_short = first["by_kind"].get("short", {}).get("n", 0)
    what = WHAT[results["case"]].format(
        n=results["requests"],
        prefix=results.get("prefix_tokens", "?"),
        gap=results.get("gap", "?"),
        long=results.get("long", "?"),
        long_tokens=results.get("long_tokens", "?"),
        short=n_short,
        turns=results.get("turns", "?"),
        chars=results.get("question_chars", "?"),
    )
    a, b = configs[labels[0]], configs[labels[1]]
    ratios = [
        f"- Prompt tokens computed, {labels[0]} ÷ {labels[1]}: "
        f"{a['prompt_tokens_computed'] / max(b['prompt_tokens_computed'], 1):.3f}."
    ]
    for kind in kinds:
        ratios.append(
            f"- Time to first token, {kind}, {labels[1]} ÷ {labels[0]}: p50 "
            f"{b['by_kind'][kind]['ttft_p50_s'] / a['by_kind'][kind]['ttft_p50_s']:.2f}×, p99 "
            f"{b['by_kind'][kind]['ttft_p99_s'] / a['by_kind'][kind]['ttft_p99_s']:.2f}×."
        )
    ratios.append(
        f"- Decode throughput, {labels[0]} ÷ {labels[1]}: {a['throughput_tok_s'] / b['throughput_tok_s']:.2f}."
    )
    text = f"""# argen serve: {results["case"]}

```
{results["command"]}
```

{describe(results["machine"])}

Model `{results["model"]}`; {what}; greedy, {results["max_tokens"]} new tokens each (`ignore_eos`),
{results["threads"]} torch threads. Two server configurations in the same process, one after the
other, on the same requests: **{labels[0]}** (argen's default) and **{labels[1]}**. Prefill chunks
of {results.get("prefill_chunk") or PREFILL_CHUNK} tokens, {results.get("step_tokens") or STEP_TOKENS} tokens per scheduler step (where chunking is on).

{chr(10).join(rows)}

{chr(10).join(ratios)}
- Outputs token-identical between the two configurations: {results["identical_outputs"]}/{results["requests"]}.
- Prompt tokens computed: prompt tokens of all requests minus those whose keys and values came
  from the prefix cache (`argen_prompt_tokens_total - argen_prompt_tokens_cached_total`).
- KV bytes held ÷ needed: blocks held (16 positions each) against the sequences' lengths, polled
  every 0.2 s: the sums over the run, and the one sample where the lengths needed most; below 1
  where sequences share prefix blocks.
"""
    (out / "report.md").write_text(text)
