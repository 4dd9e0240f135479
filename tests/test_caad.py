"""Strategy caad (context-aware adaptive decoding) and its grounding store (recipes/caad_store.py)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from small_large_helpers import assert_refused

import argen
from argen.errors import ArgenError, InvalidRequestError
from argen.recipes.caad_store import GroundingStore, LoadedStores, build_store, load_store
from argen.strategies import make_strategy

PROMPT = "The quick brown fox"
N = 12


@pytest.fixture(scope="module")
def continuation(tiny) -> list[int]:
    """A hand-made reference continuation of PROMPT: fixed token ids, not the model's greedy output."""
    vocab = tiny.runtime.info.vocab_size
    return [(17 * i + 5) % vocab for i in range(1, N + 1)]


@pytest.fixture(scope="module")
def token_store(tiny, continuation, tmp_path_factory):
    """A kNN-LM store (values=tokens) of the prompt followed by the reference continuation."""
    tokens = tiny.encode(PROMPT, chat=False) + continuation
    path = tmp_path_factory.mktemp("caad") / "tokens.safetensors"
    build_store(tiny.runtime, [tokens], values="tokens").save(path)
    return path


@pytest.fixture(scope="module")
def logit_store(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("caad") / "logits.safetensors"
    texts = ["Hello world, this is a reference text.", "Another text about foxes and dogs."]
    build_store(tiny.runtime, [tiny.encode(t, chat=False) for t in texts], values="logits", top_k=8).save(path)
    return path


def test_blend_zero_is_plain_greedy(tiny, logit_store):
    """Bug it caught when put in by hand: the blend weights swapped ((1 - blend) on the store)."""
    want = tiny.generate(PROMPT, chat=False, max_new_tokens=N, temperature=0)
    got = tiny.generate(
        PROMPT,
        chat=False,
        max_new_tokens=N,
        temperature=0,
        strategy={"name": "caad", "store": str(logit_store), "blend": 0.0, "top_n": 4},
    )
    assert got.token_ids == want.token_ids


def test_blend_one_top_one_reproduces_the_stored_continuation(tiny, token_store, continuation):
    """Bug it caught when put in by hand: the store kept the token at i (not i + 1) as the value."""
    plain = tiny.generate(PROMPT, chat=False, max_new_tokens=N, temperature=0)
    assert plain.token_ids != continuation  # the reference is not what the model says anyway
    got = tiny.generate(
        PROMPT,
        chat=False,
        max_new_tokens=N,
        temperature=0,
        strategy={"name": "caad", "store": str(token_store), "blend": 1.0, "top_n": 1},
    )
    assert got.token_ids == continuation


def test_index_search_equals_exact_search(tiny):
    """Bug it caught when put in by hand: the faiss index built with the L2 metric (not inner product)."""
    torch.manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(600, 32), dim=-1)
    store = GroundingStore(keys, torch.zeros(600, 1, dtype=torch.long), torch.ones(600, 1), "x")
    for _ in range(20):
        q = torch.randn(32) * 3
        exact_scores, exact_idx = store.search_exact(q, 8)
        scores, idx = store.search_index(q, 8)
        assert idx.tolist() == exact_idx.tolist()
        torch.testing.assert_close(scores, exact_scores, atol=1e-5, rtol=1e-5)


def test_a_store_from_other_weights_is_refused(tiny, tmp_path):
    """Bug it caught when put in by hand: the fingerprint check left out of load_store."""
    other = argen.load("tiny-random@1")
    path = tmp_path / "other.safetensors"
    build_store(other.runtime, [other.encode("Some text here", chat=False)]).save(path)
    with pytest.raises(ArgenError, match="built from other weights"):
        load_store(tiny.runtime, path)
    with pytest.raises(ArgenError, match="does not exist"):
        load_store(tiny.runtime, tmp_path / "missing.safetensors")


