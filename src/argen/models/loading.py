"""`load_model(name)`: resolve a model source and build a runtime + tokenizer for it."""

from __future__ import annotations

import gc
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from argen.errors import ArgenError, ModelNotFoundError
from argen.models import kernels, sources, tiny
from argen.models.calibration import calibration_ids
from argen.models.gguf_weights import read_gguf
from argen.models.hf import HFRuntime
from argen.models.llama import SUPPORTED_ARCHITECTURES, LlamaRuntime
from argen.models.quant import QK, quantize
from argen.models.quant_paths import QUANTS, split_quant
from argen.models.runtime import ModelRuntime

if TYPE_CHECKING:  # transformers is imported where a model is loaded (start-up cost)
    from transformers import PreTrainedTokenizerBase

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
RUNTIMES = ("auto", "native", "hf")


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ArgenError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def parse_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ArgenError(f"device {device!r} was asked for but this machine has no CUDA GPU; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ArgenError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")
    return torch.device(device)


@dataclass
class LoadedModel:
    name: str
    runtime: ModelRuntime
    tokenizer: PreTrainedTokenizerBase
    hf_model_loader: object  # () -> a Hugging Face model with the same weights, for parity and the bench peer
    eos_ids: set[int]
    quant: str = "none"  # the weight path the runtime uses (see QUANTS); never "auto"

    @cached_property
    def hf_model(self):
        return self.hf_model_loader()

    def __post_init__(self) -> None:
        # Sample text for strategies that calibrate on the model; below the Engine nothing else
        # sees the tokenizer, so the ids travel with the runtime.
        self.runtime.memo.calibration_ids = calibration_ids(self.tokenizer)


def _eos_ids(tokenizer, config) -> set[int]:
    ids = set()
    for value in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(value)
    return ids


def _make_runtime(hf_model, runtime: str, device: torch.device, dtype: torch.dtype, quant: str = "none"):
    arch = hf_model.config.model_type
    if runtime == "native" and arch not in SUPPORTED_ARCHITECTURES:
        raise ArgenError(
            f"the native runtime supports {', '.join(SUPPORTED_ARCHITECTURES)}; this model is {arch!r}. "
            "Use runtime='hf' (--runtime hf) for other architectures"
        )
    if runtime != "hf" and arch in SUPPORTED_ARCHITECTURES:
        state = hf_model.state_dict()
        weights, act8 = split_quant(quant)
        if weights not in ("none", "exact"):
            state = {k: quantize(v, weights) if _quantizable(k, v) else v for k, v in state.items()}
        return LlamaRuntime(hf_model.config, state, device=device, dtype=dtype, act8=act8)
    return HFRuntime(hf_model.to(device=device, dtype=dtype))


def resolve_quant(
    quant: str, gguf_file: Path | None, runtime: str, arch: str | None, device: torch.device, dtype: torch.dtype
) -> str:
    """The weight path for this load: "auto" resolved, and any path this model or machine cannot
    take refused with what to do instead."""
    if quant not in QUANTS:
        raise ArgenError(f"unknown quant {quant!r}; use one of {', '.join(QUANTS)}")
    native = runtime != "hf" and arch in SUPPORTED_ARCHITECTURES
    fits = native and device.type == "cpu" and dtype == torch.float32
    if quant == "auto":
        return "exact" if fits and gguf_file is not None and kernels.library() is not None else "none"
    if quant == "none":
        return quant
    if not fits:
        raise ArgenError(
            f"quant={quant!r} needs the native runtime (llama, mistral, qwen2) on the CPU in float32; "
            "use quant='none' for this model, device or dtype"
        )
    if split_quant(quant)[0] == "exact" and gguf_file is None:
        raise ArgenError(
            f"quant={quant!r} keeps a GGUF file's own quantized weights, and this model is not a GGUF "
            "file; use quant='none', or 'q8_0' / 'q4_1' to quantize it"
        )
    if kernels.library() is None:
        raise ArgenError(
            f"quant={quant!r} needs argen's CPU kernels, which need a C compiler (gcc or clang); "
            "install one or use quant='none'"
        )
    return quant


