"""`edit` on /v1/completions (PIE prompt edits, server/edits.py): an edit of a prompt the server served
reuses its cached keys and says so; eight at once equal each alone; an evicted prompt falls back to a
full prefill and says so; hostile edits get a 4xx that says what to fix."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from server_helpers import running_server

from argen.api import Generator
from argen.models import tiny as tiny_models
from argen.models.llama import LlamaRuntime
from argen.models.loading import LoadedModel
from argen.prompt_edit import PromptEdit
from argen.server.protocol import MAX_EDIT_CHARS

CODE = "def area(width, height):\n    return width * height\n\n" * 6  # 300 tokens of the byte tokenizer
MODEL = "tiny-pie"


def fresh_generator() -> Generator:
    """A tiny random Llama with a prefix cache of its own."""
    model = tiny_models.tiny_llama(0)
    runtime = LlamaRuntime(model.config, model.state_dict())
    return Generator(LoadedModel(MODEL, runtime, tiny_models.byte_tokenizer(), lambda: model, {258}))


@pytest.fixture(scope="module")
def served():
    gen = fresh_generator()
    with running_server(gen) as (url, _), httpx.Client(base_url=url, timeout=120) as client:
        yield client, gen


def complete(client, **body):
    return client.post("/v1/completions", json={"model": MODEL, "max_tokens": 8, "temperature": 0} | body)


def test_an_edit_of_a_served_prompt_reuses_its_keys_and_matches_the_python_api(served):
    client, _ = served
    assert complete(client, prompt=CODE).status_code == 200
    edit = {"start": 50, "end": 54, "text": "w * h + 0"}
    response = complete(client, prompt=CODE, edit=edit)
    assert response.status_code == 200, response.text
    report = response.json()["argen_edit"]
    alone = fresh_generator()  # the same edit through the Python API, on a model of its own
    alone.generate(CODE, chat=False, max_new_tokens=1, cache_prompt=True)
    api = alone.generate(CODE, chat=False, max_new_tokens=8, edit=PromptEdit(50, 54, "w * h + 0"))
    assert report["moved_tokens"] == api.stats.edit_moved_tokens > 200
    assert report["fallback"] is None and report["prefill_saved"] > 0.9
    assert response.json()["choices"][0]["text"] == api.text


def test_a_streamed_edit_reports_what_it_reused(served):
    client, _ = served
    assert complete(client, prompt=CODE).status_code == 200
    with client.stream(
        "POST",
        "/v1/completions",
        json={"model": MODEL, "prompt": CODE, "max_tokens": 4, "stream": True, "edit": {"start": 0, "end": 3}},
    ) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    reports = [json.loads(line[len("data: ") :]) for line in lines if '"argen_edit"' in line]
    assert len(reports) == 1 and reports[0]["argen_edit"]["moved_tokens"] > 200


def test_eight_concurrent_edits_equal_each_alone(served):
    client, _ = served
    assert complete(client, prompt=CODE).status_code == 200
    edits = [{"start": 20 + 30 * i, "end": 24 + 30 * i, "text": "x" * (i + 1)} for i in range(8)]
    alone = [complete(client, prompt=CODE, edit=e).json() for e in edits]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda e: complete(client, prompt=CODE, edit=e).json(), edits))
    assert [r["choices"][0]["text"] for r in together] == [r["choices"][0]["text"] for r in alone]
    assert all(r["argen_edit"]["moved_tokens"] > 0 for r in together)


def test_an_evicted_prompt_falls_back_to_a_full_prefill_and_says_so(served):
    client, gen = served
    prompt = CODE.replace("area", "size")
    assert complete(client, prompt=prompt).status_code == 200
    gen.runtime.kv_pool().drop_cached()  # the server is idle: its prefix cache emptied, as eviction would
    response = complete(client, prompt=prompt, edit={"start": 50, "end": 54, "text": "w"})
    assert response.status_code == 200
    report = response.json()["argen_edit"]
    assert report["moved_tokens"] == 0 and "not in the prefix cache" in report["fallback"]


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"prompt": "never sent " * 20, "edit": {"start": 0, "end": 1}}, 400, "has not served this prompt"),
        ({"prompt": CODE, "edit": {"start": 10, "end": 5000}}, 400, "outside the previous prompt"),
        ({"prompt": CODE, "edit": {"start": 20, "end": 10}}, 400, "outside the previous prompt"),
        ({"prompt": CODE, "edit": {"start": -1, "end": 10}}, 422, "start"),
        ({"prompt": CODE, "edit": {"start": 0, "end": 1, "text": "x" * (MAX_EDIT_CHARS + 1)}}, 422, "text"),
        ({"prompt": CODE, "edit": {"start": 0, "end": 1, "tokens": [5]}}, 400, "give text, not tokens"),
        ({"prompt": CODE, "edit": {"start": 0, "end": 1, "path": "/etc/passwd"}}, 422, "path"),
        ({"prompt": [CODE, CODE], "edit": {"start": 0, "end": 1}}, 400, "not a list of prompts"),
        ({"prompt": CODE, "echo": True, "edit": {"start": 0, "end": 1}}, 400, "echo"),
        ({"prompt": CODE, "edit": {"start": 0, "end": 0, "text": "y" * 60_000}}, 400, "context"),
    ],
)
def test_hostile_edits_get_a_4xx_that_says_what_to_fix(served, body, status, words):
    client, _ = served
    assert complete(client, prompt=CODE).status_code == 200
    response = complete(client, **body)
    assert response.status_code == status, response.text
    assert words in response.text


def test_chat_takes_no_edit(served):
    client, _ = served
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "edit": {"start": 0, "end": 1}}
    assert client.post("/v1/chat/completions", json=body).status_code == 422


def test_a_prompt_of_token_ids_is_edited_by_token_ids(served):
    client, _ = served
    ids = [(5 * i + 7) % 250 + 3 for i in range(120)]
    assert complete(client, prompt=ids).status_code == 200
    response = complete(client, prompt=ids, edit={"start": 40, "end": 42, "tokens": [9, 9, 9]})
    assert response.status_code == 200, response.text
    assert response.json()["argen_edit"]["moved_tokens"] == 112 - 42
    bad = complete(client, prompt=ids, edit={"start": 40, "end": 42, "tokens": [10**6]})
    assert bad.status_code == 400 and "outside the vocabulary" in bad.text
