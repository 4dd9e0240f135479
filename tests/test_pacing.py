"""Long prefills paced so that they do not stall the other sequences (engine/pacing.py): the bound on
the others' slowdown, on a simulated clock, and what the decode loop does with the pacer's answers."""

from __future__ import annotations

import pytest

from argen.engine import DecodeBatch, Event, Request
from argen.engine.pacing import PrefillPacer
from argen.sampling import SamplingParams
from argen.strategies import make_strategy


def simulate(pacer: PrefillPacer, own: float, chunk: float, chunks: int) -> tuple[float, int]:
    """Rounds of one decoding sequence (`own` seconds a round) beside a long prompt of `chunks` chunks
    (`chunk` seconds each) until the prompt is in: (the decoder's wall time, its rounds)."""
    wall, rounds = 0.0, 0
    while chunks:
        long = pacer.allows()
        seconds = own + (chunk if long else 0.0)
        chunks -= long
        pacer.record(seconds, long_chunks=long, others=True)
        wall, rounds = wall + seconds, rounds + 1
    return wall, rounds


@pytest.mark.parametrize("slowdown, own, chunk", [(1.5, 0.012, 0.7), (2.0, 0.012, 0.7), (1.5, 0.05, 0.02),
                                                  (1.2, 0.03, 1.3)])  # fmt: skip
def test_the_others_are_slowed_by_at_most_the_bound_and_one_chunk(slowdown, own, chunk):
    """Bug it guards against: a pacer that lets a long chunk run every round (the 0.2 s -> 67 s stall),
    or that counts the allowance twice. The decoder's time stays within slowdown x its own time plus
    one chunk, and the long prompt still gets in."""
    wall, rounds = simulate(PrefillPacer(slowdown), own, chunk, chunks=16)
    assert wall <= slowdown * rounds * own + chunk + 1e-9
    assert wall >= (slowdown - 0.05) * rounds * own or chunk < own  # and it uses the allowance it has


def test_rounds_without_others_are_not_paced():
    pacer = PrefillPacer(1.5)
    pacer.record(0.01, long_chunks=False, others=True)
    pacer.record(5.0, long_chunks=True, others=False)  # a long prompt alone: nobody's loss
    assert pacer.allows()
    pacer.record(5.0, long_chunks=True, others=True)
    assert not pacer.allows()
    with pytest.raises(ValueError, match="more than 1"):
        PrefillPacer(1.0)


class Refusing(PrefillPacer):
    """A pacer that never lets a long chunk run while others share the round."""

    def allows(self) -> bool:
        return False


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
    requests = lambda: {0: _request(tiny, "decoding", 24), 1: _request(tiny, long_prompt, 4),  # noqa: E731
                        2: _request(tiny, "short one", 4)}  # fmt: skip
    paced, first = _run(DecodeBatch(tiny.engine, token_budget=1024, prefill_chunk=128, prefix_caching=False,
                                    pacer=Refusing()), requests())  # fmt: skip
    assert first[1] > 24, "the long prompt ran while another sequence was decoding"
    assert first[2] <= 2, "the short prompt was held back"
    plain, first_unpaced = _run(DecodeBatch(tiny.engine, token_budget=1024, prefill_chunk=128, prefix_caching=False),
                                requests())  # fmt: skip
    assert first_unpaced[1] <= 6  # the control: unpaced, its 5 chunks run at once beside the decoder
    assert paced == plain
    for index, request in requests().items():
        alone = tiny.engine.run([request])[0]
        assert paced[index] == alone.token_ids
