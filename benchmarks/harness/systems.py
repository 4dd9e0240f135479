"""The systems a bench compares: argen with a strategy (at some dtype) and Hugging Face `generate()`
on the same weights. Each one turns prompt ids into new token ids and the seconds the whole call
took (prefill included), measured with `time.perf_counter()`."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from argen.bench import strategy_label
from argen.errors import ArgenError
from argen.strategies import REGISTRY

HF = "hf"  # the name of the reference system: HF generate(), greedy, fp32


@dataclass
class Output:
    token_ids: list[int]  # new tokens, cut after the first EOS (inclusive)
    seconds: float
    new_tokens: int  # tokens the call produced (for tokens/s)
    tokens_per_forward: float | None = None  # argen only: new tokens per target forward pass
    finish_reason: str | None = None
    # Time to process the prompt, where the system tells it apart from decoding (argen: its prefill;
    # llama.cpp: until the first token). Decode tok/s is then the rest of the call's tokens per second.
    prefill_seconds: float | None = None


def cut_at_eos(token_ids: list[int], eos_ids: set[int]) -> list[int]:
    for i, t in enumerate(token_ids):
        if t in eos_ids:
            return token_ids[: i + 1]
    return token_ids


class System:
    name: str
    kind: str  # "hf" | "argen" | "llama.cpp"
    dtype: str = "float32"
    exact: bool = True  # greedy output must equal the reference's (else it is measured, not judged)
    reference: str | None = HF  # whose tokens this system's are compared with

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> Output:
        raise NotImplementedError

    def describe(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "dtype": self.dtype,
            "exact": self.exact,
            "reference": self.reference,
        }


class HFSystem(System):
    """`model.generate()`: greedy, batch 1, `max_new_tokens` (no `min_new_tokens`), stopping on the
    same EOS ids as argen; with `prompt_lookup` > 0, HF's own prompt-lookup decoding."""

    kind = "hf"

    def __init__(self, model, eos_ids: set[int], pad_token_id: int, prompt_lookup: int = 0) -> None:
        self.model = model.eval()
        self.eos_ids = set(eos_ids)
        self.pad_token_id = pad_token_id
        self.prompt_lookup = prompt_lookup
        self.name = HF if not prompt_lookup else f"hf-prompt-lookup:{prompt_lookup}"
        self.reference = None if not prompt_lookup else HF
        self.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")

    def generate_kwargs(self, max_new_tokens: int) -> dict:
        kwargs = dict(
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.pad_token_id,
            eos_token_id=sorted(self.eos_ids),
        )
        if self.prompt_lookup:
            kwargs["prompt_lookup_num_tokens"] = self.prompt_lookup
        return kwargs

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> Output:
        device = next(self.model.parameters()).device
        ids = torch.tensor([prompt_ids], device=device)
        kwargs = self.generate_kwargs(max_new_tokens)
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            seconds = time.perf_counter() - t0
        new = out[0, len(prompt_ids) :].tolist()
        return Output(cut_at_eos(new, self.eos_ids), seconds, len(new))

    def describe(self) -> dict:
        return super().describe() | {"generate_kwargs": self.generate_kwargs(0) | {"max_new_tokens": "N"}}


class ArgenSystem(System):
    """`Generator.generate(prompt_ids, strategy=spec, max_new_tokens=N)`, greedy."""

    kind = "argen"

    def __init__(
        self, generator, spec: dict, dtype: str = "float32", reference: str | None = HF, suffix: str = ""
    ) -> None:
        self.generator = generator
        self.spec = dict(spec)
        self.dtype = dtype
        self.label = strategy_label(spec)
        self.name = (self.label if dtype == "float32" else f"{self.label}@{dtype}") + suffix
        self.reference = reference
        # A lossy strategy, or any strategy at a lower precision or a second quantization, is compared
        # but not judged. The "exact" quant path keeps the model's own weights, so it is judged.
        self.exact = (
            REGISTRY[spec["name"]].exact
            and dtype == "float32"
            and getattr(generator, "quant", "none") in ("none", "exact")
        )

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> Output:
        t0 = time.perf_counter()
        result = self.generator.generate(prompt_ids, strategy=dict(self.spec), max_new_tokens=max_new_tokens)
        seconds = time.perf_counter() - t0
        if result.prompt_ids != list(prompt_ids):
            raise RuntimeError(f"argen changed the prompt ids ({len(prompt_ids)} -> {len(result.prompt_ids)})")
        stats = result.stats
        return Output(
            list(result.token_ids),
            seconds,
            len(result.token_ids),
            stats.tokens_per_forward,
            result.finish_reason,
            stats.prefill_seconds,
        )

    def describe(self) -> dict:
        weights = self.generator.runtime.weight_bytes
        quant = getattr(self.generator, "quant", "none")
        return super().describe() | {"strategy": self.spec, "quant": quant, "weight_bytes": weights}


class LlamaCppSystem(System):
    """llama.cpp (llama-cpp-python) on the same GGUF file: greedy, batch 1, the same threads. An
    optional peer (`pip install llama-cpp-python`, built from source). It quantizes activations to
    8 bits in its matmuls, so its output is measured against argen's, not judged."""

    kind = "llama.cpp"
    exact = False

    def __init__(
        self, gguf_file, threads: int, eos_ids: set[int], reference: str | None = HF, n_ctx: int = 4096
    ) -> None:
        try:
            import llama_cpp
        except ImportError as exc:
            raise ArgenError(
                "--systems llama-cpp needs llama-cpp-python: `pip install llama-cpp-python` (it builds "
                "llama.cpp from source, about 5 minutes)"
            ) from exc
        self.version = llama_cpp.__version__
        self.llm = llama_cpp.Llama(
            model_path=str(gguf_file),
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            n_batch=512,
            verbose=False,
        )
        self.eos_ids, self.reference, self.threads = set(eos_ids), reference, threads
        self.name = "llama.cpp"
        self.weight_bytes = int(llama_cpp.llama_model_size(self.llm.model))
        self.dtype = "gguf"
        self.build = self.build_of(llama_cpp)

    @staticmethod
    def build_of(llama_cpp) -> str:
        """The instruction sets this llama.cpp was built for (its builds differ by the flags given)."""
        info = llama_cpp.llama_print_system_info().decode()
        return " ".join(f.split("=")[0].split(":")[-1].strip() for f in info.split("|") if f.strip().endswith("= 1"))

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> Output:
        self.llm.reset()  # no prefix reuse from the previous call
        out: list[int] = []
        t0 = time.perf_counter()
        first = None
        for token in self.llm.generate(
            list(prompt_ids), temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True
        ):
            if first is None:
                first = time.perf_counter()
            out.append(int(token))
            if token in self.eos_ids or len(out) >= max_new_tokens:
                break
        seconds = time.perf_counter() - t0
        return Output(
            out, seconds, len(out), None, "stop" if out and out[-1] in self.eos_ids else "length", (first or t0) - t0
        )

    def describe(self) -> dict:
        return super().describe() | {
            "llama_cpp_python": self.version,
            "llama_cpp_build": self.build,
            "threads": self.threads,
            "weight_bytes": self.weight_bytes,
        }
