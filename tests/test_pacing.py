"""Long prefills paced so that they do not stall the other sequences (engine/pacing.py): the bound on
the others' slowdown, on a simulated clock, and what the decode loop does with the pacer's answers."""

from __future__ import annotations

import pytest

from argen.engine import DecodeBatch, Event, Request
from argen.engine.pacing import ACTIVE_SECONDS, PrefillPacer
from argen.sampling import SamplingParams
from argen.strategies import make_strategy


def simulate(pacer: PrefillPacer, own: float, chunk: float, chunks: int, gap: float = 0.0) -> tuple[float, float]:
    """A steady client (a request of 16 rounds of `own` seconds; the next one arrives `gap` seconds
    after each ends, the batch meanwhile holding the long prompt alone) beside a long prompt of
    `chunks` chunks (`chunk` seconds each), until the prompt is in: (the client's time in requests,
    its own time)."""
    wall, waited, own_total, rounds = 0.0, 0.0, 0.0, 0
    while chunks:
        rounds += 1
        if gap and rounds % 16 == 0:  # between two requests
            arrives = wall + gap
            start = pacer.resume_at() if pacer.holds(others=False, now=wall) else wall
            if start < arrives:  # a chunk starts in the gap: the next request waits for it
                chunks -= 1
                pacer.record(chunk, long_chunks=True, others=False, now=start + chunk)
                waited += max(0.0, start + chunk - arrives)
                wall = max(arrives, start + chunk)
            else:
                wall = arrives
            continue
        long = not pacer.holds(others=True, now=wall)
        seconds = own + (chunk if long else 0.0)
        chunks -= long
        pacer.record(seconds, long_chunks=long, others=True, now=wall + seconds)
        wall, waited, own_total = wall + seconds, waited + seconds, own_total + own
    return waited, own_total


@pytest.mark.parametrize(
    "slowdown, own, chunk", [(1.5, 0.012, 0.7), (2.0, 0.012, 0.7), (1.5, 0.05, 0.02), (1.2, 0.03, 1.3)]
)
@pytest.mark.parametrize("gap", [0.0, 0.01])
def test_the_others_are_slowed_by_at_most_the_bound_and_one_chunk(slowdown, own, chunk, gap):
    """Bug it guards against: a pacer that lets a long chunk run every round (the 0.2 s -> 67 s
    stall), or one that lets chunks run whenever the others are between two requests (a steady client
    then met a whole chunk at the start of every request). The client's time in requests stays within
    slowdown x its own time plus one chunk, and the long prompt still gets in."""
    waited, own_total = simulate(PrefillPacer(slowdown), own, chunk, chunks=16, gap=gap)
    assert waited <= slowdown * own_total + chunk + 1e-9


def test_alone_for_long_enough_a_long_prompt_is_not_paced():
    pacer = PrefillPacer(1.5)
    assert not pacer.holds(others=True, now=0.0)
    pacer.record(5.0, long_chunks=True, others=True, now=5.0)  # a chunk beside another request
    assert pacer.holds(others=False, now=5.0)  # that request's client is between two requests: wait
    assert pacer.resume_at() == pytest.approx(min(5.0 + 5.0 / pacer.share, 5.0 + ACTIVE_SECONDS))
    assert not pacer.holds(others=False, now=5.0 + ACTIVE_SECONDS)  # nobody active since: full speed
    pacer.record(5.0, long_chunks=True, others=False, now=11.0 + ACTIVE_SECONDS)
    assert pacer.debt == 0 and not pacer.holds(others=True, now=12.0 + ACTIVE_SECONDS)
    with pytest.raises(ValueError, match="more than 1"):
        PrefillPacer(1.0)


class Refusing(PrefillPacer):
    """A pacer that never lets a long chunk run while others share the round."""

    def holds(self, others: bool, now: float) -> bool:
        return others


def _run(batch: DecodeBatch, requests: dict[int, Request]) -> tuple[dict[int, list[int]], dict[int, int]]:
    for index, request in requests.items():
        batch.admit(index, request)
    out: dict[int, list[int]] = {}
    first: dict[int, int] = {}
    rounds = 0
    while batch:
        rounds += 1
        for item in batch.step():
            if isinstance(item, Event) and item.token_ids:
                first.setdefault(item.index, rounds)
                out.setdefault(item.index, []).extend(item.token_ids)
    return out, first


def _request(tiny, prompt, new: int) -> Request:
    ids = tiny.encode(prompt, chat=False) if isinstance(prompt, str) else prompt
    return Request(ids, SamplingParams(max_new_tokens=new, ignore_eos=True), make_strategy("plain"))


def test_a_held_back_prompt_waits_for_the_others_and_changes_no_output(tiny):
    """While a sequence decodes, a pacer that refuses holds the long prompt's chunks back (it starts
    after the decoder is done); a short prompt is never held back; the outputs are those of running
    each alone (chunk boundaries do not move)."""
    long_prompt = [(7 * i) % 200 + 1 for i in range(600)]

    def requests():
        return {0: _request(tiny, "decoding", 24), 1: _request(tiny, long_prompt, 4), 2: _request(tiny, "short one", 4)}

    paced, first = _run(
        DecodeBatch(tiny.engine, token_budget=1024, prefill_chunk=128, prefix_caching=False, pacer=Refusing()),
        requests(),
    )
    assert first[1] > 24, "the long prompt ran while another sequence was decoding"
    assert first[2] <= 2, "the short prompt was held back"
    plain, first_unpaced = _run(
        DecodeBatch(tiny.engine, token_budget=1024, prefill_chunk=128, prefix_caching=False), requests()
    )
    assert first_unpaced[1] <= 6  # the control: unpaced, its 5 chunks run at once beside the decoder
    assert paced == plain
    for index, request in requests().items():
        alone = tiny.engine.run([request])[0]
        assert paced[index] == alone.token_ids
