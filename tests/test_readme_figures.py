"""Every committed report names the commit it describes and holds no absolute machine path, and the
figures the pages (README.md and every docs/*.md page) quote from them are the reports' own:

- on every page, every table row and every measured figure of the prose that follows a report's
  citation is read back against that report by `tests/figures.py` (generic: any page, any report; a
  cited report that is missing fails);
- the sentences whose figures a page derives (ratios, sums, shares, spreads) are rebuilt below from a
  report's results.json or report.md and must appear in one of the pages word for word; the generic
  check leaves exactly those sentences to them."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from figures import CITATION, check, check_page, quotes

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
# The pages whose figures are checked: README.md and the docs site's pages (mkdocs.yml), all of them,
# so that a page added later is checked without being listed here.
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
TEXT = {page: " ".join(page.read_text().split()) for page in PAGES}
ABSOLUTE = re.compile(r"(?<![\w.])/(?:work|root|tmp|home|Users|usr|opt|private|var)/")
PROVENANCE = re.compile(r"^Provenance: (?:commit|committed in) ([0-9a-f]{7,40})\b", re.M)


def results(name: str) -> dict:
    return json.loads((BENCH / name / "results.json").read_text())


def rows(name: str) -> dict[tuple[str, str], dict]:
    return {(r["category"], r["system"]): r for r in results(name)["summary"]["rows"]}


def f2(value: float) -> str:
    return f"{value:.2f}"


def span(values, spec: str = ".2f") -> str:
    """'a–b' as the pages write a range (a single value when both ends round alike)."""
    lo, hi = format(min(values), spec), format(max(values), spec)
    return lo if lo == hi else f"{lo}–{hi}"


def table(name: str, header_start: str) -> list[list[str]]:
    """The rows of the markdown table in benchmarks/NAME/report.md whose header starts so."""
    lines = (BENCH / name / "report.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    out = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        out.append([c.strip() for c in line.strip("|").split("|")])
    return out


def foundation() -> list[str]:
    plain = rows("foundation")[("all", "plain")]
    first30 = rows("foundation-first30")[("all", "plain")]
    return [
        f"({plain['identical']}/{plain['n']} token-identical; argen plain {f2(plain['ratio_vs_hf'])}× HF overall)",
        f"({first30['identical']}/{first30['n']} token-identical, {f2(first30['ratio_vs_hf'])}× HF)",
    ]


def speculative() -> list[str]:
    r, data = rows("speculative"), results("speculative")
    exact = [row for (c, _), row in r.items() if c == "all" and row["exact"] and row["reference"]]
    assert sum(row["near_ties"] for row in exact) == 0
    records = data["records"]
    skip_plain = sum(rec["systems"]["layer-skip"]["tokens_per_forward"] == 1.0 for rec in records)
    jacobi_more = sum(rec["systems"]["jacobi"]["tokens_per_forward"] > 1.0 for rec in records)
    sp = {s: f2(r[("all", s)]["speedup_vs_plain"]) for s in ("ngram", "prompt-lookup", "layer-skip", "jacobi")}
    best = {
        c: f2(max(row["speedup_vs_plain"] for (cat, _), row in r.items() if cat == c and row["speedup_vs_plain"]))
        for c in ("translation", "summarization", "math_reasoning", "rag", "mt_bench", "qa")
    }
    assert best["summarization"] == best["math_reasoning"]
    return [
        f"{sum(row['identical'] for row in exact)}/{sum(row['n'] for row in exact)} exact outputs token-identical, no near-ties",
        f"layer-skip made 1.00 tokens per pass on all {skip_plain} questions",
        f"jacobi more than 1 on {jacobi_more} of {len(records)}",
        f"ngram {sp['ngram']}×, prompt-lookup {sp['prompt-lookup']}×, layer-skip {sp['layer-skip']}×, jacobi "
        f"{sp['jacobi']}×; HF prompt lookup {f2(r[('all', 'hf-prompt-lookup:10')]['ratio_vs_hf'])}× over HF `generate()`",
        f"Best per category: translation {best['translation']}×, summarization and math reasoning "
        f"{best['summarization']}×, rag {best['rag']}×, mt_bench {best['mt_bench']}×, qa {best['qa']}×",
        f"argen plain is {f2(r[('all', 'plain')]['ratio_vs_hf'])}× HF `generate()`",
    ]


def speculative_2threads() -> list[str]:
    r, one = rows("speculative-2threads"), rows("speculative")
    argen = [r[("all", s)] for s in ("plain", "prompt-lookup", "ngram")]
    hf = r[("all", "hf-prompt-lookup:10")]
    return [
        f"{sum(x['identical'] for x in argen)}/{sum(x['n'] for x in argen)} argen outputs and "
        f"{hf['identical']}/{hf['n']} HF prompt-lookup outputs token-identical to HF",
        f"summarization ngram {f2(r[('summarization', 'ngram')]['speedup_vs_plain'])}× "
        f"({f2(one[('summarization', 'ngram')]['speedup_vs_plain'])}× at one thread), rag prompt-lookup "
        f"{f2(r[('rag', 'prompt-lookup')]['speedup_vs_plain'])}× ({f2(one[('rag', 'prompt-lookup')]['speedup_vs_plain'])}×), "
        f"both categories together {f2(r[('all', 'ngram')]['speedup_vs_plain'])}× (ngram) and "
        f"{f2(r[('all', 'prompt-lookup')]['speedup_vs_plain'])}× (prompt-lookup); HF prompt lookup "
        f"{span([r[(c, 'hf-prompt-lookup:10')]['ratio_vs_hf'] for c in ('summarization', 'rag')])}× over HF "
        f"`generate()`; argen plain {f2(r[('all', 'plain')]['ratio_vs_hf'])}× HF.",
    ]


def jacobi_backoff() -> list[str]:
    r, before = rows("jacobi-backoff"), rows("speculative")
    cats = [c for (c, s) in r if s == "jacobi" and c != "all"]
    j = r[("all", "jacobi")]
    return [
        f"{j['identical']}/{j['n']} identical; jacobi {f2(j['speedup_vs_plain'])}× plain overall, "
        f"{span([r[(c, 'jacobi')]['speedup_vs_plain'] for c in cats])}× per category (it was "
        f"{span([before[(c, 'jacobi')]['speedup_vs_plain'] for c in cats])}×)."
    ]


def control() -> list[str]:
    s = {row["system"]: row for row in results("control")["summary"]}
    guided, off = s["guided:omega=20"], s["guided:omega=0"]
    raised, n = guided["raised"].split("/")
    minus = lambda v: f"{v:.3f}".replace("-", "−")  # noqa: E731
    return [
        f"on {raised} of {n} outputs (mean {minus(guided['plain_class_log_prob'])} → {minus(guided['class_log_prob'])})",
        f"ω = 0 matched plain on {off['identical_to_plain'].replace('/', ' of ')}; speed {f2(guided['speed_vs_baseline'])}× "
        f"plain ({guided['tokens_per_s']:.1f} vs {s['plain']['tokens_per_s']:.1f} tokens/s), "
        f"{guided['passes_per_token']:.1f} base and {guided['guide_passes_per_token']:.1f} guide pass per token",
        f"replay decoded at {f2(s['counterfactual']['speed_vs_baseline'])}× the original's speed per decoded token "
        f"(one prefill, then {s['counterfactual']['passes_per_token']:.1f} pass per token), every replay without "
        f"intervention was identical ({s['replay']['identical']}), and set prompts decoded at "
        f"{f2(s['set-prompt']['speed_vs_baseline'])}× plain",
    ]


def serving() -> list[str]:
    d = results("serving")
    seq, conc = d["sequential"], d["concurrent"]
    assert d["identical_outputs"] == d["clients"]
    return [
        f"{conc['throughput_tok_s']:.1f} new tokens/s together against {seq['throughput_tok_s']:.1f} one after "
        f"another ({d['speedup']:.1f}×), outputs token-identical; time to first token p50 goes from "
        f"{seq['ttft_p50_s']:.1f} s to {conc['ttft_p50_s']:.1f} s"
    ]


def pass_cost() -> list[str]:
    ms = {int(r[0]): (float(r[1]), float(r[2])) for r in table("pass_cost", "| tokens fed")}
    timings = ", ".join(f"{n} token{'s' if n > 1 else ''} {ms[n][0]:.0f} → {ms[n][1]:.0f} ms" for n in (1, 2, 4, 8))
    return [
        f"feeding 2–8 tokens cost {span([ms[n][0] / ms[1][0] for n in (2, 4, 8)], '.1f')}× feeding one",
        f"{timings}. Even so, 8 tokens cost about {ms[8][1] / ms[1][1]:.1f}× one",
    ]


def draft_ceiling() -> list[str]:
    ceiling = {r[0]: [float(x) for x in r[3:]] for r in table("draft_ceiling", "| category | target")}
    policy = {(r[0], r[1]): r[3:] for r in table("draft_ceiling", "| category | drafter")}

    def decode_only(c):  # prompt-lookup and trigram chain, one and two threads
        return [ceiling[c][i] for i in (1, 2, 4, 5)]

    def col(c, drafter, i):
        return float(policy[(c, drafter)][i])

    drafters = ("prompt-lookup", "trigram chain")
    text = (BENCH / "draft_ceiling" / "report.md").read_text()
    prefill = {int(n): float(ms) for n, ms in re.findall(r"(\d+) tokens (\d+) ms", text)}
    step_ms = float(re.search(r"one plain decoding step costs (\d+) ms", text).group(1))
    at_700 = np.interp(700, sorted(prefill), [prefill[n] for n in sorted(prefill)])
    return [
        f"it is {span(decode_only('summarization'))}× on summarization, {span(decode_only('rag'))}× on rag and "
        f"{span(decode_only('all'))}× over all categories for prompt-lookup and n-gram drafts (one or two threads), "
        f"and {span(ceiling['summarization'][7:9])}× on summarization for a drafter that always knew which earlier "
        "span to copy",
        f"a 700-token prompt's prefill (about {at_700 / 1000:.1f} s here, some {round(at_700 / step_ms, -1):.0f} decoding steps)",
        f"the ceiling is {span([col('summarization', d, 5) for d in drafters])}× on summarization, "
        f"{span([col('rag', d, 5) for d in drafters])}× on rag and {span([col('all', d, 5) for d in drafters])}× "
        f"overall, and even the copy-anywhere drafter stops at {f2(col('summarization', 'copy anywhere', 5))}× and "
        f"{f2(col('rag', 'copy anywhere', 5))}×",
        f"Their adaptive sizing gets {span([col('summarization', d, 6) for d in drafters])}× with prefill on "
        f"summarization and {span([col('all', d, 6) for d in drafters])}× overall on the fast path",
    ]


def layer_skip() -> list[str]:
    agreement = {int(r[0]): r[1] for r in table("layer_skip", "| blocks skipped")}
    shares = re.search(
        r"One block is ([\d.]+)% \(attention\) or ([\d.]+)% \(FFN\)", (BENCH / "layer_skip" / "report.md").read_text()
    ).groups()
    return [
        f"agreement falls fast: {agreement[1]} with one block skipped, {agreement[4]} with four, {agreement[8]} "
        f"with eight, while a block is only {shares[0]}% (attention) or {shares[1]}% (FFN) of the body's weights"
    ]


def fast_path() -> list[str]:
    r = {row[0]: row for row in table("fast_path/decode", "| system ")}
    exact, peer = r["plain"], r["llama.cpp"]
    x_hf = {row[0]: row for row in table("fast_path/decode", "| category       |   n | HF tok/s")}["all"]
    cost = {int(row[0]): row for row in table("fast_path", "| tokens fed")}
    return [
        f"the default path decodes at {exact[1]} tok/s against llama.cpp's {peer[1]} ({exact[3]}×) and prefills "
        f"{exact[4]}× faster, with output identical to fp32 on {exact[6]} questions, where "
        f"llama.cpp's output leaves fp32's after {peer[7]} tokens on average",
        f"Wall time with the prompt included, over all {x_hf[1]} questions: HF `generate()` {x_hf[2]} tok/s; argen "
        f"`exact` {x_hf[3]}×, argen fp32 {x_hf[4]}×, llama.cpp {x_hf[5]}× that",
        f"16 rows cost {float(cost[16][2]):.1f}× one on the exact path (MKL's fp32 GEMM takes {cost[16][3]} ms for "
        f"the same 16 rows, against the exact path's {cost[16][1]}). A plain step got "
        f"{float(cost[1][3]) / float(cost[1][1]):.1f}× cheaper",
    ]


def speculative_fast() -> list[str]:
    r = rows("speculative-fast")
    x = {k: f2(v["speedup_vs_plain"]) for k, v in r.items() if v["speedup_vs_plain"] is not None}
    identical = sum(r[("all", s)]["identical"] for s in ("prompt-lookup", "ngram", "jacobi", "plain"))
    outputs = sum(r[("all", s)]["n"] for s in ("prompt-lookup", "ngram", "jacobi", "plain"))
    cats = [c for c, s in r if c != "all" and s == "plain"]
    best = [max(r[(c, s)]["speedup_vs_plain"] for s in ("prompt-lookup", "ngram", "jacobi")) for c in cats]
    worst = min(r[(c, s)]["speedup_vs_plain"] for c in cats for s in ("prompt-lookup", "ngram", "jacobi"))
    return [
        f"ngram {x[('all', 'ngram')]}× and prompt-lookup {x[('all', 'prompt-lookup')]}× over fast plain overall, "
        f"{x[('summarization', 'ngram')]}× and {x[('summarization', 'prompt-lookup')]}× on summarization, jacobi "
        f"{x[('all', 'jacobi')]}×; {identical}/{outputs} outputs identical to HF",
        f"No strategy falls below {f2(worst)}× plain in any category; the best per category is {span(best)}×",
    ]


def serving_cases() -> list[str]:
    sp = results("serving/shared-prefix-60")
    on, off = sp["configs"]["prefix caching"], sp["configs"]["no prefix caching"]
    ttft = on["by_kind"]["all"]["ttft_p50_s"], off["by_kind"]["all"]["ttft_p50_s"]
    b = results("serving/burst")
    chunked, whole = b["configs"]["chunked prefill"], b["configs"]["whole prompts at once"]
    p99 = chunked["by_kind"]["short"]["ttft_p99_s"], whole["by_kind"]["short"]["ttft_p99_s"]
    return [
        f"prompt tokens computed {on['prompt_tokens_computed']:.0f} with prefix caching against "
        f"{off['prompt_tokens_computed']:.0f} without ({on['prompt_tokens_computed'] / off['prompt_tokens_computed']:.3f}), "
        f"time to first token p50 {ttft[0]:.2f} s against {ttft[1]:.2f} s ({ttft[1] / ttft[0]:.2f}× better), outputs "
        f"identical {sp['identical_outputs']}/{sp['requests']}",
        f"short requests' time to first token p99 is {p99[0]:.1f} s against {p99[1]:.1f} s with whole prompts "
        f"({p99[1] / p99[0]:.1f}× better), at {chunked['throughput_tok_s'] / whole['throughput_tok_s']:.2f} of the decode "
        f"throughput, outputs identical {b['identical_outputs']}/{b['requests']}",
    ]


def serving_longer() -> list[str]:
    """The shared-prefix runs with longer questions, the caching floor they share, 256-token chunks."""
    ratio = {}
    for chars in (60, 100, 400):
        d = results(f"serving/shared-prefix-{chars}")
        on, off = d["configs"]["prefix caching"], d["configs"]["no prefix caching"]
        ttft = off["by_kind"]["all"]["ttft_p50_s"] / on["by_kind"]["all"]["ttft_p50_s"]
        block_prefix = d["prefix_tokens"] // 16 * 16  # the system prompt's full blocks, computed once
        own = (on["prompt_tokens_computed"] - block_prefix) / d["requests"]  # computed per request
        ratio[chars] = (
            on["prompt_tokens_computed"] / off["prompt_tokens_computed"],
            ttft,
            own,
            block_prefix,
            d["requests"],
        )
    n, prefix = ratio[60][4], ratio[60][3]
    under = next(t for t in range(1, 1000) if (prefix + n * t) / (n * (prefix + t)) >= 1 / 8)  # an eighth of the work
    b = results("serving/burst-256")
    chunked, whole = b["configs"]["chunked prefill"], b["configs"]["whole prompts at once"]
    p99 = chunked["by_kind"]["short"]["ttft_p99_s"], whole["by_kind"]["short"]["ttft_p99_s"]
    return [
        f"under 100 characters {ratio[100][0]:.3f} of the prompt tokens and {ratio[100][1]:.2f}× better time to first "
        f"token ([report](../benchmarks/serving/shared-prefix-100/report.md)), under 400 characters {ratio[400][0]:.3f} "
        f"and {ratio[400][1]:.2f}×",
        f"the system prompt's {prefix // 16} full blocks ({prefix} tokens) once",
        f"{ratio[60][2]:.0f}, {ratio[100][2]:.0f} and {ratio[400][2]:.0f} tokens a request on average here). Below "
        f"1/8 of the work therefore needs a request's own part under {under} tokens",
        f"the p99 was {p99[0]:.1f} s against {p99[1]:.1f} s ({p99[1] / p99[0]:.1f}×), but at "
        f"{chunked['throughput_tok_s'] / whole['throughput_tok_s']:.2f} of the throughput",
    ]


def drift_goals() -> list[str]:
    """The goals' derived figures: a share of the bytes, the per-prompt spread, the capacity gain."""
    all_rows = {r[0]: r for r in table("drift", "| configuration") if r[1] == "all"}
    gear, exact, quant8 = all_rows["gear 4-bit r4 s2%"], all_rows["exact"], all_rows["kv-quant 8-bit"]
    gaps = [
        rec["nll"] - rec["nll_exact"]
        for rec in results("drift")["records"]
        if rec["label"] in ("snapkv 0.5", "kvpress snapkv 0.5")
    ]
    c = results("serving/press-capacity")["configs"]
    minus = lambda v: f"{v:+.3f}".replace("-", "−")  # noqa: E731
    return [
        f"yes ({gear[4]} of {exact[4]} MB, {100 * float(gear[4]) / float(exact[4]):.1f}%)",
        f"at {100 * float(quant8[4]) / float(exact[4]):.1f}% of the bytes",
        f"per-prompt gaps run from {minus(min(gaps))} to {minus(max(gaps))} (results.json)",
        f"hold {c['streaming-llm 0.35']['sequences_vs_no_press']:.2f}× the concurrent 1,500-token sequences in the same "
        f"KV blocks (streaming-llm 0.35; {c['streaming-llm 0.5']['sequences_vs_no_press']:.2f}× at 0.5",
    ]


