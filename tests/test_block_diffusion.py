"""The block-diffusion digits model and its cached decoders (argen.images.block_diffusion,
block_decoding): the exact block cache against a full recompute, the order in which blocks are
committed, what each approximate cache recomputes, the pass counts, the API's bounds.

Every model here is tiny and random (or trained for a few steps), so the file runs in seconds; the
trained model's quality is measured in benchmarks/digits/.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import argen
from argen.errors import ArgenError, InvalidRequestError
from argen.images import ImageGenerator, block_decoding, decoding, training
from argen.images.block_diffusion import BlockConfig, BlockDiffusionTransformer, check_block_model
from argen.images.models import ModelConfig, build

THRESHOLD = 0.4  # on tiny_model: 28-31 passes an image, differing between images
TINY = training.Recipe(BlockConfig(width=16, layers=2, heads=2), steps=5, batch=16)
STRATEGIES = [
    "plain",
    {"name": "blockwise", "threshold": THRESHOLD},
    {"name": "blockwise", "threshold": THRESHOLD, "cache": 0},
    {"name": "subblock", "threshold": THRESHOLD, "sub_block": 4},
    {"name": "subblock", "threshold": THRESHOLD, "sub_block": 2, "reuse": 0},
    {"name": "dkv", "threshold": THRESHOLD},
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one torch thread is as fast, and two spin-waiting threads on a busy 2-core machine
    were seen running these tests 10-50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0, scale: float = 3.0) -> BlockDiffusionTransformer:
    """A random block-diffusion model whose weights are scaled up so that its distributions are far
    from uniform (some pixels pass a threshold, some do not: every branch of the decoders runs)."""
    torch.manual_seed(seed)
    model = BlockDiffusionTransformer(BlockConfig(width=16, layers=2, heads=2))
    with torch.no_grad():
        model.head.weight.mul_(scale)
        model.tok.weight.mul_(scale)
    return model.eval()


class Recorder:
    """The model, with every pass it runs recorded: (kind, rows, queried positions, commit, state of the
    image before the pass) where kind is "forward" (a full recompute) or "extend" (a cached pass)."""

    def __init__(self, model: BlockDiffusionTransformer) -> None:
        self.model, self.calls = model, []
        self.n_pixels, self.n_levels, self.n_classes = model.n_pixels, model.n_levels, model.n_classes
        self.block_size = model.block_size

    def new_state(self, batch):
        return self.model.new_state(batch)

    def __call__(self, labels, pixels):
        self.calls.append(("forward", len(labels), None, None, pixels.clone()))
        return self.model(labels, pixels)

    def extend(self, state, query, positions, **commit):
        done = commit.get("commit")
        self.calls.append(
            ("extend", len(query), positions.clone(), None if done is None else done.clone(), query.clone())
        )
        return self.model.extend(state, query, positions, **commit)


# -- the exact block cache ---------------------------------------------------------------------------------
def test_the_cached_pass_gives_the_logits_of_a_full_recompute():
    """The block KV cache's invariant: on the same state (label, finished blocks, a partly masked current
    block), the cached pass's logits equal the model's full block-causal forward. Bugs guarded: a commit
    written at the wrong positions (the cache offset: its position embeddings one block off), the commit
    seeing the current block, the label missing from the prefix. Seen failing with the commit's start
    shifted by one pixel in BlockDiffusionTransformer.extend."""
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([3, 7])
    image = torch.randint(0, 17, (2, 64), generator=g)
    image[:, 26:] = 17  # block 3 partly masked, later blocks masked
    image[0, 24], image[1, 29] = 17, 5
    state = model.new_state(2)
    positions = torch.arange(8)[None, :].expand(2, -1)
    with torch.no_grad():
        full = model(labels, image[:, :32])
        got = [model.extend(state, image[:, :8], positions, labels=labels)]
        for blk in range(1, 4):
            lo = 8 * blk
            got.append(model.extend(state, image[:, lo : lo + 8], positions + lo, commit=image[:, lo - 8 : lo]))
        # A second pass over block 3 with only some slots queried: the others come from the slot cache.
        again = model.extend(state, image[:, [27, 24, 30]], torch.tensor([[27, 24, 30]] * 2))
    for blk, logits in enumerate(got):
        assert torch.allclose(logits, full[:, 8 * blk : 8 * blk + 8], atol=1e-5), f"block {blk}"
    assert torch.allclose(again, full[:, [27, 24, 30]], atol=1e-5)


def test_decoding_with_the_block_cache_equals_decoding_without_one():
    """Same seed, same images and passes with the exact cache as with a full recompute each pass; the
    cache computes fewer tokens (the label and each finished block once)."""
    model = tiny_model()
    labels = torch.arange(6)
    runs = {
        cache: decoding.run(
            block_decoding.block_decode(
                model, labels, decoding.row_generators(2, len(labels)), threshold=THRESHOLD, cache=cache
            )
        )
        for cache in ("none", "block")
    }
    assert torch.equal(runs["none"].tokens, runs["block"].tokens)
    assert torch.equal(runs["none"].target_passes, runs["block"].target_passes)
    assert (runs["block"].tokens_computed < runs["none"].tokens_computed).all()


def test_control_the_contract_check_catches_a_model_that_is_not_block_causal(monkeypatch):
    """check_block_model (run by from_modules) refuses a model whose earlier blocks see later ones, and
    one whose cached pass differs from its forward."""
    model = tiny_model()
    check_block_model(model)
    full = BlockDiffusionTransformer.forward

    def bidirectional(self, labels, pixels):
        tokens = torch.cat([self._label_tokens(labels), pixels], 1)
        h = self._embed(tokens, torch.arange(pixels.shape[1] + 1)[None, :])
        return self._run(h, torch.ones(len(tokens[0]), len(tokens[0]), dtype=torch.bool))[:, 1:]

    monkeypatch.setattr(BlockDiffusionTransformer, "forward", bidirectional)
    with pytest.raises(ArgenError, match="not block-causal"):
        check_block_model(model)
    monkeypatch.setattr(BlockDiffusionTransformer, "forward", full)
    monkeypatch.setattr(BlockDiffusionTransformer, "_label_tokens", lambda self, labels: (labels + 17)[:, None])
    monkeypatch.setattr(
        BlockDiffusionTransformer, "forward", lambda self, labels, pixels: full(self, labels + 1, pixels)
    )
    with pytest.raises(ArgenError, match="cached pass"):
        check_block_model(model)


# -- decoding order and what each pass computes -------------------------------------------------------------
def test_one_pixel_a_pass_commits_each_block_before_the_next():
    """With threshold 1.0 a pass unmasks one pixel, so block k takes passes 8k .. 8k + 7; the pass that
    starts block k (and only it) commits block k - 1, which by then is finished and equals the final
    image's block. Bugs guarded: a block committed while it still holds masked pixels, a pass that queries
    two blocks at once, a block started before the one before it is done."""
    model = Recorder(tiny_model(scale=1.0))
    out = decoding.run(
        block_decoding.block_decode(model, torch.arange(3), decoding.row_generators(0, 3), threshold=1.0)
    )
    assert out.target_passes.tolist() == [64] * 3
    assert len(model.calls) == 64
    for i, (_, rows, positions, commit, _) in enumerate(model.calls):
        assert rows == 3 and bool((positions // 8 == i // 8).all()), f"pass {i} queries outside block {i // 8}"
        if i % 8 == 0 and i:
            assert commit is not None and torch.equal(commit, out.tokens[:, i - 8 : i]), f"pass {i}"
        else:
            assert commit is None, f"pass {i} commits mid-block"


@pytest.mark.parametrize("cache", ["none", "block", "subblock", "delayed"])
def test_the_pass_and_token_counts_are_the_passes_the_model_ran(cache):
    """The stats are counted, not estimated: per image, target_passes is the number of model calls it
    took part in, and tokens_computed the positions those calls ran for it (queries, commits, or the
    whole prefix without a cache). Bug guarded: counting passes for images that already finished the
    block (thresholds differ per image, so they leave the batch at different passes)."""
    model = Recorder(tiny_model())
    labels = torch.arange(5)
    out = decoding.run(
        block_decoding.block_decode(
            model,
            labels,
            decoding.row_generators(3, len(labels)),
            threshold=THRESHOLD,
            cache=cache,
            sub_block=4 if cache == "subblock" else 0,
        )
    )
    assert sum(rows for _, rows, *_ in model.calls) == int(out.target_passes.sum())
    assert len({rows for _, rows, *_ in model.calls}) > 1  # images left blocks at different passes
    computed = 0
    for kind, rows, positions, commit, pixels in model.calls:
        if kind == "forward":
            computed += rows * (1 + pixels.shape[1])
        else:
            computed += sum(len(set(p.tolist())) for p in positions)
            computed += 0 if commit is None else commit.numel()
    computed += 5 if cache != "none" else 0  # the first cached pass commits the label: a token an image
    assert computed == int(out.tokens_computed.sum())


def _passes(cache: str, sub_block: int = 0) -> list[tuple[int, dict[int, int]]]:
    """For each cached pass over one image: (its block, {slot queried: the pixel it held, 17 if masked})."""
    model = Recorder(tiny_model())
    out = decoding.run(
        block_decoding.block_decode(
            model,
            torch.tensor([4]),
            decoding.row_generators(5, len(torch.tensor([4]))),
            threshold=THRESHOLD,
            cache=cache,
            sub_block=sub_block,
        )
    )
    assert out.target_passes.item() < 64  # several pixels a pass somewhere: the caches have work to do
    return [(int(p[0, 0]) // 8, dict(zip((p[0] % 8).tolist(), q[0].tolist()))) for _, _, p, _, q in model.calls]


def test_delayed_cache_recomputes_a_pixel_once_after_it_is_decoded_then_reuses_it():
    """dKV-Cache: a pass queries the pixels still masked and those the pass before decoded (their K/V
    now computed from their value), and reuses the others' K/V. Bugs guarded: caching a pixel's K/V
    from the pass that decoded it (computed from the mask token), and never reusing (no saving)."""
    passes = _passes("delayed")
    reused = 0
    for (blk, before), (blk_after, after) in zip(passes, passes[1:]):
        if blk_after != blk:
            assert sorted(after) == list(range(8))  # a new block: every slot computed
            continue
        masked_before = {s for s, v in before.items() if v == 17}
        assert masked_before <= set(after), "a pixel decoded last pass was not recomputed with its value"
        assert all(v == 17 or s in masked_before for s, v in after.items()), "a cached pixel was recomputed"
        reused += 8 - len(after)
    assert reused > 0


@pytest.mark.parametrize("reuse", [True, False])
def test_subblock_cache_reuses_a_finished_sub_block_after_one_more_pass(reuse):
    """Fast-dLLM v2's sub-block cache: a pass recomputes exactly the sub-blocks that still had masked
    pixels in the pass before (a sub-block finished by that pass is computed once more, with its final
    pixels, then reused); without reuse every pass recomputes the whole block. Bug guarded: reusing a
    sub-block's K/V computed while its last pixels were still masked."""
    passes = _passes("subblock" if reuse else "block", sub_block=4)
    reused = 0
    for (blk, before), (blk_after, after) in zip(passes, passes[1:]):
        if blk_after != blk or not reuse:
            assert sorted(after) == list(range(8))
            continue
        open_before = {s // 4 for s, v in before.items() if v == 17}
        assert set(after) == {s for s in range(8) if s // 4 in open_before}
        reused += 8 - len(after)
    assert (reused > 0) == reuse


def test_a_sub_block_as_large_as_the_block_is_the_exact_block_cache():
    """A sub-block of the whole block is reused only once the block is done: the images, passes and
    tokens computed are those of the exact block cache (a request can ask for it: no error, no saving)."""
    model = tiny_model()
    runs = [
        decoding.run(
            block_decoding.block_decode(
                model,
                torch.arange(4),
                decoding.row_generators(7, 4),
                threshold=THRESHOLD,
                cache=c,
                sub_block=s,
            )
        )
        for c, s in (("block", 0), ("subblock", 8), ("subblock", 64))
    ]
    for other in runs[1:]:
        assert torch.equal(other.tokens, runs[0].tokens) and torch.equal(other.tokens_computed, runs[0].tokens_computed)


def test_approximate_caches_compute_fewer_tokens_than_the_exact_one():
    model = tiny_model()
    labels = torch.arange(8)

    def computed(cache, sub_block=0):
        gens = decoding.row_generators(6, len(labels))
        out = decoding.run(
            block_decoding.block_decode(model, labels, gens, threshold=THRESHOLD, cache=cache, sub_block=sub_block)
        )
        assert out.tokens.max() <= 16  # no mask left
        return out.tokens_computed.double().mean() / out.target_passes.double().mean()  # per pass

    exact = computed("block")
    assert computed("delayed") < exact and computed("subblock", 4) < exact < computed("none")


# -- the API ------------------------------------------------------------------------------------------------
def test_every_strategy_gives_images_in_range_and_replays_under_its_seed():
    gen = ImageGenerator.from_modules(tiny_model(), "block")
    for strategy in STRATEGIES:
        first = gen.generate_images_with_stats([0, 5, 9], strategy=strategy, seed=3)
        assert first.images.shape == (3, 8, 8) and first.images.dtype == np.int64
        assert first.images.min() >= 0 and first.images.max() <= 16
        assert first.tokens_computed is not None and (first.target_passes >= 8).all()
        again = gen.generate_images_with_stats([0, 5, 9], strategy=strategy, seed=3)
        assert np.array_equal(first.images, again.images) and np.array_equal(first.target_passes, again.target_passes)
    plain = gen.generate_images_with_stats([1, 2], strategy="plain", seed=0)
    assert plain.target_passes.tolist() == [64, 64]  # one pixel a pass


@pytest.mark.parametrize(
    "strategy, message",
    [
        ({"name": "blockwise", "cache": 2}, r"cache must be a number in \[0, 1\]"),
        ({"name": "blockwise", "threshold": 1.5}, r"threshold must be a number in \[0.0, 1.0\]"),
        ({"name": "subblock", "sub_block": 0}, r"sub_block must be a number in \[1, 64\]"),
        ({"name": "subblock", "reuse": 0.5}, "must be an integer"),
        ({"name": "dkv", "delay": 3}, "unknown option 'delay'"),
        ("confidence", "does not run on a block image model"),
        ("speculative", "does not run on a block image model"),
    ],
)
def test_bad_options_get_clear_errors(strategy, message):
    gen = ImageGenerator.from_modules(tiny_model(), "block")
    with pytest.raises(InvalidRequestError, match=message):
        gen.generate_images([0], strategy=strategy, seed=0)


def test_the_block_strategies_refuse_other_models():
    gen = ImageGenerator.from_modules(build(ModelConfig("diffusion", hidden=16)), "diffusion")
    with pytest.raises(InvalidRequestError, match="does not run on a diffusion image model"):
        gen.generate_images([0], strategy="blockwise", seed=0)


# -- training and loading -----------------------------------------------------------------------------------
def test_training_is_deterministic_and_load_works(tmp_path, monkeypatch):
    a, b = (training.train(TINY, 0, progress=False) for _ in range(2))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    monkeypatch.setenv("ARGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(training, "RECIPES", {"digits-block-diffusion": TINY})
    gen = argen.load("digits-block-diffusion")
    assert isinstance(gen, ImageGenerator) and gen.kind == "block"
    assert training.cached_path("digits-block-diffusion", TINY, 0).is_file()
    loaded = training.load_file(training.cached_path("digits-block-diffusion", TINY, 0))
    for x, y in zip(a.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(x, y)
    images = gen.generate_images([1, 2], strategy={"name": "dkv", "threshold": 0.7}, seed=1)
    assert images.shape == (2, 8, 8)
    from argen.cli import main

    out = tmp_path / "grid.png"
    argv = ["generate", "--model", "digits-block-diffusion", "--labels", "0,1", "--out", str(out), "--seed", "1"]
    assert main([*argv, "--strategy", "subblock", "--strategy-opt", "sub_block=2"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([*argv, "--strategy", "subblock", "--strategy-opt", "reuse=2"]) != 0  # bounded: refused
