"""Model files that went wrong on disk (issue 24's faults): a GGUF cut short, and the default
model's first download interrupted or left corrupt in the cache."""

from __future__ import annotations

import numpy as np
import pytest

from argen.errors import ModelNotFoundError
from argen.models import sources


@pytest.fixture
def small_gguf(tmp_path):
    """A small, complete GGUF file (a llama-style header and two tensors)."""
    from gguf import GGUFWriter

    path = tmp_path / "small.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_a_truncated_gguf_says_so(small_gguf, tmp_path, monkeypatch, keep):
    """Bug: a GGUF cut short (an interrupted copy) failed with numpy's "cannot reshape array of size
    399424 into shape (576,960)"; it now says the file is truncated and to fetch it again."""
    monkeypatch.setenv("ARGEN_CACHE_DIR", str(tmp_path / "cache"))
    assert sources.gguf_reader(small_gguf).tensors  # the whole file reads
    cut = tmp_path / "cut.gguf"
    data = small_gguf.read_bytes()
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelNotFoundError, match=r"is truncated or corrupt: its [0-9,]+ bytes .* copy it again"):
        sources.gguf_reader(cut)
    with pytest.raises(ModelNotFoundError, match="is truncated or corrupt"):
        sources.dequantized_dir(cut, "cut")
