"""`python -m benchmarks compare --merge DIR DIR ... --out DIR`: one report from runs over disjoint questions.

Why: a bench process runs on one CPU core (`--threads 1`, see docs/benchmarks.md), so a big bench is
split by category over several processes and its parts merged. Ratios stay honest because every
ratio is taken per question between systems run back to back in the same process; only the
per-category means combine records from different processes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from argen.errors import ArgenError
from benchmarks.harness import report
from benchmarks.harness.compare import PROG
from benchmarks.harness.provenance import portable_argv, portable_command, portable_path

# Settings that must agree for records to be comparable.
SAME = ("model", "max_new_tokens", "strategies", "dtypes", "hf_prompt_lookup", "greedy", "batch_size")


def _load(directory: Path) -> dict:
    path = directory / "results.json"
    if not path.is_file():
        raise ArgenError(f"{path} does not exist; --merge takes the --out directories of finished bench runs")
    return json.loads(path.read_text(encoding="utf-8"))


def merge(directories: list[Path], out: Path, allow_dirty: bool = False) -> dict[str, Path]:
    if len(directories) < 2:
        raise ArgenError("--merge needs at least two bench result directories")
    parts = [_load(Path(d)) for d in directories]
    first = parts[0]
    for directory, part in zip(directories[1:], parts[1:]):
        for key in SAME:
            if part["settings"].get(key) != first["settings"].get(key):
                raise ArgenError(
                    f"cannot merge {directory}: its {key} is {part['settings'].get(key)!r}, "
                    f"not {first['settings'].get(key)!r} as in {directories[0]}"
                )
        if [s["name"] for s in part["systems"]] != [s["name"] for s in first["systems"]]:
            raise ArgenError(f"cannot merge {directory}: it ran other systems than {directories[0]}")
        if part["machine"].get("git_commit") != first["machine"].get("git_commit"):
            raise ArgenError(
                f"cannot merge {directory}: it was measured at commit {part['machine'].get('git_commit')}, "
                f"{directories[0]} at {first['machine'].get('git_commit')}"
            )
    unclean = [str(d) for d, p in zip(directories, parts) if p["machine"].get("git_dirty") is not False]
    if unclean and not allow_dirty:
        raise ArgenError(
            f"{', '.join(unclean)}: measured from a working tree with uncommitted changes (or not "
            "recorded); pass --allow-dirty to merge them anyway, recorded as dirty"
        )
    seen: set[tuple] = set()
    records = []
    for directory, part in zip(directories, parts):
        for record in part["records"]:
            key = (record["category"], record["question_id"])
            if key in seen:
                raise ArgenError(f"question {key[1]} ({key[0]}) is in more than one of the runs ({directory})")
            seen.add(key)
            records.append(record)
    categories: dict[str, int] = {}
    for part in parts:
        for category, n in part["settings"]["categories"].items():
            categories[category] = categories.get(category, 0) + n
    settings = first["settings"] | {
        "questions_count": len(records),
        "categories": categories,
        "merged_from": [portable_path(Path(d).resolve()) for d in directories],
    }
    systems = first["systems"]
    summary = report.summarize(records, systems)
    merge_command = portable_command(
        [
            *PROG.split(),
            "--merge",
            *(str(Path(d).resolve()) for d in directories),
            "--out",
            str(out.resolve()),
            *(["--allow-dirty"] if allow_dirty else []),
        ]
    )
    command = "\n".join([*(p["command"] for p in parts), merge_command])
    machine = first["machine"] | {"merged_runs": len(parts)}
    if unclean:
        machine["git_dirty"] = True
    paths = report.write_all(out, command, portable_argv(sys.argv), machine, settings, systems, records, summary)
    report.print_summary(summary, records)
    return paths
