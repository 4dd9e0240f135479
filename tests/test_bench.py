"""`argen bench` (the wheel's thin bench) end to end on tiny-random, what it says about the options
that left with the benchmark harness, and the product boundary itself."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from argen.bench.__main__ import main as bench_main
from argen.cli import main

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a haiku about rain."]},
    {"question_id": 2, "category": "qa", "turns": ["What is the capital of France? The capital of France is"]},
    {"question_id": 3, "category": "qa", "turns": ["Over the limit."]},
]


def test_bench_measures_each_strategy_and_writes_json(tmp_path, capsys):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    out = tmp_path / "out"
    code = main(
        [
            "bench",
            "--model",
            "tiny-random",
            "--strategies",
            "plain,prompt-lookup,jacobi:adaptive=False",
            "--questions",
            str(questions),
            "--limit",
            "1",
            "--max-new-tokens",
            "12",
            "--threads",
            "1",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["question_id"] for r in results["records"]] == [1, 2]  # --limit per category
    rows = {r["strategy"]: r for r in results["summary"]}
    assert list(rows) == ["plain", "prompt-lookup", "jacobi:adaptive=False"]
    plain = rows["plain"]
    assert plain["tokens_per_forward"] == 1.0 and plain["acceptance"] is None and plain["new_tokens"] > 0
    for name in ("prompt-lookup", "jacobi:adaptive=False"):  # exact strategies: plain's very tokens
        row = rows[name]
        assert row["identical_to_plain"] == 2 and row["speedup_vs_plain"] > 0 and row["tokens_per_s"] > 0
        assert row["tokens_per_forward"] >= 1.0
    # Jacobi drafts every step: its acceptance is a share of what it proposed.
    assert 0.0 <= rows["jacobi:adaptive=False"]["acceptance"] <= 1.0
    assert {"argen", "torch", "cpu", "threads"} <= set(results["machine"])
    assert "tok/pass" in capsys.readouterr().out


def test_builtin_prompts_need_no_file(tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        bench_main(
            [
                "--model",
                "tiny-random",
                "--categories",
                "coding",
                "--max-new-tokens",
                "4",
                "--no-warmup",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert [r["category"] for r in results["records"]] == ["coding"] and results["settings"]["questions"] == "built-in"
    capsys.readouterr()


@pytest.mark.parametrize(
    "argv",
    [["--hf-prompt-lookup", "10"], ["--merge", "a", "b"], ["--control"], ["--systems", "llama-cpp"], ["--allow-dirty"]],
)
def test_harness_options_say_where_they_went(argv, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert argv[0] in err and "python -m benchmarks compare" in err and "pip install -e '.[bench]'" in err


def test_bench_drift_says_where_it_went(capsys):
    assert main(["bench", "drift", "--model", "tiny-random"]) == 2
    assert "python -m benchmarks drift" in capsys.readouterr().err
    assert bench_main(["drift"]) == 2
    assert "python -m benchmarks drift" in capsys.readouterr().err


def test_the_wheel_stays_thin():
    """The product boundary (issue 26): `argen bench` in at most 800 lines, nothing in src/argen
    imports the repository's benchmark harness, and the core dependencies hold no plotting or HTTP
    client library (the harness's extra, `bench`, does)."""
    bench = REPO / "src" / "argen" / "bench"
    lines = sum(len(p.read_text().splitlines()) for p in bench.rglob("*.py"))
    assert lines <= 800, f"src/argen/bench/ is {lines} lines; the comparison harness belongs in benchmarks/"
    for path in (REPO / "src" / "argen").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            assert not any(n == "benchmarks" or n.startswith("benchmarks.") for n in names), path
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip() for d in project["dependencies"]}
    assert not core & {"matplotlib", "httpx", "requests", "aiohttp", "llama-cpp-python", "kvpress"}, core
    bench_extra = " ".join(project["optional-dependencies"]["bench"])
    assert "matplotlib" in bench_extra and "httpx" in bench_extra
