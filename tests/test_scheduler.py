"""The one admission (engine/scheduler.py): first come first served, a cap on sequences (a request's
n samples take n), worst-case KV blocks, the n samples of a prompt together; tested without HTTP,
and run the same way by the server's worker and `argen batch`."""

from __future__ import annotations

import asyncio

import pytest

from argen.engine import DecodeBatch, Event, Request, Result
from argen.engine import scheduler as core
from argen.engine.scheduler import Scheduler, Waiting
from argen.sampling import SamplingParams
from argen.strategies import make_strategy


def _request(tiny, text: str, n: int = 1, new: int = 8) -> Request:
    return Request(
        tiny.encode(text, chat=False), SamplingParams(max_new_tokens=new, temperature=0), make_strategy("plain"), n=n
    )


def _queue(tiny, ns: list[int], kv_blocks: int | None = None, cap: int | None = 4) -> Scheduler:
    scheduler = Scheduler(DecodeBatch(tiny.engine, prefix_caching=False, kv_blocks=kv_blocks), max_sequences=cap)
    for i, n in enumerate(ns):
        scheduler.add(Waiting(i, _request(tiny, f"prompt {i} " * 3, n)))
    return scheduler


def _drain(scheduler: Scheduler) -> list[list[int]]:
    """Run to the end; the indices admitted before each round."""
    rounds = []
    try:
        while scheduler.busy():
            taken = scheduler.take()
            for entry in taken:
                scheduler.admit(entry)
            rounds.append([e.index for e in taken])
            scheduler.step()
    finally:
        scheduler.batch.remove(list(scheduler.batch.sequences))
    return rounds


def test_the_head_waits_and_nobody_jumps_the_line(tiny):
    """Cap 4: requests of n = 1, 2, 3, 1 -> the first two (3 slots) join; the third (3) waits, and so
    does the fourth though one slot is free (a scheduler that skipped a blocked head admits it)."""
    scheduler = _queue(tiny, [1, 2, 3, 1])
    assert [e.index for e in scheduler.take()] == [0, 1]
    assert [e.request.n for e in scheduler.waiting] == [3, 1]


def test_a_request_s_samples_count_as_sequences_until_they_finish(tiny):
    """The cap counts sequences: before the prefill forks a request of n = 3 it holds 3 slots, and after
    it its 3 samples do; a request of n = 2 waits beside them under a cap of 4."""
    scheduler = _queue(tiny, [3, 2])
    (first,) = scheduler.take()
    scheduler.admit(first)
    assert scheduler.batch.slots() == 3 and scheduler.take() == []
    scheduler.step()  # the prompt is prefilled and forked
    assert len(scheduler.batch) == 3 and scheduler.batch.slots() == 3 and scheduler.take() == []
    _drain(scheduler)


def test_a_lone_request_larger_than_the_cap_runs_by_itself(tiny):
    """n = 6 under a cap of 4 runs alone rather than never; the next request waits for it to finish."""
    rounds = _drain(_queue(tiny, [6, 1]))
    assert rounds[0] == [0] and [1] in rounds[1:] and all(r == [] for r in rounds[1 : rounds.index([1])])


