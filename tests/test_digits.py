"""The digits image-token models (argen.images): data split, model contract, training and its cache,
decoders (speculative sampling's exactness by a statistical test with stated power), API and CLI.

Every model here is tiny (trained for a few steps, or random), so the file runs in seconds; the
real models' quality is measured in benchmarks/digits/.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import argen
from argen.errors import ArgenError, InvalidRequestError
from argen.images import ImageGenerator, decoding, training
from argen.images.data import load_split
from argen.images.models import MadeAR, ModelConfig, build, check_model
from argen.images.quality import frechet, nearest_training_l1

TINY = {
    "digits-ar": training.Recipe(ModelConfig("ar", hidden=32, layers=1, dropout=0.0), steps=20, batch=32),
    "digits-ar-draft": training.Recipe(
        ModelConfig("ar", hidden=8, layers=1, dropout=0.0, direct=False), steps=10, batch=32
    ),
    "digits-diffusion": training.Recipe(ModelConfig("diffusion", hidden=32, layers=2, dropout=0.0), steps=20, batch=32),
}


@pytest.fixture
def tiny_recipes(tmp_path, monkeypatch):
    """The named digits models trained by tiny recipes into a fresh cache directory."""
    monkeypatch.setenv("ARGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(training, "RECIPES", TINY)
    return tmp_path


# -- data -----------------------------------------------------------------------------------------
def test_split_is_fixed_disjoint_and_stratified():
    a, b = load_split(), load_split()
    assert a.train_x.shape == (1497, 64) and a.test_x.shape == (300, 64)
    assert np.array_equal(a.test_x, b.test_x) and np.array_equal(a.train_y, b.train_y)
    assert a.train_x.min() == 0 and a.train_x.max() == 16
    assert np.bincount(a.test_y).min() >= 29  # stratified: every class about 30 times
    train_rows = {r.tobytes() for r in a.train_x}
    # Some digits are duplicated in the dataset itself; nearly all held-out images are unseen ones.
    assert sum(r.tobytes() in train_rows for r in a.test_x) <= 3


# -- the model contract -----------------------------------------------------------------------------
class TinyCausalTransformer(nn.Module):
    """A model of another architecture with the AR contract: the label as the first token, a causal
    transformer encoder, the logits for pixel t read at position t (which sees the label and pixels < t).
    `causal=False` drops the attention mask: the bug `check_model` must catch."""

    kind = "ar"

    def __init__(self, n_pixels=64, n_levels=17, n_classes=10, width=16, causal=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.n_pixels, self.n_levels, self.n_classes, self.causal = n_pixels, n_levels, n_classes, causal
        self.tok = nn.Embedding(n_levels + n_classes, width)
        self.pos = nn.Parameter(torch.randn(n_pixels, width) * 0.1)
        layer = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(width, n_levels)

    def forward(self, labels, pixels):
        seq = torch.cat([(labels + self.n_levels)[:, None], pixels[:, :-1]], 1)
        mask = nn.Transformer.generate_square_subsequent_mask(self.n_pixels) if self.causal else None
        return self.head(self.body(self.tok(seq) + self.pos, mask=mask, is_causal=self.causal))


def test_made_and_a_causal_transformer_keep_the_ar_contract():
    check_model(build(ModelConfig("ar", hidden=16, layers=2)), "ar")
    check_model(build(ModelConfig("ar", hidden=16, layers=1, direct=False)), "ar")
    check_model(TinyCausalTransformer(), "ar")
    check_model(build(ModelConfig("diffusion", hidden=16, layers=2)), "diffusion")


def test_control_a_model_that_sees_its_own_pixel_fails_the_contract():
    """Bug guarded: MADE's output mask with >= instead of > (pixel t's logits see pixel t), and a
    transformer without its causal mask: either would make AR sampling and speculative verification
    read the answer they are asked to predict."""
    made = build(ModelConfig("ar", hidden=16, layers=1))
    made.direct.mask.fill_(1.0)
    with pytest.raises(ArgenError, match="not an AR model"):
        check_model(made, "ar")
    with pytest.raises(ArgenError, match="not an AR model"):
        check_model(TinyCausalTransformer(causal=False), "ar")


def test_a_plugged_in_transformer_decodes_with_every_ar_strategy():
    gen = ImageGenerator.from_modules(TinyCausalTransformer(seed=1), "ar", draft=TinyCausalTransformer(seed=2))
    for strategy in ("plain", {"name": "speculative", "k": 3}):
        images = gen.generate_images([0, 5, 9], strategy=strategy, seed=3)
        assert images.shape == (3, 8, 8) and images.dtype == np.int64
        assert images.min() >= 0 and images.max() <= 16
    with pytest.raises(InvalidRequestError, match="draft model must have"):
        ImageGenerator.from_modules(TinyCausalTransformer(), "ar", draft=TinyCausalTransformer(n_levels=5))


# -- speculative sampling is exact --------------------------------------------------------------------
def sharp_made(seed: int, scale: float) -> MadeAR:
    """A tiny random AR model (3 pixels, 3 levels, 2 classes) with its weights scaled up so its
    conditionals are far from uniform (random small weights give near-uniform ones: no test power)."""
    torch.manual_seed(seed)
    model = MadeAR(ModelConfig("ar", hidden=8, layers=1, n_pixels=3, n_levels=3, n_classes=2, dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model.eval()


def exact_joint(model, label: int) -> dict[tuple, float]:
    """p(x | label) for every image x, from the model's conditionals."""
    out = {}
    for x in itertools.product(range(model.n_levels), repeat=model.n_pixels):
        probs = torch.softmax(model(torch.tensor([label]), torch.tensor([x])).double(), -1)[0]
        out[x] = float(np.prod([probs[t, v].item() for t, v in enumerate(x)]))
    return out


