"""Issue 24's hostile clients and faults against `argen serve` (tiny-random), each sent as an
attacker would: a 4xx within 5 s (a liveness bound, not a speed claim) and the server still serving
others; and the gauges and memory it leaves behind."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from server_helpers import metric, running_server

import argen
from argen.api import Generator
from argen.strategies import REGISTRY, register
from argen.strategies.plain import Plain

MODEL = "tiny-random"
LIVE_S = 5  # every hostile request is answered within this (generous: a liveness bound)


@pytest.fixture(scope="module")
def server():
    with running_server(argen.load(MODEL)) as (url, srv):
        yield url, srv


def post(url: str, body: dict | bytes, path: str = "completions", **kw) -> httpx.Response:
    if isinstance(body, dict):
        body = json.dumps({"model": MODEL, "max_tokens": 8, **body}).encode()
    return httpx.post(f"{url}/v1/{path}", content=body, headers={"content-type": "application/json"}, timeout=60, **kw)


def refused(url: str, body: dict | bytes, status: int, *words: str, path: str = "completions") -> dict:
    """Sends a hostile body; asserts its status within LIVE_S and the message's words, and that a
    plain request is served right after. Returns the error object."""
    started = time.perf_counter()
    r = post(url, body, path)
    elapsed = time.perf_counter() - started
    assert r.status_code == status, r.text
    assert elapsed < LIVE_S, f"answered after {elapsed:.1f} s"
    error = r.json()["error"]
    for word in words:
        assert word in error["message"], error
    assert post(url, {"prompt": "Hello", "max_tokens": 4}).status_code == 200
    return error


class Slow(Plain):
    """Plain decoding at most ~50 tokens a second: still running when its client leaves."""

    name = "test-slow"

    def step(self, state):
        time.sleep(0.02)
        return (yield from super().step(state))


def test_the_gauges_empty_when_every_client_has_left(server):
    """Bug: the scheduler returned before updating its gauges when cancellations emptied the batch,
    so /metrics kept showing the departed sequences and their KV blocks."""
    url, _ = server
    body = {"model": MODEL, "prompt": "long " * 40, "max_tokens": 1500, "ignore_eos": True, "stream": True,
            "strategy": "test-slow"}  # fmt: skip
    register(Slow)
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the response
            for _ in range(4):
                next(lines)
            assert metric(httpx.get(f"{url}/metrics").text, "argen_kv_blocks_held") > 0
    finally:
        del REGISTRY[Slow.name]
    deadline = time.monotonic() + LIVE_S
    while metric(text := httpx.get(f"{url}/metrics").text, "argen_running_requests") > 0:
        assert time.monotonic() < deadline, "the cancelled request is still running"
        time.sleep(0.05)
    time.sleep(0.2)  # the iteration that dropped it has finished
    text = httpx.get(f"{url}/metrics").text
    assert metric(text, "argen_running_sequences") == 0
    assert metric(text, "argen_kv_blocks_held") == 0 and metric(text, "argen_kv_bytes_held") == 0


def test_a_vanishing_temperature_is_greedy_over_http(server):
    """Bug: temperature 1e-38 answered 200 with every token 0 and log-prob -9999."""
    url, _ = server
    body = {"prompt": "The river", "max_tokens": 8, "logprobs": 2, "return_token_ids": True, "ignore_eos": True}
    greedy = post(url, body | {"temperature": 0}).json()["choices"][0]
    for t in (1e-38, 1e-300, 0.000001):
        r = post(url, body | {"temperature": t, "seed": 3})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["token_ids"] == greedy["token_ids"] and choice["logprobs"] == greedy["logprobs"]


def test_an_out_of_vocabulary_logit_bias_names_logit_bias(server):
    """Bug: the 400 named `param: "prompt"`."""
    url, _ = server
    error = refused(url, {"prompt": "Hi", "logit_bias": {"999999": 5}}, 400, "logit_bias", "outside the vocabulary")
    assert error["param"] == "logit_bias"



def test_a_flood_of_chat_messages_is_refused_before_tokenizing(server, monkeypatch):
    """Bug: 20,000 empty messages were templated and tokenized (100k tokens, 4 s of a worker) before
    their 400. Now the count is capped, and the templated text's length is checked before tokenizing."""
    url, _ = server
    tokenized = []  # the conversations the server tokenized (their templated lengths)
    original = Generator.chat_ids
    monkeypatch.setattr(Generator, "chat_ids", lambda self, text: tokenized.append(len(text)) or original(self, text))
    flood = {"messages": [{"role": "user", "content": ""}] * 20_000}
    error = refused(url, flood, 400, "20000 messages; at most 2048", path="chat/completions")
    assert error["param"] == "messages"
    wordy = {"messages": [{"role": "user", "content": "0123456789"}] * 1500}  # 15k characters, 45k templated
    error = refused(url, wordy, 400, "with the chat template around each", path="chat/completions")
    assert error["param"] == "messages" and error["code"] == "context_length_exceeded"
    assert tokenized == [], "a refused conversation was tokenized"


def test_a_conversation_is_tokenized_as_its_template_says(tiny):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ids = tiny.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert tiny.chat_ids(tiny.chat_text(messages)) == list(ids["input_ids"] if hasattr(ids, "keys") else ids)
