"""`argen batch IN.jsonl OUT.jsonl`: a file of requests through the continuous-batching loop, on
this machine or (`--ray`) on a Ray cluster. Formats: lines.py; order and resume: job.py; the loop:
runner.py; Ray Data: ray_batch.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from argen.cliargs import add_model_args, add_sampling_args, model_kwargs, sampling_options, strategy_spec
from argen.errors import ArgenError

# SamplingParams names -> OpenAI body fields
BODY_FIELDS = {"max_new_tokens": "max_tokens"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, metavar="IN.jsonl",
                   help='requests, one a line: OpenAI batch lines ({"custom_id", "method", "url", "body"}), or '
                        'plain prompts ({"prompt": "..."} or a JSON string; ids line-N)')  # fmt: skip
    p.add_argument("output", type=Path, metavar="OUT.jsonl",
                   help="results in OpenAI's batch output format, in input order; if it exists, the custom_ids "
                        "already in it are skipped and the rest appended (resume)")  # fmt: skip
    add_model_args(p)
    p.add_argument("--model-id", help="the model name request bodies must give (as 'model'; bodies without one "
                   "get it) (default: --model)")  # fmt: skip
    add_sampling_args(p, "each line's body decides (the server's defaults); plain prompts are greedy")
    p.add_argument("--no-chat", action="store_true", help="plain prompts as raw text (/v1/completions), "
                   "without the chat template")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoding at once: a request's n samples take n (default: %(default)s)")
    p.add_argument("--prefill-chunk", type=int, default=512, help="see 'argen serve --help' (default: %(default)s)")
    p.add_argument("--step-tokens", type=int, default=1024, help="see 'argen serve --help' (default: %(default)s)")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="compute every prompt in full instead of reusing blocks of a prefix seen before")
    p.add_argument("--draft-model", action="append", default=[], metavar="NAME=SOURCE",
                   help="a draft model lines may name (as in 'argen serve'; repeatable)")
    p.add_argument("--guide-model", action="append", default=[], metavar="NAME=SOURCE",
                   help="a guide model lines may name (as in 'argen serve'; repeatable)")
    p.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                   help="raise or lower a cap on a strategy option, as in 'argen serve' (repeatable)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar with tokens/s (default: on a terminal)")
    r = p.add_argument_group("Ray (pip install 'argen[ray]')")
    r.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster with Ray Data: ADDRESS of a running cluster, 'auto' ($RAY_ADDRESS "
                        "or a cluster on this machine, else a new one), 'local' (a new one here); one argen model per worker. "
                        "Give it after IN and OUT, or as --ray=ADDRESS")  # fmt: skip
    r.add_argument("--workers", type=int, help="Ray workers, each holding the model (default: the cluster's nodes)")
    r.add_argument("--worker-cpus", type=float, default=1, help="CPUs per Ray worker (default: %(default)s)")
    r.add_argument("--worker-gpus", type=float, default=0, help="GPUs per Ray worker (default: %(default)s)")
    r.add_argument("--rows-per-call", type=int, default=256,
                   help="requests a Ray worker takes at a time (its batch); default: %(default)s")


def body_fill(args: argparse.Namespace) -> dict:
    """Body fields given on the command line (they fill what a line's body leaves out)."""
    fill: dict[str, object] = {"model": args.model_id or args.model}
    fill.update({BODY_FIELDS.get(k, k): v for k, v in sampling_options(args).items()})
    if (strategy := strategy_spec(args)) is not None:
        fill["strategy"] = strategy
    return fill


def check(args: argparse.Namespace) -> None:
    if args.max_batch < 1 or args.prefill_chunk < 0 or args.step_tokens < 0:
        raise ArgenError("--max-batch must be >= 1, --prefill-chunk and --step-tokens >= 0 (0: off)")
    if args.input.resolve() == args.output.resolve():
        raise ArgenError("IN and OUT are the same file; write the results elsewhere")
    if args.ray is None and (args.workers is not None):
        raise ArgenError("--workers needs --ray")
    if (args.workers is not None and args.workers < 1) or args.rows_per_call < 1:
        raise ArgenError("--workers and --rows-per-call must be >= 1")


def run(args: argparse.Namespace) -> int:
    from argen.jobs.job import describe

    try:
        summary = run_batch(args)
    except KeyboardInterrupt:  # Ctrl-C: OUT holds every line finished so far, in input order
        print(f"[interrupted: the lines finished so far are in {args.output}; run the same command again to "
              "resume (the lines already there are skipped)]", file=sys.stderr)  # fmt: skip
        return 130
    print(describe(summary, args.output), file=sys.stderr)
    return 0


def run_batch(args: argparse.Namespace, on_line=None):
    """The job `args` describe (the `batch` command's options); returns its Summary. `on_line` sees
    each output line once written."""
    from argen.jobs.job import plan, run_job

    check(args)
    todo, summary = plan(args.input, args.output, body_fill(args), chat=not args.no_chat)
    if not todo:
        return summary
    if args.ray is not None:
        from argen.jobs.ray_batch import ray_executor

        execute = ray_executor(args)
    else:
        execute = local_executor(args)
    return run_job(todo, args.output, summary, execute, progress=args.progress, on_line=on_line)


def runner_options(args: argparse.Namespace) -> dict:
    """JobRunner / model options, plain values (they travel to Ray workers)."""
    return {"model": args.model, "model_id": args.model_id or args.model, "load": model_kwargs(args),
            "max_batch": args.max_batch, "prefill_chunk": args.prefill_chunk or None,
            "step_tokens": args.step_tokens or None, "prefix_caching": args.prefix_caching,
            "draft_model": list(args.draft_model), "guide_model": list(args.guide_model), "limit": list(args.limit)}  # fmt: skip


def make_runner(options: dict):
    """A JobRunner over a freshly loaded model (in this process or a Ray worker)."""
    from argen.api import load
    from argen.jobs.runner import JobRunner, make_policy
    from argen.server.companions import Companions
    from argen.server.limits import Limits

    limits = Limits.parse(options["limit"])
    gen = load(options["model"], **options["load"])
    companions = Companions.load(gen, options["model_id"], options["draft_model"], options["guide_model"])
    return JobRunner(gen, make_policy(gen, options["model_id"], limits, companions), max_batch=options["max_batch"],
                     prefill_chunk=options["prefill_chunk"], step_tokens=options["step_tokens"],
                     prefix_caching=options["prefix_caching"])  # fmt: skip


def local_executor(args: argparse.Namespace):
    from argen.server.limits import Limits

    Limits.parse(args.limit)  # checked before the (slow) model load
    runner = make_runner(runner_options(args))
    return runner.run
