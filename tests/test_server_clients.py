"""What real clients send, through the official `openai` client (and lm-eval's remote tokenizer)
against a real server on the tiny model: lists of prompts, the stop and sampling fields vLLM adds,
OpenAI's penalties, vLLM's tokenizer routes, `models.retrieve`, the fields OpenAI and vLLM clients
send (accepted and ignored, or implemented: prompt_logprobs, chat template options, continuous usage
stats), tools without parameters and parallel calls; and for each new field, the hostile values: a
4xx that names the field, never a 500."""

from __future__ import annotations

import json
import re
import time

import httpx
import jsonschema
import openai
import pytest
from server_helpers import metric, running_server

import argen
from argen.models import sources

MODEL = "tiny-random"
PROMPTS = ["Hello there", "abc abc abc", "The end is"]


@pytest.fixture(scope="module")
def url(tiny):
    with running_server(tiny, max_tokens_limit=512) as (base, _):
        yield base


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)


def post(url: str, body: dict, path: str = "v1/completions") -> httpx.Response:
    return httpx.post(f"{url}/{path}", json={"model": MODEL, **body} if path.startswith("v1/") else body, timeout=60)


def sse(url: str, body: dict, path: str = "completions") -> list[dict]:
    with httpx.stream("POST", f"{url}/v1/{path}", json={"model": MODEL, "stream": True, **body}, timeout=60) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def assert_4xx(response: httpx.Response, status: int, param: str | None, words: str = "") -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


# -- 1. a list of prompts -------------------------------------------------------------------------
def test_a_list_of_prompts_gives_n_choices_each_numbered_as_openai(url, tiny):
    out = client(url).completions.create(
        model=MODEL, prompt=PROMPTS, max_tokens=6, n=2, temperature=0.9, seed=11, extra_body={"return_token_ids": True}
    )
    assert [c.index for c in out.choices] == list(range(6))
    for i, prompt in enumerate(PROMPTS):  # choice i x n + j is sample j of prompt i, as alone
        want = tiny.generate(prompt, chat=False, max_new_tokens=6, n=2, temperature=0.9, seed=11)
        for j in range(2):
            choice = out.choices[i * 2 + j]
            assert choice.token_ids == want[j].token_ids and choice.text == want[j].text and choice.seed == 11 + j
    prompt_tokens = sum(len(tiny.encode(p, chat=False)) for p in PROMPTS)
    assert out.usage.prompt_tokens == prompt_tokens and out.usage.completion_tokens == 36


def test_a_list_of_token_id_prompts_and_its_stream(url, tiny):
    ids = [tiny.encode(p, chat=False) for p in PROMPTS]
    whole = client(url).completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert [c.text for c in whole.choices] == [tiny.generate(i, max_new_tokens=8).text for i in ids]
    texts = ["", "", ""]
    for chunk in client(url).completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in whole.choices]