N_SAMPLES = 20_000
ALPHA = 1e-3


def chi_square_p(samples: torch.Tensor, joint: dict[tuple, float]) -> tuple[float, float]:
    cells = list(joint)
    index = {c: i for i, c in enumerate(cells)}
    observed = np.bincount([index[tuple(r)] for r in samples.tolist()], minlength=len(cells))
    expected = np.array([joint[c] for c in cells]) * len(samples)
    stat, p = stats.chisquare(observed, expected)
    return float(stat), float(p)


def speculative_samples(k: int, seed: int = 0) -> tuple[torch.Tensor, dict, decoding.Decoded]:
    target, draft = sharp_made(2, 1.5), sharp_made(12, 1.5)
    labels = torch.zeros(N_SAMPLES, dtype=torch.long)
    out = decoding.run(decoding.ar_speculative(target, draft, labels, decoding.row_generators(seed, len(labels)), k=k))
    return out.tokens, exact_joint(target, 0), out


def test_power_of_the_distribution_test():
    """The exactness test below compares N = 20,000 speculative samples over the 27 images of a
    3-pixel, 3-level model with the target's exact joint (chi-square, 26 degrees of freedom,
    alpha = 1e-3). Its power against an output distribution q is that of a noncentral chi-square with
    noncentrality N * D(q || p), D the chi-square divergence sum (q - p)^2 / p: it is >= 0.99 for every
    q with D >= 0.0035, e.g. 0.01 of probability moved from one image of mass 0.05 to another. Computed
    here and asserted, so the statement cannot drift."""
    df, divergence = 26, 0.0035
    critical = stats.chi2.ppf(1 - ALPHA, df)
    assert stats.ncx2.sf(critical, df, N_SAMPLES * divergence) >= 0.99
    assert divergence <= 2 * 0.01**2 / 0.05


def test_speculative_sampling_keeps_the_target_distribution():
    for k in (1, 3):
        samples, joint, out = speculative_samples(k)
        # Far from uniform, yet every image expected >= 5 times (the chi-square approximation holds).
        assert min(joint.values()) * N_SAMPLES >= 5 and max(joint.values()) > 0.1
        stat, p = chi_square_p(samples, joint)
        assert p > ALPHA, f"k={k}: speculative output differs from the target's distribution (chi2={stat:.1f})"
        assert (out.target_passes <= 3).all() and (out.target_passes >= 1).all()


