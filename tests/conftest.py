"""Shared fixtures: tiny random models (fast, built in code) and the real default model (loaded
once per session; fetched into the cache on first use)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

import argen
from argen.models.llama import LlamaRuntime

DROPPED = range(12, 18)  # the draft model: the default model without these layers
SPEC_BENCH = Path(__file__).resolve().parents[1].parent / "shared" / "benchmarks" / "spec_bench" / "question.jsonl"


@pytest.fixture(scope="session")
def tiny():
    return argen.load("tiny-random")


@pytest.fixture(scope="session")
def tiny_gpt2():
    return argen.load("tiny-random-gpt2")


@pytest.fixture(scope="session")
def real():
    return argen.load("default")


@pytest.fixture(scope="session")
def spec_bench_questions() -> list[dict]:
    assert SPEC_BENCH.is_file(), f"Spec-Bench questions not found at {SPEC_BENCH}"
    return [json.loads(line) for line in SPEC_BENCH.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def draft(real) -> LlamaRuntime:
    """A smaller draft model with the target's tokenizer: the default model without layers 12-17
    (24 of 30 layers). It agrees with the target often enough for drafts to be accepted, not always."""
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
    return LlamaRuntime(config, state)
