"""Log-probs of the real model (fp32 weights, quant="none") against Hugging Face's on the same
weights: generated tokens and prompt scoring, to 1e-4; and lm-evaluation-harness, a real
third-party client, scoring a small multiple-choice task through `argen serve` (`local-completions`:
echo + logprobs) exactly as its own `hf` model does."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from server_helpers import metric, running_server

from argen.models import sources

pytestmark = pytest.mark.real
TOL = 1e-4
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Water boils at a temperature of"]


def hf_log_softmax(gen, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(gen.model.hf_model(torch.tensor([ids])).logits[0].float(), -1)


def test_logprobs_equal_hf_log_softmax(real_fp32):
    results = real_fp32.generate(PROMPTS, chat=False, max_new_tokens=10, logprobs=5, prompt_logprobs=5)
    worst = 0.0
    for result in results:
        ids = result.prompt_ids + result.token_ids
        logp = hf_log_softmax(real_fp32, ids)
        n = len(result.prompt_ids)
        assert result.prompt_logprobs[0] is None and len(result.logprobs) == len(result.token_ids) > 0
        records = result.prompt_logprobs[1:] + result.logprobs
        for i, record in enumerate(records, start=1):  # record of token i, predicted at position i - 1
            assert record.token == ids[i]
            worst = max(worst, abs(record.logprob - logp[i - 1, ids[i]].item()))
            top_ids = [t for t, _ in record.top]
            assert torch.allclose(torch.tensor([v for _, v in record.top]), logp[i - 1, top_ids], atol=TOL)
            assert top_ids[:1] == [int(logp[i - 1].argmax())] or abs(record.top[0][1] - logp[i - 1].max()) < TOL
        assert n + len(result.token_ids) == len(ids)
    assert worst < TOL, worst


QUESTIONS = [
    ("The sun rises in the", [" east", " west", " north", " south"], 0),
    ("Two plus two equals", [" four", " five", " seven"], 0),
    ("The opposite of hot is", [" cold", " blue", " loud", " tall"], 0),
    ("Paris is the capital of", [" France", " Japan", " Brazil"], 0),
    ("A baby cat is called a", [" kitten", " puppy", " calf", " foal"], 0),
    ("Ice is made of frozen", [" water", " sand", " iron"], 0),
    ("The largest planet in our solar system is", [" Jupiter", " Mars", " Mercury", " Venus"], 0),
    ("Bees make", [" honey", " milk", " glass"], 0),
    ("The color of grass is", [" green", " purple", " orange", " black"], 0),
    ("Monday comes after", [" Sunday", " Friday", " Wednesday"], 0),
]
TASK = """task: argen_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def run_lm_eval(model: str, model_args: dict, include: str, batch_size: int = 1) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["argen_mc"],
        batch_size=batch_size,
        log_samples=True,
        task_manager=TaskManager(include_path=include),
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    samples = sorted(out["samples"]["argen_mc"], key=lambda s: s["doc_id"])
    # resps: one [(log-likelihood, is_greedy)] per choice
    return {"acc": out["results"]["argen_mc"]["acc,none"], "ll": [[r[0][0] for r in s["resps"]] for s in samples]}


@pytest.fixture(scope="module")
def task_dir(real_fp32, tmp_path_factory):
    """The multiple-choice task, built offline (lm-eval cannot download datasets here), and the
    tokenizer for the `huggingface` backend."""
    tmp_path = tmp_path_factory.mktemp("lm_eval")
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (tmp_path / "argen_mc.yaml").write_text(TASK.format(data=data))
    real_fp32.tokenizer.save_pretrained(tmp_path / "tokenizer")
    return tmp_path


@pytest.fixture(scope="module")
def hf_scores(task_dir):
    """lm-eval's own `hf` model on the fp32 safetensors argen loaded."""
    pytest.importorskip("lm_eval")
    weights = sources.local_dir(sources.parse_source("default"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        hf = run_lm_eval("hf", {"pretrained": str(weights), "device": "cpu", "dtype": "float32"}, str(task_dir))
    assert hf["acc"] > 0.5
    assert all(max(lls) - min(lls) > 0.1 for lls in hf["ll"])  # choices far apart: 1e-3 tells them apart
    return hf


@pytest.mark.parametrize("backend, batch_size", [("huggingface", 1), ("remote", 4)])
def test_lm_eval_local_completions_through_argen_serve_equals_its_hf_model(
    real_fp32, task_dir, hf_scores, monkeypatch, backend, batch_size
):
    """lm-eval's `local-completions` scores the task through `argen serve` as its `hf` model does: one
    prompt a request with lm-eval's own tokenizer, and (the issue's acceptance) four prompts a request
    with `tokenizer_backend=remote`, lm-eval tokenizing through the server's /tokenize and reading
    its special tokens from /tokenizer_info."""
    import lm_eval.models.api_models as api_models
    import lm_eval.utils

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sent, encoded = [], []  # prompts per /v1/completions request; texts lm-eval tokenized through /tokenize
    post, encode = api_models.requests.post, lm_eval.utils.RemoteTokenizer.encode
    monkeypatch.setattr(
        api_models.requests, "post", lambda *a, **k: sent.append(len(k["json"]["prompt"])) or post(*a, **k)
    )
    monkeypatch.setattr(
        lm_eval.utils.RemoteTokenizer, "encode", lambda self, text: encoded.append(text) or encode(self, text)
    )
    args = {
        "model": real_fp32.name,
        "tokenizer_backend": backend,
        "tokenized_requests": True,
        "num_concurrent": 1,
        "max_retries": 1,
    } | ({"tokenizer": str(task_dir / "tokenizer")} if backend == "huggingface" else {})
    with running_server(real_fp32) as (url, _):
        served = run_lm_eval(
            "local-completions", {"base_url": f"{url}/v1/completions", **args}, str(task_dir), batch_size
        )
        prompts = metric(
            httpx.get(f"{url}/metrics").text, "argen_requests_total", endpoint="completions", outcome="length"
        )
    assert served["acc"] == hf_scores["acc"]
    diffs = [
        abs(a - b) for sa, sb in zip(served["ll"], hf_scores["ll"], strict=True) for a, b in zip(sa, sb, strict=True)
    ]
    assert len(diffs) == sum(len(c) for _, c, _ in QUESTIONS) and max(diffs) < 1e-3, max(diffs)
    assert prompts == len(diffs) == sum(sent)  # every choice was scored by the server
    assert max(sent) == batch_size and len(sent) == -(-len(diffs) // batch_size)  # batch_size prompts a request
    assert bool(encoded) == (backend == "remote")
