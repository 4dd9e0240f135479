"""Questions in Spec-Bench's `question.jsonl` format (one JSON object a line: question_id, category,
turns): read from a path, filtered by category and limited per category. The benchmark harness
(`benchmarks/`) finds Spec-Bench's own file beside the repository."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from argen.errors import ArgenError

# Spec-Bench's tables count MT-bench's eight categories (10 questions each) as one, "mt_bench".
MT_BENCH = "mt_bench"
MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    prompt: str  # the first user turn


def read_questions(path: Path | str) -> list[Question]:
    path = Path(path)
    if not path.is_file():
        raise ArgenError(f"questions file {str(path)!r} does not exist; pass --questions FILE")
    questions = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                turns = item["turns"]
                if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
                    raise ValueError("'turns' must be a non-empty list of strings")
                questions.append(Question(item.get("question_id", number), str(item["category"]), turns[0]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ArgenError(
                    f"{path}:{number}: not a question ({exc}); each line is a JSON object with "
                    "'question_id', 'category' and 'turns' (a list of user turns)"
                ) from exc
    if not questions:
        raise ArgenError(f"questions file {str(path)!r} holds no questions")
    return questions


def group_mt_bench(questions: list[Question]) -> list[Question]:
    """The questions with MT-bench's eight categories relabelled `mt_bench`, as Spec-Bench reports
    them, and reordered round-robin over the eight so that the first N of `mt_bench` sample every
    one of them. The group takes the place of its first question; other categories keep theirs."""
    subgroups: dict[str, list[Question]] = {}
    for q in questions:
        if q.category in MT_BENCH_CATEGORIES:
            subgroups.setdefault(q.category, []).append(q)
    mixed = [Question(q.question_id, MT_BENCH, q.prompt) for q in _round_robin(list(subgroups.values()))]
    out: list[Question] = []
    for q in questions:
        if q.category not in MT_BENCH_CATEGORIES:
            out.append(q)
        elif mixed:
            out += mixed
            mixed = []
    return out


def select_questions(
    questions: list[Question], categories: list[str] | None = None, limit: int | None = None
) -> list[Question]:
    """The first `limit` questions of each category (all if None), categories in file order (or
    the given subset). The result interleaves the categories round-robin, so slow drift of the
    machine's load while the bench runs is spread over every category instead of hitting one."""
    by_category: dict[str, list[Question]] = {}
    for q in questions:
        by_category.setdefault(q.category, []).append(q)
    if categories:
        unknown = [c for c in categories if c not in by_category]
        if unknown:
            raise ArgenError(
                f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                f"the questions file has: {', '.join(by_category)}"
            )
        by_category = {c: by_category[c] for c in by_category if c in categories}
    if limit is not None:
        if limit < 1:
            raise ArgenError("--limit must be at least 1 (questions per category)")
        by_category = {c: qs[:limit] for c, qs in by_category.items()}
    return _round_robin(list(by_category.values()))


def _round_robin(groups: list[list[Question]]) -> list[Question]:
    """The first of each group, then the second of each, and so on."""
    longest = max((len(g) for g in groups), default=0)
    return [g[i] for i in range(longest) for g in groups if i < len(g)]


def bench_questions(
    path: Path | str, categories: list[str] | None, limit: int | None, mt_bench_as_one: bool = False
) -> list[Question]:
    """What a bench run asks: read, optionally group MT-bench, then select (see above)."""
    questions = read_questions(path)
    return select_questions(group_mt_bench(questions) if mt_bench_as_one else questions, categories, limit)
