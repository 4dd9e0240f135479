"""`python -m benchmarks compare --control` on the tiny random model: every row and check present, and the checks hold."""

from __future__ import annotations

import json

from benchmarks.__main__ import main
from benchmarks.harness.control import set_members

QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a haiku about rain. Make it sad."]},
    {"question_id": 10, "category": "qa", "turns": ["Name three fruits:\napples\npears\nplums"]},
]


def test_control_bench_tiny(tmp_path, capsys):
    questions = tmp_path / "question.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    out = tmp_path / "out"
    code = main(
        [
            "compare",
            "--control",
            "--model",
            "tiny-random",
            "--guide-model",
            "tiny-random@1",
            "--omega",
            "4",
            "--questions",
            str(questions),
            "--max-new-tokens",
            "12",
            "--threads",
            "1",
            "--out",
            str(out),
            "--allow-dirty",
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["system"]: r for r in results["summary"]}
    assert set(rows) == {
        "plain-sampled",
        "replay",
        "counterfactual",
        "plain",
        "set-prompt",
        "guided:omega=0",
        "guided:omega=4",
    }
    assert rows["replay"]["identical"] == "2/2" and rows["counterfactual"]["prefix_kept"] == "2/2"
    # Sorted, both orders are one input; kept as given, only the mask makes them agree.
    assert rows["set-prompt"]["sorted_same_input"] == "2/2" and rows["set-prompt"]["order_independent"] == "2/2"
    assert rows["guided:omega=0"]["identical_to_plain"] == "2/2"
    assert rows["guided:omega=4"]["guide_passes_per_token"] > 0 and rows["plain"]["guide_passes_per_token"] == 0
    report = (out / "report.md").read_text()
    assert (
        "python -m benchmarks compare --control" in report
        and "Provenance: commit" in report
        and str(tmp_path) not in report
    )
    capsys.readouterr()


def test_set_members():
    assert set_members("a\n\nb\nc") == ["a", "b", "c"]
    assert set_members("One. Two? Three!") == ["One.", "Two?", "Three!"]
    assert set_members("Just one") == ["Just one"]
