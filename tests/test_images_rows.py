"""Per-image randomness (images/decoding.py `row_generators`): an image's pixels depend on its own
request (label, seed, index in the request), never on what shares its batch, for every strategy of
every image family. This is what lets the server decode different clients' requests as rows of one
batch (engine/images.py). Tiny random models (tests/image_helpers.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from image_helpers import cases, tiny_image_models

from argen.images import decoding


@pytest.fixture(scope="module")
def models():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is as fast, and the machine is shared
    yield tiny_image_models()
    torch.set_num_threads(threads)


def _batched(gen, strategy, rows: list[tuple[int, torch.Generator]]) -> decoding.Decoded:
    """Decode rows (label, generator) of several requests as one batch."""
    labels = torch.tensor([label for label, _ in rows])
    _, name, options = gen.check_request(labels.tolist(), strategy)
    return decoding.run(gen.decode(name, options, labels, [g for _, g in rows]))


def _mixed(request: list[tuple[int, torch.Generator]], seed: int) -> tuple[list, list[int]]:
    """The request's rows among other requests' rows (other labels and seeds): one before the first,
    two between, one after; and where the request's rows landed."""
    a = list(zip([1, 8, 0, 5], decoding.row_generators(seed + 100, 4)))
    b = list(zip([9, 2], decoding.row_generators(seed + 200, 2)))
    rows = [a[0], request[0], a[1], b[0], request[1], b[1], request[2], a[2], a[3]]
    return rows, [1, 4, 6]


@pytest.mark.parametrize("model, strategy", cases(), ids=lambda c: c if isinstance(c, str) else c["name"])
def test_a_seeded_request_gives_the_same_images_alone_and_batched_with_others(models, model, strategy):
    """The same seeded request decoded alone (the Python API) and as rows among other requests' rows
    (different labels, seeds, positions) gives the same images and passes. Seen failing with the bug
    of one generator for the whole batch (decoding._draw drawing every row from gens[0]), and with
    rows drawing coins while other rows still speculate (draws not restricted to live rows)."""
    gen = models[model]
    labels, seed = [3, 7, 3], 11
    alone = gen.generate_images_with_stats(labels, strategy=strategy, seed=seed)
    rows, where = _mixed(list(zip(labels, decoding.row_generators(seed, 3))), seed)
    mixed = _batched(gen, strategy, rows)
    side = alone.images.shape[1]
    assert np.array_equal(mixed.tokens[where].reshape(-1, side, side).numpy(), alone.images)
    assert mixed.target_passes[where].tolist() == alone.target_passes.tolist()
    assert mixed.draft_passes[where].tolist() == alone.draft_passes.tolist()


@pytest.mark.parametrize("model", ["digits-ar", "digits-diffusion", "digits-block-diffusion", "digits-var"])
def test_control_one_generator_shared_by_the_batch_fails_the_test(models, model):
    """The control: with one generator drawn from by every row of the batch (the decoders' old
    randomness: per batch, not per image), the request's images change with what shares its batch."""
    gen = models[model]
    labels, seed = [3, 7, 3], 11
    shared = torch.Generator().manual_seed(seed)
    alone = _batched(gen, "plain", [(label, shared) for label in labels])
    shared = torch.Generator().manual_seed(seed)
    rows, where = _mixed([(label, shared) for label in labels], seed)
    mixed = _batched(gen, "plain", [(label, shared) for label, _ in rows])
    assert not torch.equal(mixed.tokens[where], alone.tokens)


def test_row_generators_differ_by_seed_and_row_and_replay():
    draws = [[float(torch.rand(1, generator=g)) for g in decoding.row_generators(s, 3)] for s in (0, 1, 0)]
    assert draws[0] == draws[2] and len(set(draws[0] + draws[1])) == 6


def test_inverse_cdf_draw_never_picks_a_zero_probability_level_and_follows_the_distribution():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.2, 0.0, 0.0, 0.0, 0.8]], dtype=torch.double)
    gens = decoding.row_generators(0, 2)
    got = torch.stack([decoding._draw(probs, gens) for _ in range(4000)])
    assert set(got[:, 0].tolist()) == {1, 3} and set(got[:, 1].tolist()) == {0, 4}
    assert abs(float((got[:, 1] == 4).double().mean()) - 0.8) < 0.03  # 4.7 standard errors