def press_capacity() -> list[str]:
    """The capacity case's figures (a page cites the report: a missing one fails here)."""
    r = results("serving/press-capacity")
    c = list(r["configs"].values())
    assert len(c) == 3, f"press-capacity: three configurations expected (no press, two budgets), got {len(c)}"
    return [
        f"the most sequences the server held at once: {c[0]['peak_sequences']:.0f} without a press, "
        f"{c[1]['peak_sequences']:.0f} at budget {c[1]['press']['budget']:g} ({c[1]['sequences_vs_no_press']:.2f}×) and "
        f"{c[2]['peak_sequences']:.0f} at {c[2]['press']['budget']:g} ({c[2]['sequences_vs_no_press']:.2f}×), in "
        f"{r['kv_blocks']} KV blocks; the most blocks held at once {c[0]['peak_blocks']:.0f}, {c[1]['peak_blocks']:.0f} "
        f"and {c[2]['peak_blocks']:.0f}; wall time {c[0]['wall_s']:.0f} s, {c[1]['wall_s']:.0f} s and "
        f"{c[2]['wall_s']:.0f} s"
    ]


def structured() -> list[str]:
    engines = {r[0].split()[0]: r for r in table("structured", "| engine |")}
    us = {name: r[3].split(" / ") for name, r in engines.items()}
    compile_ms = {name: r[2].split(" / ")[0] for name, r in engines.items()}
    plain = next(r for r in table("structured", "| strategy |") if r[0] == "plain")
    return [
        f"llguidance {us['llguidance'][0]} / {us['llguidance'][1]} µs, xgrammar {us['xgrammar'][0]} / "
        f"{us['xgrammar'][1]} µs, outlines-core {us['outlines-core'][0]} / {us['outlines-core'][1]} µs; compiling a "
        f"schema (median) {compile_ms['llguidance']} ms, {compile_ms['xgrammar']} ms, {compile_ms['outlines-core']} ms",
        f"takes {plain[2]} ms a token against {plain[3]} ms unconstrained, the mask {plain[6]} of it",
    ]


