"""The `argen` command line, run in-process on the tiny random model (plus one real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest

from argen.cli import main
from argen.cli.options import parse_options

TINY = ["--model", "tiny-random", "--device", "cpu"]
GREEDY = ["generate", "Hello there", *TINY, "--max-new-tokens", "12"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_stream_matches_json(capsys):
    code, streamed, _ = run_cli(capsys, *GREEDY)
    assert code == 0
    code, out, _ = run_cli(capsys, *GREEDY, "--json")
    assert code == 0
    result = json.loads(out)
    assert streamed == result["text"] + "\n"


def test_json_has_the_result_fields(capsys):
    code, out, _ = run_cli(capsys, *GREEDY, "--json", "--temperature", "0.8", "--seed", "7", "--top-k", "50")
    assert code == 0
    result = json.loads(out)  # exactly one JSON object on stdout
    assert set(result) == {"text", "token_ids", "prompt_ids", "finish_reason", "seed", "strategy", "stats"}
    assert result["seed"] == 7 and result["strategy"] == "plain"
    assert len(result["token_ids"]) <= 12 and result["stats"]["new_tokens"] == len(result["token_ids"])


def test_no_chat_feeds_raw_text(capsys):
    _, out, _ = run_cli(capsys, *GREEDY, "--json", "--no-chat")
    _, chat_out, _ = run_cli(capsys, *GREEDY, "--json")
    assert len(json.loads(out)["prompt_ids"]) < len(json.loads(chat_out)["prompt_ids"])


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "hi", "--model", "/nonexistent"],
        ["generate", "hi", *TINY, "--max-new-tokens", "-3"],
        ["generate", "a" * 3000, *TINY],
        ["generate", "hi", *TINY, "--strategy", "no-such-strategy"],
        ["generate", "hi", *TINY, "--strategy-opt", "max_draft"],
        ["generate", "hi", *TINY, "--strategy-opt", "no_such_option=1"],
        ["generate", "hi", *TINY, "--max-new-tokens", "abc"],
        ["generate", "hi", *TINY, "--bogus"],
        [],
        ["chat", "--model", "digits-ar"],
        ["serve", "--model", "digits-ar"],
    ],
    ids=[
        "bad-model",
        "negative-max",
        "prompt-too-long",
        "unknown-strategy",
        "opt-no-equals",
        "unknown-opt",
        "not-an-int",
        "unknown-flag",
        "no-command",
        "chat-image-model",  # was an AttributeError traceback (the image generator has no tokenizer)
        "serve-image-model",
    ],
)
def test_errors_are_one_line(capsys, argv):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("argen: error:"), err
    assert "Traceback" not in err


def test_press_matches_the_python_api(capsys, tiny):
    prompt = "A long enough prompt for a press to evict something from the cache. " * 2
    code, out, _ = run_cli(
        capsys,
        "generate",
        prompt,
        *TINY,
        "--max-new-tokens",
        "12",
        "--json",
        "--no-chat",
        "--press",
        "streaming-llm",
        "--press-opt",
        "budget=0.3",
        "--press-opt",
        "sinks=2",
    )
    assert code == 0
    want = tiny.generate(
        prompt, chat=False, max_new_tokens=12, temperature=0, press={"name": "streaming-llm", "budget": 0.3, "sinks": 2}
    )
    assert json.loads(out)["token_ids"] == want.token_ids
    assert want.extras["press"]["evicted_positions"] > 0


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--press", "pyramidkv"], "unknown press 'pyramidkv'"),
        (["--press-opt", "budget=0.5"], "--press-opt needs --press NAME"),
        (["--press", "kvmerger", "--press-opt", "budget=0"], "budget must be more than 0"),
        (["--press", "kvmerger", "--press-opt", "budget"], "--press-opt takes KEY=VALUE (for example budget=0.5)"),
    ],
)
def test_bad_press_options_are_one_line(capsys, argv, words):
    code, out, err = run_cli(capsys, "generate", "hi", *TINY, *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and words in err, err


def test_error_messages_say_what_to_do(capsys):
    _, _, err = run_cli(capsys, "generate", "a" * 3000, *TINY)
    assert "context is 2048" in err and "shorten the prompt" in err
    _, _, err = run_cli(capsys, "generate", "hi", *TINY, "--max-new-tokens", "-3")
    assert "max_new_tokens must be an integer >= 0" in err


def test_strategy_opt_values_are_json_or_strings():
    assert parse_options(["n=8", "p=0.5", "flag=true", "mode=fast", "xs=[1,2]"]) == {
        "n": 8,
        "p": 0.5,
        "flag": True,
        "mode": "fast",
        "xs": [1, 2],
    }


def test_keyboard_interrupt_exits_130_quietly(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("argen.api.load", interrupted)
    code, out, err = run_cli(capsys, *GREEDY)
    assert code == 130 and "Traceback" not in err


def test_models_lists_sources_cache_and_strategies(capsys):
    code, out, err = run_cli(capsys, "models")
    assert code == 0
    assert "tiny-random" in out and "default" in out and "plain" in out
    assert "delete" in out and err == ""
    assert "kvmerger" in out and "streaming-llm" in out and "budget=0.5" in out
    assert "digits-ar " in out and "digits-diffusion" in out and "k=4 [1, 16]" in out  # the image models too


def test_bench_is_delegated_to_the_bench_package(capsys, monkeypatch):
    seen = {}

    def run(args) -> int:
        seen["rounds"] = args.rounds
        return 0

    fake = types.ModuleType("argen.bench")
    fake.add_arguments = lambda parser: parser.add_argument("--rounds", type=int, default=1)
    fake.run = run
    monkeypatch.setitem(sys.modules, "argen.bench", fake)
    assert main(["bench", "--rounds", "3"]) == 0
    assert seen == {"rounds": 3}


def test_bench_missing_is_one_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "argen.bench", None)  # makes the import fail
    code, _, err = run_cli(capsys, "bench")
    assert code == 2 and err.count("\n") == 1 and err.startswith("argen: error:")


def test_module_entry_point():
    cmd = [sys.executable, "-m", "argen.cli", *GREEDY, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("bad", [["--prefill-chunk", "-1"], ["--step-tokens", "64", "--prefill-chunk", "512"]])
def test_serve_scheduling_options_are_checked_before_loading(capsys, monkeypatch, bad):
    monkeypatch.setattr("argen.api.load", lambda *a, **k: pytest.fail("loaded a model for a bad option"))
    code, _, err = run_cli(capsys, "serve", *TINY, *bad)
    assert code == 2 and "--prefill-chunk" in err


def test_serve_passes_the_scheduling_options_to_the_server(capsys, monkeypatch):
    seen = {}
    monkeypatch.setattr("argen.server.serve.serve", lambda gen, host, port, **options: seen.update(options) or 0)
    assert run_cli(capsys, "serve", *TINY, "--prefill-chunk", "0", "--no-prefix-caching")[0] == 0
    assert seen["prefill_chunk"] is None and seen["step_tokens"] == 1024 and seen["prefix_caching"] is False
    assert seen["kv_blocks"] is None
    assert run_cli(capsys, "serve", *TINY, "--kv-blocks", "300")[0] == 0 and seen["kv_blocks"] == 300


def test_serve_kv_blocks_below_one_is_refused_before_loading(capsys, monkeypatch):
    monkeypatch.setattr("argen.api.load", lambda *a, **k: pytest.fail("loaded a model for a bad option"))
    code, _, err = run_cli(capsys, "serve", *TINY, "--kv-blocks", "0")
    assert code == 2 and "--kv-blocks must be >= 1" in err


def test_structured_output_flags(capsys, tmp_path):
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["n"],
        "additionalProperties": False,
    }
    (tmp_path / "s.json").write_text(json.dumps(schema))
    (tmp_path / "g.lark").write_text('start: "yes" | "no"')
    generate = ["generate", "Hello", *TINY, "--max-new-tokens", "40", "--json"]
    code, out, _ = run_cli(capsys, *generate, "--json-schema", str(tmp_path / "s.json"))
    assert code == 0 and 0 <= json.loads(json.loads(out)["text"])["n"] <= 99
    code, out, _ = run_cli(capsys, *generate, "--regex", "[0-9]{4}")
    assert code == 0 and json.loads(out)["text"].isdigit() and len(json.loads(out)["text"]) == 4
    code, out, _ = run_cli(capsys, *generate, "--grammar", str(tmp_path / "g.lark"))
    assert code == 0 and json.loads(out)["text"] in ("yes", "no")
    (tmp_path / "bad.json").write_text("{nope")
    for flag, path, message in (
        ("--json-schema", "bad.json", "not JSON"),
        ("--grammar", "missing.lark", "cannot read"),
    ):
        code, _, err = run_cli(capsys, *generate, flag, str(tmp_path / path))
        assert code == 2 and message in err and err.count("\n") == 1


def test_n_samples_each_under_a_header_and_as_a_json_list(capsys, tiny):
    sampled = [*TINY, "--max-new-tokens", "6", "--temperature", "1", "--seed", "5", "--no-chat"]
    code, out, _ = run_cli(capsys, "generate", "Hello there", *sampled, "--n", "3", "--json")
    want = tiny.generate("Hello there", chat=False, max_new_tokens=6, temperature=1.0, seed=5, n=3)
    results = json.loads(out)
    assert code == 0 and [r["token_ids"] for r in results] == [w.token_ids for w in want]
    assert [r["seed"] for r in results] == [5, 6, 7]
    code, out, _ = run_cli(capsys, "generate", "Hello there", *sampled, "--n", "3")
    headers = [line for line in out.splitlines() if line.startswith("--- sample")]
    assert code == 0 and headers == [f"--- sample {i} (seed {5 + i}, 6 tokens, finish: length) ---" for i in range(3)]
    assert all(w.text in out for w in want)


def test_logprobs_are_a_table_on_stderr_and_in_the_json(capsys, tiny):
    code, out, err = run_cli(capsys, *GREEDY, "--no-chat", "--logprobs", "2")
    want = tiny.generate("Hello there", chat=False, max_new_tokens=12, logprobs=2)
    rows = err.split("[log-probs: position, token, log-prob, likeliest alternatives]\n")[1].splitlines()[:-1]
    assert code == 0 and out == want.text + "\n" and len(rows) == len(want.token_ids)
    assert all(f" {r.logprob:9.4f}  " in row for row, r in zip(rows, want.logprobs, strict=True))
    _, out, _ = run_cli(capsys, *GREEDY, "--no-chat", "--logprobs", "2", "--json")
    assert [r["token"] for r in json.loads(out)["logprobs"]] == want.token_ids


def test_logit_bias_takes_ids_and_one_token_texts(capsys, tiny):
    code, out, _ = run_cli(capsys, *GREEDY, "--no-chat", "--json", "--logit-bias", "77=100")
    assert code == 0 and json.loads(out)["token_ids"] == [77] * 12
    letter = tiny.tokenizer.decode([77])
    _, out, _ = run_cli(capsys, *GREEDY, "--no-chat", "--json", "--logit-bias", f"{letter}=100")
    assert json.loads(out)["token_ids"] == [77] * 12


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--logit-bias", "77"], "TOKEN=BIAS"),
        (["--logit-bias", "77=x"], "TOKEN=BIAS"),
        (["--logit-bias", "77=500"], "[-100, 100]"),
        (["--logit-bias", "abc=1"], "is 3 tokens"),
        (["--n", "0"], "--n must be >= 1"),
        (["--logprobs", "21"], "logprobs"),
        (["--presence-penalty", "3"], "[-2, 2]"),
    ],
)
def test_bad_sampling_flags_are_one_line(capsys, argv, words):
    code, out, err = run_cli(capsys, *GREEDY, "--no-chat", *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and words in err, err


def test_superposed_gives_n_outputs_from_the_command_line(capsys, tiny):
    argv = [*TINY, "--max-new-tokens", "6", "--no-chat", "--strategy", "superposed", "--strategy-opt", "ngram_weight=0"]
    code, out, _ = run_cli(capsys, "generate", "Hello there", *argv, "--n", "3", "--json")
    spec = {"name": "superposed", "ngram_weight": 0}
    want = tiny.generate("Hello there", chat=False, max_new_tokens=6, strategy=spec, n=3)
    assert code == 0 and [r["token_ids"] for r in json.loads(out)] == [w.token_ids for w in want]
    code, _, err = run_cli(capsys, "generate", "Hello there", *argv, "--strategy-opt", "ngram_order=50")
    assert code == 2 and "ngram_order must be an integer in 1..4" in err
