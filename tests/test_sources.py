"""Model sources: one spelling per model (canonical_source), and companion models loaded once per
process whatever the spelling (shared_model), through the Python API's strategies too."""

from __future__ import annotations

import hashlib
import os

import pytest

import argen
from argen.models import loading, sources, tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """tiny-random@5 saved as a Hugging Face model directory, plus a symlink to it."""
    root = tmp_path_factory.mktemp("models")
    directory = root / "tiny5"
    tiny.tiny_llama(5).save_pretrained(directory)
    tiny.byte_tokenizer().save_pretrained(directory)
    os.symlink(directory, root / "link")
    return directory


def spellings(directory) -> list[str]:
    root = str(directory.parent)
    return [str(directory), f"{root}/./tiny5", f"{root}//tiny5", f"{root}/tiny5/../tiny5", f"{root}/link"]


def test_canonical_source_is_one_spelling_per_model(model_dir):
    assert {sources.canonical_source(s) for s in spellings(model_dir)} == {str(model_dir.resolve())}
    assert sources.canonical_source("tiny-random") == sources.canonical_source("tiny-random@0") == "tiny-random@0"
    assert sources.canonical_source("tiny-random@1") != sources.canonical_source("tiny-random@0")


def test_shared_model_loads_each_model_once(model_dir):
    before = len(loading._SHARED)
    models = {id(loading.shared_model(s)) for s in spellings(model_dir)}
    assert len(models) == 1 and len(loading._SHARED) == before + 1
    assert loading.shared_model("tiny-random@7") is loading.shared_model("tiny-random@7")


def test_draft_and_guide_sources_share_one_load(tiny, model_dir):
    """Three spellings of one path as draft and as guide: one model in memory."""
    before = len(loading._SHARED)
    for path in spellings(model_dir)[:3]:
        tiny.generate("x", max_new_tokens=3, strategy={"name": "draft-model", "draft": path})
        tiny.generate("x", max_new_tokens=3, strategy={"name": "guided", "guide_model": path, "omega": 1.0})
    assert len(loading._SHARED) <= before + 1


def test_unknown_sources_are_errors_before_any_load():
    with pytest.raises(argen.ModelNotFoundError, match="no such file or directory"):
        sources.canonical_source("/nonexistent/model")


def test_one_gguf_file_is_dequantized_once_whatever_its_name(tmp_path, monkeypatch):
    """`default` and the path of the same GGUF file give different names; the conversion is keyed
    by the file (path, size, time), so a second name finds the first one's directory instead of
    writing another copy."""
    monkeypatch.setenv("ARGEN_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "m.Q4.gguf"
    gguf.write_bytes(b"never read: only its path, size and time are")
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    converted = tmp_path / "cache" / "models" / f"name-one-{key}"
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")  # as a finished conversion leaves it
    assert sources.dequantized_dir(gguf, "name-two") == converted