def drift(name: str = "drift") -> list[str]:
    """Every configuration's mean row of a drift report, as the drift page's table has it (the per-layer
    report's table leaves out its exact rows, which the main table has)."""
    return [
        f"| {r[0]} | {r[3]} | {r[4]} | {r[6]} | {r[7]} | {r[10]} |"
        for r in table(name, "| configuration")
        if r[1] == "all" and (name == "drift" or r[0] not in ("exact", "kvpress none"))
    ]


CLAIMS = {
    "press-capacity": press_capacity,
    "serving-longer": serving_longer,
    "drift-goals": drift_goals,
    "structured": structured,
    "drift": drift,
    "drift-per-layer": lambda: drift("drift-per-layer"),
    "fast_path": fast_path,
    "serving_cases": serving_cases,
    "speculative-fast": speculative_fast,
    "foundation": foundation,
    "speculative": speculative,
    "speculative-2threads": speculative_2threads,
    "jacobi-backoff": jacobi_backoff,
    "control": control,
    "serving": serving,
    "pass_cost": pass_cost,
    "draft_ceiling": draft_ceiling,
    "layer_skip": layer_skip,
}


@pytest.mark.parametrize("name", CLAIMS)
def test_readme_quotes_the_committed_report(name):
    for sentence in CLAIMS[name]():
        sentence = " ".join(sentence.split())
        assert any(sentence in text for text in TEXT.values()), (
            f"a page (README.md or docs/) should say, as benchmarks/{name}/ does: {sentence}"
        )


