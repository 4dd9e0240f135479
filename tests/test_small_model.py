"""The small model (recipes/small_model.py, `argen distill-small`): the cut against the large model's
own weights run by hand, a training step that learns, training deterministic from its seed, the
cache (found again, remade with --force, refused for other weights, a clear message when missing)
and the command end to end. All on tiny-random (4 layers), in seconds, from a few short texts."""

from __future__ import annotations

import pytest
import torch

import argen
from argen.cli import main
from argen.errors import ArgenError
from argen.recipes import small_model as recipe_module
from argen.recipes.local_text import Corpus
from argen.recipes.small_model import (
    META_FILE,
    Recipe,
    TeacherData,
    cut_model,
    distill,
    kl_to_teacher,
    load_small_model,
    model_logits,
    read_meta,
    small_model_path,
    teacher_data,
    train,
    windows,
)

CORPUS = Corpus(
    prose=[f"The fox runs to the river {i}. The river is cold and the fox is quick. It drinks." for i in range(60)],
    functions=[("m.add", "Return the sum of a and b.", "def add(a, b):\n    return a + b\n")],
    foreign=[("German", "Der Hund ist klein und schnell und er bellt oft sehr laut.")],
)
TINY = Recipe(layers=2, steps=6, lr=1e-2, sequences=8, seq_len=32, batch=4, top_k=16)
IDS = torch.tensor([[257, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]])


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test's cache is its own directory (the real cache is never touched)."""
    monkeypatch.setenv("ARGEN_CACHE_DIR", str(tmp_path / "cache"))


def test_full_cut_reproduces_the_model(tiny, tmp_path):
    """Kept at every layer and untrained, the small model (saved, reloaded through load_model) is the
    large model: identical logits. Seen failing with the LM head left out of the cut (tiny-random's
    head is untied: the small model's was reinitialised)."""
    path = distill(tiny.model, Recipe(layers=4, steps=0), progress=False, path=tmp_path / "full")
    small = load_small_model(tiny.runtime, path)
    assert small.runtime.info.n_layers == 4
    assert torch.equal(model_logits(small.runtime, IDS), model_logits(tiny.runtime, IDS))


def test_cut_is_the_first_k_layers_by_hand(tiny, tmp_path):
    """A cut at k = 2 < 4 computes the large model's first two layers, then its final norm and LM
    head: the reference is the large HF model's own hidden state after layer 2 (output_hidden_states),
    normed and projected by hand. Seen failing with the cut keeping layers 1..k instead of 0..k-1."""
    path = distill(tiny.model, Recipe(layers=2, steps=0), progress=False, path=tmp_path / "cut")
    small = load_small_model(tiny.runtime, path)
    hf = tiny.model.hf_model
    with torch.no_grad():
        hidden = hf(input_ids=IDS, output_hidden_states=True).hidden_states[2]  # after layers 0 and 1
        h = hidden.float()
        normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + hf.config.rms_norm_eps) * hf.model.norm.weight
        want = normed @ hf.lm_head.weight.T
    got = model_logits(small.runtime, IDS)
    assert small.runtime.info.n_layers == 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - model_logits(tiny.runtime, IDS)).abs().max() > 1e-2  # and it is not the full model


def test_quantized_large_model_gets_a_quantized_small_model(tmp_path):
    """Beside a large model on quantized blocks, the small model runs on Q8_0 blocks through the same
    fused forward (not dense fp32, a slower path; not Q4_1, which undoes the distillation). Seen
    failing with matching_quant always answering "none"."""
    large = argen.load("tiny-random", quant="q4_1")
    path = distill(large.model, Recipe(layers=2, steps=0), progress=False, path=tmp_path / "cut")
    small = load_small_model(large.runtime, path)
    assert large.runtime.fused is not None
    assert small.quant == "q8_0" and small.runtime.fused is not None


def teacher(tiny) -> TeacherData:
    texts = recipe_module.corpus_texts(CORPUS)
    ids = windows(tiny.tokenizer, texts, TINY.sequences, TINY.seq_len, 0, 258)
    return teacher_data(tiny.runtime, ids, TINY.top_k, progress=False)


