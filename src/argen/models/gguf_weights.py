"""Read a GGUF file's weights as they are stored: Q4_0 / Q4_1 / Q8_0 tensors stay block-quantized
(`QuantWeight`), F32 / F16 ones become fp32 tensors, and any other type (K-quants, ...) is
dequantized to fp32 by gguf-py. Names and layouts follow the Hugging Face state dict, as
transformers' GGUF loader makes it, so the native runtime takes either."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch

from argen.models.quant import QK, QuantWeight
from argen.models.sources import gguf_reader

log = logging.getLogger("argen.models")

_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Bytes per block of 32 weights, and where the codes start: [d fp16][m fp16 (Q4_1)][codes].
_BLOCKS = {"Q4_0": ("q4_0", 18, 2), "Q4_1": ("q4_1", 20, 4), "Q8_0": ("q8_0", 34, 2)}


def hf_name(name: str) -> str | None:
    if name in _GLOBAL:
        return _GLOBAL[name]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if not match:
        return None
    layer, base, kind = match.groups()
    if f"{base}.{kind}" in _LAYER:
        return f"model.layers.{layer}.{_LAYER[f'{base}.{kind}']}"
    if base in _LAYER:
        return f"model.layers.{layer}.{_LAYER[base]}.{kind}"
    return None


def _blocks(data: np.ndarray, type_name: str) -> QuantWeight:
    fmt, size, start = _BLOCKS[type_name]
    n = data.shape[0]
    blocks = np.ascontiguousarray(data).reshape(n, -1, size)
    d = torch.from_numpy(blocks[:, :, 0:2].copy().view(np.float16).reshape(n, -1))
    m = torch.from_numpy(blocks[:, :, 2:4].copy().view(np.float16).reshape(n, -1)) if fmt == "q4_1" else None
    codes = blocks[:, :, start:].reshape(n, -1).copy()
    qs = torch.from_numpy(codes.view(np.int8) if fmt == "q8_0" else codes)
    return QuantWeight(fmt, qs, d, m)


def _unpermute_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation (transformers' `_reverse_permute_weights`,
    applied to row indices so quantized rows move whole)."""
    dim = n_rows // n_head // 2
    return torch.arange(n_rows).reshape(n_head, dim, 2).transpose(1, 2).reshape(n_rows)


def read_gguf(path: Path, config) -> dict[str, torch.Tensor | QuantWeight]:
    from gguf import dequantize

    reader = gguf_reader(path)
    arch = reader.fields["general.architecture"].contents() if "general.architecture" in reader.fields else ""
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    state: dict[str, torch.Tensor | QuantWeight] = {}
    converted = set()
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            continue
        type_name = tensor.tensor_type.name
        if type_name in _BLOCKS and tensor.data.ndim == 2 and int(tensor.shape[0]) % QK == 0:
            value: torch.Tensor | QuantWeight = _blocks(tensor.data, type_name)
        else:
            if type_name not in ("F32", "F16", "BF16"):
                converted.add(type_name)
            array = dequantize(tensor.data, tensor.tensor_type)
            value = torch.from_numpy(np.array(array, dtype=np.float32))  # a copy: the file stays read-only
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = n_heads if ".q_proj." in name else n_kv
            order = _unpermute_rows(value.shape[0], heads)
            value = value.rows(order) if isinstance(value, QuantWeight) else value[order].contiguous()
        state[name] = value
    if converted:
        log.info(
            "%s: %s tensors have no argen kernel; they are dequantized to fp32", path.name, ", ".join(sorted(converted))
        )
    del reader
    return state
