"""An older commit's serving benchmark (`argen.bench.serving`, run with that commit's sources on
PYTHONPATH), patched at run time for what its harness had no option for: the server's pacing of long
prefills (ARGEN_OLD_SLOWDOWN; 0: unpaced) and a prefix cache emptied between the two phases, as today's
harness does (benchmarks/harness/serving.py). run.py starts it; the arguments are the old harness's."""

from __future__ import annotations

import os
import sys

import argen
import argen.bench.serving as bench
import argen.server.serve as serve

slowdown = float(os.environ.get("ARGEN_OLD_SLOWDOWN", "1.5"))
loaded = []
_load, _make_server, _metrics = argen.load, serve.make_server, bench._metrics


def load(*args, **kwargs):
    loaded.append(_load(*args, **kwargs))
    return loaded[-1]


def make_server(*args, **kwargs):
    return _make_server(*args, **kwargs, prefill_slowdown=slowdown or None)


def metrics(url):
    # The old harness reads the metrics once before the concurrent phase (and once after): the server
    # is idle there, so its prefix cache is emptied first, as today's harness does.
    if not getattr(metrics, "called", False):
        loaded[-1].runtime.kv_pool().drop_cached()
        metrics.called = True
    return _metrics(url)


argen.load, serve.make_server, bench._metrics = load, make_server, metrics
sys.exit(bench.main())
