"""The serving benchmark end to end on the tiny model: both runs, the report files, and the
concurrent outputs equal to the sequential ones."""

from __future__ import annotations

import json

from argen.bench import serving


def test_serving_benchmark_writes_its_report(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": [t]}) + "\n" for i, (c, t) in
                                 enumerate([("a", "Hi there"), ("b", "Two plus two?"), ("c", "A cat story.")])))  # fmt: skip
    out = tmp_path / "out"
    assert serving.main(["--model", "tiny-random", "--clients", "3", "--max-tokens", "6", "--threads", "1",
                         "--questions", str(questions), "--out", str(out), "--allow-dirty"]) == 0  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    for mode in ("sequential", "concurrent"):
        assert results[mode]["completion_tokens"] == 18 and results[mode]["throughput_tok_s"] > 0
        assert results[mode]["ttft_p50_s"] <= results[mode]["latency_p50_s"]
    assert results["identical_outputs"] == 3 and results["concurrent_mean_batch"] >= 1
    assert (out / "latency.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "python -m argen.bench.serving --model tiny-random" in report and "one after another" in report
    assert "Provenance: commit" in report and str(tmp_path) not in report + (out / "results.json").read_text()
    assert {"git_commit", "git_dirty", "torch", "transformers", "argen", "python", "cpu_model"} <= set(results["machine"])
