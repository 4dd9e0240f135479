"""Image requests in the one decode loop (engine/images.py): admitted by the Scheduler in the same line
as text, their images counted as rows against the sequence cap, compatible requests of different
callers decoded as rows of one batch, every image batch stepped one pass a round beside the text
rows. Tiny random models (tests/image_helpers.py, the tiny text model); no HTTP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from image_helpers import tiny_image_models

from argen.engine import DecodeBatch, Event, ImageRequest, ImagesDone, Request, Result
from argen.engine.scheduler import Scheduler, Waiting
from argen.sampling import SamplingParams
from argen.strategies import make_strategy

SPECULATIVE = {"name": "speculative", "k": 3}


@pytest.fixture(scope="module")
def models():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is as fast, and the machine is shared
    yield tiny_image_models()
    torch.set_num_threads(threads)


def _images(gen, labels: list[int], seed: int, strategy: object = "plain") -> ImageRequest:
    request = ImageRequest(gen, labels, strategy, seed)
    request.check()
    return request


def _text(tiny, new: int) -> Request:
    params = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    return Request(tiny.encode("a b c", chat=False), params, make_strategy("plain"))


def _scheduler(tiny, cap: int | None, *requests) -> Scheduler:
    scheduler = Scheduler(DecodeBatch(tiny.engine, prefix_caching=False), max_sequences=cap)
    for i, request in enumerate(requests):
        scheduler.add(Waiting(i, request))
    return scheduler


def _admit(scheduler: Scheduler) -> list[int]:
    taken = scheduler.take()
    for entry in taken:
        scheduler.admit(entry)
    return [e.index for e in taken]


def _drain(scheduler: Scheduler) -> tuple[list[list], dict[int, ImagesDone]]:
    """Run to the end: the items of each round (admitting before each), and every ImagesDone by index."""
    rounds, done = [], {}
    try:
        while scheduler.busy():
            _admit(scheduler)
            items = scheduler.step()
            rounds.append(items)
            done.update({i.index: i for i in items if isinstance(i, ImagesDone)})
    finally:
        scheduler.batch.remove(list(scheduler.batch.sequences))
    return rounds, done


def _same_as_alone(done: ImagesDone, request: ImageRequest) -> None:
    alone = request.generator.generate_images_with_stats(request.labels, strategy=request.strategy, seed=request.seed)
    assert np.array_equal(done.result.images, alone.images)
    assert done.result.target_passes.tolist() == alone.target_passes.tolist()
    assert done.result.seed == request.seed and done.result.strategy == alone.strategy


def test_compatible_requests_admitted_together_share_one_batch_and_get_their_own_images(tiny, models):
    """Two callers' requests with the same model, strategy and options, admitted in one round, are rows
    of one image batch; a third with other options gets a batch of its own, stepped in the same rounds.
    Each request's images are those it gets alone. Seen failing with every request given a batch of
    its own (batch.py `_admit_images` never joining an open batch)."""
    ar = models["digits-ar"]
    a, b = _images(ar, [3, 7], 11, SPECULATIVE), _images(ar, [1], 5, SPECULATIVE)
    c = _images(ar, [4], 11, {"name": "speculative", "k": 2})
    scheduler = _scheduler(tiny, 16, a, b, c)
    assert _admit(scheduler) == [0, 1, 2]
    assert sorted(batch.rows for batch in scheduler.batch.images) == [1, 3]
    _, done = _drain(scheduler)
    assert done[0].batch_rows == done[1].batch_rows == 3 and done[2].batch_rows == 1
    for index, request in enumerate((a, b, c)):
        _same_as_alone(done[index], request)


def test_image_rows_count_against_the_sequence_cap_in_the_same_line_as_text(tiny, models):
    """Cap 4: an image request of 3 images joins; a text request of n = 2 behind it waits (3 + 2 > 4),
    and so does a 1-image request behind that (first come, first served, across kinds); once the
    images are done both join. Seen failing with image rows left out of DecodeBatch.slots()."""
    ar = models["digits-ar"]
    text = _text(tiny, 4)
    text.n = 2
    scheduler = _scheduler(tiny, 4, _images(ar, [1, 2, 3], 0), text, _images(ar, [5], 1))
    assert _admit(scheduler) == [0]
    assert scheduler.batch.slots() == 3 and len(scheduler.batch) == 3
    joined = []
    while scheduler.busy():
        joined.append(_admit(scheduler))
        scheduler.step()
    admitted = [(r, i) for r, ids in enumerate(joined) for i in ids]
    assert [i for _, i in admitted] == [1, 2] and admitted[0][0] == admitted[1][0] == 64  # after 64 passes


def test_text_and_images_take_turns_pass_by_pass_and_neither_starves(tiny, models):
    """A long text request and an image request (64 passes) admitted together: every round runs a pass
    of both, so the images finish while the text still runs (they do not wait for it), and the text gets
    a token every round meanwhile (it does not wait for them); a second text request admitted while the
    images run finishes before them. Seen failing with the image batch run to its end in one round."""
    ar = models["digits-ar"]
    long_text, images = _text(tiny, 120), _images(ar, [2, 6], 3)
    scheduler = _scheduler(tiny, 8, long_text, images)
    _admit(scheduler)
    text_rounds, image_round, short_done = [], None, None
    for r in range(200):
        if r == 10:
            scheduler.add(Waiting(2, _text(tiny, 5)))
        _admit(scheduler)
        items = scheduler.step()
        if any(isinstance(i, Event) and i.index == 0 and i.token_ids for i in items):
            text_rounds.append(r)
        if any(isinstance(i, ImagesDone) for i in items):
            image_round = r
        if any(isinstance(i, Result) and i.index == 2 for i in items):
            short_done = r
        if not scheduler.busy():
            break
    assert image_round is not None and short_done is not None
    assert image_round == 63  # one pass a round from the first: 64 passes for 64 pixels
    assert text_rounds[-1] > image_round  # the text still ran after the images were done
    first = text_rounds[0]
    assert [r for r in text_rounds if r <= image_round] == list(range(first, image_round + 1))
    assert short_done < image_round


def test_a_started_batch_takes_no_rows_a_later_request_starts_its_own(tiny, models):
    """A compatible request admitted after a batch started runs in a batch of its own beside it; both
    get the images they get alone (the var model: one pass per scale)."""
    var = models["digits-var"]
    first, later = _images(var, [0, 9], 2), _images(var, [9], 8)
    scheduler = _scheduler(tiny, 16, first)
    _admit(scheduler)
    scheduler.step()
    scheduler.add(Waiting(1, later))
    assert _admit(scheduler) == [1] and [b.rows for b in scheduler.batch.images] == [2, 1]
    _, done = _drain(scheduler)
    assert done[0].batch_rows == 2 and done[1].batch_rows == 1
    _same_as_alone(done[0], first)
    _same_as_alone(done[1], later)


def test_cancelled_requests_leave_a_batch_before_it_starts(tiny, models):
    ar = models["digits-diffusion"]
    scheduler = _scheduler(tiny, 16, _images(ar, [1, 2], 0), _images(ar, [3], 1))
    _admit(scheduler)
    scheduler.batch.drop_images({0})
    assert [b.rows for b in scheduler.batch.images] == [1]
    scheduler.batch.drop_images({1})
    assert scheduler.batch.images == [] and not scheduler.busy()
