"""`argen batch`: input lines (OpenAI batch lines and plain prompts) through the continuous-batching
loop, output lines in OpenAI's batch output shape and in input order, bad lines as error lines,
and resume after an interruption without redoing finished lines."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from server_helpers import running_server

from argen.api import ModelSpec
from argen.cli import build_parser, main
from argen.cli.batch import batch_job
from argen.jobs import run_batch
from argen.jobs.job import OrderedWriter
from argen.jobs.lines import Job, done_ids

N_PROMPTS = 200
SRC = str(Path(__file__).resolve().parents[1] / "src")


def prompts(n: int = N_PROMPTS) -> list[str]:
    # varied lengths, so requests finish (and are admitted) out of input order
    return [f"prompt {i}: " + "abc " * (i % 7) for i in range(n)]


def write_prompts(path: Path, n: int = N_PROMPTS) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(n)))
    return path


def batch_args(inp: Path, out: Path, *extra: str):
    return batch_job(
        build_parser().parse_args(
            ["batch", str(inp), str(out), "--model", "tiny-random", "--max-new-tokens", "4", "--no-progress", *extra]
        )
    )


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def texts(lines: list[dict]) -> list[tuple[str, str]]:
    return [(line["custom_id"], line["response"]["body"]["choices"][0]["message"]["content"]) for line in lines]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    """The uninterrupted local run over N_PROMPTS plain prompts."""
    d = tmp_path_factory.mktemp("batch")
    out = d / "out.jsonl"
    assert (
        main(
            [
                "batch",
                str(write_prompts(d / "in.jsonl")),
                str(out),
                "--model",
                "tiny-random",
                "--max-new-tokens",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    return read_lines(out)


def test_outputs_are_in_input_order_and_equal_the_api(reference, tiny):
    assert [line["custom_id"] for line in reference] == [f"line-{i + 1}" for i in range(N_PROMPTS)]
    assert all(line["error"] is None and line["response"]["status_code"] == 200 for line in reference)
    body = reference[0]["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "tiny-random"
    # the same greedy tokens as the Python API (which runs each batch of prompts its own way)
    some = [0, 1, 57, 199]
    results = tiny.generate([prompts()[i] for i in some], max_new_tokens=4, temperature=0.0)
    got = [reference[i]["response"]["body"] for i in some]
    assert [b["choices"][0]["message"]["content"] for b in got] == [r.text for r in results]
    assert [b["usage"]["completion_tokens"] for b in got] == [len(r.token_ids) for r in results]


def same(a, b) -> bool:
    """Equal JSON values, floats to 1e-4."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) < 1e-4
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_a_line_means_what_the_same_http_request_means(tmp_path, tiny):
    body = {
        "model": "tiny-random",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 6,
        "temperature": 0.9,
        "seed": 7,
        "top_k": 20,
        "return_token_ids": True,
    }
    completion = {"model": "tiny-random", "prompt": "abc", "max_tokens": 5, "seed": 3}
    # log-probs, the echoed prompt and vLLM's prompt_logprobs; a forced tool call: shaped as the server does
    scored = completion | {"temperature": 0, "echo": True, "logprobs": 2, "prompt_logprobs": 1}
    tool = {"type": "function", "function": {"name": "get_time"}}
    called = body | {"temperature": 0, "tools": [tool], "tool_choice": tool}
    urls = {
        "chat": "/v1/chat/completions",
        "text": "/v1/completions",
        "scored": "/v1/completions",
        "called": "/v1/chat/completions",
    }
    bodies = {"chat": body, "text": completion, "scored": scored, "called": called}
    lines = [{"custom_id": key, "method": "POST", "url": urls[key], "body": bodies[key]} for key in urls]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    run_batch(batch_args(inp, out))
    got = {line["custom_id"]: line["response"]["body"] for line in read_lines(out)}
    with running_server(tiny, model_id="tiny-random") as (url, _):
        http = {key: httpx.post(f"{url}{urls[key]}", json=bodies[key], timeout=60).json() for key in urls}
    assert got["scored"]["choices"][0]["logprobs"] and got["scored"]["choices"][0]["prompt_logprobs"]
    assert got["called"]["choices"][0]["message"]["tool_calls"]
    for choice in got["called"]["choices"] + http["called"]["choices"]:  # call ids are fresh each time
        for call in choice["message"]["tool_calls"]:
            call["id"] = "call"
    for key in urls:  # log-probs as float32 rounding allows (the batch prefilled its lines in one pass)
        assert same(got[key]["choices"], http[key]["choices"]) and got[key]["usage"] == http[key]["usage"]
        assert got[key]["object"] == http[key]["object"]


