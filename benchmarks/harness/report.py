"""Summaries and reports: per category and system, tokens/s, speed relative to HF generate() and to
argen plain, tokens per forward pass, token identity; written as results.json, report.md and
chart.png. Nothing here knows a strategy by name except the `plain` baseline, so new strategies
simply appear as more rows, columns and bars."""

from __future__ import annotations

import json
import math
from pathlib import Path

from argen.neartie import NEAR_TIE
from benchmarks.harness.provenance import describe
from benchmarks.harness.systems import HF

BASELINE = "plain"  # argen plain, fp32: what speed-ups of other strategies are measured against
ALL = "all"


def geomean(values: list[float]) -> float | None:
    values = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(records: list[dict], systems: list[dict]) -> dict:
    """One row per (category, system), categories in order of first appearance, then `all`."""
    names = [s["name"] for s in systems]
    baseline = BASELINE if BASELINE in names else None
    categories = list(dict.fromkeys(r["category"] for r in records))
    rows = []
    for category in [*categories, ALL]:
        group = [r for r in records if category in (ALL, r["category"])]
        for system in systems:
            rows.append(_row(category, system, group, baseline))
    return {
        "reference": HF,
        "baseline": baseline,
        "near_tie_threshold": NEAR_TIE,
        "categories": [*categories, ALL],
        "systems": names,
        "rows": rows,
    }


def _row(category: str, system: dict, group: list[dict], baseline: str | None) -> dict:
    name = system["name"]
    runs = [r["systems"][name] for r in group]
    row = {
        "category": category,
        "system": name,
        "kind": system["kind"],
        "dtype": system["dtype"],
        "n": len(runs),
        "new_tokens": mean([x["new_tokens"] for x in runs]),
        "tokens_per_s": mean([x["tokens_per_s"] for x in runs]),
        "ratio_vs_hf": geomean([r["systems"][name]["tokens_per_s"] / r["systems"][HF]["tokens_per_s"] for r in group])
        if name != HF
        else None,
        "speedup_vs_plain": None,
        "tokens_per_forward": mean([x["tokens_per_forward"] for x in runs]),
        "reference": system["reference"],
        "exact": system["exact"],
    }
    if baseline and system["kind"] == "argen" and name != baseline:
        row["speedup_vs_plain"] = geomean(
            [r["systems"][name]["tokens_per_s"] / r["systems"][baseline]["tokens_per_s"] for r in group]
        )
    if system["reference"] is not None:
        divergences = [x["divergence"] for x in runs if x["divergence"]]
        row |= {
            "identical": sum(x["identical"] for x in runs),
            "near_ties": sum(bool(d["near_tie"]) for d in divergences),
            "real_divergences": sum(d["near_tie"] is False for d in divergences) if system["exact"] else None,
            "agreement": mean([x["agreement"] for x in runs]),
            "tokens_before_divergence": mean([x.get("tokens_before_divergence") for x in runs]),
            "nll_gap": mean([x.get("nll_gap") for x in runs]),
        }
    row |= {
        "decode_tokens_per_s": mean([x.get("decode_tokens_per_s") for x in runs]),
        "prefill_tokens_per_s": mean([x.get("prefill_tokens_per_s") for x in runs]),
        "weight_bytes": system.get("weight_bytes"),
    }
    return row


# -- text ----------------------------------------------------------------------------------------


def _fmt(value, spec: str = ".2f", none: str = "—") -> str:
    return none if value is None else format(value, spec)


