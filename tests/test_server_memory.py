"""An idle server gives freed heap back to the system (server/memory.py): the trim really returns
pages on glibc, and the server's worker runs it once per idle period."""

from __future__ import annotations

import asyncio
import ctypes.util
import platform
import time

import pytest

from argen.server import memory
from argen.server import scheduler as server_scheduler

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not GLIBC or ctypes.util.find_library("c") is None, reason="malloc_trim is glibc's")
def test_the_trim_returns_free_heap_pages_that_malloc_keeps():
    """Freed chunks below a live one stay resident (malloc only trims the top of its heap by itself);
    release_free_memory hands them back. Fails if the trim is a no-op (e.g. it never calls
    malloc_trim, or calls it on a library that lacks it)."""
    blocks = [bytes(1000) for _ in range(100_000)]  # 100 MB of 1 kB chunks: malloc's heap, not mmap
    pin = bytes(1000)  # a live chunk above them keeps malloc from trimming the top by itself
    del blocks
    before = _rss_mb()
    assert memory.release_free_memory() is True
    after = _rss_mb()
    assert before - after > 50, (before, after)
    del pin


def test_the_worker_trims_once_per_idle_period(tiny, monkeypatch):
    """No trim before the first request, one a moment after the server goes idle, none while it stays
    idle, one again after the next request. Fails if the worker trims on every wake-up (a heap walk
    per step) or never."""
    from argen.jobs.runner import make_policy
    from argen.server.metrics import Metrics
    from argen.server.params import build_request
    from argen.server.protocol import CompletionRequest

    trims: list[float] = []
    monkeypatch.setattr(server_scheduler, "TRIM_AFTER_IDLE_S", 0.2)
    monkeypatch.setattr(server_scheduler, "release_free_memory", lambda: trims.append(time.monotonic()) or True)
    policy = make_policy(tiny, "tiny-random")
    body = {"model": "tiny-random", "prompt": "Hello there", "max_tokens": 4}
    worker = server_scheduler.Scheduler(tiny.engine, Metrics(), prefill_slowdown=None)

    async def one_request() -> None:
        (ticket,) = worker.submit_all(
            [build_request(tiny, CompletionRequest.model_validate(body), policy)], "completions"
        )
        while not isinstance(item := await ticket.queue.get(), server_scheduler.Result):
            assert not isinstance(item, Exception), item

    try:
        worker.start()
        time.sleep(0.5)
        assert trims == []  # nothing to give back yet
        asyncio.run(one_request())
        finished = time.monotonic()
        time.sleep(1.0)
        assert len(trims) == 1 and trims[0] - finished >= 0.1, trims
        asyncio.run(one_request())
        time.sleep(1.0)
        assert len(trims) == 2, trims
    finally:
        worker.stop(timeout=30)
