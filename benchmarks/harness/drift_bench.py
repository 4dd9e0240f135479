"""`python -m benchmarks drift`: what each lossy option loses, measured against exact greedy decoding.

A lossy configuration is a strategy (e.g. `skip-decode:min_layers=12`) and/or extra generate
options (JSON: `{"method": "...", "setting": "...", "strategy": ..., "options": {...}}`, e.g. a KV
press). For each configuration, on Spec-Bench's long-input categories (summarization, rag) and on
long-context prompts (several Spec-Bench articles, 2-6k tokens, a question about one of them), it
records tok/s, KV bytes (held at the end and peak), greedy agreement with plain decoding (tokens
until the first divergence, token agreement) and the full model's NLL of the lossy continuation
vs the exact one (`drift.py`), then writes results.json, report.md and drift.png. With `--kvpress`,
NVIDIA kvpress's presses of the same names at the same budgets run beside them on the same weights
(`drift_kvpress.py`), and transformers' quantized KV cache beside argen's kv-quant.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from argen import load
from argen.bench import parse_strategy
from argen.bench.questions import read_questions, select_questions
from argen.errors import ArgenError
from benchmarks.harness import drift_kvpress, kvpress_peer
from benchmarks.harness.drift import NLLScorer, agreement, answer_recall, mean_nll
from benchmarks.harness.drift_kvpress import beside
from benchmarks.harness.provenance import describe, git_state, machine_info, portable_argv, portable_path, require_clean
from benchmarks.harness.report import markdown_table, mean
from benchmarks.harness.specbench import find_questions_file

PROG = "python -m benchmarks drift"
EXACT = "exact"  # the reference row: plain greedy decoding
LONG = "long-context"
FFN_THRESHOLDS = (0.99, 0.98, 0.97, 0.96)  # SmolLM2-135M's middle FFNs: cos 0.95-0.98
SKIP_FRACTIONS = (0.8, 0.65, 0.5, 0.35)  # SkipDecode's min_layers, as fractions of the model's layers


@dataclass(frozen=True)
class LossyConfig:
    method: str
    setting: str
    strategy: dict | str = "plain"
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.method} {self.setting}".strip()


@dataclass(frozen=True)
class Case:
    case_id: str
    category: str
    prompt: str
    source: str | None = None  # the article the question is about (long-context): answer recall


def parse_config(text: str) -> LossyConfig:
    """`name:key=value:...` (a strategy) or a JSON object with method, setting, strategy, options."""
    text = text.strip()
    if text.startswith("{"):
        try:
            item = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ArgenError(f"--config {text!r} is not valid JSON: {exc}") from exc
        unknown = set(item) - {"method", "setting", "strategy", "options"}
        if unknown or not isinstance(item.get("options", {}), dict):
            raise ArgenError(
                "a JSON --config has method, setting, strategy (a name or spec) and options (a dict of "
                f"generate options, e.g. a press); got {text!r}"
            )
        strategy = item.get("strategy", "plain")
        name = strategy if isinstance(strategy, str) else strategy.get("name", "plain")
        return LossyConfig(
            str(item.get("method", name)), str(item.get("setting", "")), strategy, item.get("options", {})
        )
    spec = parse_strategy(text)
    setting = ",".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return LossyConfig(spec["name"], setting, spec)


def default_configs(n_layers: int, max_new_tokens: int) -> list[LossyConfig]:
    """Four settings per built-in lossy strategy (distinct ones: a tiny model may have fewer); SkipDecode
    ramps down over the whole output."""
    configs = [
        parse_config(f"skip-decode:min_layers={m}:decay_tokens={max_new_tokens}")
        for m in dict.fromkeys(max(1, round(n_layers * f)) for f in SKIP_FRACTIONS)
    ]
    return configs + [parse_config(f"ffn-skip:threshold={t}") for t in FFN_THRESHOLDS]


def long_context_cases(articles: list[str], count_tokens, lengths: list[int]) -> list[Case]:
    """One prompt per target length: numbered articles added until the prompt reaches the length, and
    a question about the middle one (so the answer sits far from both ends)."""
    cases = []
    for n, target in enumerate(lengths):
        chosen, total, start = [], 0, n * 3  # each case starts at other articles
        for article in articles[start:] + articles[:start]:
            if total >= target:
                break
            chosen.append(article)
            total += count_tokens(article) + 8
        about = len(chosen) // 2
        body = "\n\n".join(f"Article {i + 1}:\n{a}" for i, a in enumerate(chosen))
        question = f"{body}\n\nIn one or two sentences: what is Article {about + 1} about, and who is involved?"
        cases.append(Case(f"long-{target}", LONG, question, chosen[about]))
    return cases


def build_cases(args, questions, count_tokens) -> list[Case]:
    picked = select_questions(questions, args.categories, args.limit)
    cases = [Case(str(q.question_id), q.category, q.prompt) for q in picked]
    articles = [q.prompt.removeprefix("Summarize:").strip() for q in questions if q.category == "summarization"]
    if args.long_lengths and not articles:
        raise ArgenError(
            "the long-context case builds its prompts from the summarization articles; the questions "
            "file has none (pass --long-lengths '' to leave it out)"
        )
    return cases + long_context_cases(articles, count_tokens, args.long_lengths)


def measure(
    generator,
    cases: list[Case],
    configs: list[LossyConfig],
    max_new_tokens: int,
    ignore_eos: bool,
    progress=None,
    peer=None,
) -> list[dict]:
    """Every configuration on every case (batch 1, greedy), each beside the exact output of the same
    prompt; the configurations' order alternates per case (slow drift of the machine's load).
    `peer(case, prompt, exact, scorer, exact_nll, reverse)` adds a peer's records for the case."""
    runtime = generator.model.runtime
    records = []
    every = [LossyConfig(EXACT, ""), *configs]
    for n, case in enumerate(cases):
        prompt = generator.encode(case.prompt, chat=True)
        order = [0, *(range(1, len(every)) if n % 2 == 0 else range(len(every) - 1, 0, -1))]
        runs: dict[int, object] = {}
        for i in order:
            runs[i] = generator.generate(
                prompt,
                strategy=every[i].strategy,
                max_new_tokens=max_new_tokens,
                temperature=0,
                ignore_eos=ignore_eos,
                **every[i].options,
            )
        exact = runs[0]
        with NLLScorer(runtime, prompt) as scorer:
            exact_nll = mean_nll(scorer.score(exact.token_ids))
            for i, config in enumerate(every):
                result = runs[i]
                same = agreement(exact.token_ids, result.token_ids)
                s = result.stats
                decode_s = s.wall_seconds - s.prefill_seconds
                records.append(
                    {
                        "case": case.case_id,
                        "category": case.category,
                        "prompt_tokens": len(prompt),
                        "method": config.method,
                        "setting": config.setting,
                        "label": config.label,
                        "new_tokens": s.new_tokens,
                        "tok_s": s.new_tokens / decode_s if decode_s > 0 else None,
                        "kv_bytes": getattr(s, "kv_bytes_held", None) or s.peak_kv_bytes,
                        "peak_kv_bytes": s.peak_kv_bytes,
                        "first_divergence": same.first_divergence,
                        "token_agreement": same.token_agreement,
                        "nll_exact": exact_nll,
                        "nll": exact_nll if i == 0 else mean_nll(scorer.score(result.token_ids)),
                        "answer_recall": answer_recall(exact.text, result.text, case.source) if case.source else None,
                        "extras": {k: v for k, v in result.extras.items() if k != "replay"},
                    }
                )
            if peer is not None:
                records += peer(case, prompt, exact, scorer, exact_nll, n % 2 == 1)
        if progress:
            progress(n + 1, len(cases))
    return records


