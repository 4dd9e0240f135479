"""`argen batch IN.jsonl OUT.jsonl`: the options, converted once into a `BatchJob` (argen.jobs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from argen.cli.options import (
    add_model_options,
    add_request_policy_options,
    add_sampling_options,
    add_scheduler_options,
    check_scheduler_options,
    limits,
    model_spec,
    sampling_options,
    scheduler_options,
    strategy_spec,
)
from argen.errors import ArgenError

if TYPE_CHECKING:
    from argen.jobs import BatchJob

# argen.jobs (which builds on the server's modules: FastAPI) is imported by the functions below, not
# here: every `argen` command builds this parser, and only `argen batch` should pay for loading it.

# SamplingParams names -> OpenAI body fields
BODY_FIELDS = {"max_new_tokens": "max_tokens"}


def add_batch(sub) -> None:
    p = sub.add_parser(
        "batch",
        help="run a JSONL file of requests (OpenAI batch format), resumable",
        description="Run a file of requests through the continuous-batching loop, here or on a Ray "
        "cluster; results in OpenAI's batch output format, in input order.",
    )
    p.add_argument(
        "input",
        type=Path,
        metavar="IN.jsonl",
        help='requests, one a line: OpenAI batch lines ({"custom_id", "method", "url", "body"}), or '
        'plain prompts ({"prompt": "..."} or a JSON string; ids line-N)',
    )
    p.add_argument(
        "output",
        type=Path,
        metavar="OUT.jsonl",
        help="results in OpenAI's batch output format, in input order; if it exists, the custom_ids "
        "already in it are skipped and the rest appended (resume)",
    )
    add_model_options(p)
    p.add_argument(
        "--model-id",
        help="the model name request bodies must give (as 'model'; bodies without one get it) (default: --model)",
    )
    add_sampling_options(p, "each line's body decides (the server's defaults); plain prompts are greedy")
    p.add_argument(
        "--no-chat", action="store_true", help="plain prompts as raw text (/v1/completions), without the chat template"
    )
    add_scheduler_options(p)
    add_request_policy_options(p, "lines")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar with tokens/s (default: on a terminal)",
    )
    r = p.add_argument_group("Ray (pip install 'argen[ray]')")
    r.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        default=None,
        metavar="ADDRESS",
        help="run on a Ray cluster with Ray Data: ADDRESS of a running cluster, 'auto' ($RAY_ADDRESS "
        "or a cluster on this machine, else a new one), 'local' (a new one here); one argen model per worker. "
        "Give it after IN and OUT, or as --ray=ADDRESS",
    )
    r.add_argument("--workers", type=int, help="Ray workers, each holding the model (default: the cluster's nodes)")
    r.add_argument("--worker-cpus", type=float, default=1, help="CPUs per Ray worker (default: %(default)s)")
    r.add_argument("--worker-gpus", type=float, default=0, help="GPUs per Ray worker (default: %(default)s)")
    r.add_argument(
        "--rows-per-call",
        type=int,
        default=256,
        help="requests a Ray worker takes at a time (its batch); default: %(default)s",
    )
    p.set_defaults(handler=batch)


def body_fill(args: argparse.Namespace) -> dict:
    """Body fields given on the command line (they fill what a line's body leaves out)."""
    fill: dict[str, object] = {"model": args.model_id or args.model}
    fill.update({BODY_FIELDS.get(k, k): v for k, v in sampling_options(args).items()})
    if (strategy := strategy_spec(args)) is not None:
        fill["strategy"] = strategy
    return fill


def batch_job(args: argparse.Namespace) -> BatchJob:
    """The job the `batch` options describe, checked (before any model loads)."""
    from argen.jobs import BatchJob, RayOptions, RunnerOptions  # start-up cost: see the top of this module

    check_scheduler_options(args)
    if args.ray is None and args.workers is not None:
        raise ArgenError("--workers needs --ray")
    if (args.workers is not None and args.workers < 1) or args.rows_per_call < 1:
        raise ArgenError("--workers and --rows-per-call must be >= 1")
    runner = RunnerOptions(
        model_spec(args),
        args.model_id or args.model,
        **scheduler_options(args),
        draft_models=tuple(args.draft_model),
        guide_models=tuple(args.guide_model),
        draft_heads=tuple(args.draft_head),
        caad_stores=tuple(args.caad_store),
        small_models=tuple(args.small_model),
        limits=limits(args),
    )
    ray = None
    if args.ray is not None:
        ray = RayOptions(
            args.ray,
            workers=args.workers,
            worker_cpus=args.worker_cpus,
            worker_gpus=args.worker_gpus,
            rows_per_call=args.rows_per_call,
        )
    return BatchJob(
        args.input, args.output, runner, body_fill(args), chat=not args.no_chat, progress=args.progress, ray=ray
    )


def batch(args: argparse.Namespace) -> int:
    from argen.jobs import run_batch  # start-up cost: see the top of this module
    from argen.jobs.job import describe  # start-up cost, as above

    job = batch_job(args)
    try:
        summary = run_batch(job)
    except KeyboardInterrupt:  # Ctrl-C: OUT holds every line finished so far, in input order
        print(
            f"[interrupted: the lines finished so far are in {job.output}; run the same command again to "
            "resume (the lines already there are skipped)]",
            file=sys.stderr,
        )
        return 130
    print(describe(summary, job.output), file=sys.stderr)
    return 0
