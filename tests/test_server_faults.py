"""Issue 24's hostile clients and faults against `argen serve` (tiny-random), each sent as an
attacker would: a 4xx within 5 s (a liveness bound, not a speed claim) and the server still serving
others; and the gauges and memory it leaves behind."""

from __future__ import annotations

import json
import threading
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
    body = {
        "model": MODEL,
        "prompt": "long " * 40,
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
        "strategy": "test-slow",
    }
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


# -- grammars ----------------------------------------------------------------------------------
def json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def patterns(n: int, nested: bool = False) -> dict:
    """Issue 24's schema: an allOf of n `.*aI.*` patterns, whose intersection llguidance decides in
    time exponential in n. `nested`: the patterns behind $refs from inside a property (the static
    bound does not see them there; the sandbox's deadline stops it)."""
    if not nested:
        return {"allOf": [{"type": "string", "pattern": f".*a{i}.*"} for i in range(n)]}
    return {
        "$defs": {f"p{i}": {"type": "string", "pattern": f".*a{i}.*"} for i in range(n)},
        "type": "object",
        "properties": {"x": {"allOf": [{"$ref": f"#/$defs/p{i}"} for i in range(n)]}},
    }


def sandbox(srv):
    return srv.config.app.state.grammars


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_an_allof_of_200_patterns_is_refused_at_once(server):
    """Bug: this 9 KB schema ran for 20 minutes (RSS 0.6 -> 10.4 GB) and kept on after the client left."""
    url, _ = server
    error = refused(
        url,
        {"prompt": "Hi", "response_format": json_schema(patterns(200))},
        400,
        "allOf combines 200 regexes",
        "at most 8",
    )
    assert error["param"] == "response_format" and "a0" not in error["message"]


def test_a_costly_grammar_the_static_bound_misses_is_killed_at_its_deadline(server):
    """Bug: nothing bounded a grammar's compile; it ran in the shared request-preparation pool.
    Past the static bound (patterns behind $refs), the sandbox's child is killed at its deadline;
    the answer quotes nothing of the grammar, and the children are back, small."""
    url, srv = server
    error = refused(
        url,
        {"prompt": "Hi", "response_format": json_schema(patterns(16, nested=True))},
        400,
        "takes longer than 2 s to compile",
    )
    assert error["param"] == "response_format" and "a0" not in error["message"] and "$defs" not in error["message"]
    deadline = time.monotonic() + LIVE_S
    while len(pids := sandbox(srv).pids()) < sandbox(srv).workers:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert all(rss_mb(pid) < 300 for pid in pids)


def test_a_grammar_past_the_memory_cap_is_killed(tiny):
    from argen.server.grammar_sandbox import GrammarSandbox

    grammars = GrammarSandbox(tiny.engine.grammars, memory_mb=48)
    with running_server(tiny, grammars=grammars) as (url, _):
        error = refused(
            url,
            {"prompt": "Hi", "response_format": json_schema(patterns(13, nested=True))},
            400,
            "takes more than 48 MB to compile",
        )
    assert error["param"] == "response_format"


def test_concurrent_costly_grammars_leave_the_others_served(server):
    """Bug: six such compiles filled the request-preparation pool (6 threads) and stalled every
    client for 86 s. Now they run in the sandbox (2 at a time, the rest 429 after a 1 s wait), and a
    plain client is served meanwhile."""
    url, _ = server
    body = json.dumps(
        {"model": MODEL, "prompt": "Hi", "max_tokens": 4, "response_format": json_schema(patterns(16, nested=True))}
    ).encode()
    answers: list[tuple[int, float]] = []

    def attack() -> None:
        started = time.perf_counter()
        r = httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=60)
        answers.append((r.status_code, time.perf_counter() - started))

    threads = [threading.Thread(target=attack) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    for _ in range(3):
        started = time.perf_counter()
        assert post(url, {"prompt": "Hello", "max_tokens": 4}).status_code == 200
        assert time.perf_counter() - started < LIVE_S
    for t in threads:
        t.join(60)
    assert len(answers) == 8 and all(status in (400, 429) for status, _ in answers), answers
    assert all(seconds < LIVE_S for _, seconds in answers), answers


def test_a_huge_alternation_is_refused_before_it_is_queued(server):
    """Bug: a Lark grammar of 9,000 alternatives passed the checks and failed once decoding had started
    ("max is 2000"), reported as the model's output breaking the grammar."""
    url, srv = server
    alternation = " | ".join(f'"w{i}"' for i in range(9000))
    counts = {"endpoint": "completions", "outcome": "rejected_400"}
    before = metric(httpx.get(f"{url}/metrics").text, "argen_requests_total", **counts)
    error = refused(
        url,
        {"prompt": "Hi", "response_format": {"type": "grammar", "grammar": f"start: {alternation}"}},
        400,
        "response_format: the grammar is not valid",
        "max is 2000",
    )
    assert error["param"] == "response_format" and "w1" not in error["message"]
    after = metric(httpx.get(f"{url}/metrics").text, "argen_requests_total", **counts)
    assert after - before == 1, "the request was queued (rejected_400 counts those refused before the queue)"


def test_a_grammar_limit_met_while_decoding_names_the_grammar(server, tiny):
    """A limit that trips only on the text the model writes (here: after "b", which the check's probe
    does not take) ends the request with a 400 naming response_format, not as the output breaking
    the grammar."""
    url, _ = server
    alternation = " | ".join(f'"w{i}"' for i in range(9000))
    b = tiny.tokenizer.encode("b", add_special_tokens=False)[0]
    body = {
        "prompt": "Hi",
        "response_format": {"type": "grammar", "grammar": f'start: "a" | "b" x\nx: {alternation}'},
        "logit_bias": {str(b): 100},
    }
    error = refused(url, body, 400, "response_format: the grammar went past a limit", "max is 2000")
    assert error["param"] == "response_format"


# -- long prompts ------------------------------------------------------------------------------
def test_a_long_scored_prompt_leaves_the_others_served(server):
    """A prompt filling the context with echo + logprobs 20 (the most prompt scoring a client can ask)
    beside a steady client: the steady client's requests are served within the liveness bound while
    it is prefilled (its chunks are paced), and the long one completes."""
    url, _ = server
    long_done: list[httpx.Response] = []
    body = {
        "model": MODEL,
        "prompt": [(7 * i) % 250 + 1 for i in range(2040)],
        "echo": True,
        "logprobs": 20,
        "max_tokens": 1,
    }
    thread = threading.Thread(
        target=lambda: long_done.append(httpx.post(f"{url}/v1/completions", json=body, timeout=120))
    )
    thread.start()
    time.sleep(0.05)
    for _ in range(4):
        started = time.perf_counter()
        assert post(url, {"prompt": "Hello", "max_tokens": 8}).status_code == 200
        assert time.perf_counter() - started < LIVE_S
    thread.join(120)
    assert long_done[0].status_code == 200 and len(long_done[0].json()["choices"][0]["logprobs"]["tokens"]) == 2041
