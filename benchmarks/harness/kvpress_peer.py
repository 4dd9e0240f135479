"""NVIDIA kvpress on the Hugging Face model with argen's weights: the peer of argen's KV presses in
`python -m benchmarks drift --kvpress`.

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

KV quantization (`kv-quant-8`, `kv-quant-4`, `kv-quant-2`, beside argen's `kv-quant`): no press;
the same loop with transformers' `QuantizedCache` (backend optimum-quanto) in place of the
DynamicCache, so every position is kept, quantized (no budget). Settings, as near argen's
kv-quant as transformers and quanto allow:
- groups of 64 values (gcd(64, head_dim): on the default model one position's 64-dimension head
  vector), asymmetric min-max codes (quanto's MaxOptimizer) for 4 and 2 bits. Keys are quantized
  per token, like values (`axis_key=0`), where argen's are per channel over 64 positions:
  quanto's per-channel groups (`axis_key=-1`) run over the flattened (batch, head, position) rows,
  so they fail unless heads × positions is a multiple of 64 and otherwise straddle two heads.
- 8 bits: transformers' quanto layer takes 2 or 4 bits only, and quanto's 8-bit type is symmetric
  (an absmax scale, no zero-point, no groups of its own). `kv-quant-8` runs transformers'
  `QuantizedLayer` (its fp residual and re-quantization) with quanto's qint8 on groups of 64
  values made by reshaping (`QInt8Layer`).
- `residual_length=64`: the newest positions (0 to 63) stay in fp32 and are quantized 64 at a
  time, as argen's kv-quant (recent=0) keeps the newest positions short of a whole group in fp32.
  Unlike argen, transformers quantizes the whole prompt at once (argen leaves the prompt's last
  length % 64 positions in fp32) and, at each flush, re-quantizes the whole cache from its
  dequantized values (with per-token groups this gives the same codes back).
- scales and shifts stay in the cache's dtype (fp32; argen's are fp16), and every forward
  dequantizes the whole cache (argen dequantizes one layer at a time as well).

KV bytes: the sum of the bytes of every tensor the cache holds, over all layers: for a
DynamicCache its keys and values (`Tensor.nbytes`); for a quantized cache the packed codes,
scales and shifts of quanto's tensors (found through `__tensor_flatten__`, so a packed 4-bit code
counts half a byte) plus the fp32 residual keys and values. Sampled by a forward hook on each
attention layer that runs before the press's hook (so a layer's full keys, before it is pressed,
count toward the peak) and once after each forward; `held` is the last sample, `peak` the
largest. The quantized cache's transient copies (the prompt's fp keys before they are quantized,
the dequantized cache each forward builds) are never held by it and do not count.

kvpress 0.5.5 needs transformers<5.3: install it in an environment of its own
(`pip install 'argen[kvpress]'`, docs/lossy-and-drift.md). Importing kvpress patches transformers' attention
functions, so it is imported only when a kvpress run is asked for.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import time
from dataclasses import dataclass

import torch

from argen.errors import ArgenError

INSTALL = "pip install 'argen[kvpress]'"
DECODE_INTERVAL = 16  # decoding steps between presses: argen's block size (cache/paged.py BLOCK_SIZE)
QUANT_GROUP = 64  # values per quantization group: argen's GROUP (cache/quant.py)
RESIDUAL = 64  # newest positions kept in fp32 until quantized together: argen's fp tail (< a group)


@dataclass(frozen=True)
class PeerMethod:
    name: str  # as given to --kvpress
    beside: str  # the argen method whose rows this one's sit beside
    scorer: str = ""  # the kvpress ScorerPress class
    wrapper: str | None = None  # a kvpress press wrapping the scorer on the prefill (MergingPress)
    decoding: bool = True  # kvpress can press while decoding with this scorer (see the module doc)
    eager: bool = False  # the press reads the attention weights: eager attention
    bits: int | None = None  # no press: transformers' QuantizedCache at this many bits (no budget)

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def row(self) -> str:
        """The method in the rows' names: `kvpress kv-quant 8-bit` beside argen's `kv-quant 8-bit`."""
        return "kv-quant" if self.quantized else self.name

    @property
    def press_name(self) -> str:
        if self.quantized:
            return f"QuantizedCache(quanto, {self.bits}-bit)"
        return f"{self.wrapper}({self.scorer})" if self.wrapper else self.scorer


# One table: --kvpress names -> kvpress presses. SnapKV's scorer (and PyramidKV's, SnapKV's with
# per-layer budgets) needs more than 64 queries in view, which a decoding step never has, and kvpress's merge-on-evict press works on the prefill only
# (its decoding merger, CAMPress, keeps a fixed count, not a fraction): those two press the prompt.
METHODS = {
    m.name: m
    for m in (
        PeerMethod("streaming-llm", "streaming-llm", "StreamingLLMPress"),
        PeerMethod("h2o", "h2o", "ObservedAttentionPress", eager=True),
        PeerMethod("snapkv", "snapkv", "SnapKVPress", decoding=False),
        PeerMethod("pyramidkv", "prefix-kv", "PyramidKVPress", decoding=False),  # per-layer budgets, a pyramid
        PeerMethod("knorm", "knorm", "KnormPress"),
        PeerMethod("expected-attention", "expected-attention", "ExpectedAttentionPress"),
        PeerMethod("merging", "kvmerger", "SnapKVPress", wrapper="MergingPress", decoding=False),
        *(PeerMethod(f"kv-quant-{bits}", "kv-quant", bits=bits) for bits in (8, 4, 2)),
    )
}
ROWS = {m.row: m for m in METHODS.values()}  # a row's method -> a method of that row (all sit beside the same)


def compression_ratio(budget: float) -> float:
    """kvpress's compression_ratio (the fraction removed) for argen's budget (the fraction kept)."""
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not 0 < budget <= 1:
        raise ArgenError(f"a kvpress budget is the fraction of positions kept, in (0, 1]; got {budget!r}")
    return round(1.0 - float(budget), 9)  # 1 - 0.65 is 0.35000000000000003


def parse_methods(text: str) -> list[PeerMethod]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        what = f"unknown method {', '.join(map(repr, unknown))}" if unknown else "no method"
        raise ArgenError(f"--kvpress: {what}; it takes names from {', '.join(METHODS)} (comma-separated); got {text!r}")
    return [METHODS[n] for n in dict.fromkeys(names)]


def import_kvpress():
    try:
        import kvpress
    except ImportError as exc:
        raise ArgenError(
            f"--kvpress needs NVIDIA kvpress, which is not importable here ({exc}). Install it with "
            f"`{INSTALL}` in an environment of its own: kvpress 0.5.5 needs transformers<5.3 "
            "(docs/lossy-and-drift.md, kvpress beside argen's presses)"
        ) from exc
    return kvpress


def import_quanto():
    try:
        quanto = importlib.import_module("optimum.quanto")
    except ImportError as exc:
        raise ArgenError(
            f"--kvpress kv-quant-N needs optimum-quanto (transformers' QuantizedCache backend), which is "
            f"not importable here ({exc}). Install it with `{INSTALL}` in the kvpress environment "
            "(docs/lossy-and-drift.md, kvpress beside argen's presses)"
        ) from exc
    return quanto


def kvpress_version(package: str = "kvpress") -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
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
    decoding = kvpress.CompressionRatioDecodingPress(
        base_press=scorer(), target_compression_ratio=ratio, compression_interval=DECODE_INTERVAL
    )
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


def held_bytes(value) -> int:
    """Bytes of the plain tensors inside `value`: a tensor subclass (quanto's quantized tensors and
    their packed data) through `__tensor_flatten__`, a tuple through its items, anything else 0."""
    if isinstance(value, torch.Tensor):
        if type(value) is torch.Tensor or not hasattr(value, "__tensor_flatten__"):
            return value.nbytes
        names, _ = value.__tensor_flatten__()
        return sum(held_bytes(getattr(value, name)) for name in names)
    if isinstance(value, tuple):
        return sum(held_bytes(item) for item in value)
    return 0


def cache_bytes(cache) -> int:
    """Bytes of every key and value tensor the cache holds, quantized or not (a layer not written
    yet holds none)."""
    return sum(
        held_bytes(getattr(layer, name, None))
        for layer in getattr(cache, "layers", [])
        for name in ("keys", "values", "_quantized_keys", "_quantized_values")
    )


def quant_group(config) -> int:
    """Values per quantization group: argen's 64, or less where it does not divide a head vector
    (so a group never spans two positions)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return math.gcd(QUANT_GROUP, head_dim)