def load_model(
    name: str = "default", runtime: str = "auto", device: str = "cpu", dtype="float32", quant: str = "auto"
) -> LoadedModel:
    loaded = _load_model(name, runtime, device, dtype, quant)
    if sources.parse_source(name).kind != "tiny":
        # What a load leaves (tokenizer vocabularies, config trees, the GGUF reader's objects) lives as
        # long as the process: freezing it (after one collection, so that only live objects stay) keeps
        # the cycle collector's full passes from walking it again and again during decoding, where they
        # took 5% of a one-thread decode step (AMD Zen 4). vLLM freezes its heap after start-up too.
        # Tiny test models skip it: tests load hundreds, and a collection each would cost more.
        gc.collect()
        gc.freeze()
    return loaded


def _load_model(name: str, runtime: str, device: str, dtype, quant: str) -> LoadedModel:
    if runtime not in RUNTIMES:
        raise ArgenError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    torch_device, torch_dtype = parse_device(device), parse_dtype(dtype)
    source = sources.parse_source(name)
    if source.kind == "tiny":
        factory = tiny.tiny_llama if source.name == "tiny-random" else tiny.tiny_gpt2
        hf_model = factory(source.seed)
        tokenizer = tiny.byte_tokenizer()
        quant = resolve_quant(quant, None, runtime, hf_model.config.model_type, torch_device, torch_dtype)
        run = _make_runtime(hf_model, runtime, torch_device, torch_dtype, quant)
        return LoadedModel(
            name, run, tokenizer, lambda: factory(source.seed), _eos_ids(tokenizer, hf_model.config), quant
        )
    directory = sources.local_dir(source)
    gguf_file = sources.gguf_file(source)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    quant = resolve_quant(quant, gguf_file, runtime, config.model_type, torch_device, torch_dtype)
    weights, act8 = split_quant(quant)
    if weights == "exact":
        # The file's own blocks: the fp32 copy in the cache is never read (it is for the HF reference).
        tokenizer = _load_tokenizer(directory)
        assert gguf_file is not None  # resolve_quant refuses "exact" without a GGUF file
        run = LlamaRuntime(config, read_gguf(gguf_file, config), device=torch_device, dtype=torch_dtype, act8=act8)
        return LoadedModel(name, run, tokenizer, lambda: _load_hf_dir(directory)[0], _eos_ids(tokenizer, config), quant)
    hf_model, tokenizer = _load_hf_dir(directory)
    run = _make_runtime(hf_model, runtime, torch_device, torch_dtype, quant)
    keep = hf_model if isinstance(run, HFRuntime) else None
    # The HF copy is dropped after conversion (it doubles memory) and re-read only if asked for.
    return LoadedModel(
        name,
        run,
        tokenizer,
        (lambda: keep) if keep else (lambda: _load_hf_dir(directory)[0]),
        _eos_ids(tokenizer, hf_model.config),
        quant,
    )


def _quantizable(name: str, value: torch.Tensor) -> bool:
    """Matrices of the decoder and the vocabulary matrix, when their input size is whole blocks."""
    return (
        value.dim() == 2
        and value.shape[1] % QK == 0
        and (name.endswith("proj.weight") or "embed" in name or name.startswith("lm_head"))
    )


def _load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelNotFoundError(f"could not load the tokenizer from {str(directory)!r}: {exc}") from exc


_SHARED: dict[tuple, LoadedModel] = {}
_SHARED_LOCK = threading.Lock()


def shared_model(name: str, runtime: str = "auto", device: str = "cpu", dtype="float32") -> LoadedModel:
    """`load_model`, once per process for each (canonical source, runtime, device, dtype): companion
    models (draft and guide models) that many requests name, under any spelling of the same path,
    share one copy."""
    key = (sources.canonical_source(name), runtime, str(parse_device(str(device))), str(parse_dtype(dtype)))
    with _SHARED_LOCK:  # one load at a time: two threads asking for one model load it once
        if key not in _SHARED:
            _SHARED[key] = load_model(name, runtime=runtime, device=str(device), dtype=dtype)
        return _SHARED[key]


def _load_hf_dir(directory: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelNotFoundError(
            f"could not load a Hugging Face model from {str(directory)!r}: {exc}. "
            "argen reads causal LMs that transformers' AutoModelForCausalLM supports"
        ) from exc
    return model.eval(), tokenizer
