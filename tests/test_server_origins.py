"""return_origins (argen extension): each token's origin and each choice's decode stats over HTTP,
streamed and not; a greedy prompt-lookup request's "draft" origins add up to its accepted drafts."""

from __future__ import annotations

import json

import httpx
import pytest
from server_helpers import running_server


@pytest.fixture(scope="module")
def server(looping):
    with running_server(looping) as (url, _):
        yield url


BODY = {
    "model": "tiny-looping",
    "prompt": "hello",
    "max_tokens": 48,
    "temperature": 0,
    "ignore_eos": True,
    "strategy": {"name": "prompt-lookup", "adaptive": False},
    "return_origins": True,
}


def _stream(url: str, body: dict) -> list[dict]:
    chunks = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body | {"stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def test_origins_and_stats_in_a_response(server):
    """Every token has an origin, the drafts marked equal the drafts accepted (unless the last step
    was cut by max_tokens, when they are at most that), and the stats say the strategy."""
    for max_tokens in (40, 41, 42, 43):
        out = httpx.post(
            f"{server}/v1/completions", json=BODY | {"max_tokens": max_tokens, "return_token_ids": True}
        ).json()
        (choice,) = out["choices"]
        origins, stats = choice["token_origins"], choice["stats"]
        assert len(origins) == len(choice["token_ids"]) == max_tokens
        assert stats["strategy"] == "prompt-lookup" and stats["draft_tokens_accepted"] > 0
        drafts = origins.count("draft")
        assert drafts == stats["draft_tokens_accepted"] or (
            origins[-1] == "draft" and drafts < stats["draft_tokens_accepted"]
        )
        assert origins.count("verify") + origins.count("step") <= stats["forward_passes"] - stats["prefill_passes"]


def test_a_stream_carries_each_chunk_s_origins_and_the_stats_at_the_end(server):
    chunks = _stream(server, BODY)
    texts = [c for c in chunks if c["choices"]]
    stats = [c["argen_stats"] for c in chunks if "argen_stats" in c]
    streamed = [o for c in texts for o in c["choices"][0].get("token_origins", [])]
    whole = httpx.post(f"{server}/v1/completions", json=BODY).json()["choices"][0]
    assert streamed == whole["token_origins"]
    assert len(stats) == 1 and stats[0]["index"] == 0
    assert stats[0]["draft_tokens_accepted"] == whole["stats"]["draft_tokens_accepted"]
    assert "draft" in streamed


def test_without_the_flag_nothing_extra_is_sent(server):
    body = {k: v for k, v in BODY.items() if k != "return_origins"}
    out = httpx.post(f"{server}/v1/completions", json=body).json()
    assert "token_origins" not in out["choices"][0] and "stats" not in out["choices"][0]
    assert not any("argen_stats" in c or "token_origins" in str(c) for c in _stream(server, body))


def test_chat_and_a_bad_flag(server):
    out = httpx.post(
        f"{server}/v1/chat/completions",
        json={
            "model": "tiny-looping",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8,
            "return_origins": True,
        },
    ).json()
    assert len(out["choices"][0]["token_origins"]) == out["usage"]["completion_tokens"]
    bad = httpx.post(f"{server}/v1/completions", json=BODY | {"return_origins": "yes"})
    assert bad.status_code == 422
