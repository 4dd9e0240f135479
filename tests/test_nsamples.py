"""n samples of one prompt (`generate(..., n=4)`, the server's `n`): the prompt is prefilled once and
forked; sample i draws with seed + i and replays alone from that seed; the server returns n choices
(each with its seed), streams them interleaved by choice index, bounds n, and frees every sample of
a request its client abandons."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from server_helpers import metric, running_server

import argen
from argen.engine import DecodeBatch, Request
from argen.errors import InvalidRequestError
from argen.sampling import SamplingParams
from argen.strategies import make_strategy

MODEL = "tiny-random"
PROMPT = "The cat sat on the mat. The cat sat on the mat. The cat"  # 55 tokens (bytes)
SAMPLED = dict(chat=False, temperature=1.0, max_new_tokens=12, ignore_eos=True)
LOOKUP = {"name": "prompt-lookup", "max_draft": 4, "adaptive": False}


@pytest.mark.parametrize("strategy", ["plain", LOOKUP], ids=["plain", "prompt-lookup"])
def test_n_samples_have_their_own_seeds_and_each_replays_alone(tiny, strategy):
    results = tiny.generate(PROMPT, n=4, seed=100, strategy=strategy, **SAMPLED)
    assert [r.sample_index for r in results] == [0, 1, 2, 3] and [r.seed for r in results] == [100, 101, 102, 103]
    assert len({tuple(r.token_ids) for r in results}) == 4, "the samples are not distinct"
    for r in results:
        assert r.extras["replay"]["params"]["seed"] == r.seed
        alone = tiny.generate(PROMPT, seed=r.seed, strategy=strategy, **SAMPLED)
        assert alone.token_ids == r.token_ids and alone.text == r.text
    if strategy != "plain":  # an exact strategy: the same samples as plain's, drafts verified per sample
        assert sum(r.stats.draft_tokens_proposed for r in results) > 0
        assert [r.token_ids for r in results] == [r.token_ids for r in tiny.generate(PROMPT, n=4, seed=100, **SAMPLED)]
    assert tiny.runtime.kv_pool().held == 0, "a fork's blocks were not given back"


@pytest.mark.parametrize(
    "strategy, temperature",
    [
        ("contrastive", 0.0),  # reads the prompt's hidden states in start(): the forks share them
        ({"name": "guided", "guide_model": "tiny-random@2"}, 1.0),  # a guide model's caches, one set per sample
    ],
)
def test_strategies_with_state_of_their_own_fork_too(tiny, strategy, temperature):
    options = dict(chat=False, temperature=temperature, max_new_tokens=6, strategy=strategy)
    results = tiny.generate(PROMPT, n=2, seed=20, **options)
    assert tiny.generate(PROMPT, seed=21, **options).token_ids == results[1].token_ids
    set_prompt = argen.SetPrompt(prefix="Films:\n", members=["Alien\n", "Heat\n"], suffix="Best:")
    results = tiny.generate(set_prompt, n=2, seed=20, chat=False, temperature=1.0, max_new_tokens=6)
    assert (
        tiny.generate(set_prompt, seed=21, chat=False, temperature=1.0, max_new_tokens=6).token_ids
        == results[1].token_ids
    )


def test_the_prompt_is_prefilled_once(tiny, monkeypatch):
    runtime = tiny.runtime
    fed: list[int] = []  # tokens of each prefill segment (more than one token: decode steps feed one)
    original = runtime.forward_packed

    def spy(segments, plan=None):
        fed.extend(len(s.tokens) for s in segments if len(s.tokens) > 1)
        return original(segments, plan)

    monkeypatch.setattr(runtime, "forward_packed", spy)
    prompt_len = len(tiny.encode(PROMPT, chat=False))
    results = tiny.generate(PROMPT, n=4, seed=1, **SAMPLED)
    assert fed == [prompt_len - 1], "the prompt was not prefilled exactly once"
    assert [r.stats.prefill_passes for r in results] == [1, 0, 0, 0]
    assert all(r.stats.prompt_tokens == prompt_len for r in results)
    # Control: four requests of the same prompt (no forking) prefill it four times, so the spy sees it.
    fed.clear()
    tiny.generate([PROMPT] * 4, seed=1, **SAMPLED)
    assert fed == [prompt_len - 1] * 4


def test_greedy_samples_are_identical_and_shapes_follow_n(tiny):
    two = tiny.generate(PROMPT, n=2, chat=False, max_new_tokens=12)
    assert (
        len(two) == 2
        and two[0].token_ids == two[1].token_ids == tiny.generate(PROMPT, chat=False, max_new_tokens=12).token_ids
    )
    assert two[1].seed == two[0].seed + 1
    one = tiny.generate(PROMPT, n=1, chat=False, max_new_tokens=4)
    assert isinstance(one, list) and len(one) == 1  # n given: a list, whatever n is
    nested = tiny.generate(["ab", "cd"], n=3, max_new_tokens=4, chat=False, temperature=1.0, seed=5)
    assert [[(r.index, r.sample_index) for r in rs] for rs in nested] == [[(i, j) for j in range(3)] for i in range(2)]
    for bad in (0, -1, True, 2.0):
        with pytest.raises(InvalidRequestError, match="n \\(samples of the prompt\\)"):
            tiny.generate(PROMPT, n=bad, max_new_tokens=4)


def test_stream_interleaves_the_samples(tiny):
    stream = tiny.stream(PROMPT, n=3, seed=9, **SAMPLED)
    events = list(stream)
    assert [r.sample_index for r in stream.result] == [0, 1, 2]
    assert {e.sample_index for e in events[:3]} == {0, 1, 2}, "the samples did not decode together"
    for r in stream.result:
        mine = [e for e in events if e.sample_index == r.sample_index]
        assert [t for e in mine for t in e.token_ids] == r.token_ids and "".join(e.text for e in mine) == r.text
        assert mine[-1].finish_reason == "length"


def test_hf_runtime_samples_replay_too(tiny_gpt2):
    results = tiny_gpt2.generate("hello", n=2, seed=3, **SAMPLED)
    assert results[0].token_ids != results[1].token_ids
    assert tiny_gpt2.generate("hello", seed=4, **SAMPLED).token_ids == results[1].token_ids


def test_kv_admission_counts_every_sample(tiny):
    batch = DecodeBatch(tiny.engine)
    block = tiny.runtime.kv_pool().block_size

    def request(n: int) -> Request:
        params = SamplingParams(max_new_tokens=10 * block, temperature=1.0)
        return Request(list(range(40, 40 + 3 * block + 1)), params, make_strategy("plain"), n=n)

    one = batch.blocks_needed(request(1))
    assert one == 14  # 3 prompt blocks + 1 pending token, 10 blocks of output: 14 blocks
    assert batch.blocks_needed(request(4)) == one + 3 * (one - 3)  # the 3 full prompt blocks are shared
    pool = tiny.runtime.kv_pool()
    n = pool.max_blocks // (one - 3) + 1  # more forks than the pool holds, though one sequence fits
    assert batch.can_admit(request(1)) and not batch.can_admit(request(n))
    seq = batch.admit(0, request(4))
    assert batch.reserved_blocks == batch.blocks_needed(request(4))
    while seq in batch.sequences and seq.prefilling:
        batch.step()
    assert len(batch) == 4 and sum(s.reserved for s in batch.sequences) == batch.blocks_needed(request(4))
    batch.remove(list(batch.sequences))
    assert batch.reserved_blocks == 0 and pool.held == 0


# -- the server --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    gen = argen.load(MODEL)
    with running_server(gen, max_batch=8, max_tokens_limit=512) as (url, _):
        yield url, gen


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)


def test_n_choices_through_the_openai_client_each_replayable(server, tiny):
    url, _ = server
    c = client(url)
    ask = dict(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=16,
        temperature=1.0,
        seed=40,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    out = c.completions.create(n=3, **ask)
    assert [ch.index for ch in out.choices] == [0, 1, 2] and [ch.seed for ch in out.choices] == [40, 41, 42]
    want = tiny.generate(PROMPT, n=3, seed=40, chat=False, temperature=1.0, max_new_tokens=16, ignore_eos=True)
    assert [ch.token_ids for ch in out.choices] == [r.token_ids for r in want]
    assert out.usage.completion_tokens == 48 and out.usage.prompt_tokens == len(want[0].prompt_ids)
    again = c.completions.create(**(ask | {"seed": out.choices[2].seed}))  # choice 2 alone, from its seed
    assert again.choices[0].text == out.choices[2].text and again.choices[0].seed == 42
    chunks = list(c.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **ask))
    for ch in out.choices:
        mine = [k.choices[0] for k in chunks if k.choices and k.choices[0].index == ch.index]
        assert "".join(k.text for k in mine) == ch.text and mine[-1].finish_reason == "length"
        assert mine[-1].seed == ch.seed
    assert chunks[-1].usage.completion_tokens == 48

    messages = [{"role": "user", "content": "Say hi."}]
    chat = c.chat.completions.create(model=MODEL, messages=messages, n=2, max_tokens=10, temperature=1.0, seed=7)
    want = tiny.generate(messages, n=2, seed=7, temperature=1.0, max_new_tokens=10)
    assert [ch.message.content for ch in chat.choices] == [r.text for r in want] and chat.choices[1].seed == 8
    chunks = list(
        c.chat.completions.create(
            model=MODEL, messages=messages, n=2, max_tokens=10, temperature=1.0, seed=7, stream=True
        )
    )
    for r in want:
        mine = [k.choices[0] for k in chunks if k.choices[0].index == r.sample_index]
        assert mine[0].delta.role == "assistant" and "".join(k.delta.content or "" for k in mine) == r.text


@pytest.mark.parametrize(
    "body, status, param, words",
    [
        ({"n": 10**9}, 400, "n", "at most 8 samples"),  # the server's max_batch (8) is below the limit (16)
        ({"n": 10**30}, 400, "n", "at most 8 samples"),
        ({"n": 0}, 422, "n", "greater than or equal to 1"),
        ({"n": -3}, 422, "n", "greater than or equal to 1"),
        ({"n": "4"}, 422, "n", "valid integer"),
        ({"n": 2.5}, 422, "n", "valid integer"),
        ({"n": True}, 422, "n", "valid integer"),
        ({"n": 8, "max_tokens": 100}, 400, "max_tokens", "8 x 100 = 800"),
        ({"n": 4, "max_tokens": 129}, 400, "max_tokens", "at most 512 per request"),
        ({"n": 2, "seed": 2**63 - 1}, 400, "seed", "seed + n - 1"),
    ],
)
def test_hostile_n(server, body, status, param, words):
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", **body}, timeout=30)
    error = r.json()["error"]
    assert r.status_code == status and error["param"] == param and words in error["message"], error


def test_default_max_tokens_shrinks_with_n_and_the_schema_shows_the_cap(server):
    url, _ = server
    out = httpx.post(
        f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "n": 8, "ignore_eos": True}, timeout=120
    ).json()
    assert out["usage"]["completion_tokens"] == 8 * 64  # 64 each, not the default 256: 512 (the limit) in all
    schema = httpx.get(f"{url}/openapi.json").json()["components"]["schemas"]
    assert schema["CompletionRequest"]["properties"]["n"]["maximum"] == 8


def test_a_client_leaving_mid_stream_frees_all_its_samples():
    gen = argen.load(MODEL)
    with running_server(gen, max_batch=4, max_queue=0) as (url, _):
        c = client(url)
        before = httpx.get(f"{url}/metrics").text
        stream = c.completions.create(
            model=MODEL,
            prompt="long",
            n=4,
            max_tokens=500,
            temperature=1.0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for _, _chunk in zip(range(6), stream):
            pass
        stream.close()
        # Needs all 4 slots (max_queue 0: it would get 429 if they were still taken, unless it waits).
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health").json()["running"]:
            assert time.monotonic() < deadline, "the abandoned request is still running"
            time.sleep(0.02)
        assert gen.runtime.kv_pool().held == 0, "an abandoned sample kept its KV blocks"
        out = c.completions.create(model=MODEL, prompt="next", n=4, max_tokens=5, temperature=1.0)
        assert [ch.index for ch in out.choices] == [0, 1, 2, 3] and out.usage.completion_tokens == 20
        after = httpx.get(f"{url}/metrics").text
        cancelled = metric(after, "argen_requests_total", endpoint="completions", outcome="cancelled")
        assert cancelled - metric(before, "argen_requests_total", endpoint="completions", outcome="cancelled") == 1
        tokens = metric(after, "argen_generation_tokens_total") - metric(before, "argen_generation_tokens_total")
        assert tokens < 4 * 500, "the abandoned samples ran to the end"


def test_the_n_limit_is_set_like_the_strategy_caps():
    from argen.errors import ArgenError
    from argen.server.limits import Limits

    assert Limits().max_n == 16 and Limits.parse(["n=32"]).max_n == 32
    assert Limits.parse(["n=32"]).check(make_strategy("plain")) is None
    with pytest.raises(ArgenError, match="whole number"):
        Limits.parse(["n=0"])