def test_speculative_jacobi_decoding_keeps_the_target_distribution():
    target = sharp_made(2, 1.5)
    joint = exact_joint(target, 0)
    for window in (1, 3):
        out = decoding.run(
            decoding.ar_jacobi(
                target,
                torch.zeros(N_SAMPLES, dtype=torch.long),
                decoding.row_generators(1, N_SAMPLES),
                window=window,
            )
        )
        stat, p = chi_square_p(out.tokens, joint)
        assert p > ALPHA, f"window={window}: Jacobi output differs from the target's distribution (chi2={stat:.1f})"
        assert (out.target_passes <= 3).all() and (out.target_passes >= 1).all()


@pytest.mark.parametrize("broken", ["proposal", "acceptance"])
def test_control_jacobi_with_a_misrecorded_proposal_fails(monkeypatch, broken):
    """Bugs guarded: judging a guess against the wrong proposal distribution (the uniform start
    instead of the pass it was drawn from) and a biased acceptance rule."""
    target = sharp_made(2, 1.5)
    if broken == "acceptance":
        monkeypatch.setattr(decoding, "accept_probability", lambda p, q: torch.clamp(1.3 * p / q, max=1.0))
    else:
        monkeypatch.setattr(decoding, "next_proposals", lambda redo, p, q: q)  # guesses judged against stale q
    out = decoding.run(
        decoding.ar_jacobi(
            target,
            torch.zeros(N_SAMPLES, dtype=torch.long),
            decoding.row_generators(1, N_SAMPLES),
            window=3,
        )
    )
    assert chi_square_p(out.tokens, exact_joint(target, 0))[1] < ALPHA


def test_control_the_draft_distribution_fails_the_distribution_test():
    """The control: the draft's own samples (what accepting every draft token gives) are rejected."""
    target, draft = sharp_made(2, 1.5), sharp_made(12, 1.5)
    samples = decoding.run(
        decoding.ar_plain(
            draft,
            torch.zeros(N_SAMPLES, dtype=torch.long),
            decoding.row_generators(0, N_SAMPLES),
        )
    )
    assert chi_square_p(samples.tokens, exact_joint(target, 0))[1] < ALPHA


@pytest.mark.parametrize("broken", ["acceptance", "residual"])
def test_control_a_biased_rule_fails_the_distribution_test(monkeypatch, broken):
    """Bugs guarded: an acceptance rule off by a factor (min(1, 1.3 p/q)), and resampling a rejected
    token from p instead of norm(max(p - q, 0)); each shifts the output distribution."""
    if broken == "acceptance":
        monkeypatch.setattr(decoding, "accept_probability", lambda p, q: torch.clamp(1.3 * p / q, max=1.0))
    else:
        monkeypatch.setattr(decoding, "residual", lambda p, q: p)
    samples, joint, _ = speculative_samples(3)
    assert chi_square_p(samples, joint)[1] < ALPHA


def test_speculative_passes_shrink_with_a_draft_equal_to_the_target():
    """With the target as its own draft every token is kept: ceil(64 / (k + 1)) target passes."""
    model = build(ModelConfig("ar", hidden=16, layers=1, dropout=0.0)).eval()
    out = decoding.run(decoding.ar_speculative(model, model, torch.arange(4), decoding.row_generators(0, 4), k=3))
    assert out.target_passes.tolist() == [16] * 4 and out.draft_passes.tolist() == [48] * 4


def test_lantern_with_delta_zero_is_exact_speculative_sampling_and_relaxing_saves_passes():
    """LANTERN lends a draft token its neighbours' mass only up to delta: at delta = 0 nothing is
    lent, so the same seed gives the same images as exact speculative sampling (a bug that lends mass
    anyway, or resamples from a different residual, breaks the equality); with delta > 0 more drafts
    are kept, so fewer target passes."""
    target, draft = sharp_made(2, 1.5), sharp_made(12, 1.5)
    labels = torch.zeros(4000, dtype=torch.long)

    def run(relax):
        return decoding.run(
            decoding.ar_speculative(target, draft, labels, decoding.row_generators(5, len(labels)), k=2, relax=relax)
        )

    exact = run(None)
    order = decoding.grey_level_order(3)
    assert torch.equal(run(decoding.Lantern(order, delta=0.0, neighbours=2)).tokens, exact.tokens)
    relaxed = run(decoding.Lantern(order, delta=0.5, neighbours=2))
    assert relaxed.target_passes.double().mean() < exact.target_passes.double().mean()