def test_control_a_changed_figure_is_caught(monkeypatch):
    """The check above fails when a report and the pages part: one figure off by 0.01."""
    real = rows("speculative")
    changed = {k: dict(v) for k, v in real.items()}
    changed[("all", "ngram")]["speedup_vs_plain"] += 0.01
    monkeypatch.setitem(globals(), "rows", lambda name: changed if name == "speculative" else real)
    with pytest.raises(AssertionError, match="should say, as benchmarks/speculative/"):
        test_readme_quotes_the_committed_report("speculative")


def test_every_report_names_its_commit_and_no_machine_path():
    reports = sorted(BENCH.rglob("report.md"))
    assert len(reports) >= 15
    history = subprocess.run(["git", "rev-list", "--all"], cwd=ROOT, capture_output=True, text=True)
    for report in reports:
        text = report.read_text()
        found = PROVENANCE.search(text)
        assert found, f"{report.relative_to(ROOT)} has no 'Provenance: commit ...' line"
        if history.returncode == 0 and history.stdout:  # a checkout with history: the commit must be in it
            assert any(c.startswith(found.group(1)) for c in history.stdout.split()), f"{report}: unknown commit"
        machine = (
            json.loads((report.parent / "results.json").read_text()).get("machine", {})
            if (report.parent / "results.json").is_file()
            else {}
        )
        if machine:
            assert machine["git_commit"] == found.group(1) and "git_dirty" in machine, report
    for path in sorted(BENCH.rglob("*")):
        if path.suffix in (".md", ".json", ".py"):
            match = ABSOLUTE.search(path.read_text())
            assert match is None, f"{path.relative_to(ROOT)} holds an absolute machine path at {match.group()!r}..."


