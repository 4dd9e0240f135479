"""One batch job: the input's requests not yet in OUT, run by an executor (the local JobRunner, or
Ray), their output lines appended to OUT in input order, with a progress bar.

Order and resume go together: a line is written only once every line before it is written (the
ones that finish early wait in memory), so OUT is always a prefix of the job in input order, and a
rerun appends the rest after it. Each line is written whole and flushed; if the process dies
mid-line, the rerun cuts that partial line off (`done_ids`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from argen.jobs.lines import Job, done_ids, encode_line, read_jobs

# jobs, on_tokens -> (job, output line) for each job, in any order
Executor = Callable[[list[Job], Callable[[int], None]], Iterable[tuple[Job, dict]]]


@dataclass
class Summary:
    total: int = 0  # requests in the input
    skipped: int = 0  # already in OUT
    written: int = 0  # lines written by this run
    errors: int = 0  # of those, lines with an error
    tokens: int = 0
    seconds: float = 0.0


class OrderedWriter:
    """Writes output lines in the jobs' order, however they arrive."""

    def __init__(self, out: TextIO, jobs: list[Job]) -> None:
        self.out, self.order = out, [job.index for job in jobs]
        self.next = 0
        self.waiting: dict[int, dict] = {}

    def add(self, job: Job, line: dict) -> Iterator[dict]:
        """Buffer `line`; write (and yield) every line now ready."""
        self.waiting[job.index] = line
        while self.next < len(self.order) and self.order[self.next] in self.waiting:
            ready = self.waiting.pop(self.order[self.next])
            self.out.write(encode_line(ready))  # one whole line per write
            self.out.flush()
            self.next += 1
            yield ready


def plan(in_path: Path, out_path: Path, fill: dict, chat: bool) -> tuple[list[Job], Summary]:
    """The input's jobs not yet in OUT (checked before any model is loaded)."""
    jobs = read_jobs(in_path, fill, chat)
    done = done_ids(out_path)
    todo = [job for job in jobs if job.custom_id not in done]
    return todo, Summary(total=len(jobs), skipped=len(jobs) - len(todo))


def run_job(
    todo: list[Job],
    out_path: Path,
    summary: Summary,
    execute: Executor,
    *,
    progress: bool | None = None,
    on_line: Callable[[dict], None] | None = None,
) -> Summary:
    """Run `todo` with `execute`, appending to OUT in order. `progress`: None shows the bar on a
    terminal only. `on_line` sees each line once written (tests use it to interrupt a job)."""
    start = time.perf_counter()
    bar = tqdm(
        total=len(todo),
        unit="req",
        desc="batch",
        disable=(not sys.stderr.isatty()) if progress is None else not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )

    def on_tokens(n: int) -> None:
        summary.tokens += n

    try:
        with open(out_path, "a", encoding="utf-8") as out:
            writer = OrderedWriter(out, todo)
            for job, line in execute(todo, on_tokens):
                for written in writer.add(job, line):
                    summary.written += 1
                    summary.errors += written["error"] is not None
                    bar.update(1)
                    elapsed = time.perf_counter() - start
                    bar.set_postfix_str(
                        f"{summary.tokens / max(elapsed, 1e-9):.1f} tok/s, {summary.errors} errors", refresh=False
                    )
                    if on_line is not None:
                        on_line(written)
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - start
    return summary


def describe(summary: Summary, out_path: Path) -> str:
    if not summary.written and summary.skipped == summary.total:
        return f"[nothing to do: all {summary.total} requests are in {out_path} already]"
    rate = summary.tokens / summary.seconds if summary.seconds > 0 else 0.0
    skipped = f", {summary.skipped} already there" if summary.skipped else ""
    return (
        f"[{summary.written} lines written to {out_path} ({summary.errors} errors){skipped}; "
        f"{summary.tokens} tokens in {summary.seconds:.1f} s, {rate:.1f} tok/s]"
    )
