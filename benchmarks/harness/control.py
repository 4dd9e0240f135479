"""`python -m benchmarks compare --control`: what the control strategies cost and whether they do what they promise, on
Spec-Bench questions with the argen model (no Hugging Face peer: these outputs have no HF equivalent).

Per question, all in one process, batch 1:
- counterfactual: a sampled output (temperature 1, seed = question id), then its replay without an
  intervention (must be identical) and with one at the middle of the output (the prefix must be kept);
  the replay decodes only after the intervention, after a single prefill;
- set-prompt: the question's lines (or sentences) as an unordered set, in the given and in the reversed
  order, against plain greedy decoding of the question. argen sorts members canonically, so the two
  orders are the same input by construction (`sorted_same_input`, which cannot fail); the check that
  can fail decodes both orders with the members kept as given (`canonical=False`), where only the
  attention mask makes the outputs agree (`order_independent`);
- guided: the guide model under two sentiment prefixes, omega = 0 (must equal plain greedy) and
  omega = W; the guide's class log-probability of the outputs, plain vs guided.
Rows report tokens/s (decoded tokens / wall seconds, prefill included), target forward passes per
decoded token (prefill included) and guide passes per decoded token.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import torch

from argen import load
from argen.bench.questions import bench_questions
from argen.engine import Request
from argen.neartie import first_difference
from argen.sampling import SamplingParams
from argen.setprompt import SetPrompt, set_prompt_layout
from argen.strategies import make_strategy
from benchmarks.harness.provenance import describe, machine_info, portable_path
from benchmarks.harness.specbench import find_questions_file

INTERVENTION = " However"  # the forced token's text (its first token)
CHECKS = ("identical", "prefix_kept", "sorted_same_input", "order_independent", "identical_to_plain")


def command_line(args) -> str:
    parts = ["python", "-m", "benchmarks", "compare", "--control", "--model", args.model]
    if args.categories:
        parts += ["--categories", ",".join(args.categories)]
    if args.limit is not None:
        parts += ["--limit", str(args.limit)]
    if getattr(args, "group_mt_bench", False):
        parts.append("--group-mt-bench")
    parts += [
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--guide-model",
        args.guide_model or args.model,
        "--omega",
        str(args.omega),
    ]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    parts += ["--out", portable_path(args.out)]
    if getattr(args, "allow_dirty", False):
        parts.append("--allow-dirty")
    return shlex.join(parts)


def set_members(prompt: str) -> list[str]:
    """The question's non-empty lines, else its sentences, else the whole question."""
    lines = [x.strip() for x in prompt.splitlines() if x.strip()]
    if len(lines) >= 2:
        return lines
    sentences = [x for x in re.split(r"(?<=[.?!])\s+", prompt.strip()) if x]
    return sentences if len(sentences) >= 2 else [prompt.strip()]


def _row(result) -> dict:
    s = result.stats
    n = max(s.new_tokens, 1)
    return {
        "new_tokens": s.new_tokens,
        "seconds": s.wall_seconds,
        "tokens_per_s": s.tokens_per_s,
        "passes_per_token": s.forward_passes / n,
        "guide_passes_per_token": s.draft_passes / n,
        "token_ids": result.token_ids,
    }


def run_question(gen, question, max_new: int, guided_spec: dict, scorer, token: int) -> dict:
    rows: dict[str, dict] = {}
    ids = gen.encode(question.prompt)
    sampled = gen.generate(ids, max_new_tokens=max_new, temperature=1.0, seed=int(str(question.question_id)[-6:]))
    rows["plain-sampled"] = _row(sampled)
    replay = gen.counterfactual(sampled)
    rows["replay"] = _row(replay) | {"identical": replay.token_ids == sampled.token_ids}
    if len(sampled.token_ids) >= 2:
        t = len(sampled.token_ids) // 2
        cf = gen.counterfactual(sampled, {t: token})
        rows["counterfactual"] = _row(cf) | {"position": t, "prefix_kept": cf.token_ids[:t] == sampled.token_ids[:t]}
    greedy = gen.generate(ids, max_new_tokens=max_new)
    rows["plain"] = _row(greedy)
    members = set_members(question.prompt)
    given = gen.generate(SetPrompt("", members, ""), max_new_tokens=max_new)
    sorted_same = gen.encode(SetPrompt("", members[::-1], "")) == given.prompt_ids
    unsorted = [_greedy_unsorted(gen, order, max_new) for order in (members, members[::-1])]
    differ = first_difference(*unsorted)
    rows["set-prompt"] = _row(given) | {
        "members": len(members),
        "sorted_same_input": sorted_same,
        "order_independent": differ is None,
        "first_difference": differ,
    }
    off = gen.generate(ids, max_new_tokens=max_new, strategy=guided_spec | {"omega": 0.0})
    rows["guided:omega=0"] = _row(off) | {"identical_to_plain": off.token_ids == greedy.token_ids}
    on = gen.generate(ids, max_new_tokens=max_new, strategy=dict(guided_spec))
    rows[f"guided:omega={guided_spec['omega']:g}"] = _row(on) | {
        "class_log_prob": scorer.class_log_prob(on.token_ids),
        "plain_class_log_prob": scorer.class_log_prob(greedy.token_ids),
    }
    return {
        "question_id": question.question_id,
        "category": question.category,
        "prompt_tokens": len(ids),
        "systems": rows,
    }


