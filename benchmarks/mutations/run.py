"""Issue 24's test gaps, proven: each gap's bug, put back by hand into a copy of the code, fails the tests
that close the gap, and the same tests pass on the unmutated copy.

    python benchmarks/mutations/run.py [--only NAME] [--list] [--jobs N] [--allow-dirty]

For each mutation: copy src/, tests/ and pyproject.toml (and README.md, benchmarks/ where its tests
read them) to a temporary directory, replace one exact string in one file (asserted to occur exactly
once, so this script fails loudly when the code moves; a replacement of None deletes the file), run
the named test node ids there with `python -m pytest NODES -x -q -p no:cacheprovider` and
PYTHONPATH=<copy>/src, and classify: *caught* (a test failed), *SURVIVED* (they passed: a real gap),
*not run here* (every test skipped, e.g. an ISA this CPU lacks). A control run of the same node ids
on the unmutated copy (one per distinct set) must pass. Kernels are compiled into a throwaway cache
directory (the model files are linked from the real one), so a mutated build never lands in the
shared cache. Writes report.md and results.json next to this script.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]  # this checkout's argen, and the `benchmarks` package

from argen.models import kernels  # noqa: E402
from argen.models.sources import cache_dir  # noqa: E402
from benchmarks.harness.provenance import script_args

KERNEL_EXACT = "tests/test_kernels.py::test_kernel_is_exact_where_fp32_arithmetic_is"
KERNEL_F64 = "tests/test_kernels.py::test_kernel_matches_float64_within_its_rounding_bound"
BOUNDARIES = "tests/test_sampling.py::test_top_p_and_min_p_draw_exactly_the_filtered_softmax_at_every_boundary"
DISTRIBUTION = "tests/test_distribution.py::test_output_distribution_is_exactly_plain_sampling"
FIGURES = "tests/test_readme_figures.py::test_every_table_row_and_prose_figure_is_its_reports"
QUOTES = "tests/test_readme_figures.py::test_readme_quotes_the_committed_report"
# Mutations of one family run the same node ids (one control for them all); with -x the first to fail stops the run.
README_TESTS = [f"{QUOTES}[fast_path]", f"{QUOTES}[press-capacity]", FIGURES]
KERNEL_TESTS = [
    f"{KERNEL_F64}[q8_0-avx2]",
    f"{KERNEL_F64}[q4_0-scalar]",
    f"{KERNEL_EXACT}[q8_0-avx2]",
    f"{KERNEL_EXACT}[q4_0-scalar]",
    f"{KERNEL_EXACT}[q4_1-scalar16]",
]
TOP_P_TESTS = [
    "tests/test_sampling.py::test_top_p_at_an_exact_boundary_drops_the_token_whose_predecessors_cover_it",
    f"{BOUNDARIES}[1.0]",
    f"{DISTRIBUTION}[plain top-p]",
]
MIN_P_TESTS = [
    "tests/test_sampling.py::test_min_p_at_an_exact_boundary_keeps_the_tokens_at_min_p_times_the_top",
    f"{BOUNDARIES}[1.0]",
    f"{BOUNDARIES}[0.7]",
    f"{BOUNDARIES}[1.3]",
    f"{DISTRIBUTION}[plain min-p]",
]


@dataclass
class Mutation:
    name: str
    gap: str  # the gap it stands for
    bug: str
    file: str  # relative to the repository root
    old: str
    new: str | None  # None: the file is deleted
    tests: list[str]
    commit: str  # the commit that closed the gap
    extra: list[str] = field(default_factory=list)  # more to copy: README.md, docs, benchmarks
    timeout_s: int = 900
    repeats: int = 1


MUTATIONS = [
    Mutation(
        "prefix-key-drops-a-token",
        "prefix-cache key ignoring one token of a block",
        "the block hash leaves out the block's last token",
        "src/argen/cache/paged.py",
        '",".join(map(str, tokens)).encode()',
        '",".join(map(str, tokens[:-1])).encode()',
        [
            "tests/test_batching.py::test_a_prompt_differing_at_any_one_position_of_a_block_takes_only_the_blocks_before_it"
        ],
        "f8b339d",
    ),
    Mutation(
        "greedy-accepts-near-tie",
        "greedy verifier accepting a draft within 1e-4 of the argmax",
        "greedy verification also accepts a drafted token whose logit is within NEAR_TIE of the argmax",
        "src/argen/strategies/speculative/verify.py",
        "nxt = next((c for c in kids if tree.tokens[c] == token), None)",
        "nxt = next((c for c in kids if tree.tokens[c] == token or (greedy and gap_is_near_tie("
        "float(processed.max() - processed[tree.tokens[c]])))), None)",
        ["tests/test_neartie.py::test_the_verifier_rejects_the_runner_up_drafted_at_a_near_tie"],
        "f6e7d96",
    ),
    Mutation(
        "prefix-kv-keeps-lowest",
        "prefix-kv keeping the lowest-scored positions",
        "PrefixKV keeps each head's lowest-scored positions (`topk(largest=False)`)",
        "src/argen/cache/press_attention.py",
        "s[:, : total - recent].topk(count, dim=-1)",
        "s[:, : total - recent].topk(count, dim=-1, largest=False)",
        ["tests/test_prefix_kv.py::test_a_press_keeps_each_heads_best_scored_positions_by_hf_eager_attention"],
        "ee605d8",
    ),
    Mutation(
        "readme-table-cell",
        "README figures: a table cell drifts from its report",
        "the fast-path table's `exact` decode speed 78.6 -> 78.9 tok/s in docs/fast-path.md",
        "docs/fast-path.md",
        "| argen `exact` (the default) | 78.6 | 556 |",
        "| argen `exact` (the default) | 78.9 | 556 |",
        README_TESTS,
        "66efdd7",
        ["README.md", "docs", "benchmarks"],
    ),
    Mutation(
        "report-denominator",
        "README figures: a hard-coded denominator (`/30`)",
        "the fast-path report's fp32 comparison becomes 30/31 (README still says 30/30; the old test "
        "rebuilt it as `30` + `/30`)",
        "benchmarks/fast_path/decode/report.md",
        "| plain@none |     30/30 |",
        "| plain@none |     30/31 |",
        README_TESTS,
        "66efdd7",
        ["README.md", "docs", "benchmarks"],
    ),
    Mutation(
        "capacity-report-missing",
        "README figures: press_capacity() checked nothing without its results",
        "benchmarks/serving/press-capacity/results.json deleted",
        "benchmarks/serving/press-capacity/results.json",
        "",
        None,
        README_TESTS,
        "66efdd7",
        ["README.md", "docs", "benchmarks"],
    ),
    # The kernels are written once against cpu_simd.h's vector layer: one scale load serves every build
    # (AVX2 and the portable builds run here; the AVX-512 builds are compiled only on an AVX2 host).
    Mutation(
        "kernel-scale",
        "a kernel scale off by 1e-6 (every build: AVX2, portable C at widths 8 and 16)",
        "the fp32 kernels' block scale times (1 + 1e-6)",
        "src/argen/models/kernels/cpu_kernels.c",
        "d[t] = vload_f16((const uint16_t *)(r + t * rec));",
        "d[t] = vmul(vload_f16((const uint16_t *)(r + t * rec)), vset1(1.0f + 1e-6f));",
        KERNEL_TESTS,
        "97ad5d1",
    ),
    Mutation(
        "top-p-strict",
        "top-p off-by-one: `>=` -> `>`",
        "top-p drops a token only when its predecessors cover strictly more than top_p (keeps one more at "
        "an exact boundary)",
        "src/argen/sampling.py",
        "(cumulative - sorted_logits.softmax(-1)) >= params.top_p",
        "(cumulative - sorted_logits.softmax(-1)) > params.top_p",
        TOP_P_TESTS,
        "622e417",
    ),
    Mutation(
        "top-p-one-fewer",
        "top-p off-by-one: the crossing token dropped",
        "top-p drops the token whose cumulative probability crosses top_p (`cumulative >= top_p`)",
        "src/argen/sampling.py",
        "(cumulative - sorted_logits.softmax(-1)) >= params.top_p",
        "cumulative >= params.top_p",
        TOP_P_TESTS,
        "622e417",
    ),
    Mutation(
        "min-p-boundary",
        "min-p boundary: `<` -> `<=`",
        "min-p also drops a token exactly at min_p x the top probability",
        "src/argen/sampling.py",
        "logits.masked_fill(probs < threshold, neg_inf)",
        "logits.masked_fill(probs <= threshold, neg_inf)",
        MIN_P_TESTS,
        "a026a5f",
    ),
    Mutation(
        "min-p-before-temperature",
        "min-p judged before the temperature",
        "min-p's probabilities taken from the logits before temperature scaling",
        "src/argen/sampling.py",
        "probs = logits.softmax(-1)\n",
        "probs = (logits * params.temperature).softmax(-1)\n",
        MIN_P_TESTS,
        "622e417",
    ),
    Mutation(
        "seqkv-frees-at-exit",
        "SeqKV.__del__ freeing at interpreter exit",
        "the `sys.is_finalizing()` guard removed from SeqKV.__del__",
        "src/argen/cache/paged.py",
        "        if sys.is_finalizing():\n            return\n",
        "",
        ["tests/test_h2o.py::test_a_pressed_cache_alive_at_exit_does_not_abort_the_interpreter"],
        "3bbcdb2",
        repeats=3,
    ),
    Mutation(
        "exact-path-a8",
        "quant=exact not equal to quant=none (the 30/30)",
        "the exact path rounds activations to 8 bits (the exact-a8 path's flag set for plain exact)",
        "src/argen/models/quant_paths.py",
        "if quant.endswith(A8) else (quant, False)",
        'if quant.endswith(A8) else (quant, quant == "exact")',
        ["tests/test_real_model.py::test_the_exact_path_decodes_as_fp32_token_for_token"],
        "c979d17",
        timeout_s=2400,
    ),
    Mutation(
        "exact-path-rmsnorm-eps",
        "quant=exact not equal to quant=none (the 30/30)",
        "the fused exact path's RMSNorm adds eps outside the square root: 1/(sqrt(mean x^2) + eps)",
        "src/argen/models/kernels/cpu_forward.c",
        "1.0f / sqrtf(dot(x, x, n) / (float)n + eps)",
        "1.0f / (sqrtf(dot(x, x, n) / (float)n) + eps)",
        ["tests/test_real_model.py::test_the_exact_path_decodes_as_fp32_token_for_token"],
        "b2e08fa",
        timeout_s=2400,
    ),
]  # the real model's last: it takes the longest
BY_NAME = {m.name: m for m in MUTATIONS}
ABSOLUTE = re.compile(r"(?<![\w.])/(?:work|root|tmp|home|Users|usr|opt|private|var)/[^\s:'\"]*")
SUMMARY = re.compile(r"^(PASSED|FAILED|ERROR|SKIPPED)\s+(.*)$", re.M)


def copy_repo(dest: Path, extra: list[str]) -> None:
    # The benchmark harness's package too (not its reports): some tests import it.
    for name in ["src", "tests", "pyproject.toml", "benchmarks/__init__.py", "benchmarks/harness", *extra]:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(
                source, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True
            )
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    shared = ROOT.parent / "shared"  # the Spec-Bench questions the real-model tests read, beside the checkout
    if shared.is_dir():
        (dest.parent / "shared").symlink_to(shared)


def mutate(copy: Path, m: Mutation) -> None:
    path = copy / m.file
    text = path.read_text()
    if m.new is None:
        path.unlink()
        return
    found = text.count(m.old)
    assert found == 1, f"{m.name}: {m.old!r} occurs {found} times in {m.file} (expected once): update this mutation"
    path.write_text(text.replace(m.old, m.new))


def kernel_free_cache(base: Path) -> Path:
    """A cache directory holding links to every entry of argen's cache but its compiled kernels."""
    cache = base / "cache"
    cache.mkdir()
    real = cache_dir()
    if real.is_dir():
        for entry in real.iterdir():
            if entry.name != "kernels":
                (cache / entry.name).symlink_to(entry)
    return cache


