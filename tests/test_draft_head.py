"""The draft head (models/draft_head.py), its recipe (recipes/draft_head.py, `argen distill-draft`)
and strategy `draft-head`: a training step that learns, training deterministic from its seed, the
cache (keyed by model and recipe, reloaded, missed by another model), the runtime computing what
training trained, and the strategy's exactness (greedy identity with plain, same-seed sampling
identity, the cache after every step; the exact output distribution is in test_distribution.py).

Tiny heads are trained here on the tiny models in seconds, from a few short texts."""

from __future__ import annotations

import pytest
import torch
from checks import check_cache_matches_prefill, check_greedy_identical

import argen
from argen.api import Generator
from argen.errors import ArgenError, InvalidRequestError
from argen.models.draft_head import DraftHeadRuntime, read_head
from argen.models.runtime import Segment
from argen.recipes import draft_head as recipe_module
from argen.recipes.draft_head import (
    LoadedHeads,
    Recipe,
    Trainer,
    distill,
    generate_data,
    load_draft_head,
    make_batch,
    new_head,
)
from argen.recipes.local_text import Corpus, build_prompts, roff_text

CORPUS = Corpus(
    prose=["The fox runs to the river. The river is cold and the fox is quick. It drinks and runs home again."],
    functions=[("m.add", "Return the sum of a and b.", "def add(a, b):\n    return a + b\n")],
    topics=["tar, the command to archive files"],
    foreign=[("German", "Der Hund ist klein und schnell und er bellt oft sehr laut.")],
)
TINY = Recipe(prompts=8, max_new_tokens=24, vocab=256, epochs=6, batch_tokens=2048, lr=3e-3)


def tiny_head(gen: Generator, path, recipe: Recipe = TINY) -> DraftHeadRuntime:
    distill(gen, recipe, progress=False, path=path, corpus=CORPUS)
    return load_draft_head(gen.runtime, path)


@pytest.fixture(scope="module")
def looping_head(looping, tmp_path_factory) -> DraftHeadRuntime:
    return tiny_head(looping, tmp_path_factory.mktemp("heads") / "looping.safetensors")


@pytest.fixture(scope="module")
def random_head(tiny, tmp_path_factory) -> DraftHeadRuntime:
    """A head for tiny-random, whose text never repeats: its drafts are mostly rejected."""
    return tiny_head(
        tiny,
        tmp_path_factory.mktemp("heads") / "tiny.safetensors",
        Recipe(prompts=4, max_new_tokens=16, vocab=256, epochs=1),
    )


@pytest.fixture(scope="module")
def examples(tiny):
    prompts = build_prompts(CORPUS, 4, 0)
    return generate_data(tiny, prompts, Recipe(prompts=4, max_new_tokens=16), progress=False)


# -- training -----------------------------------------------------------------------------------
def test_recorded_features_are_the_targets_hidden_states(tiny, examples):
    """The recorder keeps, for every token but the last, the final hidden state a fresh prefill of
    the whole sequence computes (the head learns from exactly what the verifier hands it)."""
    e = examples[0]
    cache = tiny.runtime.new_cache(1, len(e.ids))
    _, hidden = tiny.runtime.forward(
        torch.tensor([e.ids[:-1]]), torch.arange(len(e.ids) - 1)[None], cache, num_logits=0
    )
    cache.free()
    assert e.features.shape == (len(e.ids) - 1, tiny.runtime.info.hidden_size)
    assert torch.allclose(e.features, hidden[0], atol=1e-4)