def markdown_table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> str:
    """A markdown table that also reads as plain text: the first `text_columns` columns are
    left-aligned, the (numeric) rest right-aligned."""
    widths = [max(3, *(len(str(c)) for c in col)) for col in zip(header, *rows, strict=True)]

    def line(cells):
        return (
            "| "
            + " | ".join(
                str(c).ljust(w) if i < text_columns else str(c).rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    sep = ["-" * w if i < text_columns else "-" * (w - 1) + ":" for i, w in enumerate(widths)]
    return "\n".join([line(header), "| " + " | ".join(sep) + " |", *(line(r) for r in rows)])


def headline_table(summary: dict) -> str:
    """Rows: categories; columns: HF tok/s, then each other system's speed as a multiple of HF's."""
    others = [s for s in summary["systems"] if s != HF]
    header = ["category", "n", "HF tok/s", *(f"{s} ×HF" for s in others)]
    by_key = {(r["category"], r["system"]): r for r in summary["rows"]}
    rows = []
    for category in summary["categories"]:
        hf = by_key[(category, HF)]
        cells = [category, str(hf["n"]), _fmt(hf["tokens_per_s"], ".1f")]
        cells += [_fmt(by_key[(category, s)]["ratio_vs_hf"]) for s in others]
        rows.append(cells)
    return markdown_table(header, rows)


def speedup_table(summary: dict) -> str | None:
    """Rows: categories; columns: each argen strategy's speed-up over argen plain, and each other
    HF system's over HF generate(): every engine against its own plain decoding, as speculative
    decoding papers report it. None when there is nothing to compare."""
    by_key = {(r["category"], r["system"]): r for r in summary["rows"]}
    ours = [s for s in summary["systems"] if by_key[(ALL, s)]["speedup_vs_plain"] is not None]
    theirs = [s for s in summary["systems"] if s != HF and by_key[(ALL, s)]["kind"] == "hf"]
    if not ours:
        return None
    header = ["category", "n", *(f"{s} ×plain" for s in ours), *(f"{s} ×HF" for s in theirs), "best argen"]
    rows = []
    for category in summary["categories"]:
        speedups = {s: by_key[(category, s)]["speedup_vs_plain"] for s in ours}
        best = max(speedups, key=lambda s: speedups[s] or 0.0)
        cells = [category, str(by_key[(category, ours[0])]["n"]), *(_fmt(v) for v in speedups.values())]
        cells += [_fmt(by_key[(category, s)]["ratio_vs_hf"]) for s in theirs]
        rows.append([*cells, best])
    return markdown_table(header, rows, text_columns=1)


PEER = "llama.cpp"


def fast_path_table(summary: dict) -> str | None:
    """Rows: systems (all questions); decode and prefill speed (and their ratio to llama.cpp's, when it
    ran), fidelity against each system's reference, and the weights held. None when no system told
    its prefill apart from its decoding."""
    by_key = {(r["category"], r["system"]): r for r in summary["rows"]}
    rows = [by_key[(ALL, s)] for s in summary["systems"]]
    if not any(r["prefill_tokens_per_s"] for r in rows):
        return None
    peer = by_key.get((ALL, PEER))
    header = ["system", "decode tok/s", "prefill tok/s"]
    header += ["decode ×llama.cpp", "prefill ×llama.cpp"] if peer else []
    header += ["vs", "identical", "tokens before divergence", "agreement", "NLL gap", "weights MB"]
    lines = []
    for r in rows:
        judged = r["reference"] is not None
        cells = [r["system"], _fmt(r["decode_tokens_per_s"], ".1f"), _fmt(r["prefill_tokens_per_s"], ".0f")]
        if peer:
            ratio = [
                None if not (r[k] and peer[k]) else r[k] / peer[k]
                for k in ("decode_tokens_per_s", "prefill_tokens_per_s")
            ]
            cells += [_fmt(ratio[0]), _fmt(ratio[1])]
        cells += [
            r["reference"] or "—",
            f"{r['identical']}/{r['n']}" if judged else "ref",
            _fmt(r.get("tokens_before_divergence"), ".1f"),
            _fmt(r.get("agreement"), ".1%"),
            _fmt(r.get("nll_gap"), "+.4f"),
            _fmt(r["weight_bytes"] and r["weight_bytes"] / 1e6, ".0f"),
        ]
        lines.append(cells)
    return markdown_table(header, lines)


def detail_table(summary: dict) -> str:
    """Rows: (category, system); every measured figure."""
    header = [
        "category",
        "system",
        "n",
        "new tok",
        "tok/s",
        "×HF",
        "×plain",
        "tok/fwd",
        "identical",
        "vs",
        "near-ties",
        "real div.",
        "agreement",
    ]
    rows = []
    for r in summary["rows"]:
        judged = r["reference"] is not None
        rows.append(
            [
                r["category"],
                r["system"],
                str(r["n"]),
                _fmt(r["new_tokens"], ".1f"),
                _fmt(r["tokens_per_s"], ".1f"),
                _fmt(r["ratio_vs_hf"]),
                _fmt(r["speedup_vs_plain"]),
                _fmt(r["tokens_per_forward"]),
                f"{r['identical']}/{r['n']}" if judged else "ref",
                r["reference"] or "—",
                str(r["near_ties"]) if judged else "—",
                _fmt(r.get("real_divergences"), "d"),
                _fmt(r.get("agreement"), ".1%"),
            ]
        )
    return markdown_table(header, rows, text_columns=2)


def divergence_notes(records: list[dict]) -> tuple[list[str], list[str]]:
    """(near-tie notes, real-divergence notes), one line per diverging (question, system)."""
    near, real = [], []
    for rec in records:
        for name, row in rec["systems"].items():
            d = row.get("divergence")
            if not d or d["near_tie"] is None:
                continue
            where = f"{rec['category']} #{rec['question_id']}, {name} vs {row['reference']}, new token {d['position']}"
            what = f"{d['token']} vs {d['reference_token']}, HF top-2 {d['top2']}, logit gap {d['gap']:.2e}"
            (near if d["near_tie"] else real).append(f"{where}: {what}")
    return near, real


def print_summary(summary: dict, records: list[dict]) -> None:
    print()
    print(headline_table(summary))
    fast = fast_path_table(summary)
    if fast:
        print()
        print(fast)
    print()
    print(detail_table(summary))
    near, real = divergence_notes(records)
    if near:
        print(f"\n{len(near)} divergence(s) at floating-point near-ties (top-2 logit gap <= {NEAR_TIE:g}); not bugs.")
    if real:
        print(f"\n!!! {len(real)} REAL DIVERGENCE(S) from greedy decoding by exact systems; these are bugs:")
        for line in real:
            print(f"!!!   {line}")


def render_markdown(command: str, machine: dict, settings: dict, summary: dict, records: list[dict]) -> str:
    near, real = divergence_notes(records)
    baseline = summary["baseline"]
    parts = [
        "# argen beside its peers on Spec-Bench",
        "",
        "```",
        command,
        "```",
        "",
        f"Model `{settings['model']}`, {settings['questions_count']} questions from `{settings['questions']}` "
        f"(first turn, chat template), greedy, batch 1, up to {settings['max_new_tokens']} new tokens, "
        f"systems interleaved per question in one process (order alternating per question).",
        "",
        describe(machine),
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items() if k != "dirty_files") + ".",
        "",
    ]
    if settings.get("merged_from"):
        parts += [
            f"Merged from {len(settings['merged_from'])} runs over disjoint questions (the commands above, "
            "one process each); every ratio is still taken within one process, per question.",
            "",
        ]
    short = {c: n for c, n in settings["categories"].items() if settings["limit"] and n < settings["limit"]}
    if short:
        listed = ", ".join(f"{c} {n}" for c, n in short.items())
        parts += [
            f"`--limit {settings['limit']}` is per category; these categories have fewer questions and use "
            f"all of them: {listed}.",
            "",
        ]
    parts += [
        "## Speed relative to Hugging Face `generate()`",
        "",
        headline_table(summary),
        "",
        "![argen speed relative to HF generate()](chart.png)",
        "",
    ]
    fast = fast_path_table(summary)
    if fast:
        parts += [
            "## Decode and prefill speed, fidelity and weight memory",
            "",
            "All questions. **decode tok/s**: new tokens ÷ the seconds after the prompt is processed; "
            "**prefill tok/s**: prompt tokens ÷ the seconds to process them (argen: its prefill; llama.cpp: "
            "until its first token); mean over questions. **tokens before divergence** (mean) and "
            "**agreement** against the system named in **vs**; **NLL gap**: the fp32 reference model's mean "
            "negative log-likelihood per token of this system's output minus that of the **vs** system's "
            "output (0 when identical; positive: the reference model finds this output less likely). "
            "**weights MB**: the weights the system holds in memory.",
            "",
            fast,
            "",
        ]
    speedups = speedup_table(summary)
    if speedups:
        parts += [
            "## Speed-up over each engine's own plain decoding",
            "",
            "argen strategies ÷ argen `plain`; other Hugging Face systems ÷ HF `generate()`.",
            "",
            speedups,
            "",
        ]
    parts += [
        "## Every category and system",
        "",
        detail_table(summary),
        "",
        "## How to read it",
        "",
        "- **tok/s**: new tokens ÷ wall seconds of the whole call (prefill included), mean over questions.",
        "- **×HF**: geometric mean over questions of (system tok/s ÷ HF `generate()` tok/s on the same "
        "question, measured back to back); above 1.00 is faster than HF.",
        "- **×plain**: the same, against argen `plain` at float32"
        + ("." if baseline else " (not measured in this run: `plain` was not among the strategies)."),
        "- **tok/fwd**: new tokens per target-model forward pass after the prefill (1.00 for plain decoding).",
        "- **identical**: questions whose new tokens equal the reference's (**vs**) token for token, EOS "
        "included. HF's output is cut after its first EOS. A difference by an exact system is a **near-tie** "
        f"when HF's top-2 logits at the first differing token are within {NEAR_TIE:g} of each other and the "
        "two systems chose those two (floating-point order of operations decides); otherwise it is a **real "
        "divergence**, a bug.",
        "- **agreement**: share of the longer output produced before the first difference, mean over "
        "questions; for lossy systems (other dtypes, lossy strategies) it measures drift rather than bugs.",
        "",
        "## Divergences",
        "",
    ]
    if real:
        parts += [f"**{len(real)} REAL DIVERGENCE(S): these are bugs.**", ""]
        parts += [f"- {line}" for line in real] + [""]
    elif near:
        parts += ["No real divergences: every difference from greedy decoding by an exact system is a near-tie.", ""]
    else:
        parts += ["None: every exact system's output equals its reference's, token for token.", ""]
    if near:
        parts += [f"{len(near)} near-tie(s):", ""] + [f"- {line}" for line in near] + [""]
    return "\n".join(parts)


def write_chart(summary: dict, path: Path) -> None:
    """Grouped bars: each system's speed relative to HF (and to argen plain, when there is a
    strategy other than plain), per category, with a dashed line at 1.0."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_key = {(r["category"], r["system"]): r for r in summary["rows"]}
    categories = summary["categories"]
    panels = [("ratio_vs_hf", "speed ÷ HF generate()", [s for s in summary["systems"] if s != HF])]
    vs_plain = [s for s in summary["systems"] if by_key[(ALL, s)]["speedup_vs_plain"] is not None]
    if vs_plain:
        panels.append(("speedup_vs_plain", "speed ÷ argen plain", vs_plain))
    fig = Figure(figsize=(max(8.0, 0.9 * len(categories) + 4), 3.6 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    for index, (key, label, names) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, index + 1)
        width = 0.8 / max(1, len(names))
        for j, name in enumerate(names):
            xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(categories))]
            ys = [by_key[(c, name)][key] or 0.0 for c in categories]
            color = f"C{summary['systems'].index(name) % 10}"  # one colour per system in every panel
            bars = ax.bar(xs, ys, width, label=name, color=color)
            if len(names) * len(categories) <= 60:
                ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
        ax.set_ylabel(label)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("python -m benchmarks compare: tokens/s relative (geometric mean over questions)")
    fig.savefig(path, dpi=110)


def write_all(
    out: Path,
    command: str,
    argv: list[str],
    machine: dict,
    settings: dict,
    systems: list[dict],
    records: list[dict],
    summary: dict,
) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "report.md", "chart": out / "chart.png"}
    results = {
        "command": command,
        "argv": argv,
        "machine": machine,
        "settings": settings,
        "systems": systems,
        "summary": summary,
        "records": records,
    }
    paths["json"].write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    paths["markdown"].write_text(render_markdown(command, machine, settings, summary, records), encoding="utf-8")
    write_chart(summary, paths["chart"])
    return paths