def derived() -> list[str]:
    """Every sentence rebuilt above (figures computed from a report, checked word for word)."""
    return [sentence for claim in CLAIMS.values() for sentence in claim()]


def every_quote(derived_sentences: list[str] = ()) -> tuple[list, list[str]]:
    """What every page quotes (tests/figures.py's quotes, over PAGES), and the problems with its citations."""
    found, problems = [], []
    for page in PAGES:
        page_found, page_problems = quotes(page, ROOT, derived_sentences)
        found += page_found
        problems += page_problems
    return found, problems


def test_every_table_row_and_prose_figure_is_its_reports():
    """Every page, read by the generic checker: every row of every table after a citation (README's
    strategies table; the fast path's decode table, its quant paths, the prefill and pass-cost tables,
    both drift tables in the docs) stands in a row of the cited report, and every measured figure of
    the prose is a cited report's."""
    problems, found = [], []
    for page in PAGES:
        page_problems, page_found = check_page(page, ROOT, derived())
        problems += page_problems
        found += page_found
    assert not problems, "the pages quote figures their reports do not hold:\n" + "\n".join(problems)
    rows = [q for q in found if q.cells is not None]
    tables = {q.reports[-1].name for q in rows}
    assert {
        "benchmarks/fast_path/decode",
        "benchmarks/fast_path/quant-paths",
        "benchmarks/fast_path",
        "benchmarks/drift",
        "benchmarks/drift-per-layer",
    } <= tables, tables
    assert len(rows) >= 90 and sum(len(q.checked) for q in rows) >= 450
    readme = [q for q in rows if q.page == "README.md"]
    assert len(readme) >= 9 and sum(len(q.checked) for q in readme) >= 20, "README's strategies table is checked"
    cites = {page.relative_to(ROOT).as_posix() for page in PAGES if CITATION.search(page.read_text())}
    assert cites <= {q.page for q in found} | {"docs/benchmarks.md"}, "every page that cites a report is read"