def _greedy_unsorted(gen, members: list[str], max_new: int) -> list[int]:
    """Greedy output for a set prompt whose members keep the order given (not sorted canonically)."""
    layout = set_prompt_layout(gen.tokenizer, SetPrompt("", members, ""), chat=True, canonical=False)
    request = Request(
        layout.ids, SamplingParams(max_new_tokens=max_new), make_strategy("plain"), layout.positions, layout.mask
    )
    return gen.engine.run([request])[0].token_ids


def summarize(records: list[dict]) -> list[dict]:
    names = list(dict.fromkeys(n for r in records for n in r["systems"]))
    baseline = {"replay": "plain-sampled", "counterfactual": "plain-sampled"}
    out = []
    for name in names:
        runs = [r["systems"][name] for r in records if name in r["systems"]]
        base = baseline.get(name, "plain")
        ratios = [
            r["systems"][name]["tokens_per_s"] / r["systems"][base]["tokens_per_s"]
            for r in records
            if name in r["systems"] and r["systems"][base]["tokens_per_s"] > 0
        ]
        row = {
            "system": name,
            "n": len(runs),
            "baseline": base if name != base else None,
            "new_tokens": _mean(x["new_tokens"] for x in runs),
            "tokens_per_s": _mean(x["tokens_per_s"] for x in runs),
            "speed_vs_baseline": _geomean(ratios) if name != base else None,
            "passes_per_token": _mean(x["passes_per_token"] for x in runs),
            "guide_passes_per_token": _mean(x["guide_passes_per_token"] for x in runs),
        }
        for check in CHECKS:
            if check in runs[0]:
                row[check] = f"{sum(x[check] for x in runs)}/{len(runs)}"
        if "class_log_prob" in runs[0]:
            row["class_log_prob"] = _mean(x["class_log_prob"] for x in runs)
            row["plain_class_log_prob"] = _mean(x["plain_class_log_prob"] for x in runs)
            row["raised"] = f"{sum(x['class_log_prob'] > x['plain_class_log_prob'] for x in runs)}/{len(runs)}"
        out.append(row)
    return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _geomean(values: list[float]) -> float | None:
    import math

    values = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def write_report(out: Path, command: str, settings: dict, rows: list[dict], records: list[dict], machine: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps(
            {"command": command, "settings": settings, "machine": machine, "summary": rows, "records": records},
            indent=1,
        )
    )
    f = lambda v, spec=".2f": "" if v is None else format(v, spec)  # noqa: E731
    lines = [
        "# argen control strategies",
        "",
        f"`{command}`",
        "",
        describe(machine),
        "",
        f"{settings['questions_count']} questions, "
        f"up to {settings['max_new_tokens']} new tokens, batch 1, float32, torch threads "
        f"{settings['threads']}. Guide: `{settings['guided']}`.",
        "",
        "| system | vs | tok/s | speed vs | target passes/token | guide passes/token | checks |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        checks = [f"{k} {r[k]}" for k in (*CHECKS, "raised") if k in r]
        if "class_log_prob" in r:
            checks.append(f"class log-prob {r['plain_class_log_prob']:.3f} (plain) -> {r['class_log_prob']:.3f}")
        lines.append(
            f"| {r['system']} | {r['baseline'] or ''} | {f(r['tokens_per_s'])} | {f(r['speed_vs_baseline'])} | "
            f"{f(r['passes_per_token'])} | {f(r['guide_passes_per_token'])} | {'; '.join(checks)} |"
        )
    lines += [
        "",
        "tok/s: decoded tokens / wall seconds of the call, prefill included (a counterfactual decodes only "
        "the tokens after the intervention). Passes per token: forward passes of the call (prefill included) "
        "per decoded token. Speed vs: geometric mean over questions of tok/s relative to the `vs` row.",
        "",
        "Set prompt: `sorted_same_input` counts questions whose two member orders are the same prompt once "
        "argen sorts the members canonically (true by construction: it cannot fail); `order_independent` "
        "counts those whose two orders, decoded greedily with the members kept as given, agree token for "
        "token, which only the attention mask can make true.",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def run(args) -> int:
    questions_path = Path(args.questions) if args.questions else find_questions_file()
    questions = bench_questions(questions_path, args.categories, args.limit, args.group_mt_bench)
    gen = load(args.model)
    guided_spec = {"name": "guided", "guide_model": args.guide_model or args.model, "omega": args.omega}
    scorer = gen.prepare_strategy(guided_spec)
    token = gen.tokenizer(INTERVENTION, add_special_tokens=False)["input_ids"][0]
    gen.generate("warm up", max_new_tokens=4, strategy=dict(guided_spec))
    records = []
    for i, q in enumerate(questions):
        print(f"benchmarks compare --control: {i + 1}/{len(questions)} {q.category} #{q.question_id}", file=sys.stderr)
        records.append(run_question(gen, q, args.max_new_tokens, guided_spec, scorer, token))
    rows = summarize(records)
    settings = {
        "model": args.model,
        "questions": portable_path(questions_path.resolve()),
        "questions_count": len(questions),
        "max_new_tokens": args.max_new_tokens,
        "threads": torch.get_num_threads(),
        "guided": guided_spec,
        "intervention_token": token,
    }

    path = write_report(
        Path(args.out), command_line(args), settings, rows, records, machine_info(getattr(args, "git_state", None))
    )
    print(path.read_text())
    return 0