def test_a_streamed_list_without_a_seed_reports_each_choices_own_seed(url, tiny):
    """Each prompt draws its own seed; every choice's last chunk carries its prompt's seed + j, which
    replays it alone."""
    texts, seeds = {}, {}
    for chunk in sse(url, {"prompt": PROMPTS[:2], "max_tokens": 6, "n": 2, "temperature": 1.0}):
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            if choice["finish_reason"]:
                seeds[choice["index"]] = choice["seed"]
    assert sorted(seeds) == [0, 1, 2, 3] and seeds[1] == seeds[0] + 1 and seeds[3] == seeds[2] + 1
    for index, seed in seeds.items():
        alone = tiny.generate(PROMPTS[index // 2], chat=False, max_new_tokens=6, temperature=1.0, seed=seed)
        assert alone.text == texts[index]


def test_a_list_scored_as_lm_eval_scores_it_equals_one_prompt_at_a_time(url):
    """lm-eval's local-completions at batch size 4: echo, logprobs=1, max_tokens=1, a list of prompts
    (prefilled in one packed pass: equal to one at a time up to float32 rounding)."""
    body = {"max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True, "seed": 1234}
    batched = post(url, {"prompt": PROMPTS, **body}).json()["choices"]
    for i, prompt in enumerate(PROMPTS):
        alone = post(url, {"prompt": prompt, **body}).json()["choices"][0]
        assert batched[i]["index"] == i and batched[i]["text"] == alone["text"]
        mine, theirs = batched[i]["logprobs"], alone["logprobs"]
        assert mine["tokens"] == theirs["tokens"] and mine["text_offset"] == theirs["text_offset"]
        assert mine["token_logprobs"][1:] == pytest.approx(theirs["token_logprobs"][1:], abs=1e-4)
        for a, b in zip(mine["top_logprobs"][1:], theirs["top_logprobs"][1:], strict=True):
            assert a.keys() == b.keys() and list(a.values()) == pytest.approx(list(b.values()), abs=1e-4)


def test_every_prompt_of_a_list_follows_the_response_format(url):
    fmt = {"type": "regex", "regex": r"[0-9]{3}-[a-z]{2}"}
    out = client(url).completions.create(
        model=MODEL, prompt=PROMPTS, max_tokens=12, temperature=1.0, seed=3, extra_body={"response_format": fmt}
    )
    assert len(out.choices) == 3 and all(re.fullmatch(fmt["regex"], c.text) for c in out.choices)


def test_the_prompts_of_a_list_decode_in_one_batch(tiny):
    """Each prompt is admitted as a request, and they are queued together: four prompts on a server
    of four slots run as four sequences at once."""
    with running_server(tiny, max_batch=4) as (base, _):
        client(base).completions.create(
            model=MODEL, prompt=PROMPTS + ["one more"], max_tokens=40, temperature=0, extra_body={"ignore_eos": True}
        )
        text = httpx.get(f"{base}/metrics").text
        assert metric(text, "argen_running_sequences_peak") == 4
        assert metric(text, "argen_requests_total", endpoint="completions", outcome="length") == 4


def test_a_list_that_does_not_fit_the_queue_is_refused_whole(tiny):
    """All or none: a list the queue cannot take now is a 429 (none of it queued); one it could never
    take is a 400."""
    import threading

    with running_server(tiny, max_batch=1, max_queue=2) as (base, _):
        assert_4xx(post(base, {"prompt": PROMPTS + ["x"], "max_tokens": 2}), 400, "prompt", "at most 3 requests")
        busy = threading.Thread(target=post, args=(base, {"prompt": "busy", "max_tokens": 300, "ignore_eos": True}))
        busy.start()
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/health").json()["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        r = post(base, {"prompt": PROMPTS, "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert httpx.get(f"{base}/health").json()["waiting"] == 0  # nothing of it was queued
        assert post(base, {"prompt": PROMPTS[:2], "max_tokens": 2}).status_code == 200
        busy.join(60)


@pytest.mark.parametrize(
    "body, status, param, words",
    [
        ({"prompt": []}, 400, "prompt", "empty"),
        ({"prompt": ["a"] * 65}, 422, "prompt", "at most 64"),
        ({"prompt": [[1, 2]] * 65}, 422, "prompt", "at most 64"),
        ({"prompt": ["ok", "x" * 2100]}, 400, "prompt", "prompt 1 has 2100 tokens"),
        ({"prompt": [[1], [10**6]]}, 400, "prompt", "outside the vocabulary"),
        ({"prompt": [[1], []]}, 400, "prompt", "prompt 1 is empty"),
        ({"prompt": ["a", "b", "c"], "max_tokens": 200, "n": 1}, 400, "max_tokens", "3 prompts x n x max_tokens"),
        ({"prompt": ["a", ["b"]]}, 422, "prompt", ""),
    ],
)
def test_hostile_prompt_lists_are_4xx(url, body, status, param, words):
    assert_4xx(post(url, body), status, param, words)


# -- 2. stop strings and vLLM's stop fields -------------------------------------------------------
def test_many_stop_strings_as_lm_eval_sends_them(url, tiny):
    full = tiny.generate("Stop here", chat=False, max_new_tokens=30, ignore_eos=True).text
    i = next(i for i in range(3, len(full) - 1) if full[i].isprintable() and full[i] not in full[:i])
    stops = [f"never{k}" for k in range(31)] + [full[i]]
    out = client(url).completions.create(
        model=MODEL, prompt="Stop here", max_tokens=30, temperature=0, stop=stops, extra_body={"ignore_eos": True}
    )
    assert out.choices[0].text == full[:i] and out.choices[0].finish_reason == "stop"


def test_vllm_stop_fields_mean_what_the_python_api_means(url, tiny):
    plain = tiny.generate("Hello there", chat=False, max_new_tokens=20, ignore_eos=True)
    stop = next(t for t in plain.token_ids[3:] if len(tiny.tokenizer.decode([t])) == 1)
    cases = [
        {"stop_token_ids": [stop]},
        {"stop_token_ids": [stop], "include_stop_str_in_output": True},
        {"min_tokens": 4, "logit_bias": {"258": 100}},
        {"skip_special_tokens": False, "logit_bias": {"257": 100}},
        {"stop": [tiny.tokenizer.decode([stop])], "include_stop_str_in_output": True},
    ]
    for fields in cases:
        api = {**fields, "logit_bias": {int(k): v for k, v in fields.get("logit_bias", {}).items()}}
        want = tiny.generate("Hello there", chat=False, max_new_tokens=20, ignore_eos="min_tokens" not in fields, **api)
        out = client(url).completions.create(
            model=MODEL,
            prompt="Hello there",
            max_tokens=20,
            temperature=0,
            extra_body={"return_token_ids": True, "ignore_eos": "min_tokens" not in fields, **fields},
        )
        assert (out.choices[0].text, out.choices[0].token_ids) == (want.text, want.token_ids), fields


@pytest.mark.parametrize(
    "body, status, param, words",
    [
        ({"stop": ["s"] * 33}, 422, "stop", ""),
        ({"stop": "x" * 257}, 422, "stop", ""),
        ({"stop": ["ok", "x" * 257]}, 422, "stop", ""),
        ({"stop": [""]}, 422, "stop", ""),
        ({"stop_token_ids": [10**6]}, 400, "stop_token_ids", "outside the vocabulary"),
        ({"stop_token_ids": [-1]}, 422, "stop_token_ids", ""),
        ({"stop_token_ids": [1] * 257}, 422, "stop_token_ids", ""),
        ({"stop_token_ids": ["1"]}, 422, "stop_token_ids", ""),
        ({"stop_token_ids": [True]}, 422, "stop_token_ids", ""),
        ({"min_tokens": 50, "max_tokens": 10}, 400, "min_tokens", "max_new_tokens"),
        ({"min_tokens": -1}, 422, "min_tokens", ""),
        ({"min_tokens": "3"}, 422, "min_tokens", ""),
        ({"min_tokens": 2, "response_format": {"type": "json_object"}}, 400, "min_tokens", "grammar"),
        ({"include_stop_str_in_output": "yes"}, 422, "include_stop_str_in_output", ""),
        ({"skip_special_tokens": 0}, 422, "skip_special_tokens", ""),
    ],
)
def test_hostile_stop_fields_are_4xx(url, body, status, param, words):
    assert_4xx(post(url, {"prompt": "hi", "max_tokens": 10, **body}), status, param, words)


# -- 3. vLLM's tokenizer routes, models.retrieve, lm-eval's remote tokenizer ----------------------
def test_tokenize_and_detokenize_as_generation_tokenizes(url, tiny):
    text = "Hello there, tokens."
    r = post(url, {"prompt": text, "return_token_strs": True}, "tokenize").json()
    assert (
        r["tokens"] == tiny.encode(text, chat=False) and r["count"] == len(r["tokens"]) and r["max_model_len"] == 2048
    )
    assert r["token_strs"] == tiny.tokenizer.convert_ids_to_tokens(r["tokens"])
    assert post(url, {"tokens": r["tokens"]}, "detokenize").json() == {"prompt": text}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = post(url, {"messages": messages}, "tokenize").json()
    assert chat["tokens"] == tiny.encode(messages)
    out = client(url).chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert out.usage.prompt_tokens == chat["count"]


def test_tokenizer_info_and_lm_evals_remote_tokenizer(url, tiny):
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    info = httpx.get(f"{url}/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>" and info["chat_template"] == tiny.tokenizer.chat_template
    assert not any(str(sources.cache_dir()) in json.dumps(v) for v in info.values())  # no local path leaks
    assert check_remote_tokenizer_support(f"{url}/v1/completions")
    remote = RemoteTokenizer(f"{url}/v1/completions")
    assert remote.encode("Hello there") == tiny.tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    assert remote.eos_token_id == tiny.tokenizer.eos_token_id and remote.decode(remote.encode("Hi")) == "Hi"


def test_models_retrieve(url):
    assert client(url).models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as info:
        client(url).models.retrieve("gpt-4o")
    assert info.value.body["code"] == "model_not_found" and MODEL in info.value.body["message"]


@pytest.mark.parametrize(
    "path, body, status, param, words",
    [
        ("tokenize", {}, 400, "prompt", "either prompt"),
        ("tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400, "prompt", "either prompt"),
        ("tokenize", {"prompt": "x" * 30000}, 400, "prompt", "more than any 2048-token context"),
        ("tokenize", {"prompt": "a", "model": "other"}, 404, "model", "not served here"),
        ("tokenize", '{"prompt": "\\ud800"}', 400, "prompt", "not valid Unicode"),
        (
            "tokenize",
            {"messages": [{"role": "user", "content": "b"}], "add_special_tokens": True},
            400,
            "add_special_tokens",
            "chat template",
        ),
        (
            "tokenize",
            {"messages": [{"role": "user", "content": "b"}], "chat_template": "{{ 7 * 7 }}"},
            422,
            "chat_template",
            "unknown field",
        ),
        (
            "tokenize",
            {"messages": [{"role": "user", "content": "b"}], "chat_template_kwargs": {"tokenize": False}},
            400,
            "chat_template_kwargs",
            "not a template variable",
        ),
        ("detokenize", {"tokens": [1] * 2049}, 400, "tokens", "context"),
        ("detokenize", {"tokens": [10**6]}, 400, "tokens", "outside the vocabulary"),
        ("detokenize", {"tokens": [-1]}, 422, "tokens", ""),
        ("detokenize", {"tokens": [2**70]}, 400, "tokens", "outside the vocabulary"),
        ("detokenize", {"tokens": "1 2"}, 422, "tokens", ""),
    ],
)
def test_hostile_tokenizer_requests_are_4xx(url, path, body, status, param, words):
    if isinstance(body, str):  # raw JSON (a lone surrogate, which httpx will not encode)
        r = httpx.post(f"{url}/{path}", content=body, headers={"content-type": "application/json"}, timeout=60)
    else:
        r = post(url, body, path)
    assert_4xx(r, status, param, words)


# -- 4. presence and frequency penalties ----------------------------------------------------------
def test_penalties_through_the_client_equal_the_python_api(url, tiny):
    want = tiny.generate("abc abc", chat=False, max_new_tokens=16, presence_penalty=2.0, frequency_penalty=2.0)
    out = client(url).completions.create(
        model=MODEL,
        prompt="abc abc",
        max_tokens=16,
        temperature=0,
        presence_penalty=2.0,
        frequency_penalty=2.0,
        extra_body={"return_token_ids": True},
    )
    assert out.choices[0].token_ids == want.token_ids
    assert want.token_ids != tiny.generate("abc abc", chat=False, max_new_tokens=16).token_ids


@pytest.mark.parametrize(
    "body, param",
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"presence_penalty": "1"}, "presence_penalty"),
    ],
)
def test_penalties_out_of_openais_range_are_422(url, body, param):
    assert_4xx(post(url, {"prompt": "hi", **body}), 422, param)


# -- 5. fields OpenAI and vLLM clients send -------------------------------------------------------
MESSAGES = [{"role": "user", "content": "Say something."}]


def test_fields_clients_send_are_accepted(url, tiny):
    want = tiny.generate(MESSAGES, max_new_tokens=6)
    out = client(url).chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=6,
        temperature=0,
        store=False,
        metadata={"run": "7", "who": "test"},
        user="u-1",
        service_tier="auto",
        reasoning_effort="low",
    )
    assert out.choices[0].message.content == want.text
    done = client(url).completions.create(model=MODEL, prompt="hi", max_tokens=2, user="u-2")
    assert done.usage.completion_tokens == 2


@pytest.mark.parametrize(
    "body, param",
    [
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"user": "u" * 257}, "user"),
        ({"service_tier": "gold"}, "service_tier"),
        ({"store": "yes"}, "store"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"chat_template_kwargs": []}, "chat_template_kwargs"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"stream_options": {"continuous_usage_stats": 1}}, "stream_options"),
        ({"totally_unknown": 1}, "totally_unknown"),
    ],
)
def test_hostile_client_fields_are_422(url, body, param):
    assert_4xx(post(url, {"messages": MESSAGES, **body}, "v1/chat/completions"), 422, param)