def test_training_lowers_the_kl(tiny):
    """Six steps on the teacher's data lower the (top-k) KL to the large model on a fixed batch.
    Seen failing with the loss's sign flipped (the student pushed away from the teacher)."""
    data = teacher(tiny)
    student = cut_model(tiny.model.hf_model_loader(), TINY.layers)

    def kl() -> float:  # by hand, sum over the teacher's top k of p_t (log p_t - log q_s), mean over positions
        with torch.no_grad():
            q = torch.log_softmax(student(input_ids=data.ids).logits, -1).gather(-1, data.top_ids.long())
        p = data.top_logprobs
        return (p.exp() * (p - q)).sum(-1).mean().item()

    before = kl()
    losses = train(student, data, TINY, progress=False)
    after = kl()
    assert len(losses) == TINY.steps
    assert after < 0.8 * before, (before, after)
    assert kl_to_teacher(student, data) == pytest.approx(after, rel=1e-4)  # the recipe's own measure agrees


def test_training_is_deterministic_from_the_seed(tiny):
    """Two runs of one recipe give identical weights; another seed gives other weights. Seen failing
    with the batch order drawn from torch's global generator instead of the recipe's seed."""
    data = teacher(tiny)

    def weights(recipe: Recipe) -> dict[str, torch.Tensor]:
        torch.manual_seed(torch.seed() % 1000)  # the global generator differs from run to run
        student = cut_model(tiny.model.hf_model_loader(), recipe.layers)
        train(student, data, recipe, progress=False)
        return student.state_dict()

    first, second, other = weights(TINY), weights(TINY), weights(Recipe(**{**TINY.__dict__, "seed": 1}))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_the_cache(tiny, tmp_path, monkeypatch, capsys):
    """distill-small caches under the model's fingerprint and the recipe: load_small_model finds it
    ("cached"); a second command finds it without training; --force trains again; a small model made
    from other weights is refused. Seen failing with load_small_model skipping the fingerprint check."""
    monkeypatch.setattr("argen.recipes.local_text.local_corpus", lambda *a, **k: CORPUS)
    with pytest.raises(ArgenError, match=r"argen distill-small --model tiny-random"):
        load_small_model(tiny.runtime, model_name="tiny-random")
    args = ["distill-small", "--model", "tiny-random", "--no-progress", "--layers", "2", "--steps", "3"]
    args += ["--sequences", "8", "--seq-len", "32", "--batch", "4", "--top-k", "16"]
    assert main(args) == 0
    made = capsys.readouterr()
    path = small_model_path(tiny.runtime, Recipe(layers=2, steps=3, sequences=8, seq_len=32, batch=4, top_k=16))
    assert made.out.strip() == str(path) and "written to" in made.err
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    meta = read_meta(path)
    assert meta["fingerprint"] and meta["recipe"]["steps"] == 3
    # The run's record (recipes/cached.py's run_meta), which the documented recipe time quotes.
    assert meta["threads"] == torch.get_num_threads() and meta["torch"] == torch.__version__ and meta["cpu"]
    assert meta["teacher_seconds"] + meta["train_seconds"] == pytest.approx(meta["seconds"]) and meta["cpu_seconds"] > 0

    small = load_small_model(tiny.runtime, "cached")  # the only one cached for this model
    assert small.runtime.info.n_layers == 2 and small.runtime.info.vocab_size == tiny.runtime.info.vocab_size
    assert load_small_model(tiny.runtime) is small  # once per runtime

    assert main(args) == 0
    assert "is cached" in capsys.readouterr().err
    stamp = (path / META_FILE).stat().st_mtime_ns
    assert main([*args, "--force"]) == 0
    assert "written to" in capsys.readouterr().err and (path / META_FILE).stat().st_mtime_ns != stamp

    other = argen.load("tiny-random@1")
    with pytest.raises(ArgenError, match=r"made from another model .*argen distill-small"):
        load_small_model(other.runtime, path, model_name="tiny-random@1")
    with pytest.raises(ArgenError, match="no small model is cached"):
        load_small_model(other.runtime, model_name="tiny-random@1")
    with pytest.raises(ArgenError, match="does not exist"):
        load_small_model(tiny.runtime, tmp_path / "nowhere")


def test_recipe_checks():
    for bad in (Recipe(layers=0), Recipe(steps=-1), Recipe(lr=0.0), Recipe(layers=2, train_layers=3)):
        with pytest.raises(ArgenError, match="recipe setting|train_layers"):
            bad.check()