def bump(figure: str) -> str:
    return figure[:-1] + str((int(figure[-1]) + 1) % 10)


def test_control_any_table_figure_changed_by_one_digit_is_caught():
    """Each figure of each checked table row of every page, its last digit changed (30/30 to 30/31,
    78.6 to 78.7): the row no longer stands in its report. Also a row relabelled as its neighbour
    (h2o 0.35's figures under `h2o 0.5`)."""
    import dataclasses

    from figures import NUMBER

    found, _ = every_quote()
    changed = 0
    for q in (q for q in found if q.cells is not None):
        for i, cell in enumerate(q.cells[1:], 1):
            for m in NUMBER.finditer(cell):
                cells = list(q.cells)
                cells[i] = cell[: m.start()] + bump(m.group()) + cell[m.end() :]
                assert check(dataclasses.replace(q, cells=cells)), (
                    f"{q.page}:{q.line}: {m.group()} -> {bump(m.group())}"
                )
                changed += 1
    assert changed >= 450
    h2o = {label: q for q in found if q.cells is not None and (label := q.cells[0]) in ("h2o 0.5", "h2o 0.35")}
    assert check(dataclasses.replace(h2o["h2o 0.35"], cells=["h2o 0.5", *h2o["h2o 0.35"].cells[1:]]))