def summarize(records: list[dict]) -> list[dict]:
    """Means per (configuration, category), and over every case ("all")."""
    rows = []
    labels = list(dict.fromkeys(r["label"] for r in records))
    categories = [*dict.fromkeys(r["category"] for r in records), "all"]
    for label in labels:
        for category in categories:
            group = [r for r in records if r["label"] == label and category in ("all", r["category"])]
            if not group:
                continue
            row = {
                "label": label,
                "method": group[0]["method"],
                "setting": group[0]["setting"],
                "category": category,
                "cases": len(group),
            }
            for key in (
                "tok_s",
                "kv_bytes",
                "peak_kv_bytes",
                "first_divergence",
                "token_agreement",
                "nll_exact",
                "nll",
                "answer_recall",
                "first_divergence_hf",
                "token_agreement_hf",
            ):
                row[key] = mean([r.get(key) for r in group])
            row["nll_gap"] = None if row["nll"] is None or row["nll_exact"] is None else row["nll"] - row["nll_exact"]
            rows.append(row)
    return rows


def _f(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def render(command: str, machine: dict, settings: dict, rows: list[dict], notes: list[str] = ()) -> str:
    header = [
        "configuration",
        "category",
        "cases",
        "tok/s",
        "KV MB held",
        "KV MB peak",
        "first divergence",
        "token agreement",
        "NLL exact",
        "NLL lossy",
        "NLL gap",
        "answer recall",
    ]
    table = [
        [
            r["label"],
            r["category"],
            str(r["cases"]),
            _f(r["tok_s"], ".1f"),
            _f(r["kv_bytes"] and r["kv_bytes"] / 1e6, ".2f"),
            _f(r["peak_kv_bytes"] and r["peak_kv_bytes"] / 1e6, ".2f"),
            _f(r["first_divergence"], ".1f"),
            _f(r["token_agreement"], ".3f"),
            _f(r["nll_exact"], ".3f"),
            _f(r["nll"], ".3f"),
            _f(r["nll_gap"], "+.3f"),
            _f(r["answer_recall"], ".2f"),
        ]
        for r in rows
    ]
    return "\n".join(
        [
            "# argen drift: lossy options against exact decoding",
            "",
            "```",
            command,
            "```",
            "",
            f"Model `{settings['model']}`, greedy, batch 1, up to {settings['max_new_tokens']} new tokens"
            f"{' (EOS ignored)' if settings['ignore_eos'] else ''}; {settings['cases']} prompts: categories "
            f"{', '.join(settings['categories'])} (first turn, chat template) and long-context prompts of "
            f"{', '.join(map(str, settings['long_lengths'])) or 'no'} tokens (numbered Spec-Bench articles, a question about "
            "the middle one). Every configuration runs beside plain greedy decoding (`exact`) on the same prompt.",
            "",
            describe(machine),
            "",
            "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items() if k != "dirty_files") + ".",
            "",
            markdown_table(header, table, text_columns=2),
            "",
            "![agreement and NLL gap against KV bytes and tok/s](drift.png)",
            "",
            "- tok/s: new tokens ÷ decoding seconds (the prefill left out). KV MB held: what the request's cache "
            "held at the end (a press reports it; otherwise the peak); peak: the most it held at once "
            "(`Result.stats.peak_kv_bytes`).",
            "- first divergence: tokens equal to the exact output before the first difference; token agreement: "
            "positions with the same token ÷ the longer output.",
            "- NLL: mean negative log-likelihood per token that the full model (no skipping, no press) assigns to "
            "the continuation, teacher-forced; gap: lossy − exact (greedy output is not the most likely sequence, so "
            "a gap may be slightly negative).",
            "- answer recall (long-context only): the share of the exact answer's names and numbers (found in the "
            "article asked about) that the lossy answer also contains.",
            "- Compute skipping (skip-decode, ffn-skip) holds the same KV bytes as exact decoding: every position "
            "keeps its slot in every layer (SkipDecode's skipped layers leave theirs unwritten, never read).",
            *notes,
            "",
        ]
    )


def _style(method: str, families: list[str]) -> dict:
    """argen's methods: circles in a color per method; a kvpress method: hollow markers, dashed, in the
    color of the argen method it sits beside (black beside exact)."""
    home = beside(method) or method
    color = "black" if home == EXACT else f"C{families.index(home) % 10}"
    if method == EXACT:
        return {"marker": "*", "color": color, "linestyle": "none", "markersize": 10}
    if home != method:  # a marker per kvpress method: two may sit beside one argen method (snapkv, h2o)
        marker = "^v<>sDp"[list(kvpress_peer.ROWS).index(method.split()[-1]) % 7] if home != EXACT else "^"
        return {
            "marker": marker,
            "color": color,
            "markerfacecolor": "none",
            "linestyle": "--" if home != EXACT else "none",
        }
    return {"marker": "o", "color": color}


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in rows if r["category"] == "all"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    families = list(dict.fromkeys(beside(m) or m for m in methods))
    fig = Figure(figsize=(11, 8), layout="constrained")
    FigureCanvasAgg(fig)
    panels = [
        ("kv_bytes", "token_agreement"),
        ("kv_bytes", "nll_gap"),
        ("tok_s", "token_agreement"),
        ("tok_s", "nll_gap"),
    ]
    names = {
        "kv_bytes": "KV MB held (mean per request)",
        "tok_s": "decode tok/s",
        "token_agreement": "token agreement with exact",
        "nll_gap": "NLL gap (lossy − exact, nats/token)",
    }
    for index, (x, y) in enumerate(panels):
        ax = fig.add_subplot(2, 2, index + 1)
        for method in methods:
            points = [
                (r[x] / (1e6 if x == "kv_bytes" else 1), r[y], r["setting"])
                for r in rows
                if r["method"] == method and r[x] is not None and r[y] is not None
            ]
            if not points:
                continue
            style = _style(method, families)
            ax.plot([p[0] for p in points], [p[1] for p in points], label=method, **style)
            for px, py, setting in points:
                if setting:
                    ax.annotate(setting, (px, py), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(names[x])
        ax.set_ylabel(names[y])
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize="small")
    fig.suptitle("argen drift: fidelity against memory and speed (mean over all prompts)")
    fig.savefig(path, dpi=110)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="model to load; default: %(default)s")
    parser.add_argument("--questions", metavar="FILE", default=None, help="Spec-Bench question.jsonl (default: found)")
    parser.add_argument(
        "--categories", metavar="A,B", default="summarization,rag", help="Spec-Bench categories; default: %(default)s"
    )
    parser.add_argument(
        "--limit", metavar="N", type=int, default=10, help="questions per category; default: %(default)s"
    )
    parser.add_argument(
        "--long-lengths",
        metavar="N,N",
        default="2000,4000,6000",
        help="token lengths of the long-context prompts ('' for none); default: %(default)s",
    )
    parser.add_argument(
        "--config",
        metavar="SPEC",
        action="append",
        default=None,
        help="a lossy configuration, repeatable: `name:key=value` (a strategy) or JSON "
        '{"method", "setting", "strategy", "options": {generate options, e.g. a press}}; '
        "default: skip-decode and ffn-skip at four settings each",
    )
    parser.add_argument(
        "--kvpress",
        metavar="A,B",
        default=None,
        help="NVIDIA kvpress's presses to run beside argen's on the same weights: "
        f"{', '.join(m for m in kvpress_peer.METHODS if not kvpress_peer.METHODS[m].quantized)};"
        " and transformers' quantized KV cache (optimum-quanto) beside argen's kv-quant: "
        f"{', '.join(m for m in kvpress_peer.METHODS if kvpress_peer.METHODS[m].quantized)} "
        "(one row each, no budget). Needs `pip install 'argen[kvpress]'`, in an environment "
        "of its own: docs/lossy-and-drift.md",
    )
    parser.add_argument(
        "--kvpress-budgets",
        metavar="B,B",
        default=None,
        help="fractions of positions kept for the kvpress press rows (kv-quant-N rows have none); "
        "default: the budgets of the press configurations (--config), else 0.5,0.35,0.2,0.1",
    )
    parser.add_argument("--max-new-tokens", metavar="N", type=int, default=128, help="default: %(default)s")
    parser.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    parser.add_argument("--threads", metavar="N", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", metavar="DIR", default="benchmarks/drift", help="default: %(default)s")
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="write the report from a working tree with uncommitted changes (recorded as dirty)",
    )


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise ArgenError(f"--long-lengths takes whole numbers separated by commas; got {text!r}") from exc
    if any(v < 16 for v in values):
        raise ArgenError("--long-lengths: each length is at least 16 tokens")
    return values


