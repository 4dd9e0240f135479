"""`argen batch IN.jsonl OUT.jsonl`: a file of requests through the continuous-batching loop, on
this machine or (with `RayOptions`) on a Ray cluster. Formats: lines.py; order and resume: job.py;
the loop: runner.py; Ray Data: ray_batch.py. The command line (`argen.cli.batch`) builds a
`BatchJob`; this package never sees its options."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from argen.errors import ArgenError
from argen.jobs.job import Summary, plan, run_job
from argen.jobs.ray_batch import RayOptions, ray_executor
from argen.jobs.runner import RunnerOptions, make_runner

__all__ = ["BatchJob", "RayOptions", "RunnerOptions", "run_batch"]


@dataclass(frozen=True)
class BatchJob:
    """One `argen batch` run: IN, OUT, the runners' options, the body fields that fill what a line's
    body leaves out (`fill`), and where it runs (`ray`: None runs here)."""

    input: Path
    output: Path
    runner: RunnerOptions
    fill: dict = field(default_factory=dict)
    chat: bool = True  # plain prompts through the chat template (/v1/chat/completions)
    progress: bool | None = None  # a progress bar (None: on a terminal)
    ray: RayOptions | None = None


def run_batch(job: BatchJob, on_line: Callable[[dict], None] | None = None) -> Summary:
    """Run `job`; returns its Summary. `on_line` sees each output line once written."""
    if job.input.resolve() == job.output.resolve():
        raise ArgenError("IN and OUT are the same file; write the results elsewhere")
    todo, summary = plan(job.input, job.output, job.fill, chat=job.chat)
    if not todo:
        return summary
    execute = make_runner(job.runner).run if job.ray is None else ray_executor(job.ray, job.runner)
    return run_job(todo, job.output, summary, execute, progress=job.progress, on_line=on_line)
