"""The serving benchmark end to end on the tiny model: both runs, the report files, and the
concurrent outputs equal to the sequential ones."""

from __future__ import annotations

import json

from benchmarks.harness import serving


def test_serving_benchmark_writes_its_report(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        "".join(
            json.dumps({"question_id": i, "category": c, "turns": [t]}) + "\n"
            for i, (c, t) in enumerate([("a", "Hi there"), ("b", "Two plus two?"), ("c", "A cat story.")])
        )
    )
    out = tmp_path / "out"
    assert (
        serving.main(
            [
                "--model",
                "tiny-random",
                "--clients",
                "3",
                "--max-tokens",
                "6",
                "--threads",
                "1",
                "--questions",
                str(questions),
                "--out",
                str(out),
                "--allow-dirty",
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    for mode in ("sequential", "concurrent"):
        assert results[mode]["completion_tokens"] == 18 and results[mode]["throughput_tok_s"] > 0
        assert results[mode]["ttft_p50_s"] <= results[mode]["latency_p50_s"]
    assert results["identical_outputs"] == 3 and results["concurrent_mean_batch"] >= 1
    assert results["quant"] == "auto" and results["prefill_slowdown"] > 0
    cached = results["cached_prompt_tokens"]
    assert 0 <= cached["concurrent"] < results["prompt_tokens"] and 0 <= cached["sequential"] < results["prompt_tokens"]
    assert (out / "latency.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "python -m benchmarks serving --model tiny-random" in report and "one after another" in report
    assert "Provenance: commit" in report and str(tmp_path) not in report + (out / "results.json").read_text()
    assert {"git_commit", "git_dirty", "torch", "transformers", "argen", "python", "cpu_model"} <= set(
        results["machine"]
    )


def _questions(tmp_path):
    questions = tmp_path / "q.jsonl"
    texts = [
        "Hi there",
        "Two plus two?",
        "A cat story.",
        "Name a colour.",
        "The history of the river and the towns along it, told slowly, one town after another. " * 3,
    ]
    questions.write_text(
        "".join(json.dumps({"question_id": i, "category": "c", "turns": [t]}) + "\n" for i, t in enumerate(texts))
    )
    return questions


def test_shared_prefix_case_computes_the_prefix_once_and_each_configuration_starts_cold(tmp_path):
    out = tmp_path / "out"
    for _ in range(2):  # a second run in the same process must not find the first run's blocks
        assert (
            serving.main(
                [
                    "--model",
                    "tiny-random",
                    "--case",
                    "shared-prefix",
                    "--clients",
                    "3",
                    "--max-tokens",
                    "4",
                    "--prefix-tokens",
                    "96",
                    "--gap",
                    "0.05",
                    "--threads",
                    "1",
                    "--questions",
                    str(_questions(tmp_path)),
                    "--out",
                    str(out),
                    "--allow-dirty",
                ]
            )
            == 0
        )
        results = json.loads((out / "results.json").read_text())
        cached, uncached = results["configs"]["prefix caching"], results["configs"]["no prefix caching"]
        assert results["identical_outputs"] == results["requests"] == 3
        # The 96-token prefix (6 blocks) is computed once with caching, by every request without.
        assert uncached["prompt_tokens_computed"] - cached["prompt_tokens_computed"] >= 2 * 96
    report = (out / "report.md").read_text()
    assert "Prompt tokens computed, prefix caching ÷ no prefix caching" in report


def test_a_pool_forgets_its_cached_blocks_on_request():
    from argen.cache.paged import BlockPool, SeqKV

    pool = BlockPool(1, 1, 4, max_blocks=4, block_size=2)
    seq = SeqKV(pool, 8)
    seq.reserve(4)
    seq.lengths[0] = 4
    seq.register_prefix([1, 2, 3, 4], [0, 1, 2, 3])
    seq.free()
    assert len(pool.evictable) == 2 and pool.held == 0  # kept for prefix hits after the sequence ended
    assert pool.drop_cached() == 2 and not pool.by_hash and len(pool.free) == 4


def test_press_capacity_case_measures_the_sequences_held_in_the_same_kv_blocks(tmp_path):
    """A small press-capacity run: room for 2 unpressed requests' worst cases; the servers' gauges
    must show 2 running at once without a press, more with one, and never more blocks than given."""
    out = tmp_path / "out"
    assert (
        serving.main(
            [
                "--model",
                "tiny-random",
                "--case",
                "press-capacity",
                "--clients",
                "6",
                "--long-tokens",
                "600",
                "--max-tokens",
                "8",
                "--fit",
                "2",
                "--budgets",
                "0.35",
                "--threads",
                "1",
                "--questions",
                str(_questions(tmp_path)),
                "--out",
                str(out),
                "--allow-dirty",
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    unpressed, pressed = results["configs"]["no press"], results["configs"]["streaming-llm 0.35"]
    assert results["kv_blocks"] == 2 * unpressed["reserved_blocks"] == unpressed["kv_blocks_limit"]
    assert unpressed["peak_sequences"] == unpressed["fit_by_admission"] == 2
    assert 2 < pressed["peak_sequences"] <= pressed["fit_by_admission"]
    assert pressed["sequences_vs_no_press"] == pressed["peak_sequences"] / 2
    for config in (unpressed, pressed):
        assert 0 < config["peak_blocks"] <= results["kv_blocks"] and config["completion_tokens"] == 6 * 8
        assert max((s for _, s, _ in config["timeline"]), default=0) <= config["peak_sequences"]
    assert unpressed["token_agreement"] == 1.0 and 0 <= pressed["token_agreement"] <= 1
    assert min(results["prompt_tokens"]) >= 600
    report = (out / "report.md").read_text()
    assert "most sequences running at once (measured)" in report and (out / "capacity.png").stat().st_size > 0
    assert "--case press-capacity" in report and f"`--kv-blocks {results['kv_blocks']}`" in report