def test_continue_final_message_continues_a_partial_assistant_message(url, tiny):
    partial = MESSAGES + [{"role": "assistant", "content": "Here is"}]
    ids = tiny.encode_chat(partial, add_generation_prompt=False, continue_final_message=True)
    assert tiny.tokenizer.decode(ids).endswith("Here is")  # open: no end-of-turn after it
    want = tiny.generate(ids, max_new_tokens=8)
    out = client(url).chat.completions.create(
        model=MODEL,
        messages=partial,
        max_tokens=8,
        temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    assert out.choices[0].message.content == want.text and out.usage.prompt_tokens == len(ids)
    no_prompt = post(url, {"messages": MESSAGES, "add_generation_prompt": False}, "tokenize").json()["count"]
    assert no_prompt < post(url, {"messages": MESSAGES}, "tokenize").json()["count"]
    both = post(url, {"messages": partial, "continue_final_message": True}, "v1/chat/completions")
    assert_4xx(both, 400, "messages", "add_generation_prompt")


def test_chat_template_kwargs_reach_the_template():
    gen = argen.load("tiny-random")
    gen.tokenizer.chat_template = (
        "{{ greeting | default('Hello') }}: {% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with running_server(gen) as (base, _):
        plain = post(base, {"messages": MESSAGES}, "tokenize").json()["tokens"]
        kwargs = {"chat_template_kwargs": {"greeting": "Bonjour"}}
        greeted = post(base, {"messages": MESSAGES, **kwargs}, "tokenize").json()["tokens"]
        assert gen.tokenizer.decode(plain).startswith("Hello:") and gen.tokenizer.decode(greeted).startswith("Bonjour:")
        out = client(base).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, extra_body=kwargs)
        assert out.usage.prompt_tokens == len(greeted)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"tokenize": False}, "'tokenize' is not a template variable"),
        ({"chat_template": "{{ 1 }}"}, "chat_template"),
        ({"messages": []}, "'messages'"),
        ({"add_generation_prompt": False}, "add_generation_prompt"),
        ({"bad-name": 1}, "'bad-name'"),
        ({f"v{i}": 1 for i in range(17)}, "at most 16"),
        ({"v": "x" * 5000}, "4096 characters"),
        ({"v": [[[[[[[[[1]]]]]]]]]}, "nested at most 8 deep"),
    ],
)
def test_hostile_chat_template_kwargs_are_400(url, kwargs, words):
    r = post(url, {"messages": MESSAGES, "chat_template_kwargs": kwargs}, "v1/chat/completions")
    assert_4xx(r, 400, "chat_template_kwargs", words)


