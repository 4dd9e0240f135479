"""Where the Spec-Bench questions live: `shared/benchmarks/spec_bench/question.jsonl`, in the
project's `shared/` folder beside the repository root (see `../shared/README.md`). Reading,
grouping and selecting them is `argen.bench.questions` (the same for `argen bench`)."""

from __future__ import annotations

from pathlib import Path

from argen.errors import ArgenError

DEFAULT_QUESTIONS = Path("shared/benchmarks/spec_bench/question.jsonl")


def find_questions_file(start: Path | None = None) -> Path:
    """`shared/benchmarks/spec_bench/question.jsonl` in the current directory or one of its
    parents (the project keeps `shared/` next to its root), else next to this repository."""
    start = Path.cwd() if start is None else Path(start)
    here = Path(__file__).resolve()
    for directory in [start, *start.resolve().parents, *here.parents]:
        candidate = directory / DEFAULT_QUESTIONS
        if candidate.is_file():
            return candidate
    raise ArgenError(
        f"could not find the Spec-Bench questions ({DEFAULT_QUESTIONS}) in {str(start)!r} or its parents; "
        "pass --questions FILE (a JSONL file with question_id, category and turns on each line)"
    )