def quantized_cache(config, bits: int):
    """transformers' QuantizedCache (quanto) at `bits`, keys and values per token, groups of
    `quant_group`, `RESIDUAL` newest positions in fp32; 8 bits through `QInt8Layer` (module doc)."""
    from transformers import Cache, QuantizedCache

    import_quanto()
    config = config.get_text_config(decoder=True)
    group = quant_group(config)
    if bits == 8:
        layer = _qint8_layer_class()
        return Cache(layers=[layer(8, 0, 0, group, RESIDUAL) for _ in range(config.num_hidden_layers)])
    return QuantizedCache(
        "quanto", config, nbits=bits, axis_key=0, axis_value=0, q_group_size=group, residual_length=RESIDUAL
    )


@functools.cache
def _qint8_layer_class():  # built on first use: transformers is imported late
    from transformers.cache_utils import QuantizedLayer

    class QInt8Layer(QuantizedLayer):
        """transformers' QuantizedLayer with quanto's qint8 (symmetric, absmax scale) on groups of
        `q_group_size` consecutive values: transformers' quanto layer refuses 8 bits."""

        def _quantize(self, tensor, axis):
            from optimum.quanto import AbsmaxOptimizer, qint8, quantize_weight

            groups = tensor.reshape(-1, self.q_group_size)  # what quanto's axis-0 groups are
            scale = AbsmaxOptimizer()(groups, qint8, 0).clamp_min(1e-12)  # an all-zero group: no 0/0
            return quantize_weight(groups, qint8, 0, scale), tensor.shape

        def _dequantize(self, q_tensor):
            codes, shape = q_tensor
            return codes.dequantize().reshape(shape)

    return QInt8Layer


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

    def run(
        self, prompt: list[int], method: PeerMethod, budget: float | None, max_new_tokens: int, ignore_eos: bool = False
    ) -> PeerRun:
        """`method` at `budget` (a quantized method has none: every position is kept)."""
        if method.quantized:
            cache = quantized_cache(self.model.config, method.bits)
            return self._decode(prompt, max_new_tokens, ignore_eos, None, f"{method.press_name}, no press", cache=cache)
        press = build_press(method, budget)
        when = "prefill and decoding" if method.decoding else "prefill only"
        try:
            return self._decode(
                prompt, max_new_tokens, ignore_eos, press, f"{method.press_name}, {when}", eager=method.eager
            )
        except AssertionError as exc:  # kvpress checks its inputs with asserts (e.g. SnapKV: > 64 prompt tokens)
            raise ArgenError(
                f"kvpress {method.name} ({method.press_name}) at budget {budget} failed on a "
                f"{len(prompt)}-token prompt: {exc}"
            ) from exc

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
    def _decode(
        self,
        prompt: list[int],
        max_new_tokens: int,
        ignore_eos: bool,
        press,
        description: str,
        eager: bool = False,
        cache=None,
    ) -> PeerRun:
        from transformers import DynamicCache

        if not prompt or max_new_tokens < 1:
            raise ArgenError("a kvpress run needs a prompt and at least one new token")
        model, cache = self.model, DynamicCache() if cache is None else cache
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
