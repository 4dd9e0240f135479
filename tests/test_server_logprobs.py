"""Log-probs through the server (tiny model): completions' legacy object (with echo: the prompt's
records first), chat's `content` list, streamed chunks, the official openai client, and the 400s."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from server_helpers import running_server

import argen

MODEL = "tiny-random"
PROMPT = "Score me, then go on."


@pytest.fixture(scope="module")
def url(tiny):
    with running_server(tiny) as (base, _):
        yield base


def post(url: str, body: dict, path: str = "completions") -> httpx.Response:
    return httpx.post(f"{url}/v1/{path}", json={"model": MODEL, **body}, timeout=60)


def sse(url: str, body: dict, path: str = "completions") -> list[dict]:
    with httpx.stream("POST", f"{url}/v1/{path}", json={"model": MODEL, "stream": True, **body}, timeout=60) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_completion_logprobs_are_the_api_records(url, tiny):
    want = tiny.generate(PROMPT, chat=False, max_new_tokens=8, logprobs=3, ignore_eos=True)
    r = post(url, {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 3, "ignore_eos": True})
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == want.text and len(lp["tokens"]) == 8
    assert all(abs(a - b.logprob) < 1e-4 for a, b in zip(lp["token_logprobs"], want.logprobs, strict=True))
    for top, record in zip(lp["top_logprobs"], want.logprobs, strict=True):
        assert 3 <= len(top) <= 4 and max(top.values()) == pytest.approx(record.top[0][1], abs=1e-4)
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    pieces = [t for t in lp["tokens"] if not t.startswith("bytes:")]  # part of a character: "bytes:\\xe2"
    assert all(piece in choice["text"] for piece in pieces)


def test_echo_scores_the_prompt_as_lm_eval_asks(url, tiny):
    want = tiny.generate(PROMPT, chat=False, max_new_tokens=0, prompt_logprobs=1)
    n = len(want.prompt_ids)
    # lm-eval's local-completions: echo, logprobs=1, max_tokens=1, and reads token_logprobs[ctxlen:-1].
    r = post(url, {"prompt": PROMPT, "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True})
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"].startswith(PROMPT) and len(lp["tokens"]) == n + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(abs(a - b.logprob) < 1e-4 for a, b in zip(lp["token_logprobs"][1:n], want.prompt_logprobs[1:]))
    assert lp["text_offset"][:n] == list(range(n))  # one byte a token
    # max_tokens 0: the prompt only; token ids as the prompt works the same.
    r0 = post(url, {"prompt": want.prompt_ids, "max_tokens": 0, "logprobs": 0, "echo": True}).json()["choices"][0]
    assert r0["text"] == PROMPT and r0["finish_reason"] == "length" and r0["logprobs"]["tokens"] == lp["tokens"][:n]
    assert r0["logprobs"]["token_logprobs"] == lp["token_logprobs"][:n]
    # echo without logprobs: the text only.
    plain = post(url, {"prompt": PROMPT, "max_tokens": 3, "echo": True, "temperature": 0}).json()["choices"][0]
    assert plain["text"].startswith(PROMPT) and plain["logprobs"] is None


def test_chat_logprobs_in_openai_shape_through_the_client(url, tiny):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Hi"}]
    out = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    want = tiny.generate(messages, max_new_tokens=6, logprobs=2, ignore_eos=True)
    content = out.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([r.logprob for r in want.logprobs], abs=1e-4)
    assert all(len(c.top_logprobs) == 2 for c in content)
    for c, t in zip(content, want.token_ids, strict=True):  # a byte token: one byte (ids past 258: no text)
        assert len(c.bytes) == (1 if t < 256 else 0 if t >= len(tiny.tokenizer) else len(c.token))
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    assert echoed.choices[0].logprobs.token_logprobs[0] is None and echoed.choices[0].text == PROMPT
    none = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert none.choices[0].logprobs is None


def test_streamed_chunks_carry_their_tokens_logprobs(url):
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 2, "ignore_eos": True}
    whole = post(url, body).json()["choices"][0]["logprobs"]
    chunks = sse(url, body)
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for part in parts for x in part[key]] == whole[key], key
    # with echo: the prompt (and its records) first.
    echoed = sse(url, body | {"echo": True})
    first = echoed[0]["choices"][0]
    assert first["text"] == PROMPT and first["logprobs"]["token_logprobs"][0] is None
    assert echoed[1]["choices"][0]["logprobs"]["text_offset"][0] == len(PROMPT)
    chat_body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 5,
        "temperature": 0,
        "logprobs": True,
        "ignore_eos": True,
    }
    whole_chat = post(url, chat_body, "chat/completions").json()["choices"][0]["logprobs"]["content"]
    streamed = [
        c
        for chunk in sse(url, chat_body, "chat/completions")
        if (lp := chunk["choices"][0].get("logprobs"))
        for c in lp["content"]
    ]
    assert streamed == whole_chat and len(streamed) == 5


@pytest.mark.parametrize(
    "path, body, param, words",
    [
        ("completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens", "0 is for scoring a prompt"),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
            "max_tokens",
            "ask for at least 1",
        ),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
            "top_logprobs",
            "needs logprobs: true",
        ),
        (
            "completions",
            {"prompt": "hi", "logprobs": 1, "temperature": 0, "strategy": "beam"},
            "strategy",
            "does not report log-probs",
        ),
        (
            "chat/completions",
            {
                "messages": [{"role": "user", "content": "hi"}],
                "logprobs": True,
                "temperature": 0,
                "strategy": "contrastive",
            },
            "strategy",
            "does not report log-probs",
        ),
    ],
)
def test_what_cannot_be_scored_is_a_400(url, path, body, param, words):
    r = post(url, body, path)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param and words in error["message"], error


def test_filtered_tokens_get_a_finite_floor(url):
    """-inf (a token top-k filtered out) is not JSON: the alternatives beyond top_k show -9999."""
    r = post(url, {"prompt": PROMPT, "max_tokens": 2, "temperature": 1.0, "top_k": 1, "logprobs": 3, "seed": 1})
    top = r.json()["choices"][0]["logprobs"]["top_logprobs"][0]
    assert sorted(top.values()) == [-9999.0, -9999.0, 0.0]
    assert argen.logprobs.MAX_TOP_LOGPROBS == 20