def test_prompt_logprobs_as_vllm_returns_them(url, tiny):
    want = tiny.generate("Score this prompt", chat=False, max_new_tokens=0, prompt_logprobs=2)
    out = post(url, {"prompt": "Score this prompt", "max_tokens": 1, "prompt_logprobs": 2}).json()
    got = out["choices"][0]["prompt_logprobs"]
    assert got[0] is None and len(got) == len(want.prompt_ids)
    for entry, token, record in zip(got[1:], want.prompt_ids[1:], want.prompt_logprobs[1:], strict=True):
        mine = entry[str(token)]
        assert mine["logprob"] == pytest.approx(record.logprob, abs=1e-4) and mine["rank"] == record.rank
        assert mine["decoded_token"] == tiny.tokenizer.decode([token])
        ranked = sorted((v["rank"], k) for k, v in entry.items())
        assert [r for r, _ in ranked if r <= 2] == [1, 2] or mine["rank"] <= 2
    chat = post(url, {"messages": MESSAGES, "max_tokens": 1, "prompt_logprobs": 0}, "v1/chat/completions").json()
    assert chat["prompt_logprobs"][0] is None and all(len(e) == 1 for e in chat["prompt_logprobs"][1:])
    assert "prompt_logprobs" not in post(url, {"prompt": "x", "max_tokens": 1}).json()["choices"][0]
    streamed = post(url, {"prompt": "x", "max_tokens": 1, "prompt_logprobs": 1, "stream": True})
    assert_4xx(streamed, 400, "prompt_logprobs", "cannot be streamed")


