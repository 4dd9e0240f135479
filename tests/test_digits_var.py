"""Next-scale (VAR) digits model, ScaleKV cache budgets and grouped speculative decoding (GSD), on tiny
random or briefly trained models of the real shapes: runs in seconds. The real models' quality is
measured in benchmarks/digits/."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_digits import TINY, chi_square_p, exact_joint, sharp_made

import argen
from argen.errors import ArgenError, InvalidRequestError
from argen.images import ImageGenerator, decoding, training, var
from argen.images.gsd import Grouped
from argen.images.models import ModelConfig, build, check_model

TINY_VAR = {
    **TINY,
    "digits-var": training.Recipe(ModelConfig("var", hidden=32, layers=2, dropout=0.0), steps=10, batch=16),
}


@pytest.fixture
def tiny_recipes(tmp_path, monkeypatch):
    """The named digits models (digits-var too) trained by tiny recipes into a fresh cache directory."""
    monkeypatch.setenv("ARGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(training, "RECIPES", TINY_VAR)
    return tmp_path


def tiny_var(seed: int = 0, layers: int = 2) -> var.VarTransformer:
    torch.manual_seed(seed)
    return build(ModelConfig("var", hidden=32, layers=layers, dropout=0.0)).eval()


# -- the scale pyramid and the model's contract ----------------------------------------------------------
def test_pyramid_is_the_image_average_pooled_and_rounded():
    pixels = torch.arange(64).reshape(1, 64) % 17
    maps = var.pyramid(pixels, (1, 2, 4, 8))
    assert maps.shape == (1, 85) and maps.min() >= 0 and maps.max() <= 16
    assert torch.equal(maps[0, 21:], pixels[0])  # the finest map is the image itself
    image = pixels.reshape(8, 8).double()
    assert maps[0, 0] == torch.round(image.mean())
    assert maps[0, 1] == torch.round(image[:4, :4].mean())  # top-left quarter
    assert maps[0, 5] == torch.round(image[:2, :2].mean())  # top-left 2x2 block
    assert torch.equal(var.pyramid(torch.full((2, 64), 16), (1, 2, 4, 8)), torch.full((2, 85), 16))


def test_var_transformer_keeps_the_next_scale_contract():
    check_model(tiny_var(), "var")
    check_model(tiny_var(layers=1), "var")


@pytest.mark.parametrize("broken", ["full attention", "stale cache"])
def test_control_a_model_that_sees_its_own_scale_or_skips_its_cache_fails(monkeypatch, broken):
    """Bugs guarded: attention without the block-causal mask (scale k's logits would read scale k's own
    tokens through scale k+1's inputs, so one-pass-per-scale decoding would condition on tokens not
    yet drawn), and a step() that forgets the cached scales (decoding would see only the current one)."""
    model = tiny_var()
    if broken == "full attention":
        model.mask.fill_(True)
        match = "not a next-scale model"
    else:

        def forget(self, k, v):  # keeps only the newest scale's entries
            self.keys, self.values = k, v
            return k, v

        monkeypatch.setattr(var.LayerCache, "append", forget)
        match = "disagrees with forward"
    with pytest.raises(ArgenError, match=match):
        check_model(model, "var")


# -- decoding ---------------------------------------------------------------------------------------------
def test_plain_var_decoding_takes_one_pass_per_scale_and_replays_under_a_seed():
    gen = ImageGenerator.from_modules(tiny_var(), "var")
    out = gen.generate_images_with_stats([0, 3, 9, 9], seed=4)
    assert out.images.shape == (4, 8, 8) and out.images.dtype == np.int64
    assert 0 <= out.images.min() <= out.images.max() <= 16
    assert out.target_passes.tolist() == [4] * 4 and out.draft_passes.tolist() == [0] * 4
    assert np.array_equal(out.images, gen.generate_images([0, 3, 9, 9], seed=4))
    assert not np.array_equal(out.images, gen.generate_images([0, 3, 9, 9], seed=5))


def test_scalekv_with_a_budget_above_the_cache_is_plain_decoding():
    """21 entries (scales 1, 2, 4) is the most a layer ever holds before the last pass: a budget that
    large prunes nothing, so the same seed gives plain decoding's images. A budget rule off by one
    (keeping budget - 1 entries, or pruning a cache that already fits) breaks the equality."""
    gen = ImageGenerator.from_modules(tiny_var(), "var")
    plain = gen.generate_images(list(range(10)) * 3, seed=2)
    full = gen.generate_images(list(range(10)) * 3, strategy={"name": "scalekv", "budget": 21}, seed=2)
    assert np.array_equal(plain, full)
    small = gen.generate_images(list(range(10)) * 3, strategy={"name": "scalekv", "budget": 2}, seed=2)
    assert not np.array_equal(plain, small)  # pruning changes what the fine scales attend to


def test_scalekv_keeps_the_budget_and_the_most_attended_entries():
    model = tiny_var(layers=2)
    labels = torch.arange(6)
    _, held = decoding.run(var.var_decode(model, labels, decoding.row_generators(0, len(labels)), budgets=[3, 7]))
    assert held == (3 + 7) / 2
    _, held = decoding.run(var.var_decode(model, labels, decoding.row_generators(0, len(labels))))
    assert held == 21
    layer = var.LayerCache(torch.arange(5.0).reshape(1, 1, 5, 1), torch.arange(5.0).reshape(1, 1, 5, 1))
    layer.attention = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.05]).reshape(1, 1, 1, 5)
    layer.keep(2)
    assert layer.keys.flatten().tolist() == [1.0, 3.0]  # the two most attended, in their order


def test_drafter_layers_get_the_drafter_budget():
    model = tiny_var(layers=3)
    share = var.history_share(model)
    assert share.shape == (3,) and ((share >= 0) & (share <= 1)).all()
    budgets = var.layer_budgets(model, budget=2, drafters=1, drafter_budget=21)
    assert sorted(budgets) == [2, 2, 21] and budgets[int(share.argmax())] == 21
    with pytest.raises(InvalidRequestError, match="at most the model's 3 layers"):
        var.layer_budgets(model, budget=2, drafters=4, drafter_budget=21)


# -- grouped speculative decoding ---------------------------------------------------------------------------
def test_gsd_with_groups_of_one_is_exact_speculative_sampling_draw_for_draw():
    """A group of one token is the token: p(G)/q(G) = p(x)/q(x), so the same seed gives the same images
    as exact speculative sampling (a group that let a neighbour in anyway, or a q(G) taken from the
    target, breaks the equality); larger groups keep more drafts, so fewer target passes."""
    target, draft = sharp_made(2, 1.5), sharp_made(12, 1.5)
    labels = torch.zeros(4000, dtype=torch.long)
    order = decoding.grey_level_order(3)

    def run(relax):
        return decoding.run(
            decoding.ar_speculative(target, draft, labels, decoding.row_generators(5, len(labels)), k=2, relax=relax)
        )

    exact = run(None)
    one = run(Grouped(order, group=1))
    assert torch.equal(one.tokens, exact.tokens) and torch.equal(one.target_passes, exact.target_passes)
    grouped = run(Grouped(order, group=3, p_gap=1.0))
    assert grouped.target_passes.double().mean() < exact.target_passes.double().mean()


def test_gsd_with_groups_of_one_keeps_the_target_distribution():
    """The same as the exactness test of speculative sampling (tests/test_digits.py: chi-square, stated
    power), through the GSD path; the control: groups of three fail it (GSD is lossy)."""
    target, draft = sharp_made(2, 1.5), sharp_made(12, 1.5)
    joint = exact_joint(target, 0)
    labels = torch.zeros(20_000, dtype=torch.long)
    order = decoding.grey_level_order(3)
    one = decoding.run(
        decoding.ar_speculative(
            target, draft, labels, decoding.row_generators(9, len(labels)), k=3, relax=Grouped(order, 1)
        )
    )
    assert chi_square_p(one.tokens, joint)[1] > 1e-3
    three = decoding.run(
        decoding.ar_speculative(
            target, draft, labels, decoding.row_generators(9, len(labels)), k=3, relax=Grouped(order, 3)
        )
    )
    assert chi_square_p(three.tokens, joint)[1] < 1e-3


def test_gsd_group_is_the_nearest_levels_within_the_probability_gap():
    order = decoding.grey_level_order(5)
    p = torch.tensor([[0.1, 0.2, 0.3, 0.25, 0.15]], dtype=torch.double)
    q = torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.2]], dtype=torch.double)
    grouped = Grouped(order, group=3, p_gap=1.0)
    assert grouped.members(p, torch.tensor([2]))[0].tolist() == [False, True, True, True, False]
    mass_p, mass_q, excluded = grouped.judge(p, q, torch.tensor([2]))
    assert mass_p.item() == pytest.approx(0.75) and mass_q.item() == pytest.approx(0.6) and excluded is None
    # The probability filter: level 3 (p 0.25) is within 0.06 of p(2) = 0.3, level 1 (p 0.2) is not.
    assert Grouped(order, group=3, p_gap=0.06).members(p, torch.tensor([2]))[0].tolist() == [
        False,
        False,
        True,
        True,
        False,
    ]


# -- API -----------------------------------------------------------------------------------------------------
def test_load_digits_var_and_generate(tiny_recipes):
    gen = argen.load("digits-var")
    assert isinstance(gen, ImageGenerator) and gen.kind == "var" and gen.draft is None
    out = gen.generate_images_with_stats([1, 2, 3], seed=3)
    assert out.images.shape == (3, 8, 8) and out.target_passes.tolist() == [4, 4, 4]
    assert np.array_equal(out.images, gen.generate_images([1, 2, 3], seed=3))
    budgeted = gen.generate_images([1, 2, 3], strategy={"name": "scalekv", "budget": 4, "drafters": 1}, seed=3)
    assert budgeted.shape == (3, 8, 8)
    ar = argen.load("digits-ar")
    grouped = ar.generate_images_with_stats([5] * 4, strategy={"name": "gsd", "k": 3, "group": 3}, seed=1)
    assert grouped.images.shape == (4, 8, 8) and (grouped.target_passes <= 64).all()


@pytest.mark.parametrize(
    "model, strategy, message",
    [
        ("digits-var", {"name": "speculative"}, "does not run on a var"),
        ("digits-var", {"name": "scalekv", "budget": 0}, r"budget must be a number in \[1, 4096\]"),
        ("digits-var", {"name": "scalekv", "budget": 2.5}, "must be an integer"),
        ("digits-var", {"name": "scalekv", "drafters": 3}, "at most the model's 2 layers"),
        ("digits-var", {"name": "scalekv", "drafters": 99}, r"drafters must be a number in \[0, 64\]"),
        ("digits-ar", {"name": "scalekv"}, "does not run on a ar"),
        ("digits-ar", {"name": "gsd", "group": 17}, r"group must be a number in \[1, 16\]"),
        ("digits-ar", {"name": "gsd", "p_gap": -0.1}, r"p_gap must be a number in \[0.0, 1.0\]"),
        ("digits-ar", {"name": "gsd", "radius": 2}, "unknown option 'radius'"),
    ],
)
def test_bad_var_and_gsd_requests_get_clear_errors(tiny_recipes, model, strategy, message):
    with pytest.raises(InvalidRequestError, match=message):
        argen.load(model).generate_images([0], strategy=strategy, seed=0)


def test_gsd_needs_a_draft_model():
    gen = ImageGenerator.from_modules(sharp_made(2, 1.0), "ar")
    with pytest.raises(InvalidRequestError, match="no draft model"):
        gen.generate_images([0], strategy="gsd", seed=0)


def test_a_plugged_in_latent_order_reaches_the_relaxed_strategies():
    """Bug guarded: from_modules dropping `latent_order` (LANTERN's and GSD's neighbourhoods would
    silently fall back to grey-level distance for a codebook model)."""
    order = decoding.grey_level_order(3).flip(-1)  # a codebook whose nearest tokens are the far levels
    gen = ImageGenerator.from_modules(sharp_made(2, 1.0), "ar", draft=sharp_made(3, 1.0), latent_order=order)
    assert gen.latent_order is order
