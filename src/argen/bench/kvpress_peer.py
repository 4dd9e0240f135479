"""NVIDIA kvpress on the Hugging Face model with argen's weights: the peer of argen's KV presses in
`argen bench drift --kvpress`.

`KVPressPeer(hf_model, eos_ids)` greedy-decodes a prompt (token ids) with a kvpress press at a
budget (the fraction of positions kept, as argen's presses take it: kvpress's compression_ratio is
1 - budget), or with no press (`reference`: the peer's own exact run). The loop is kvpress's own
(pipeline.py `generate_answer`): one forward over the whole prompt, pressed by the press's hooks
after each attention layer (the first token is chosen from that pass), then one token per forward
with explicit position ids (a pressed cache is shorter than the positions seen).

Where kvpress can press while decoding (`decoding=True` below: a ScorerPress under
`CompressionRatioDecodingPress`, wrapped with the prefill press in `PrefillDecodingPress`), the
cache is pressed back to `budget` of the positions seen every `DECODE_INTERVAL` steps, as argen's
presses do when a 16-position block frees; the others press the prompt only and the cache grows by
one position per new token.

KV bytes: the sum of the cache's key and value tensors' bytes (`Tensor.nbytes`, every layer),
sampled by a forward hook on each attention layer that runs before the press's hook (so a layer's
full keys, before it is pressed, count toward the peak) and once after each forward; `held` is the
last sample, `peak` the largest.

kvpress 0.5.5 needs transformers<5.3: install it in an environment of its own
(`pip install 'argen[kvpress]'`, README). Importing kvpress patches transformers' attention
functions, so it is imported only when a kvpress run is asked for.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from argen.errors import ArgenError

INSTALL = "pip install 'argen[kvpress]'"
DECODE_INTERVAL = 16  # decoding steps between presses: argen's block size (cache/paged.py BLOCK_SIZE)


@dataclass(frozen=True)
class PeerMethod:
    name: str  # as given to --kvpress
    beside: str  # the argen method whose rows this one's sit beside
    scorer: str  # the kvpress ScorerPress class
    wrapper: str | None = None  # a kvpress press wrapping the scorer on the prefill (MergingPress)
    decoding: bool = True  # kvpress can press while decoding with this scorer (see the module doc)
    eager: bool = False  # the press reads the attention weights: eager attention

    @property
    def press_name(self) -> str:
        return f"{self.wrapper}({self.scorer})" if self.wrapper else self.scorer


# One table: --kvpress names -> kvpress presses. SnapKV's scorer needs more than 64 queries in view,
# which a decoding step never has, and kvpress's merge-on-evict press works on the prefill only
# (its decoding merger, CAMPress, keeps a fixed count, not a fraction): those two press the prompt.
METHODS = {m.name: m for m in (
    PeerMethod("streaming-llm", "streaming-llm", "StreamingLLMPress"),
    PeerMethod("h2o", "h2o", "ObservedAttentionPress", eager=True),
    PeerMethod("snapkv", "h2o", "SnapKVPress", decoding=False),
    PeerMethod("knorm", "knorm", "KnormPress"),
    PeerMethod("expected-attention", "expected-attention", "ExpectedAttentionPress"),
    PeerMethod("merging", "kvmerger", "SnapKVPress", wrapper="MergingPress", decoding=False),
)}  # fmt: skip


def compression_ratio(budget: float) -> float:
    """kvpress's compression_ratio (the fraction removed) for argen's budget (the fraction kept)."""
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not 0 < budget <= 1:
        raise ArgenError(f"a kvpress budget is the fraction of positions kept, in (0, 1]; got {budget!r}")
    return round(1.0 - float(budget), 9)  # 1 - 0.65 is 0.35000000000000003


def parse_methods(text: str) -> list[PeerMethod]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise ArgenError(f"--kvpress takes names from {', '.join(METHODS)} (comma-separated); got {text!r}")
    return [METHODS[n] for n in dict.fromkeys(names)]


def import_kvpress():
    try:
        import kvpress
    except ImportError as exc:
        raise ArgenError(f"--kvpress needs NVIDIA kvpress, which is not importable here ({exc}). Install it with "
                         f"`{INSTALL}` in an environment of its own: kvpress 0.5.5 needs transformers<5.3 "
                         "(README, KV-cache presses)") from exc  # fmt: skip
    return kvpress


def kvpress_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvpress")
    except PackageNotFoundError:
        return None


def build_press(method: PeerMethod, budget: float):
    """The kvpress press for `method` at `budget` (fraction kept): the prefill press, and where
    kvpress can, a decoding press that keeps `budget` of the positions seen."""
    kvpress = import_kvpress()
    ratio = compression_ratio(budget)
    scorer = getattr(kvpress, method.scorer)
    prefill = scorer(compression_ratio=ratio)
    if method.wrapper:
        prefill = getattr(kvpress, method.wrapper)(press=prefill)
    if not method.decoding:
        return prefill
    decoding = kvpress.CompressionRatioDecodingPress(base_press=scorer(), target_compression_ratio=ratio,
                                                     compression_interval=DECODE_INTERVAL)  # fmt: skip
    return kvpress.PrefillDecodingPress(prefilling_press=prefill, decoding_press=decoding)


@dataclass
class PeerRun:
    token_ids: list[int]
    seconds: float  # the whole generation
    prefill_seconds: float  # the prompt's forward (its pressing included) and the first token
    kv_bytes: int  # held at the end
    peak_kv_bytes: int
    press: str  # what ran: "none" or the kvpress press and when it pressed

    @property
    def tok_s(self) -> float | None:
        decode = self.seconds - self.prefill_seconds
        return len(self.token_ids) / decode if decode > 0 else None


def cache_bytes(cache) -> int:
    """Bytes of every key and value tensor the cache holds (a layer not written yet holds none)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            value = getattr(layer, name, None)
            if isinstance(value, torch.Tensor):
                total += value.nbytes
    return total