def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(url):
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(
        client(url).chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, stream=True, stream_options=options
        )
    )
    assert all(c.usage is not None for c in chunks)
    done = [c.usage.completion_tokens for c in chunks]
    assert done == sorted(done) and done[-1] == chunks[-1].usage.completion_tokens == 8
    assert len({c.usage.prompt_tokens for c in chunks}) == 1
    plain = list(client(url).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, stream=True))
    assert all(c.usage is None for c in plain)


# -- 6. tools ----------------------------------------------------------------------------------
WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Oslo"]}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_time", "description": "The time now"}},
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
]


def test_a_function_without_parameters_takes_no_arguments(url):
    for tool in (TOOLS[0], {"type": "function", "function": {"name": "get_time", "parameters": {}}}):
        out = client(url).chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            tools=[tool],
            max_tokens=40,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        )
        (call,) = out.choices[0].message.tool_calls
        assert call.function.name == "get_time" and json.loads(call.function.arguments) == {}
        assert out.choices[0].finish_reason == "tool_calls"


def test_required_with_parallel_tool_calls_may_call_several(url):
    counts = set()
    for seed in range(6):
        out = client(url).chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=True,
            max_tokens=200,
            temperature=1.0,
            seed=seed,
        )
        calls = out.choices[0].message.tool_calls
        assert out.choices[0].finish_reason == "tool_calls" and 1 <= len(calls) <= 8
        for call in calls:
            schema = {"get_time": {"type": "object", "maxProperties": 0}, "get_weather": WEATHER}[call.function.name]
            jsonschema.validate(json.loads(call.function.arguments), schema)
        counts.add(len(calls))
    assert max(counts) > 1  # several calls happen
    one = client(url).chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=200,
        temperature=1.0,
        seed=0,
    )
    assert len(one.choices[0].message.tool_calls) == 1


@pytest.mark.real
def test_the_default_model_calls_a_function_without_parameters_and_stops(real):
    """The bug this guards against: a function without parameters got an open-object grammar, and the
    default model wrote keys until max_tokens, with no tool call."""
    with running_server(real) as (base, _):
        c = client(base)
        out = c.chat.completions.create(
            model=real.name,
            messages=[{"role": "user", "content": "What time is it?"}],
            tools=TOOLS,
            max_tokens=60,
            temperature=0,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        )
        choice = out.choices[0]
        assert (
            choice.finish_reason == "tool_calls" and json.loads(choice.message.tool_calls[0].function.arguments) == {}
        )
        ask = [{"role": "user", "content": "What is the weather in Paris and in Oslo?"}]
        counts = []
        for seed in range(4):
            out = c.chat.completions.create(
                model=real.name,
                messages=ask,
                tools=TOOLS,
                tool_choice="required",
                parallel_tool_calls=True,
                max_tokens=150,
                temperature=0.7,
                seed=seed,
            )
            calls = out.choices[0].message.tool_calls
            assert out.choices[0].finish_reason == "tool_calls" and calls
            counts.append(len(calls))
        assert max(counts) >= 2, counts  # the model does make several calls when it may