def test_lantern_neighbourhood_stops_at_delta():
    order = decoding.grey_level_order(5)
    assert order[2].tolist() == [1, 3, 0, 4] and order[0].tolist() == [1, 2, 3, 4]
    p = torch.tensor([[0.1, 0.2, 0.3, 0.25, 0.15]], dtype=torch.double)
    lent, mask = decoding.Lantern(order, delta=0.3, neighbours=2).relaxed(p, torch.tensor([2]))
    assert lent.item() == pytest.approx(0.5) and mask[0].tolist() == [False, True, False, False, False]
    lent, mask = decoding.Lantern(order, delta=0.5, neighbours=2).relaxed(p, torch.tensor([2]))
    assert lent.item() == pytest.approx(0.75) and mask[0].tolist() == [False, True, False, True, False]


# -- diffusion decoding ---------------------------------------------------------------------------------
def test_confidence_decoding_spans_one_pass_to_one_pixel_a_pass():
    model = build(ModelConfig("diffusion", hidden=16, layers=2)).eval()
    labels = torch.arange(5)
    every = decoding.run(
        decoding.diffusion_confidence(model, labels, decoding.row_generators(0, len(labels)), threshold=0.0)
    )
    assert every.target_passes.tolist() == [1] * 5
    one = decoding.run(
        decoding.diffusion_confidence(model, labels, decoding.row_generators(0, len(labels)), threshold=1.0)
    )
    assert one.target_passes.tolist() == [64] * 5
    plain = decoding.run(decoding.diffusion_plain(model, labels, decoding.row_generators(0, len(labels))))
    rows = decoding.run(
        decoding.diffusion_confidence(model, labels, decoding.row_generators(0, len(labels)), threshold=0.0, block=8)
    )
    assert rows.target_passes.tolist() == [8] * 5  # blocks of one row: one pass per row
    for out in (every, one, plain, rows):
        assert out.tokens.min() >= 0 and out.tokens.max() <= 16  # no mask token left


# -- training and its cache ---------------------------------------------------------------------------
def test_training_is_deterministic_from_its_seed():
    recipe = TINY["digits-ar"]
    a, b, c = (training.train(recipe, seed, progress=False) for seed in (0, 0, 1))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert not all(torch.equal(x, z) for x, z in zip(a.state_dict().values(), c.state_dict().values()))


def test_pretrained_trains_once_then_loads_from_the_cache(tiny_recipes, monkeypatch):
    first = training.pretrained("digits-diffusion", progress=False)
    path = training.cached_path("digits-diffusion", TINY["digits-diffusion"], 0)
    assert path.is_file() and path.parent == tiny_recipes / "images"
    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("trained again instead of loading"))
    again = training.pretrained("digits-diffusion", progress=False)
    for x, y in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(x, y)
    # A different recipe is a different file: stale weights are never loaded for it.
    assert training.cached_path("digits-diffusion", replace(TINY["digits-diffusion"], steps=21), 0) != path


# -- API and CLI ------------------------------------------------------------------------------------------
def test_load_and_generate_images(tiny_recipes):
    gen = argen.load("digits-ar")
    assert isinstance(gen, ImageGenerator) and gen.draft is not None
    images = gen.generate_images(labels=[0, 1, 2], seed=7)
    assert images.shape == (3, 8, 8) and images.dtype == np.int64 and 0 <= images.min() <= images.max() <= 16
    assert np.array_equal(images, gen.generate_images(labels=[0, 1, 2], seed=7))
    for strategy in ({"name": "speculative", "k": 2}, {"name": "lantern", "k": 3, "delta": 0.2}, {"name": "jacobi"}):
        spec = gen.generate_images_with_stats([3] * 4, strategy=strategy, seed=1)
        assert spec.images.shape == (4, 8, 8) and (spec.target_passes <= 64).all()
    diffusion = argen.load("digits-diffusion")
    out = diffusion.generate_images_with_stats([4, 5], strategy={"name": "confidence", "threshold": 0.5}, seed=2)
    assert out.images.shape == (2, 8, 8) and (out.target_passes <= 64).all()