def run(args: argparse.Namespace) -> int:
    state = git_state()
    require_clean(state, args.allow_dirty)
    methods = kvpress_peer.parse_methods(args.kvpress) if args.kvpress is not None else []
    if any(not m.quantized for m in methods):
        kvpress_peer.import_kvpress()  # before the model loads: an error that says how to install it
    if any(m.quantized for m in methods):
        kvpress_peer.import_quanto()
    if args.max_new_tokens < 1 or args.limit < 1 or args.threads < 0:
        raise ArgenError("--max-new-tokens and --limit must be >= 1, --threads >= 0")
    args.categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    args.long_lengths = _ints(args.long_lengths)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        questions_path = Path(args.questions) if args.questions else find_questions_file()
        generator = load(args.model)
        configs = (
            [parse_config(c) for c in args.config]
            if args.config
            else default_configs(generator.model.runtime.info.n_layers, args.max_new_tokens)
        )
        context = generator.model.runtime.info.max_positions - args.max_new_tokens - 64
        if any(n > context for n in args.long_lengths):
            raise ArgenError(
                f"--long-lengths: this model's context leaves room for prompts of at most {context} tokens"
            )
        cases = build_cases(args, read_questions(questions_path), lambda text: len(generator.encode(text, chat=False)))
        peer_configs = drift_kvpress.peer_configs(
            methods,
            drift_kvpress.parse_budgets(args.kvpress_budgets)
            if args.kvpress_budgets
            else drift_kvpress.press_budgets(configs),
        )
        peer = None
        if peer_configs:
            hf = kvpress_peer.KVPressPeer(generator.model.hf_model, generator.model.eos_ids)
            hf.warm_up()

            def text(ids: list[int]) -> str:
                return generator.tokenizer.decode(ids, skip_special_tokens=True)

            def peer(case, prompt, exact, scorer, exact_nll, reverse):
                return drift_kvpress.peer_records(
                    hf,
                    text,
                    case,
                    prompt,
                    exact,
                    scorer,
                    exact_nll,
                    peer_configs,
                    args.max_new_tokens,
                    args.ignore_eos,
                    reverse,
                )

        print(
            f"{PROG}: {len(cases)} prompts × {len(configs) + 1} configurations"
            f"{f' + {len(peer_configs) + 1} kvpress' if peer_configs else ''}",
            file=sys.stderr,
        )

        def progress(done: int, total: int) -> None:
            print(f"  {done}/{total} prompts", file=sys.stderr)

        records = measure(generator, cases, configs, args.max_new_tokens, args.ignore_eos, progress, peer)
        command = shlex.join(
            [
                *PROG.split(),
                "--model",
                args.model,
                "--categories",
                ",".join(args.categories),
                "--limit",
                str(args.limit),
                "--long-lengths",
                ",".join(map(str, args.long_lengths)),
                *[x for c in (args.config or []) for x in ("--config", c)],
                *(["--kvpress", ",".join(m.name for m in methods)] if methods else []),
                *(["--kvpress-budgets", args.kvpress_budgets] if methods and args.kvpress_budgets else []),
                "--max-new-tokens",
                str(args.max_new_tokens),
                *(["--ignore-eos"] if args.ignore_eos else []),
                *(["--threads", str(args.threads)] if args.threads else []),
                *(["--questions", portable_path(args.questions)] if args.questions else []),
                "--out",
                portable_path(args.out),
            ]
        )
        machine = machine_info(state)
        settings = {
            "model": args.model,
            "max_new_tokens": args.max_new_tokens,
            "ignore_eos": args.ignore_eos,
            "categories": args.categories,
            "limit": args.limit,
            "long_lengths": args.long_lengths,
            "cases": len(cases),
            "configs": [asdict(c) for c in configs],
            "threads": torch.get_num_threads(),
            "quant": generator.quant,
            "greedy": True,
            "batch_size": 1,
        }
        notes = []
        if peer_configs:
            machine["kvpress"] = kvpress_peer.kvpress_version()
            settings["kvpress"] = drift_kvpress.settings(peer_configs) | drift_kvpress.hf_agreement(records)
            notes = drift_kvpress.describe(settings["kvpress"], settings["kvpress"], generator.quant)
    finally:
        torch.set_num_threads(threads)
    rows = drift_kvpress.arrange(summarize(records))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "command": command,
        "argv": portable_argv(sys.argv),
        "machine": machine,
        "settings": settings,
        "summary": rows,
        "records": records,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    (out / "report.md").write_text(render(command, machine, settings, rows, notes), encoding="utf-8")
    plot(rows, out / "drift.png")
    print(f"{PROG}: report written to {out / 'report.md'} (also results.json, drift.png)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except ArgenError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
