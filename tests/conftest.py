"""Shared fixtures: tiny random models (fast, built in code) and the real default model (loaded
once per session; fetched into the cache on first use)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import argen

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
