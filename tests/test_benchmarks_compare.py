"""The comparison harness (`python -m benchmarks compare`) end to end on tiny-random, and its small parts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from argen.bench import parse_strategy, strategy_label
from argen.bench.questions import (
    MT_BENCH,
    MT_BENCH_CATEGORIES,
    Question,
    bench_questions,
    read_questions,
    select_questions,
)
from argen.errors import ArgenError
from argen.models.tiny import tiny_llama
from benchmarks.harness.compare import PROG, add_arguments, command_line, run
from benchmarks.harness.provenance import git_state
from benchmarks.harness.runner import NEAR_TIE, first_difference, judge, top2_at
from benchmarks.harness.specbench import find_questions_file
from benchmarks.harness.systems import Output, cut_at_eos

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a haiku about rain.", "Now another."]},
    {"question_id": 2, "category": "writing", "turns": ["Describe a cat in one sentence."]},
    {"question_id": 3, "category": "writing", "turns": ["Not selected: over the limit."]},
    {"question_id": 10, "category": "qa", "turns": ["What is the capital of France?"]},
    {"question_id": 11, "category": "qa", "turns": ["Who wrote Hamlet? Answer: Hamlet was written by"]},
]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG)
    add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture
def questions_file(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS), encoding="utf-8")
    return path


def test_bench_end_to_end_tiny_random(tmp_path, questions_file, capsys):
    out = tmp_path / "out"
    args = parse(
        [
            "--model",
            "tiny-random",
            "--questions",
            str(questions_file),
            "--limit",
            "2",
            "--max-new-tokens",
            "8",
            "--strategies",
            "plain",
            "--out",
            str(out),
            "--threads",
            "1",
            "--no-progress",
            "--allow-dirty",
        ]
    )
    assert run(args) == 0

    for name in ("results.json", "report.md", "chart.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert not (out / "records.partial.jsonl").exists()
    assert "--limit 2` is per category" not in (out / "report.md").read_text()
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = json.loads((out / "results.json").read_text())
    assert results["command"].startswith("python -m benchmarks compare --model tiny-random")
    assert {
        "git_commit",
        "git_dirty",
        "argen",
        "torch",
        "transformers",
        "python",
        "cpu_model",
        "cpu_count",
        "platform",
    } <= set(results["machine"])
    assert results["machine"]["git_commit"] == git_state()["git_commit"]
    for text in ((out / "results.json").read_text(), (out / "report.md").read_text()):
        assert str(tmp_path) not in text and str(REPO) not in text  # paths relative to the repository
    assert "Provenance: commit " + results["machine"]["git_commit"] in (out / "report.md").read_text()
    assert [r["question_id"] for r in results["records"]] == [1, 10, 2, 11]  # categories interleaved
    summary = results["summary"]
    assert summary["categories"] == ["writing", "qa", "all"]
    rows = {(r["category"], r["system"]): r for r in summary["rows"]}
    for category, n in (("writing", 2), ("qa", 2), ("all", 4)):
        plain, hf = rows[(category, "plain")], rows[(category, "hf")]
        assert plain["n"] == hf["n"] == n
        # On tiny-random argen plain greedy is HF greedy, token for token.
        assert plain["identical"] == n and plain["real_divergences"] == 0
        assert plain["tokens_per_s"] > 0 and hf["tokens_per_s"] > 0 and plain["ratio_vs_hf"] > 0
        assert plain["tokens_per_forward"] == pytest.approx(1.0)
    for record in results["records"]:
        plain = record["systems"]["plain"]
        assert plain["identical"] is True
        assert plain["token_ids"] == record["systems"]["hf"]["token_ids"]
        assert 1 <= plain["new_tokens"] <= 8

    report = (out / "report.md").read_text()
    assert results["command"] in report
    assert "| category |" in report and "| HF tok/s |" in report and "plain ×HF" in report
    assert "| all " in report and "chart.png" in report
    printed = capsys.readouterr().out
    assert "plain ×HF" in printed and "report written to" in printed


def test_questions_selection(questions_file, tmp_path):
    questions = read_questions(questions_file)
    assert questions[0].prompt == "Write a haiku about rain."  # the first turn only
    picked = select_questions(questions, categories=["qa"], limit=1)
    assert [q.question_id for q in picked] == [10]
    with pytest.raises(ArgenError, match="unknown category nope"):
        select_questions(questions, categories=["nope"])
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    target = tmp_path / "shared" / "benchmarks" / "spec_bench" / "question.jsonl"
    target.parent.mkdir(parents=True)
    target.write_text(questions_file.read_text())
    assert find_questions_file(nested) == target


def test_mt_bench_grouped_as_spec_bench_reports_it():
    path = find_questions_file()
    grouped = bench_questions(path, None, 20, mt_bench_as_one=True)
    by_category: dict[str, list[Question]] = {}
    for q in grouped:
        by_category.setdefault(q.category, []).append(q)
    assert list(by_category)[0] == MT_BENCH and not set(by_category) & set(MT_BENCH_CATEGORIES)
    assert {len(qs) for qs in by_category.values()} == {20}  # 6 categories of 20, every one full
    original = {q.question_id: q.category for q in read_questions(path)}
    # The first 20 of mt_bench sample all eight MT-bench categories, not just the first two.
    assert {original[q.question_id] for q in by_category[MT_BENCH]} == set(MT_BENCH_CATEGORIES)
    everything = bench_questions(path, [MT_BENCH], None, mt_bench_as_one=True)
    assert len(everything) == 80 and {q.category for q in everything} == {MT_BENCH}


def test_strategy_specs_and_helpers():
    assert parse_strategy("plain") == {"name": "plain"}
    with pytest.raises(ArgenError, match="unknown strategy"):
        parse_strategy("no-such-strategy")
    with pytest.raises(ArgenError, match="unknown option"):
        parse_strategy("plain:depth=3")
    with pytest.raises(ArgenError, match="key=value"):
        parse_strategy("plain:oops")
    assert strategy_label({"name": "x", "k": 4, "b": True}) == "x:k=4:b=True"
    assert cut_at_eos([5, 2, 7], {2}) == [5, 2]
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 4, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2
    assert command_line(parse(["--limit", "3", "--dtypes", "float32,bfloat16"])) == (
        "python -m benchmarks compare --model default --limit 3 --max-new-tokens 128 --strategies plain "
        "--dtypes float32,bfloat16 --hf-prompt-lookup 0 --warmup --out bench-out"
    )


def test_judge_flags_real_divergences_and_measures_lossy_drift():
    model = tiny_llama(0)
    prompt = [257, 72, 105, 258, 10]
    ref = []
    for _ in range(4):  # the model's own greedy continuation
        ref.append(top2_at(model, prompt, ref)[0][0])
    ids, values = top2_at(model, prompt, ref[:2])
    assert values[0] - values[1] > NEAR_TIE  # tiny-random has clear winners
    wrong = ref[:2] + [ids[1], ref[3]]  # picks the runner-up at token 2: a real divergence
    systems = [
        SimpleNamespace(name="hf", reference=None, exact=True),
        SimpleNamespace(name="exact", reference="hf", exact=True),
        SimpleNamespace(name="lossy", reference="hf", exact=False),
    ]
    outputs = {"hf": Output(ref, 1.0, 4), "exact": Output(wrong, 0.5, 4), "lossy": Output(wrong, 2.0, 4)}
    record = judge(Question(7, "qa", "x"), prompt, systems, systems, outputs, model)
    exact, lossy = record["systems"]["exact"], record["systems"]["lossy"]
    assert exact["identical"] is False and exact["agreement"] == 0.5 and exact["tokens_per_s"] == 8.0
    d = exact["divergence"]
    assert d["position"] == 2 and d["near_tie"] is False and d["top2"] == ids
    assert d["token"] == ids[1] and d["reference_token"] == ids[0]
    assert lossy["divergence"] == {"position": 2, "near_tie": None}  # measured, not judged
    assert "identical" not in record["systems"]["hf"]


def test_merge_runs_split_by_category(tmp_path, questions_file, capsys):
    parts = []
    for category in ("writing", "qa"):
        out = tmp_path / category
        args = parse(
            [
                "--model",
                "tiny-random",
                "--questions",
                str(questions_file),
                "--categories",
                category,
                "--max-new-tokens",
                "4",
                "--out",
                str(out),
                "--threads",
                "1",
                "--no-progress",
                "--no-warmup",
                "--allow-dirty",
            ]
        )
        assert run(args) == 0
        parts.append(out)
    merged = tmp_path / "merged"
    assert run(parse(["--merge", *map(str, parts), "--out", str(merged), "--allow-dirty"])) == 0
    results = json.loads((merged / "results.json").read_text())
    writing = [q["question_id"] for q in QUESTIONS if q["category"] == "writing"]
    assert sorted(r["question_id"] for r in results["records"]) == sorted(q["question_id"] for q in QUESTIONS)
    assert results["settings"]["categories"] == {"writing": len(writing), "qa": 2}
    rows = {(r["category"], r["system"]): r for r in results["summary"]["rows"]}
    assert rows[("all", "plain")]["n"] == len(QUESTIONS) and rows[("qa", "plain")]["n"] == 2
    report = (merged / "report.md").read_text()
    assert (
        "--categories writing" in report
        and "--categories qa" in report
        and "python -m benchmarks compare --merge" in report
    )

    with pytest.raises(ArgenError, match="more than one of the runs"):
        run(parse(["--merge", str(parts[0]), str(parts[0]), "--out", str(tmp_path / "twice"), "--allow-dirty"]))
    with pytest.raises(ArgenError, match="cannot go with --control"):
        run(parse(["--merge", *map(str, parts), "--control", "--out", str(tmp_path / "y")]))
    for key, value, error in (
        ("git_commit", "0000000", "measured at commit 0000000"),
        ("git_dirty", True, "uncommitted changes"),
    ):
        part = json.loads((parts[1] / "results.json").read_text())
        part["machine"] = part["machine"] | {"git_dirty": False} | {key: value}
        (tmp_path / "other").mkdir(exist_ok=True)
        (tmp_path / "other" / "results.json").write_text(json.dumps(part))
        first = json.loads((parts[0] / "results.json").read_text())
        first["machine"]["git_dirty"] = False
        (tmp_path / "clean").mkdir(exist_ok=True)
        (tmp_path / "clean" / "results.json").write_text(json.dumps(first))
        with pytest.raises(ArgenError, match=error):
            run(parse(["--merge", str(tmp_path / "clean"), str(tmp_path / "other"), "--out", str(tmp_path / "m2")]))
    with pytest.raises(ArgenError, match="does not exist"):
        run(parse(["--merge", str(parts[0]), str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]))


class FakeLlama:
    """Stands in for llama_cpp.Llama: 'generates' greedily with the tiny model through HF, so the
    peer's protocol (reset, generate with temp=0, time to first token) is exercised without a build."""

    def __init__(self, model_path, n_ctx, n_threads, n_threads_batch, n_batch, verbose):
        self.model_path, self.threads, self.model = model_path, n_threads, object()
        self.hf = tiny_llama(0)

    def reset(self):
        self.resets = getattr(self, "resets", 0) + 1

    def generate(self, tokens, temp, top_k, top_p, min_p, repeat_penalty, reset):
        import torch

        assert temp == 0.0 and top_k == 1 and reset
        ids = list(tokens)
        while True:
            with torch.inference_mode():
                token = int(self.hf(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            yield token


def test_bench_quant_paths_and_a_llama_cpp_peer(tmp_path, questions_file, monkeypatch):
    import sys

    from argen.models import sources

    fake = SimpleNamespace(
        Llama=FakeLlama,
        __version__="0.0-fake",
        llama_model_size=lambda model: 1234,
        llama_print_system_info=lambda: b"CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 0 | ",
    )
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    gguf = tmp_path / "model.gguf"
    monkeypatch.setattr(sources, "gguf_file", lambda source: gguf)
    out = tmp_path / "out"
    args = parse(
        [
            "--model",
            "tiny-random",
            "--questions",
            str(questions_file),
            "--limit",
            "1",
            "--max-new-tokens",
            "6",
            "--quants",
            "none,q8_0",
            "--systems",
            "llama-cpp",
            "--reference",
            "plain@none",
            "--out",
            str(out),
            "--threads",
            "1",
            "--no-progress",
            "--allow-dirty",
        ]
    )
    assert run(args) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["system"]: r for r in results["summary"]["rows"] if r["category"] == "all"}
    assert set(rows) == {"hf", "plain", "plain@none", "plain@q8_0", "llama.cpp"}
    assert rows["plain@none"]["reference"] == "hf" and rows["plain"]["reference"] == "plain@none"
    assert rows["llama.cpp"]["reference"] == "plain@none" and not rows["llama.cpp"]["exact"]
    assert rows["llama.cpp"]["identical"] == 2  # the fake peer decodes the same weights greedily
    assert rows["plain@q8_0"]["exact"] is False and rows["plain@q8_0"]["weight_bytes"] < rows["plain"]["weight_bytes"]
    for name in ("plain", "llama.cpp"):
        assert rows[name]["prefill_tokens_per_s"] > 0 and rows[name]["decode_tokens_per_s"] > 0
    assert rows["llama.cpp"]["weight_bytes"] == 1234
    assert "Decode and prefill speed" in (out / "report.md").read_text()
    assert "llama.cpp build SSE3 AVX2." in (out / "report.md").read_text()  # the peer's ISA, named
    assert "--systems llama-cpp" in results["command"] and "--reference plain@none" in results["command"]


def test_bench_peer_and_reference_errors_say_what_to_do(tmp_path, questions_file, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # not installed
    base = [
        "--model",
        "tiny-random",
        "--questions",
        str(questions_file),
        "--limit",
        "1",
        "--max-new-tokens",
        "2",
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
        "--allow-dirty",
    ]
    with pytest.raises(ArgenError, match="unknown --systems vllm"):
        run(parse([*base, "--systems", "vllm"]))
    with pytest.raises(ArgenError, match="GGUF"):
        run(parse([*base, "--systems", "llama-cpp"]))
    with pytest.raises(ArgenError, match="--reference 'nope' is not among"):
        run(parse([*base, "--reference", "nope"]))
