"""Reports reproducible from the repository: the commit and its dirty flag, a refusal to measure from
a dirty tree unless told, and paths relative to the repository."""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

import pytest

from argen.errors import ArgenError
from benchmarks.harness import compare, serving
from benchmarks.harness.provenance import describe, git_state, portable_argv, portable_path, require_clean

REPO = Path(__file__).resolve().parents[1]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path) -> Path:
    """A scratch repository laid out like argen's: a source file and a committed report."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "b").mkdir(parents=True)
    (tmp_path / "benchmarks" / "b" / "report.md").write_text("old\n")
    (tmp_path / "benchmarks" / "b" / "run.py").write_text("print()\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return tmp_path


def test_dirty_means_code_changed_not_reports_rewritten(repo):
    state = git_state(repo)
    assert state["git_commit"] == git(repo, "rev-parse", "--short", "HEAD").strip() and state["git_dirty"] is False
    (repo / "benchmarks" / "b" / "report.md").write_text("regenerated\n")  # a run rewriting its report
    (repo / "benchmarks" / "new").mkdir()
    (repo / "benchmarks" / "new" / "results.json").write_text("{}")
    assert git_state(repo)["git_dirty"] is False
    (repo / "benchmarks" / "b" / "run.py").write_text("print(1)\n")  # the script that makes it is code
    (repo / "src" / "new.py").write_text("")  # so is an untracked source file
    state = git_state(repo)
    assert state["git_dirty"] is True and state["dirty_files"] == ["benchmarks/b/run.py", "src/new.py"]
    with pytest.raises(ArgenError, match="uncommitted changes .*benchmarks/b/run.py.*--allow-dirty"):
        require_clean(state, allow_dirty=False)
    require_clean(state, allow_dirty=True)
    assert "with uncommitted changes" in describe(state) and state["git_commit"] in describe(state)


def test_the_bench_refuses_a_dirty_tree_before_measuring(monkeypatch, tmp_path):
    dirty = {"git_commit": "abc1234", "git_dirty": True, "dirty_files": ["src/argen/engine.py"]}
    monkeypatch.setattr(compare, "git_state", lambda: dirty)
    monkeypatch.setattr(compare, "_run", lambda args: pytest.fail("measured from a dirty tree"))
    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    with pytest.raises(ArgenError, match="src/argen/engine.py"):
        compare.run(parser.parse_args(["--out", str(tmp_path)]))
    with pytest.raises(ArgenError, match="uncommitted"):
        compare.run(parser.parse_args(["--control", "--out", str(tmp_path)]))
    monkeypatch.setattr(serving, "git_state", lambda: dirty)
    monkeypatch.setattr(serving, "run", lambda args: pytest.fail("measured from a dirty tree"))
    with pytest.raises(ArgenError, match="uncommitted"):
        serving.main(["--out", str(tmp_path)])


def test_this_checkout_is_recorded():
    state = git_state()
    assert state["git_commit"] == git(REPO, "rev-parse", "--short", "HEAD").strip()
    code_changes = [
        line
        for line in git(REPO, "status", "--porcelain", "--untracked-files=all").splitlines()
        if not (line[3:].startswith("benchmarks/") and not line.endswith(".py"))
    ]
    assert state["git_dirty"] is bool(code_changes)


def test_paths_are_written_relative_to_the_repository():
    assert portable_path(REPO / "benchmarks" / "speculative") == os.path.join("benchmarks", "speculative")
    assert portable_path(REPO.parent / "shared" / "q.jsonl") == os.path.join("..", "shared", "q.jsonl")
    # A path beside neither the repository nor its parent (pytest's tmp_path is a sibling of a clone in /tmp).
    outside = Path(REPO.anchor) / "argen-test-outside" / "out"
    assert portable_path(outside) == "<outside>/out"  # nothing of this machine's layout
    assert portable_path("bench-out") == "bench-out"
    argv = [
        str(REPO.parent / "venv" / "bin" / "argen"),
        "bench",
        "--out",
        str(REPO / "benchmarks" / "x"),
        "--limit",
        "3",
    ]
    assert portable_argv(argv) == ["argen", "bench", "--out", os.path.join("benchmarks", "x"), "--limit", "3"]
