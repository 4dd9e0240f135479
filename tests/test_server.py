"""The OpenAI-compatible server, spoken to with the official `openai` client over loopback:
completions and chat, streaming or not, continuous batching (32 concurrent streams, each
token-identical to the request run alone), disconnects, limits, errors and a SIGTERM drain."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from helpers import BrokenOnThirdStep, assert_same_or_near_tie
from server_helpers import metric, running_server

import argen
from argen.strategies import REGISTRY, register

MODEL = "tiny-random"


@pytest.fixture(scope="module")
def server():
    with running_server(argen.load(MODEL), max_batch=32) as (url, srv):
        yield url, srv


@pytest.fixture(scope="module")
def small_server():
    """One request at a time and one waiting: for the queue and disconnect tests."""
    with running_server(argen.load(MODEL), max_batch=1, max_queue=1) as (url, srv):
        yield url, srv


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)


def test_models_health_and_metrics(server):
    url, _ = server
    assert [m.id for m in client(url).models.list()] == [MODEL]
    assert httpx.get(f"{url}/health").json() == {"status": "ok", "model": MODEL, "running": 0, "waiting": 0}
    text = httpx.get(f"{url}/metrics").text
    for name in (
        "argen_requests_total",
        "argen_generation_tokens_total",
        "argen_queue_depth",
        "argen_batch_size",
        "argen_request_latency_seconds",
        "argen_time_to_first_token_seconds",
    ):
        assert name in text


def test_completion_matches_generate(server, tiny):
    url, _ = server
    want = tiny.generate("Hello there", chat=False, max_new_tokens=20)
    out = client(url).completions.create(
        model=MODEL, prompt="Hello there", max_tokens=20, temperature=0, extra_body={"return_token_ids": True}
    )
    choice = out.choices[0]
    assert (
        choice.text == want.text and choice.token_ids == want.token_ids and choice.finish_reason == want.finish_reason
    )
    assert out.object == "text_completion" and out.model == MODEL
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(want.prompt_ids), len(want.token_ids))
    streamed = client(url).completions.create(
        model=MODEL,
        prompt="Hello there",
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids) and chunks[-1].choices == []


def test_chat_streaming_and_not(server, tiny):
    url, _ = server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]
    want = tiny.generate(messages, max_new_tokens=24)
    out = client(url).chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    assert out.choices[0].message.content == want.text and out.choices[0].message.role == "assistant"
    assert out.object == "chat.completion" and out.usage.prompt_tokens == len(want.prompt_ids)
    chunks = list(
        client(url).chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant" and all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason


def test_sampling_parameters_seed_stop_and_strategy(server, tiny):
    url, _ = server
    c = client(url)
    want = tiny.generate("Sample", chat=False, max_new_tokens=16, temperature=0.8, top_p=0.9, top_k=50, seed=7)
    out = c.completions.create(
        model=MODEL,
        prompt="Sample",
        max_tokens=16,
        temperature=0.8,
        top_p=0.9,
        seed=7,
        extra_body={"top_k": 50, "return_token_ids": True},
    )
    assert out.choices[0].token_ids == want.token_ids
    full = tiny.generate("Stop here", chat=False, max_new_tokens=40).text
    i = next(i for i in range(3, len(full) - 2) if "\ufffd" not in full[i : i + 2] and full[i : i + 2] not in full[:i])
    out = c.completions.create(model=MODEL, prompt="Stop here", max_tokens=40, temperature=0, stop=full[i : i + 2])
    assert out.choices[0].text == full[:i] and out.choices[0].finish_reason == "stop"
    plain = tiny.generate("abc abc abc abc", chat=False, max_new_tokens=20).token_ids
    for strategy in ("prompt-lookup", {"name": "prompt-lookup", "max_draft": 4, "adaptive": False}):
        out = c.completions.create(
            model=MODEL,
            prompt="abc abc abc abc",
            max_tokens=20,
            temperature=0,
            extra_body={"strategy": strategy, "return_token_ids": True},
        )
        assert out.choices[0].token_ids == plain


def test_32_concurrent_streams_are_token_identical_to_running_alone(server, tiny):
    url, _ = server
    requests = [(f"Request {i}: " + "xyz " * (i % 7), 8 + (i * 5) % 33) for i in range(32)]
    want = [tiny.generate(prompt, chat=False, max_new_tokens=n, ignore_eos=True) for prompt, n in requests]
    before = httpx.get(f"{url}/metrics").text
    got: list = [None] * len(requests)

    def run(i: int) -> None:
        time.sleep(0.004 * i)  # arrivals spread out: requests join a batch that is already running
        prompt, n = requests[i]
        stream = client(url).completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=n,
            temperature=0,
            stream=True,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )
        chunks = [c.choices[0] for c in stream]
        got[i] = (
            [t for c in chunks for t in (c.token_ids or [])],
            "".join(c.text for c in chunks),
            chunks[-1].finish_reason,
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for (ids, text, finish), ref in zip(got, want):
        if assert_same_or_near_tie(tiny.model.hf_model, ref.prompt_ids, ids, ref.token_ids) is False:
            assert text == ref.text
        assert len(ids) == len(ref.token_ids) and finish == "length"
    after = httpx.get(f"{url}/metrics").text
    steps = metric(after, "argen_batch_size_count") - metric(before, "argen_batch_size_count")
    small = metric(after, "argen_batch_size_bucket", le="8.0") - metric(before, "argen_batch_size_bucket", le="8.0")
    assert steps > small, "no step ran more than 8 sequences together: the requests were not batched"


def test_disconnect_mid_stream_frees_the_slot(small_server):
    url, _ = small_server
    c = client(url)
    before = httpx.get(f"{url}/metrics").text
    stream = c.completions.create(
        model=MODEL, prompt="long", max_tokens=1500, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    for _, _chunk in zip(range(3), stream):
        pass
    stream.close()
    out = c.completions.create(model=MODEL, prompt="next", max_tokens=5, temperature=0)  # needs the only slot
    assert out.usage.completion_tokens == 5
    after = httpx.get(f"{url}/metrics").text
    cancelled = metric(after, "argen_requests_total", endpoint="completions", outcome="cancelled")
    assert cancelled - metric(before, "argen_requests_total", endpoint="completions", outcome="cancelled") == 1
    tokens = metric(after, "argen_generation_tokens_total") - metric(before, "argen_generation_tokens_total")
    assert tokens < 1500, "the disconnected request ran to the end"


def test_abandoned_non_streaming_request_is_cancelled(small_server):
    url, _ = small_server
    before = httpx.get(f"{url}/metrics").text
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(
            f"{url}/v1/completions",
            timeout=1.0,
            json={"model": MODEL, "prompt": "slow", "max_tokens": 2000, "ignore_eos": True},
        )
    out = client(url).completions.create(model=MODEL, prompt="next", max_tokens=4, temperature=0)
    assert out.usage.completion_tokens == 4
    after = httpx.get(f"{url}/metrics").text
    assert metric(after, "argen_generation_tokens_total") - metric(before, "argen_generation_tokens_total") < 2000
    cancelled = metric(after, "argen_requests_total", endpoint="completions", outcome="cancelled")
    assert cancelled - metric(before, "argen_requests_total", endpoint="completions", outcome="cancelled") == 1


def test_full_queue_answers_429_with_retry_after(small_server):
    url, _ = small_server
    c = client(url)
    running = c.completions.create(
        model=MODEL,
        prompt="hold the slot",
        max_tokens=1500,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    next(iter(running))
    waiting: list = []
    thread = threading.Thread(
        target=lambda: waiting.append(c.completions.create(model=MODEL, prompt="w", max_tokens=3))
    )
    thread.start()
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/health").json()["waiting"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(openai.RateLimitError) as info:
        c.completions.create(model=MODEL, prompt="rejected", max_tokens=3)
    assert info.value.status_code == 429 and int(info.value.response.headers["retry-after"]) >= 1
    assert info.value.body["code"] == "queue_full" and "busy" in info.value.body["message"]
    running.close()
    thread.join(60)
    assert waiting[0].usage.completion_tokens == 3


LONG = "x" * 2100  # the tiny model's context is 2048 positions; one byte = one token


@pytest.mark.parametrize(
    "path, body, status, param, words",
    [
        ("completions", {"prompt": LONG}, 400, "prompt", "context is 2048"),
        ("chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages", "shorten it"),
        ("completions", {"prompt": "hi", "max_tokens": 5000}, 400, "max_tokens", "at most 2048"),
        ("completions", {"prompt": "y" * 2000, "max_tokens": 100}, 400, "max_tokens", "at most 48"),
        ("completions", {"prompt": "hi", "strategy": "nope"}, 400, "strategy", "valid strategies: beam"),
        (
            "completions",
            {"prompt": "hi", "strategy": {"name": "prompt-lookup", "bad": 1}},
            400,
            "strategy",
            "unknown option(s) bad",
        ),
        ("completions", {"prompt": "hi", "n": 17}, 400, "n", "at most 16 samples"),
        ("completions", {"prompt": "hi", "presence_penalty": 2.5}, 422, "presence_penalty", "less than or equal to 2"),
        ("completions", {"prompt": ["a", ""]}, 400, "prompt", "prompt 1 is empty"),
        ("completions", {"prompt": ["a"] * 65}, 422, "prompt", "at most 64"),
        ("completions", {"prompt": [999999]}, 400, "prompt", "outside the vocabulary"),
        ("completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model", "serves 'tiny-random'"),
        ("completions", {"prompt": "hi", "temperature": "hot"}, 422, "temperature", "valid number"),
        ("completions", {"prompt": "hi", "strategyy": "plain"}, 422, "strategyy", "unknown field"),
        ("completions", {"max_tokens": 4}, 422, "prompt", "prompt is required"),
        ("chat/completions", {"messages": []}, 422, "messages", "at least 1 item"),
        ("chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 422, "messages", "role"),
    ],
)
def test_bad_requests_get_openai_error_objects(server, path, body, status, param, words):
    url, _ = server
    r = httpx.post(f"{url}/v1/{path}", json={"model": MODEL, **body})
    error = r.json()["error"]
    assert r.status_code == status and error["param"] == param and words in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}


def test_malformed_body_and_unknown_route(server):
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.get(f"{url}/v1/nothing")
    assert r.status_code == 404 and "no route GET /v1/nothing" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client(url).completions.create(model=MODEL, prompt="hi", max_tokens=5000)
    assert "at most 2048" in info.value.body["message"]


def test_one_failing_request_leaves_the_others_alone(server, tiny):
    url, _ = server
    register(BrokenOnThirdStep)
    try:
        want = tiny.generate("survivor", chat=False, max_new_tokens=30).text
        results: dict = {}

        def broken() -> None:
            results["broken"] = httpx.post(
                f"{url}/v1/completions", timeout=60, json={"model": MODEL, "prompt": "x", "strategy": "test-broken"}
            )

        thread = threading.Thread(target=broken)
        thread.start()
        out = client(url).completions.create(model=MODEL, prompt="survivor", max_tokens=30, temperature=0)
        thread.join(60)
    finally:
        del REGISTRY[BrokenOnThirdStep.name]
    assert out.choices[0].text == want
    r = results["broken"]
    assert r.status_code == 500 and "boom" in r.json()["error"]["message"]


def test_draining_server_answers_503():
    with running_server(argen.load(MODEL)) as (url, srv):
        srv.scheduler.draining = True  # what SIGTERM sets first, before uvicorn stops listening
        r = httpx.post(
            f"{url}/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
        )
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert httpx.get(f"{url}/health").json()["status"] == "draining"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_in_flight_requests_then_exits_0():
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(argen.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "argen.cli", "serve", "--model", MODEL, "--port", str(port), "--log-level", "warning"],
        env=env,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        stream = client(url).completions.create(
            model=MODEL,
            prompt="drain me",
            max_tokens=400,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        chunks = [next(iter(stream))]
        proc.send_signal(signal.SIGTERM)
        while True:  # the signal is handled: the server says it is draining, or no longer listens
            try:
                if httpx.get(f"{url}/health").status_code == 503:
                    break
            except httpx.TransportError:
                break
            assert time.monotonic() < deadline + 60
            time.sleep(0.05)
        try:  # new requests are turned away
            late = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "late"})
            assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        except httpx.TransportError:
            pass
        chunks += list(stream)
        assert sum(len(c.choices[0].token_ids or []) for c in chunks) == 400  # nothing lost to the shutdown
        assert chunks[-1].choices[0].finish_reason == "length"
        assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_command_rejects_bad_options_before_loading(capsys):
    from argen.cli import main

    assert main(["serve", "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1; got 0" in capsys.readouterr().err
    assert main(["serve", "--port", "70000"]) == 2
    assert "--port must be in 0..65535" in capsys.readouterr().err


@pytest.mark.real
def test_real_model_concurrent_chat_matches_running_alone(real, spec_bench_questions):
    prompts = [q["turns"][0] for q in spec_bench_questions if len(q["turns"][0]) < 400][:6]
    want = [real.generate(p, max_new_tokens=24) for p in prompts]
    got: list = [None] * len(prompts)
    with running_server(real, model_id="default") as (url, _):

        def run(i: int) -> None:
            out = client(url).chat.completions.create(
                model="default",
                temperature=0,
                max_tokens=24,
                messages=[{"role": "user", "content": prompts[i]}],
                extra_body={"return_token_ids": True},
            )
            got[i] = out.choices[0].token_ids

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    for ids, ref in zip(got, want):
        assert_same_or_near_tie(real.model.hf_model, ref.prompt_ids, ids, ref.token_ids)


def test_logit_bias_over_http(server, tiny):
    url, _ = server
    want = tiny.generate("Hello there", chat=False, max_new_tokens=8, logit_bias={288: -100, 77: 4.5})
    out = client(url).completions.create(
        model=MODEL,
        prompt="Hello there",
        max_tokens=8,
        temperature=0,
        logit_bias={"288": -100, "77": 4.5},
        extra_body={"return_token_ids": True},
    )
    assert out.choices[0].token_ids == want.token_ids and 288 not in want.token_ids
    for bias, words in (
        ({"abc": 1}, "token ids"),
        ({"5": 1000}, "[-100, 100]"),
        ({"999999": 5}, "outside the vocabulary"),
        ({str(i): 1 for i in range(2000)}, "at most 1024"),
    ):
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "logit_bias": bias})
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.json()