def portable(text: str, copy: Path) -> str:
    return ABSOLUTE.sub(lambda match: "<path>/" + Path(match.group()).name, text.replace(str(copy), "<copy>"))


def run_tests(m: Mutation, mutated: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="argen-mutation-") as tmp:
        copy = Path(tmp) / "repo"
        copy.mkdir()
        copy_repo(copy, m.extra)
        if mutated:
            mutate(copy, m)
        env = os.environ | {"PYTHONPATH": str(copy / "src"), "ARGEN_CACHE_DIR": str(kernel_free_cache(Path(tmp)))}
        cmd = [sys.executable, "-m", "pytest", *m.tests, "-x", "-q", "-p", "no:cacheprovider", "-rA"]
        started = time.perf_counter()
        try:
            done = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=m.timeout_s)
            rc, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:  # its output comes back as bytes, whatever `text` said
            rc, output = None, (exc.stdout or b"").decode(errors="replace")
        seconds = time.perf_counter() - started
        output = portable(output, copy)
    lines = {kind: [] for kind in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    for kind, rest in SUMMARY.findall(output):
        lines[kind].append(rest.strip())
    if rc is None:
        outcome = "timed out"
    elif rc != 0 and (lines["FAILED"] or lines["ERROR"]):
        outcome = "caught" if mutated else "FAILED"
    elif rc == 0 and lines["PASSED"]:
        outcome = "SURVIVED" if mutated else "passed"
    elif rc == 0:
        outcome = "not run here"
    else:
        outcome = f"error (exit code {rc})"
    return {
        "outcome": outcome,
        "exit_code": rc,
        "seconds": round(seconds, 1),
        "passed": lines["PASSED"],
        "failed": lines["FAILED"] + lines["ERROR"],
        "skipped": lines["SKIPPED"],
        "tail": "\n".join(output.strip().splitlines()[-12:]),
    }


def isas_here() -> dict[str, str]:
    return {
        isa: (
            "runs here"
            if not kernels.missing_features(isa)
            else f"compiled only (CPU lacks {', '.join(kernels.missing_features(isa))})"
        )
        for isa in kernels.ISA_NEEDS
        if kernels.compiler_targets(isa)
    }


def cell(items: list[str]) -> str:
    return "<br>".join(f"`{i}`" for i in items).replace("|", "\\|") or "—"


def short(node: str) -> str:
    return node.split(" - ")[0].replace("tests/", "").split("::")[-1] if "::" in node else node


def report(command: str, state: dict, rows: list[dict], controls: dict[str, dict]) -> str:
    caught = sum(r["runs"][0]["outcome"] == "caught" for r in rows)
    lines = [
        "# Issue 24's test gaps: each gap's bug put back fails its tests",
        "",
        "```",
        command,
        "```",
        "",
        f"Provenance: commit {state['git_commit']}, "
        f"{'dirty: ' + ', '.join(state['dirty_files']) if state['git_dirty'] else 'clean working tree'}. "
        f"CPU: {kernels.cpu_name()} ({os.cpu_count()} CPUs); Python {sys.version.split()[0]}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "Kernel ISAs on this host: " + "; ".join(f"{isa}: {s}" for isa, s in isas_here().items()) + ".",
        "",
        "Each row: one deliberate bug (one exact string replaced in one file of a temporary copy of the "
        "repository), then `python -m pytest NODES -x -q -p no:cacheprovider` on that copy. *caught*: a "
        "named test failed (the first one to fail is listed; `-x` stops there); *SURVIVED*: every named test "
        "passed; *not run here*: every named test was skipped. Control: the same node ids on the unmutated "
        "copy, which must pass. Seconds are wall time on a shared, loaded machine.",
        "",
        f"{caught} of {len(rows)} mutations caught.",
        "",
        "| mutation | gap closed by | the bug | file | tests run (in order) | failed with the bug | result "
        "| s | control | control s |",
        "|---|---|---|---|---|---|---|--:|---|--:|",
    ]
    for r in rows:
        m, control = r["mutation"], controls[r["control"]]
        outcomes = [run["outcome"] for run in r["runs"]]
        result = outcomes[0] if len(set(outcomes)) == 1 else " / ".join(outcomes)
        if len(outcomes) > 1:
            result += f" ({len(outcomes)} runs)"
        failed = sorted({short(f) for run in r["runs"] for f in run["failed"]})
        lines.append(
            f"| {m['name']} | {m['commit']} | {m['bug']} | `{m['file']}` | {cell([short(t) for t in m['tests']])} "
            f"| {cell(failed)} | {result} | {' / '.join(str(run['seconds']) for run in r['runs'])} "
            f"| {control['outcome']} | {control['seconds']} |"
        )
    notes = [r for r in rows if r["runs"][0]["skipped"]]
    if notes:
        lines += ["", "Skips:", ""] + [
            f"- {r['mutation']['name']}: {s}" for r in notes for s in r["runs"][0]["skipped"]
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    if "--list" in sys.argv[1:]:
        for m in MUTATIONS:
            print(f"{m.name:28} {m.file}: {m.bug}")
        return

    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--only", choices=list(BY_NAME), action="append", help="run only this mutation (repeatable)"
        )
        parser.add_argument("--list", action="store_true", help="list the mutations and exit")
        parser.add_argument("--jobs", type=int, default=1, help="families of mutations run at once (default 1)")

    args, state = script_args(__doc__, root=ROOT, add=options)
    chosen = [BY_NAME[n] for n in args.only] if args.only else MUTATIONS
    command = shlex.join(["python", "benchmarks/mutations/run.py", *sys.argv[1:]])
    machine = state | {"cpu_model": kernels.cpu_name(), "cpu_count": os.cpu_count(), "isas": isas_here()}
    families: dict[str, list[Mutation]] = {}  # mutations sharing node ids share a control run
    for m in chosen:
        families.setdefault(json.dumps([m.tests, m.extra]), []).append(m)
    controls: dict[str, dict] = {}
    done: dict[str, dict] = {}
    lock = threading.Lock()

    def run_family(key: str, members: list[Mutation]) -> None:
        controls[key] = run_tests(members[0], mutated=False)
        print(f"control  {members[0].name}: {controls[key]['outcome']} ({controls[key]['seconds']} s)", flush=True)
        for m in members:
            runs = [run_tests(m, mutated=True) for _ in range(m.repeats)]
            for r in runs:
                print(f"mutation {m.name}: {r['outcome']} ({r['seconds']} s) {r['failed'][:1]}", flush=True)
            with lock:  # the report is written after every row: a run cut short keeps the rows it has
                done[m.name] = {"mutation": asdict(m), "control": key, "runs": runs}
                rows = [done[c.name] for c in chosen if c.name in done]
                text = report(command, state, rows, controls)
                (OUT / "report.md").write_text(text)
                (OUT / "results.json").write_text(
                    json.dumps({"command": command, "machine": machine, "rows": rows, "controls": controls}, indent=1)
                    + "\n"
                )

    with ThreadPoolExecutor(args.jobs) as pool:  # threads: each waits on its own pytest process
        list(pool.map(lambda item: run_family(*item), families.items()))
    rows = [done[m.name] for m in chosen]
    text = report(command, state, rows, controls)
    print(text)
    bad = [
        r["mutation"]["name"]
        for r in rows
        if any(run["outcome"] not in ("caught", "not run here") for run in r["runs"])
    ]
    bad += [k for k, c in controls.items() if c["outcome"] != "passed"]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
