"""Shared fixtures: tiny random models (fast, built in code) and the real default model (loaded
once per session; fetched into the cache on first use)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import argen
from argen.api import Generator
from argen.models import tiny as tiny_models
from argen.models.llama import LlamaRuntime
from argen.models.loading import LoadedModel
from argen.models.quant import QK, quantize

DROPPED = range(12, 18)  # the draft model: the default model without these layers
SPEC_BENCH = Path(__file__).resolve().parents[1].parent / "shared" / "benchmarks" / "spec_bench" / "question.jsonl"


@pytest.fixture(scope="session")
def tiny():
    return argen.load("tiny-random")


@pytest.fixture(scope="session")
def tiny_gpt2():
    return argen.load("tiny-random-gpt2")


@pytest.fixture(scope="session")
def looping():
    """tiny-random with every attention output zeroed: the next token depends on the current one
    only, so greedy decoding enters a cycle that lookup drafts then predict."""
    model = tiny_models.tiny_llama(0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    runtime = LlamaRuntime(model.config, model.state_dict())
    return Generator(LoadedModel("tiny-looping", runtime, tiny_models.byte_tokenizer(), lambda: model, {258}))


@pytest.fixture(scope="session")
def real():
    return argen.load("default")


@pytest.fixture(scope="session")
def real_fp32():
    """The default model's weights dequantized to fp32 (`quant="none"`, torch's path): the reference of
    the parity, log-prob and exact-path tests, loaded once per session."""
    gen = argen.load("default", quant="none")
    assert gen.quant == "none"
    return gen


@pytest.fixture(scope="session")
def spec_bench_questions() -> list[dict]:
    assert SPEC_BENCH.is_file(), f"Spec-Bench questions not found at {SPEC_BENCH}"
    return [json.loads(line) for line in SPEC_BENCH.read_text().splitlines() if line.strip()]


def q8_0(state: dict) -> dict:
    """Every matrix whose rows are whole blocks on Q8_0 blocks, as `quant="q8_0"` loads a model."""
    return {k: quantize(v, "q8_0") if v.dim() == 2 and v.shape[1] % QK == 0 else v for k, v in state.items()}


@pytest.fixture(scope="session")
def draft(real) -> LlamaRuntime:
    """A smaller draft model with the target's tokenizer: the default model without layers 12-17
    (24 of 30 layers). It agrees with the target often enough for drafts to be accepted, not always.
    Its matrices on Q8_0 blocks, as `quant="q8_0"` loads them: the fused forward drafts about twice
    as fast as fp32 (measured on one thread), and a draft's numbers never decide the output."""
    hf = real.model.hf_model
    config = copy.deepcopy(hf.config)
    kept = [i for i in range(config.num_hidden_layers) if i not in DROPPED]
    state = {k: v for k, v in hf.state_dict().items() if not k.startswith("model.layers.")}
    for new, old in enumerate(kept):
        prefix = f"model.layers.{old}."
        state |= {
            f"model.layers.{new}." + k[len(prefix) :]: v for k, v in hf.state_dict().items() if k.startswith(prefix)
        }
    config.num_hidden_layers = len(kept)
    return LlamaRuntime(config, q8_0(state))


@pytest.fixture(scope="session")
def real_small(real) -> LoadedModel:
    """A small model with the default model's tokenizer for bild and fs-gen: the default model cut to
    its first 8 of 30 layers (not distilled: the tests need its vocabulary, not its quality), on Q8_0
    blocks like `draft`: the fused forward gives a row the same bits alone and in a batch (torch's
    fp32 path does not), and runs faster."""
    hf = real.model.hf_model
    config = copy.deepcopy(hf.config)
    config.num_hidden_layers = 8
    state = {
        k: v
        for k, v in hf.state_dict().items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < config.num_hidden_layers
    }
    return LoadedModel(
        "default-first-8", LlamaRuntime(config, q8_0(state)), real.tokenizer, lambda: None, set(real.model.eos_ids)
    )