@pytest.mark.parametrize("init", ["random", "last-layer"])
def test_a_training_step_lowers_the_loss_on_a_fixed_batch(tiny, examples, init):
    trainer = Trainer(tiny.runtime, torch.arange(tiny.runtime.info.vocab_size), unroll=3, reg_weight=1.0)
    weights = new_head(tiny.runtime, Recipe(init=init))
    if init == "last-layer":
        assert torch.equal(weights.down.weight, tiny.runtime.layers[-1].down.weight)
    batch = make_batch(examples)
    optimizer = torch.optim.AdamW(weights.parameters(), lr=3e-3)
    first, metrics = trainer.loss(weights, batch)
    assert {"ce1", "ce2", "ce3", "top1_1"} <= set(metrics)
    for _ in range(30):
        loss, _ = trainer.loss(weights, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    last, _ = trainer.loss(weights, batch)
    assert last.item() < 0.7 * first.item(), (first.item(), last.item())


def test_training_is_deterministic_from_the_seed(tiny, tmp_path):
    recipe = Recipe(prompts=4, max_new_tokens=12, vocab=256, epochs=2, sampled=0.5)
    heads = [
        read_head(distill(tiny, r, progress=False, path=tmp_path / f"{i}.safetensors", corpus=CORPUS))
        for i, r in enumerate([recipe, recipe, Recipe(**(vars(recipe) | {"seed": 1}))])
    ]
    (a, vocab_a, meta_a), (b, vocab_b, _), (c, _, _) = heads
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert torch.equal(vocab_a, vocab_b)
    assert not torch.equal(a.fc.weight, c.fc.weight)
    assert meta_a["recipe"]["seed"] == 0 and meta_a["sequences"] == 4
    # The run's record (recipes/cached.py's run_meta), which the documented recipe times quote.
    assert meta_a["threads"] == torch.get_num_threads() and meta_a["torch"] == torch.__version__ and meta_a["cpu"]
    assert meta_a["data_seconds"] + meta_a["train_seconds"] == pytest.approx(meta_a["seconds"])
    assert meta_a["cpu_seconds"] > 0


# -- the cache ----------------------------------------------------------------------------------
def test_the_cache_is_keyed_by_model_and_recipe_reloaded_and_missed_by_another_model(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("ARGEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(ArgenError, match="argen distill-draft --model tiny-random"):
        load_draft_head(tiny.runtime, None, "tiny-random")
    recipe = Recipe(prompts=4, max_new_tokens=12, vocab=256, epochs=1)
    monkeypatch.setattr(recipe_module, "Recipe", lambda: recipe)  # this tiny recipe stands for the default one
    path = distill(tiny, recipe, progress=False, corpus=CORPUS)
    assert path == tmp_path / "draft-heads" / f"{recipe_module.fingerprint(tiny.runtime)}-{recipe.key()}.safetensors"
    assert Recipe(**(vars(recipe) | {"vocab": 128})).key() != recipe.key()
    head = load_draft_head(tiny.runtime, None, "tiny-random")
    assert head is load_draft_head(tiny.runtime, "cached") and head.target is tiny.runtime  # loaded once
    assert torch.equal(head.vocab, read_head(path)[1])
    other = argen.load("tiny-random@1")
    assert recipe_module.fingerprint(other.runtime) != recipe_module.fingerprint(tiny.runtime)
    with pytest.raises(ArgenError, match="no draft head is cached"):
        load_draft_head(other.runtime, None, "tiny-random@1")
    with pytest.raises(ArgenError, match="distilled from another model"):
        load_draft_head(other.runtime, path, "tiny-random@1")


def test_a_missing_head_says_to_run_distill_draft(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("ARGEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(ArgenError, match="argen distill-draft"):
        tiny.generate("hi", max_new_tokens=4, strategy="draft-head")
    from argen.engine import Request
    from argen.sampling import SamplingParams
    from argen.strategies import make_strategy

    with pytest.raises(InvalidRequestError, match="argen distill-draft"):  # below the API nothing loads a head
        tiny.engine.validate(Request(tiny.encode("hi"), SamplingParams(max_new_tokens=4), make_strategy("draft-head")))


# -- the runtime computes what training trained --------------------------------------------------
def test_drafting_feeds_compute_the_unrolled_training_steps(tiny, random_head):
    """Entry i of unrolled step s (what training scores) equals what the runtime computes for a node
    s - 1 deep: entries 0..i - s + 1 caught up with the target's features, then the nodes fed level
    by level with their parents' predicted features and a mask over the cache. (A mask that let
    step s see other entries, or a feature fed from the wrong entry, fails this.)"""
    head, c = random_head, random_head.config
    gen = torch.Generator().manual_seed(0)
    n = 12
    tokens = torch.randint(0, 256, (1, n + 1), generator=gen)
    feats = torch.randn(1, n, c.hidden_size, generator=gen)
    emb = tiny.runtime.embed_tokens(tokens[:, 1:]).float()
    with torch.no_grad():
        steps = head.weights.unrolled(emb, feats, tiny.runtime.cos[:n], tiny.runtime.sin[:n], 3)
    i = 9
    for depth in (0, 1, 2):  # a node `depth` deep is entry i of step depth + 1
        committed = i - depth + 1  # entries 0..committed-1 hold the target's features
        cache = head.new_cache(1, n + 4)
        out = head.forward_packed(
            [
                Segment(
                    cache, tokens[0, 1 : committed + 1], list(range(committed)), None, 1, features=feats[0, :committed]
                )
            ]
        )[0]
        feature = out.hidden[-1]
        for d in range(depth):  # each level: one node, seeing the committed entries, its ancestors and itself
            position = committed + d
            mask = torch.ones(1, position + 1, dtype=torch.bool)
            out = head.forward_packed(
                [Segment(cache, [int(tokens[0, position + 1])], [position], mask, 1, features=feature[None])]
            )[0]
            feature = out.hidden[-1]
        want = steps[depth][0, i]
        assert torch.allclose(feature, want, atol=1e-4), (depth, (feature - want).abs().max())
        cache.free()
    with torch.no_grad():  # steps after the first computed from entry 4 on: the same from entry 4 + 3 on
        windowed = head.weights.unrolled(emb, feats, tiny.runtime.cos[:n], tiny.runtime.sin[:n], 3, first=4)
    for full, part in zip(steps, windowed, strict=True):
        assert torch.allclose(full[:, 7:], part[:, 7:], atol=1e-5)


# -- the strategy -----------------------------------------------------------------------------------
@pytest.mark.parametrize("adaptive", [False, True])
def test_greedy_equals_plain_where_drafts_fail(tiny, random_head, adaptive):
    for prompt in ("no repeats here!", "abc abc abc abc abc abc"):
        check_greedy_identical(tiny, prompt, {"name": "draft-head", "head": random_head, "adaptive": adaptive})


@pytest.mark.parametrize("adaptive", [False, True])
def test_greedy_equals_plain_where_drafts_succeed(looping, looping_head, adaptive):
    plain = looping.generate("hello", max_new_tokens=60, ignore_eos=True)
    spec = {"name": "draft-head", "head": looping_head, "adaptive": adaptive}
    out = check_greedy_identical(looping, "hello", spec, max_new_tokens=60)
    s = out.stats
    assert out.extras["draft_head"]["head_passes"] == s.draft_passes
    if adaptive:
        return  # on a model this small a head pass costs about a target pass: drafting may not pay (sizing: below)
    assert 0 < s.draft_tokens_accepted < s.draft_tokens_proposed, s  # both verifier branches were taken
    assert s.forward_passes < plain.stats.forward_passes


class FixedCost:
    """A cost model that ignores timings: `body(n)` seconds for a pass over n tokens, free logits."""

    def __init__(self, body) -> None:
        self.body, self.head_seconds = body, 0.0

    def shared(self, n_tokens: int, rows: float = 1.0, batch: int = 1) -> float:
        return self.body(batch * n_tokens) / batch

    def __call__(self, n_tokens: int, rows: float = 1.0) -> float:
        return self.body(n_tokens)

    def observe(self, *args) -> None:
        pass


@pytest.mark.parametrize(
    "body, head, drafts",
    [(lambda n: 1.0, 0.01, True), (lambda n: float(n), 0.01, False), (lambda n: 1.0, 5.0, False)],
    ids=["verifying is flat: draft", "verifying costs per token: plain", "head passes dear: plain"],
)
def test_adaptive_sizing_drafts_where_it_pays(looping, looping_head, monkeypatch, body, head, drafts):
    """The tree is sized by the pass costs: verification as cheap for 17 tokens as for 1 and cheap head
    passes give deep trees; verification that grows with every token, or a head pass dearer than the
    tokens it could win, give plain steps, and there the head rests between tries (guards against a
    head pass paid every step where drafting never pays: 0.87x plain on Spec-Bench before)."""
    from argen.strategies.speculative import adaptive, draft_head

    monkeypatch.setattr(adaptive.CostModel, "for_runtime", staticmethod(lambda runtime: FixedCost(body)))
    monkeypatch.setattr(draft_head.DraftHead, "_head_seconds", lambda self, m, rows: head)
    spec = {"name": "draft-head", "head": looping_head}
    out = check_greedy_identical(looping, "hello", spec, max_new_tokens=40)
    s = out.stats
    if drafts:
        assert s.draft_tokens_proposed > 3 * s.forward_passes and s.forward_passes < 30, s
    else:
        assert s.draft_tokens_proposed == 0, s
        # Rests of 1, 2, 4, 8, 8, ... steps: about one head pass in nine steps once it has backed off.
        assert out.extras["draft_head"]["head_passes"] <= 10 < s.forward_passes, (out.extras, s)


def test_adaptive_growth_grows_only_nodes_worth_verifying(looping, looping_head, monkeypatch):
    """With verification flat up to two tokens and steep beyond, at most one node is ever worth
    verifying, so each level's head pass feeds that one node, not the `width` most probable of its
    level. Guards against growing the top `width` children whatever the sizing kept (a head pass
    over nodes that can never be verified)."""
    from argen.strategies.speculative import adaptive, draft_head

    monkeypatch.setattr(
        adaptive.CostModel,
        "for_runtime",
        staticmethod(lambda runtime: FixedCost(lambda n: 1.0 if n <= 2 else float(n))),
    )
    monkeypatch.setattr(draft_head.DraftHead, "_head_seconds", lambda self, m, rows: 0.01)
    grown: list[int] = []
    timed = draft_head.DraftHead._timed

    def recording(self, state, feed):
        if feed.mask is not None:  # a level's pass (a catch-up is causal)
            grown.append(len(feed.tokens))
        return (yield from timed(self, state, feed))

    monkeypatch.setattr(draft_head.DraftHead, "_timed", recording)
    out = check_greedy_identical(
        looping, "hello", {"name": "draft-head", "head": looping_head, "width": 4}, max_new_tokens=40
    )
    assert out.stats.draft_tokens_accepted > 0, out.stats
    assert grown and set(grown) == {1}, grown


def test_cache_after_every_step_equals_a_fresh_prefill(looping, looping_head):
    accepted = check_cache_matches_prefill(
        looping, "hello", {"name": "draft-head", "head": looping_head, "adaptive": False}, max_new_tokens=30, atol=1e-5
    )
    assert accepted > 0


def test_sampling_reproduces_plain_sampling_for_the_same_seed(looping, looping_head):
    accepted = rejected = 0
    for seed in range(8):
        params = dict(max_new_tokens=30, temperature=(1.0, 0.7)[seed % 2], top_k=(0, 40)[seed // 4], seed=seed)
        plain = looping.generate("hello", **params)
        out = looping.generate(
            "hello", strategy={"name": "draft-head", "head": looping_head, "adaptive": False}, **params
        )
        assert out.token_ids == plain.token_ids, params
        accepted += out.stats.draft_tokens_accepted
        rejected += out.stats.draft_tokens_proposed - out.stats.draft_tokens_accepted
    assert accepted > 0 and rejected > 0


def test_batched_requests_share_head_passes_and_equal_their_lone_runs(looping, looping_head):
    prompts = ["hello", "abc", "x y z"]
    spec = {"name": "draft-head", "head": looping_head, "adaptive": False}
    alone = [looping.generate(p, max_new_tokens=24, ignore_eos=True, strategy=spec).token_ids for p in prompts]
    together = looping.generate(prompts, max_new_tokens=24, ignore_eos=True, strategy=spec)
    assert [r.token_ids for r in together] == alone


def test_options_are_checked(looping_head):
    from argen.strategies import make_strategy

    for bad in ({"width": 0}, {"max_nodes": 0}, {"width": 2.5}, {"head": 3}, {"max_draft": 0}):
        with pytest.raises(InvalidRequestError):
            make_strategy({"name": "draft-head", **bad})
    strategy = make_strategy({"name": "draft-head", "head": looping_head})
    assert strategy.options()["head"] == "looping.safetensors"  # a loaded head is recorded by its file


def test_roff_text_reads_a_man_page():
    page = '.TH "X" "1"\n.SH "NAME"\nx \\- ein Werkzeug\n.PP\nDies ist \\fBwichtig\\fR f\\(:ur alle\\&.\n'
    assert roff_text(page) == ["x - ein Werkzeug", "Dies ist wichtig für alle."]


# -- the server: heads are the operator's choice ---------------------------------------------------
@pytest.fixture(scope="module")
def head_server(tiny, random_head):
    from server_helpers import running_server

    from argen.server.companions import Companions

    companions = Companions.load(tiny, "tiny-random", heads=[f"h={random_head.meta['path']}"])
    with running_server(tiny, companions=companions) as (url, _):
        yield url


def post(url: str, spec, **fields):
    import json

    import httpx

    body = {"model": "tiny-random", "prompt": "Hello", "max_tokens": 12, "temperature": 0, "strategy": spec, **fields}
    return httpx.post(
        f"{url}/v1/completions",
        content=json.dumps(body).encode(),  # NaN as a careless client sends it
        headers={"content-type": "application/json"},
        timeout=60,
    )


def test_a_server_with_a_head_serves_draft_head_as_the_python_api_does(head_server, tiny, random_head):
    want = tiny.generate("Hello", chat=False, max_new_tokens=12, strategy={"name": "draft-head", "head": random_head})
    for spec in ({"name": "draft-head"}, {"name": "draft-head", "head": "h"}, "draft-head"):
        r = post(head_server, spec, return_token_ids=True)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == want.token_ids


@pytest.mark.parametrize(
    "spec, status, words",
    [
        ({"name": "draft-head", "head": "cached"}, 400, "must name one of this server's head models ('h')"),
        ({"name": "draft-head", "head": "/tmp/x.safetensors"}, 400, "--draft-head NAME=SOURCE"),
        ({"name": "draft-head", "head": "~/.cache/argen/draft-heads/x.safetensors"}, 400, "must name one of"),
        ({"name": "draft-head", "head": "tiny-random"}, 400, "must name one of"),
        ({"name": "draft-head", "head": 5}, 400, "must name one of"),
        ({"name": "draft-head", "head": ["h"]}, 400, "must name one of"),
        ({"name": "draft-head", "head": None}, 400, "must name one of"),
        (
            {"name": "draft-head", "width": 10**6},
            400,
            "option width of strategy 'draft-head' is 1000000, but this server allows at most 8",
        ),
        ({"name": "draft-head", "max_nodes": 10**9}, 400, "max_nodes"),
        ({"name": "draft-head", "max_draft": 4096}, 400, "max_draft"),
        ({"name": "draft-head", "width": 0}, 400, "width must be an integer >= 1"),
        ({"name": "draft-head", "width": 2.5}, 400, "must be an integer"),
        ({"name": "draft-head", "max_nodes": float("nan")}, 400, "max_nodes"),
        ({"name": "draft-head", "adaptive": "yes"}, 400, "true or false"),
    ],
)
def test_hostile_draft_head_options_get_400_and_nothing_is_loaded(head_server, tiny, spec, status, words):
    before = dict(tiny.runtime.memo.get(LoadedHeads).by_path)
    r = post(head_server, spec)
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert words in message
    for secret in ("/tmp", ".cache", "safetensors"):
        assert secret not in message, message
    assert tiny.runtime.memo.get(LoadedHeads).by_path == before


def test_a_server_without_a_head_refuses_draft_head_saying_what_the_operator_does(tiny):
    from server_helpers import running_server

    with running_server(tiny) as (url, _):
        r = post(url, {"name": "draft-head"})
    assert r.status_code == 400
    assert "--draft-head NAME=cached" in r.json()["error"]["message"]


def test_serve_checks_its_draft_head_flag(capsys, monkeypatch, tmp_path):
    from argen.cli import main

    monkeypatch.setenv("ARGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("argen.server.serve.serve", lambda *a, **k: pytest.fail("served despite a bad --draft-head"))
    assert main(["serve", "--model", "tiny-random", "--draft-head", "nosource"]) == 2
    assert "--draft-head takes NAME=SOURCE (e.g. default=cached)" in capsys.readouterr().err
    assert main(["serve", "--model", "tiny-random", "--draft-head", "h=cached"]) == 2
    assert "run `argen distill-draft --model tiny-random`" in capsys.readouterr().err
