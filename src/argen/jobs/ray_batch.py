"""`argen batch --ray`: the same job on a Ray cluster with Ray Data.

The driver reads IN, skips what OUT holds, and answers lines that are not requests itself; the
requests go to a fixed pool of Ray actors (`--workers`), each holding one argen model and running
its share through its own JobRunner (the continuous-batching loop, as locally). Ray Data keeps the
blocks' order (`preserve_order`), and the driver writes OUT exactly as a local run does (in input
order, resumable), so the two give the same lines.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable, Iterator

from argen.distributed import connect, require_ray
from argen.jobs.lines import Job, error_line


class _Worker:
    """A Ray Data actor: one model, loaded once; each call runs a batch of requests."""

    def __init__(self, options: dict) -> None:
        from argen.jobs import make_runner

        self.runner = make_runner(options)

    def __call__(self, batch: dict) -> dict:
        jobs = [Job(int(index), int(line), str(cid), str(endpoint), json.loads(body))
                for index, line, cid, endpoint, body in zip(batch["index"], batch["line"], batch["custom_id"],
                                                            batch["endpoint"], batch["body"])]  # fmt: skip
        done = sorted(((job.index, json.dumps(out)) for job, out in self.runner.run(jobs)))
        return {"index": [index for index, _ in done], "out": [out for _, out in done]}


def ray_executor(args: argparse.Namespace) -> Callable[[list[Job], Callable[[int], None]], Iterator[tuple[Job, dict]]]:
    from argen.jobs import runner_options
    from argen.server.limits import Limits

    Limits.parse(args.limit)  # checked before anything starts
    ray = require_ray()
    started = connect(args.ray)
    options = runner_options(args)
    workers = args.workers or max(1, sum(1 for node in ray.nodes() if node.get("Alive")))

    def execute(todo: list[Job], on_tokens: Callable[[int], None]) -> Iterator[tuple[Job, dict]]:
        import ray.data

        try:
            by_index = {job.index: job for job in todo}
            requests = []
            for job in todo:
                if job.error is not None:  # not a request: no model needed to say so
                    yield job, error_line(job, job.error)
                else:
                    requests.append({"index": job.index, "line": job.line, "custom_id": job.custom_id,
                                     "endpoint": job.endpoint, "body": json.dumps(job.body)})  # fmt: skip
            if not requests:
                return
            per_call = min(args.rows_per_call, math.ceil(len(requests) / workers))  # every worker gets a share
            context = ray.data.DataContext.get_current()
            context.execution_options.preserve_order = True
            context.enable_progress_bars = False  # the job has its own
            context.print_on_execution_start = False
            logging.getLogger("ray.data").setLevel(logging.WARNING)  # its INFO lines would break the bar
            ds = ray.data.from_items(requests, override_num_blocks=math.ceil(len(requests) / per_call))
            ds = ds.map_batches(_Worker, fn_constructor_kwargs={"options": options}, batch_size=per_call,
                                compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=args.worker_cpus,
                                num_gpus=args.worker_gpus or None, batch_format="numpy")  # fmt: skip
            for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
                for index, out in zip(batch["index"], batch["out"]):
                    line = json.loads(str(out))
                    if line["error"] is None:
                        on_tokens(line["response"]["body"]["usage"]["completion_tokens"])
                    yield by_index[int(index)], line
        finally:
            if started:
                ray.shutdown()

    return execute
