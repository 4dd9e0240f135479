"""`argen batch --ray`: the same job on a Ray cluster with Ray Data.

The driver reads IN, skips what OUT holds, and answers lines that are not requests itself; the
requests go to a fixed pool of Ray actors (`--workers`), each holding one argen model and running
its share through its own JobRunner (the continuous-batching loop, as locally). Ray Data keeps the
blocks' order (`preserve_order`), and the driver writes OUT exactly as a local run does (in input
order, resumable), so the two give the same lines.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from argen.distributed import connect, require_ray
from argen.jobs.lines import Job, error_line
from argen.jobs.runner import RunnerOptions, make_runner


@dataclass(frozen=True)
class RayOptions:
    """Where and how `argen batch --ray` runs: the cluster's `address` ('auto': $RAY_ADDRESS or one on
    this machine, else a new one; 'local': a new one here), `workers` each holding the model (None:
    one per node), their CPUs and GPUs, and the requests a worker takes at a time."""

    address: str = "auto"
    workers: int | None = None
    worker_cpus: float = 1
    worker_gpus: float = 0
    rows_per_call: int = 256


class _Worker:
    """A Ray Data actor: one model, loaded once; each call runs a batch of requests."""

    def __init__(self, options: RunnerOptions) -> None:
        self.runner = make_runner(options)

    def __call__(self, batch: dict) -> dict:
        jobs = [
            Job(int(index), int(line), str(cid), str(endpoint), json.loads(body))
            for index, line, cid, endpoint, body in zip(
                batch["index"], batch["line"], batch["custom_id"], batch["endpoint"], batch["body"]
            )
        ]
        done = sorted(((job.index, json.dumps(out)) for job, out in self.runner.run(jobs)))
        return {"index": [index for index, _ in done], "out": [out for _, out in done]}


def ray_executor(
    cluster: RayOptions, options: RunnerOptions
) -> Callable[[list[Job], Callable[[int], None]], Iterator[tuple[Job, dict]]]:
    ray = require_ray()
    started = connect(cluster.address)
    workers = cluster.workers or max(1, sum(1 for node in ray.nodes() if node.get("Alive")))

    def execute(todo: list[Job], on_tokens: Callable[[int], None]) -> Iterator[tuple[Job, dict]]:
        import ray.data

        try:
            by_index = {job.index: job for job in todo}
            requests = []
            for job in todo:
                if job.error is not None:  # not a request: no model needed to say so
                    yield job, error_line(job, job.error)
                else:
                    requests.append(
                        {
                            "index": job.index,
                            "line": job.line,
                            "custom_id": job.custom_id,
                            "endpoint": job.endpoint,
                            "body": json.dumps(job.body),
                        }
                    )
            if not requests:
                return
            per_call = min(cluster.rows_per_call, math.ceil(len(requests) / workers))  # every worker gets a share
            context = ray.data.DataContext.get_current()
            context.execution_options.preserve_order = True
            context.enable_progress_bars = False  # the job has its own
            context.print_on_execution_start = False
            logging.getLogger("ray.data").setLevel(logging.WARNING)  # its INFO lines would break the bar
            ds: ray.data.Dataset = ray.data.from_items(
                requests, override_num_blocks=math.ceil(len(requests) / per_call)
            )
            ds = ds.map_batches(
                _Worker,
                fn_constructor_kwargs={"options": options},
                batch_size=per_call,
                compute=ray.data.ActorPoolStrategy(size=workers),
                num_cpus=cluster.worker_cpus,
                num_gpus=cluster.worker_gpus or None,
                batch_format="numpy",
            )
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