@pytest.mark.parametrize(
    "labels, strategy, message",
    [
        ([10], "plain", "label must be an integer class"),
        ([-1], "plain", "label must be an integer class"),
        ([1.5], "plain", "label must be an integer class"),
        ([], "plain", "between 1 and"),
        ([0] * 5000, "plain", "between 1 and"),
        ([0], "confidence", "does not run on a ar"),
        ([0], {"name": "speculative", "k": 1000}, r"k must be a number in \[1, 16\]"),
        ([0], {"name": "speculative", "k": 2.5}, "must be an integer"),
        ([0], {"name": "plain", "temperature": 0}, "temperature must be a number"),
        ([0], {"name": "plain", "draft": "/etc/passwd"}, "unknown option 'draft'"),
        ([0], {"name": "beam"}, "does not run on"),
        ([0], {"name": "lantern", "delta": 2}, r"delta must be a number in \[0.0, 1.0\]"),
        ([0], {"name": "lantern", "neighbours": 99}, "neighbours must be a number"),
    ],
)
def test_bad_requests_get_clear_errors(tiny_recipes, labels, strategy, message):
    gen = argen.load("digits-ar")
    with pytest.raises(InvalidRequestError, match=message):
        gen.generate_images(labels, strategy=strategy, seed=0)


def test_cli_writes_a_png_grid(tiny_recipes, tmp_path, capsys):
    from argen.cli import main

    out = tmp_path / "grid.png"
    assert main(["generate", "--model", "digits-ar", "--labels", "0,1,2", "--out", str(out), "--seed", "1"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "3 images" in capsys.readouterr().err
    assert (
        main(
            [
                "generate",
                "--model",
                "digits-diffusion",
                "--labels",
                "7",
                "--strategy",
                "confidence",
                "--strategy-opt",
                "threshold=0.8",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    assert "label 7:" in capsys.readouterr().out


def test_cli_checks_image_options_before_loading(tiny_recipes, monkeypatch, capsys):
    from argen.cli import main

    monkeypatch.setattr("argen.images.pretrained", lambda *a, **k: pytest.fail("loaded (and maybe trained) first"))
    assert main(["generate", "--model", "digits-ar", "--labels", "0", "--strategy", "confidence"]) != 0
    assert "does not run on a ar" in capsys.readouterr().err
    assert main(["generate", "--model", "digits-ar", "--labels", "0,x"]) != 0
    assert "comma-separated list of integers" in capsys.readouterr().err
    assert main(["generate", "--labels", "0", "hello"]) != 0  # a text model: --labels is refused, nothing loaded
    assert "--labels and --out are for image models" in capsys.readouterr().err


# -- quality ------------------------------------------------------------------------------------------------
def test_frechet_distance_is_zero_for_equal_sets_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 5))
    assert abs(frechet(a, a)) < 1e-6
    assert frechet(a, a + 0.5) == pytest.approx(5 * 0.25, rel=1e-6)  # a mean shift only: |d|^2
    assert frechet(a, a * 2) > 1.0


def test_nearest_training_distance_is_zero_for_a_copy():
    split = load_split()
    copies = split.train_x[[5, 700, 1400]]
    assert nearest_training_l1(copies).tolist() == [0, 0, 0]
    assert (nearest_training_l1(split.test_x[:150]) > 0).mean() > 0.95  # held-out digits are (nearly all) new


def test_blocks_are_decoded_in_order():
    """Bug guarded: a block chosen per pixel instead of per image (or the last block first) unmasks
    pixels of a later row while an earlier row still has masked ones."""
    seen = []

    class Recorder(nn.Module):
        n_pixels, n_levels, n_classes = 64, 17, 10

        def forward(self, labels, pixels):
            seen.append((pixels != 17).clone())
            return torch.randn(len(labels), 64, 17, generator=torch.Generator().manual_seed(len(seen)))

    decoding.run(
        decoding.diffusion_confidence(
            Recorder(), torch.arange(3), decoding.row_generators(0, 3), threshold=0.3, block=8
        )
    )
    for done in seen:
        rows = done.reshape(-1, 8, 8).all(-1)  # (images, rows) fully decoded
        started = done.reshape(-1, 8, 8).any(-1)
        for image in range(len(done)):
            first_open = int((~rows[image]).nonzero()[0]) if not rows[image].all() else 8
            assert not started[image, first_open + 1 :].any()