def test_caad_without_a_store_says_how_to_build_one(tiny):
    with pytest.raises(InvalidRequestError, match="argen caad-store"):
        tiny.generate(PROMPT, chat=False, max_new_tokens=2, strategy="caad")


@pytest.mark.parametrize(
    "bad", [{"top_n": 0}, {"top_n": 65}, {"blend": 1.5}, {"blend": -0.1}, {"temperature": 0}, {"store": 5}]
)
def test_bad_options_are_refused(bad):
    with pytest.raises(InvalidRequestError):
        make_strategy({"name": "caad", **bad})


def test_caad_store_command(tiny, tmp_path, capsys):
    from argen.cli import main

    refs = tmp_path / "refs.jsonl"
    refs.write_text("\n".join(json.dumps({"text": t}) for t in ["one two three", "four five six seven"]) + "\n")
    out = tmp_path / "store.safetensors"
    assert main(["caad-store", "--model", "tiny-random", "--input", str(refs), "--out", str(out), "--no-progress"]) == 0
    store = load_store(tiny.runtime, out)
    assert len(store) == sum(len(tiny.encode(t, chat=False)) - 1 for t in ["one two three", "four five six seven"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    assert main(["caad-store", "--model", "tiny-random", "--input", str(bad), "--out", str(out)]) == 2
    assert "string field 'text'" in capsys.readouterr().err


# -- the server: stores are the operator's choice ---------------------------------------------------
@pytest.fixture(scope="module")
def store_server(tiny, token_store):
    from server_helpers import running_server

    from argen.server.companions import Companions

    companions = Companions.load(tiny, "tiny-random", stores=[f"refs={token_store}"])
    with running_server(tiny, companions=companions) as (url, _):
        yield url


def post(url: str, spec, prompt=PROMPT, **fields):
    import httpx

    body = {"model": "tiny-random", "prompt": prompt, "max_tokens": N, "temperature": 0, "strategy": spec, **fields}
    return httpx.post(
        f"{url}/v1/completions",
        content=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
        timeout=120,
    )


@pytest.mark.parametrize(
    "spec, words",
    [
        ({"name": "caad", "top_n": 10**6}, "top_n"),
        ({"name": "caad", "blend": 2}, "blend"),
        ({"name": "caad", "blend": float("nan")}, "blend"),
        ({"name": "caad", "temperature": -1}, "temperature"),
        ({"name": "caad", "store": "/tmp/x.safetensors"}, "--caad-store NAME=SOURCE"),
        ({"name": "caad", "store": "~/.cache/argen/x.safetensors"}, "must name one of"),
        ({"name": "caad", "store": 5}, "must name one of"),
    ],
)
def test_hostile_caad_options_get_400_and_nothing_is_loaded(store_server, tiny, spec, words):
    """Bug it caught when put in by hand: the server's name check skipped for stores (a path passed on)."""
    before = dict(tiny.runtime.memo.get(LoadedStores).by_path)
    assert_refused(store_server, spec, words, secrets=("/tmp", ".cache", "safetensors"))
    assert tiny.runtime.memo.get(LoadedStores).by_path == before


def test_eight_concurrent_caad_requests_equal_each_alone(store_server, tiny, token_store):
    """Bug it caught when put in by hand: the retrieved-distribution buffer kept on the (shared) store and
    not zeroed between steps, so one request's retrievals leak into the others'."""
    prompts = [PROMPT, "Hello there", "One two", PROMPT + " jumps", "A", "Zebra crossing", "Foxes", "Dogs bark"]
    spec = {"name": "caad", "store": "refs", "blend": 0.5, "top_n": 4}
    alone = [
        tiny.generate(p, chat=False, max_new_tokens=N, temperature=0, strategy=spec | {"store": str(token_store)})
        for p in prompts
    ]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda p: post(store_server, spec, prompt=p, return_token_ids=True), prompts))
    for r, want in zip(responses, alone, strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == want.token_ids