def test_a_line_may_name_a_caad_store_the_command_loaded(tmp_path, tiny):
    """`argen batch --caad-store NAME=PATH`: a line's caad request gets the store and decodes as the
    Python API does with it. Seen failing when batch parsed --caad-store but never handed it to the
    runner (the line got a 400: this server has none loaded)."""
    from argen.recipes.caad_store import build_store

    store = tmp_path / "refs.caad"
    build_store(tiny.runtime, [tiny.encode("the cat sat on the mat " * 4, chat=False)], values="tokens").save(store)
    spec = {"name": "caad", "blend": 1.0, "top_n": 1}
    line = {"custom_id": "c", "method": "POST", "url": "/v1/completions"}
    line["body"] = {"model": "tiny-random", "prompt": "the cat", "max_tokens": 6, "temperature": 0, "strategy": spec}
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps(line) + "\n")
    run_batch(batch_args(inp, out, "--caad-store", f"refs={store}"))
    body = read_lines(out)[0]["response"]["body"]
    want = tiny.generate("the cat", chat=False, max_new_tokens=6, temperature=0, strategy=spec | {"store": str(store)})
    assert body["choices"][0]["text"] == want.text, body


def test_bad_lines_become_error_lines(tmp_path):
    ok = {"model": "tiny-random", "prompt": "abc", "max_tokens": 2}
    raw = [
        json.dumps("a bare string prompt"),
        "not json {",
        json.dumps([1, 2]),
        json.dumps(
            {
                "custom_id": "wrong-model",
                "method": "POST",
                "url": "/v1/completions",
                "body": {**ok, "model": "gpt-4o-mini"},
            }
        ),
        json.dumps(
            {"custom_id": "unknown-field", "method": "POST", "url": "/v1/completions", "body": {**ok, "bogus": 1}}
        ),
        json.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": ok}),
        json.dumps(
            {"custom_id": "streamed", "method": "POST", "url": "/v1/completions", "body": {**ok, "stream": True}}
        ),
        json.dumps(
            {"custom_id": "too-long", "method": "POST", "url": "/v1/completions", "body": {**ok, "max_tokens": 10**6}}
        ),
        "",
        json.dumps({"custom_id": "ok", "method": "POST", "url": "/v1/completions", "body": ok}),
        json.dumps({"custom_id": "ok", "method": "POST", "url": "/v1/completions", "body": ok}),
        json.dumps({"prompt": 5}),
        "[" * 100_000,
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_bytes(("\n".join(raw) + "\n").encode() + b'{"prompt": "bad UTF-8: \xff"}\n')
    summary = run_batch(batch_args(inp, out))
    lines = read_lines(out)
    ids = [line["custom_id"] for line in lines]
    assert ids == [
        "line-1",
        "line-2",
        "line-3",
        "wrong-model",
        "unknown-field",
        "bad-url",
        "streamed",
        "too-long",
        "ok",
        "ok",
        "line-12",
        "line-13",
        "line-14",
    ]  # (the blank line 9 is skipped)
    status = [(line["response"] or {}).get("status_code") for line in lines]
    assert status == [200, None, None, 404, 422, None, 400, 400, 200, None, None, None, 400]
    assert "too deeply" in lines[11]["error"]["message"] and lines[12]["error"]["code"] == "invalid_text"
    assert lines[1]["error"]["code"] == "invalid_line" and "not JSON" in lines[1]["error"]["message"]
    assert "already used on line 10" in lines[9]["error"]["message"]
    assert "gpt-4o-mini" in lines[3]["error"]["message"] and "--model-id" not in lines[3]["error"]["message"]
    assert summary.errors == 11 and summary.written == 13
    # --model-id: the name bodies give (here an OpenAI model's) is accepted
    out2 = tmp_path / "out2.jsonl"
    run_batch(batch_args(inp, out2, "--model-id", "gpt-4o-mini"))
    assert read_lines(out2)[3]["response"]["status_code"] == 200


def test_the_writer_keeps_input_order_whatever_the_finishing_order():
    out = io.StringIO()
    jobs = [Job(i, i + 1, f"c{i}") for i in range(4)]
    writer = OrderedWriter(out, jobs)
    assert list(writer.add(jobs[2], {"n": 2})) == [] and list(writer.add(jobs[1], {"n": 1})) == []
    assert [x["n"] for x in writer.add(jobs[0], {"n": 0})] == [0, 1, 2]
    assert [x["n"] for x in writer.add(jobs[3], {"n": 3})] == [3]
    assert [json.loads(line)["n"] for line in out.getvalue().splitlines()] == [0, 1, 2, 3]


def test_interrupted_then_rerun_resumes_without_redoing_lines(tmp_path, reference):
    inp, out = write_prompts(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    stop_after, seen = 50, []

    def interrupt(line: dict) -> None:
        seen.append(line["custom_id"])
        if len(seen) >= stop_after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(batch_args(inp, out), on_line=interrupt)
    assert len(read_lines(out)) == stop_after
    with open(out, "a") as f:  # the process died in the middle of writing a line
        f.write('{"id": "batch_req_x", "custom_id": "line-51", "resp')
    summary = run_batch(batch_args(inp, out))
    assert summary.skipped == stop_after and summary.written == N_PROMPTS - stop_after
    # only the remaining lines were generated: their tokens, not the first 50's
    assert summary.tokens == sum(
        line["response"]["body"]["usage"]["completion_tokens"] for line in reference[stop_after:]
    )
    assert texts(read_lines(out)) == texts(reference)
    # a third run has nothing left to do
    again = run_batch(batch_args(inp, out))
    assert again.written == 0 and again.skipped == N_PROMPTS


def test_resume_refuses_an_output_file_that_is_not_batch_output(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("hello\n")
    inp = write_prompts(tmp_path / "in.jsonl", 2)
    assert main(["batch", str(inp), str(out), "--model", "tiny-random"]) == 2
    assert done_ids(tmp_path / "absent.jsonl") == set()


def test_killed_process_resumes(tmp_path, reference):
    """A real kill (SIGKILL, no cleanup) between lines or mid-line: the rerun completes OUT."""
    inp, out = write_prompts(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "argen.cli",
        "batch",
        str(inp),
        str(out),
        "--model",
        "tiny-random",
        "--max-new-tokens",
        "4",
        "--no-progress",
        "--max-batch",
        "4",
    ]
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while (not out.exists() or out.stat().st_size < 4000) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = out.read_text().count("\n")
    assert 0 < first < N_PROMPTS, "the kill came too late to test a resume"
    subprocess.run(cmd, env=env, check=True, stderr=subprocess.DEVNULL)
    assert texts(read_lines(out)) == texts(reference)


def test_ctrl_c_exits_130_and_says_that_the_same_command_resumes(tmp_path, reference, monkeypatch, capsys):
    """Ctrl-C mid-run: exit status 130, a message that says a re-run resumes, and the re-run it names
    completes OUT. The interrupt is the KeyboardInterrupt that SIGINT raises, raised as the 20th line
    is written (a signal from another process raced the job, which now ends in about 2 s)."""
    import argen.jobs

    inp, out = write_prompts(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    args = ["batch", str(inp), str(out), "--model", "tiny-random", "--max-new-tokens", "4", "--no-progress"]
    run_batch = argen.jobs.run_batch

    def interrupted(job, on_line=None):
        written = []

        def ctrl_c(line: dict) -> None:
            written.append(line)
            if len(written) == 20:
                raise KeyboardInterrupt

        return run_batch(job, on_line=ctrl_c)

    monkeypatch.setattr(argen.jobs, "run_batch", interrupted)
    assert main(args) == 130
    err = capsys.readouterr().err
    assert f"the lines finished so far are in {out}" in err and "run the same command again to resume" in err
    assert out.read_text().count("\n") == 20
    monkeypatch.setattr(argen.jobs, "run_batch", run_batch)
    assert main(args) == 0
    assert texts(read_lines(out)) == texts(reference)


@pytest.mark.parametrize("command", [["batch", "IN", "OUT", "--ray"], ["serve", "--replicas", "2"]])
def test_ray_options_without_ray_say_how_to_install(tmp_path, monkeypatch, capsys, command):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    monkeypatch.setattr("argen.api.load", lambda *a, **k: pytest.fail("loaded a model before finding Ray missing"))
    inp = write_prompts(tmp_path / "in.jsonl", 2)
    args = [str(inp) if a == "IN" else str(tmp_path / "out.jsonl") if a == "OUT" else a for a in command]
    assert main([*args, "--model", "tiny-random"]) == 2
    assert "pip install 'argen[ray]'" in capsys.readouterr().err


def test_serve_replicas_gets_the_serve_options(monkeypatch):
    seen = {}
    monkeypatch.setattr("argen.distributed.require_ray", lambda: None)
    monkeypatch.setattr("argen.distributed.serve_replicas", lambda *a, **k: seen.update(args=a, kwargs=k))
    assert (
        main(
            [
                "serve",
                "--model",
                "tiny-random",
                "--replicas",
                "3",
                "--port",
                "9001",
                "--max-batch",
                "4",
                "--limit",
                "num_beams=3",
                "--ray",
                "ray://head:10001",
                "--replica-cpus",
                "2",
            ]
        )
        == 0
    )
    model, app = seen["args"]
    assert model == ModelSpec("tiny-random", device="auto")
    assert app["max_batch"] == 4 and app["model_id"] == "tiny-random" and app["limits"].options["num_beams"] == 3
    assert seen["kwargs"] | {"companions": None} == {
        "replicas": 3,
        "host": "127.0.0.1",
        "port": 9001,
        "address": "ray://head:10001",
        "replica_cpus": 2.0,
        "replica_gpus": 0.0,
        "companions": None,
    }


def test_lines_that_finish_out_of_order_are_written_in_input_order(tmp_path, tiny):
    """Longer requests first: the loop finishes them last, the file still lists them first."""
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "tiny-random", "prompt": f"{i} abc", "max_tokens": 12 - i, "ignore_eos": True},
        }
        for i in range(10)
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    from argen.jobs.lines import read_jobs
    from argen.jobs.runner import JobRunner, make_policy

    runner = JobRunner(tiny, make_policy(tiny, "tiny-random"))
    finished = [job.custom_id for job, _ in runner.run(read_jobs(inp, {}))]
    assert finished == [f"r{i}" for i in reversed(range(10))]  # the premise: the loop finishes them in reverse
    run_batch(batch_args(inp, out))
    written = read_lines(out)
    assert [line["custom_id"] for line in written] == [f"r{i}" for i in range(10)]
    assert [line["response"]["body"]["usage"]["completion_tokens"] for line in written] == [12 - i for i in range(10)]