class _Meter:
    """Samples the cache's bytes after each attention layer (before a press's hook) and after each forward."""

    def __init__(self, layers) -> None:
        self.held = self.peak = 0
        self.hooks = [layer.self_attn.register_forward_hook(self._hook, with_kwargs=True) for layer in layers]

    def _hook(self, module, args, kwargs, output):
        cache = kwargs.get("past_key_values")
        if cache is not None:
            self.sample(cache)

    def sample(self, cache) -> None:
        self.held = cache_bytes(cache)
        self.peak = max(self.peak, self.held)

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


class KVPressPeer:
    def __init__(self, hf_model, eos_ids: set[int]) -> None:
        self.model = hf_model.eval()
        self.eos_ids = set(eos_ids)

    def warm_up(self) -> None:
        """One short run, not measured: a process's first HF forward pays one-time costs."""
        self.reference(list(range(1, 9)), 2, ignore_eos=True)

    def reference(self, prompt: list[int], max_new_tokens: int, ignore_eos: bool = False) -> PeerRun:
        """HF greedy decoding with no press (the peer's own exact output). Like argen's `Result.token_ids`,
        the tokens end with the EOS token where one stopped the run."""
        return self._decode(prompt, max_new_tokens, ignore_eos, None, "none")

    def run(self, prompt: list[int], method: PeerMethod, budget: float, max_new_tokens: int,
            ignore_eos: bool = False) -> PeerRun:  # fmt: skip
        press = build_press(method, budget)
        when = "prefill and decoding" if method.decoding else "prefill only"
        try:
            return self._decode(prompt, max_new_tokens, ignore_eos, press, f"{method.press_name}, {when}",
                                eager=method.eager)  # fmt: skip
        except AssertionError as exc:  # kvpress checks its inputs with asserts (e.g. SnapKV: > 64 prompt tokens)
            raise ArgenError(f"kvpress {method.name} ({method.press_name}) at budget {budget} failed on a "
                             f"{len(prompt)}-token prompt: {exc}") from exc  # fmt: skip

    @contextlib.contextmanager
    def _attention(self, eager: bool):
        config = self.model.config
        before = config._attn_implementation
        if eager and before != "eager":
            self.model.set_attn_implementation("eager")
        try:
            yield
        finally:
            if config._attn_implementation != before:
                self.model.set_attn_implementation(before)

    @torch.inference_mode()
    def _decode(self, prompt: list[int], max_new_tokens: int, ignore_eos: bool, press, description: str,
                eager: bool = False) -> PeerRun:  # fmt: skip
        from transformers import DynamicCache

        if not prompt or max_new_tokens < 1:
            raise ArgenError("a kvpress run needs a prompt and at least one new token")
        model, cache = self.model, DynamicCache()
        meter = _Meter(model.model.layers)  # registered first: runs before the press's hooks
        tokens: list[int] = []
        try:
            with self._attention(eager), press(model) if press is not None else contextlib.nullcontext():
                start = time.perf_counter()
                ids = torch.tensor([prompt], dtype=torch.long)
                logits = model(input_ids=ids, past_key_values=cache, logits_to_keep=1).logits
                meter.sample(cache)
                tokens.append(int(logits[0, -1].argmax()))
                prefill = time.perf_counter() - start
                while len(tokens) < max_new_tokens and (ignore_eos or tokens[-1] not in self.eos_ids):
                    position = torch.tensor([[len(prompt) + len(tokens) - 1]])
                    ids = torch.tensor([[tokens[-1]]], dtype=torch.long)
                    logits = model(input_ids=ids, past_key_values=cache, position_ids=position).logits
                    meter.sample(cache)
                    tokens.append(int(logits[0, -1].argmax()))
                seconds = time.perf_counter() - start
        finally:
            meter.close()
        return PeerRun(tokens, seconds, prefill, meter.held, meter.peak, description)