def test_kv_memory_for_the_worst_case_bounds_admission(tiny):
    """With KV blocks for two requests' worst cases, the third waits for one of them to finish (the
    sequence cap alone would take all three)."""
    probe = DecodeBatch(tiny.engine, prefix_caching=False)
    need = probe.blocks_needed(_request(tiny, "prompt 0 " * 3))
    scheduler = _queue(tiny, [1, 1, 1], kv_blocks=2 * need + need // 2, cap=None)
    assert [e.index for e in scheduler.take()] == [0, 1]
    _drain(scheduler)


# -- the server's worker and `argen batch` admit the same way -------------------------------------
def _bodies() -> list[dict]:
    """24 completions: prompts of 1 to ~90 tokens, 2 to 14 new tokens, some sampled, some with n > 1."""
    bodies = []
    for i in range(24):
        body = {
            "model": "tiny-random",
            "prompt": f"request {i}: " + "the mill by the river " * (i % 7) * 2,
            "max_tokens": 2 + (5 * i) % 13,
            "ignore_eos": True,
            "temperature": 0,
        }
        if i % 5 == 1:
            body |= {"temperature": 0.8, "seed": i}
        if i % 6 == 2:
            body |= {"n": 2 + i % 2, "temperature": 0.9, "seed": 100 + i}
        bodies.append(body)
    return bodies


OPTIONS = {"max_batch": 5, "prefill_chunk": 32, "step_tokens": 64, "prefix_caching": True}


def _record(monkeypatch) -> list[tuple[int, int]]:
    """(round, request index) of every admission, in order."""
    admitted: list[tuple[int, int]] = []
    admit = core.Scheduler.admit

    def recording(self, entry):
        admitted.append((self.rounds, entry.index))
        return admit(self, entry)

    monkeypatch.setattr(core.Scheduler, "admit", recording)
    return admitted


def _through_batch(tiny, bodies) -> dict[tuple[int, int], str]:
    from argen.jobs.lines import Job
    from argen.jobs.runner import JobRunner, make_policy

    runner = JobRunner(tiny, make_policy(tiny, "tiny-random"), **OPTIONS)
    jobs = [Job(i, i + 1, f"r{i}", "completions", body) for i, body in enumerate(bodies)]
    texts = {}
    for job, line in runner.run(jobs):
        assert line["error"] is None, line
        for choice in line["response"]["body"]["choices"]:
            texts[(job.index, choice["index"])] = choice["text"]
    return texts


def _through_server(tiny, bodies) -> dict[tuple[int, int], str]:
    from argen.jobs.runner import make_policy
    from argen.server.metrics import Metrics
    from argen.server.params import build_request
    from argen.server.protocol import CompletionRequest
    from argen.server.scheduler import Scheduler as ServerScheduler

    policy = make_policy(tiny, "tiny-random")
    requests = [build_request(tiny, CompletionRequest.model_validate(body), policy) for body in bodies]
    # No pacing: it decides by wall time, which no two runs share (`argen batch` never paces).
    server = ServerScheduler(tiny.engine, Metrics(), max_queue=64, prefill_slowdown=None, **OPTIONS)

    async def run() -> dict[tuple[int, int], str]:
        tickets = server.submit_all(requests, "completions")  # one line, as when all 24 are waiting
        texts, left = {}, sum(r.n for r in requests)
        while left:
            item = await tickets[0].queue.get()  # the tickets of one submit_all share a queue
            if isinstance(item, Exception):
                raise item
            if isinstance(item, Result):
                texts[(item.index, item.sample_index)] = item.text
                left -= 1
            else:
                assert isinstance(item, Event)
        return texts

    try:
        return asyncio.run(run())
    finally:
        server.stop(timeout=30)


def test_the_server_and_argen_batch_admit_the_same_24_requests_alike(tiny, monkeypatch):
    """The same 24 requests through the server's worker (no HTTP) and through `argen batch`: the same
    requests join in the same rounds, and every sample's output is the same. Fails if either counts
    `--max-batch` otherwise (e.g. requests, not sequences) or skips the blocked head of the line."""
    bodies = _bodies()
    pool = tiny.runtime.kv_pool()
    pool.drop_cached()
    admitted = _record(monkeypatch)
    batch_texts = _through_batch(tiny, bodies)
    batch_order, admitted[:] = list(admitted), []
    pool.drop_cached()
    server_texts = _through_server(tiny, bodies)
    pool.drop_cached()
    assert sorted(i for _, i in batch_order) == list(range(24))
    assert len({r for r, _ in batch_order}) > 3  # the premise: the cap makes requests wait for rounds
    assert admitted == batch_order
    assert len(batch_texts) == sum(body.get("n", 1) for body in bodies)
    assert server_texts == batch_texts


@pytest.mark.parametrize("cap", [0, -1])
def test_a_sequence_cap_below_one_is_refused(tiny, cap):
    with pytest.raises(ValueError, match="max_sequences must be >= 1"):
        Scheduler(DecodeBatch(tiny.engine), max_sequences=cap)