def test_control_a_prose_figure_no_report_holds_is_caught():
    """Every measured figure of every page's prose, replaced by one no report holds, is reported. (The
    prose check only asks that a figure be one of the cited reports' numbers: a figure changed to
    another of them passes it; the sentences the tests rebuild are exact.)"""
    import dataclasses

    from figures import NUMBER, measured

    found, _ = every_quote(derived())
    prose = [q for q in found if q.cells is None and measured(q.text)]
    figures_checked = 0
    for q in prose:
        for at, figure in measured(q.text):
            end = NUMBER.match(q.text, at).end()
            assert check(dataclasses.replace(q, text=q.text[:at] + "987.654" + q.text[end:])), (
                f"{q.page}:{q.line}: {figure}"
            )
            figures_checked += 1
    assert len(prose) >= 5 and figures_checked >= 70


def test_control_a_cited_report_that_is_missing_fails(tmp_path, monkeypatch):
    """A page citing a path that does not exist (as a path or as a docs page's `../benchmarks/` link),
    or a folder without report.md, gets a problem each;
    the capacity sentence fails (it used to pass, checking nothing) when its results are missing."""
    (tmp_path / "benchmarks" / "half").mkdir(parents=True)
    (tmp_path / "benchmarks" / "half" / "results.json").write_text("{}")
    page = tmp_path / "page.md"
    page.write_text(
        "# A page\n\nMeasured (`benchmarks/gone/report.md`), 12.5 tok/s.\n\n"
        "More (`benchmarks/half/`):\n\n| x | tok/s |\n|---|--:|\n| a | 3.25 |\n\n"
        "A docs page's link ([report](../benchmarks/gone-too/report.md)): 4.5 tok/s.\n"
    )
    problems, _ = check_page(page, tmp_path)
    assert any("benchmarks/gone/report.md, which does not exist" in p for p in problems), problems
    assert any("benchmarks/half/, whose folder has no report.md" in p for p in problems), problems
    assert any("benchmarks/gone-too/report.md, which does not exist" in p for p in problems), problems
    monkeypatch.setitem(globals(), "BENCH", tmp_path / "benchmarks")
    with pytest.raises(FileNotFoundError):
        press_capacity()
