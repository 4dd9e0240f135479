"""The native runtime's fused CPU forward (`kernels/cpu_forward.c`): a whole pass over a few new
tokens per sequence in one call, for quantized weights. `LlamaRuntime.forward` takes it for decode
steps, verification passes, beams and batched rows (at most `MAX_NEW_TOKENS` tokens per sequence);
prefills go through torch. Its results do not depend on what else shares the pass (batch
invariance, see the C file), so exact strategies reproduce plain decoding bit for bit on it."""

from __future__ import annotations

import ctypes

import torch

from argen.models.kernels import LayerStruct, ModelStruct, library

# At most this many new tokens per sequence, and rows in all, take the fused path; longer feeds
# (prefills) take torch's, whose GEMMs (on weights dequantized per call) are faster there: the block
# kernels cost about as much as dequantize + GEMM at 32 rows (SmolLM2's shapes, one thread).
MAX_NEW_TOKENS = 32
MAX_ROWS = 64


class FusedForward:
    def __init__(self, runtime) -> None:
        self.lib = library()
        info, layers = runtime.info, runtime.layers
        structs = (LayerStruct * info.n_layers)()
        for s, layer in zip(structs, layers):
            s.attn_norm, s.ffn_norm = layer.attn_norm.data_ptr(), layer.ffn_norm.data_ptr()
            s.qkv, s.o, s.gate_up, s.down = layer.qkv.struct, layer.o.struct, layer.gate_up.struct, layer.down.struct
        self.layers = structs  # kept alive: the model struct points into it
        inter = layers[0].gate_up.out_features // 2
        self.model = ModelStruct(info.n_layers, info.n_heads, info.n_kv_heads, info.head_dim, info.hidden_size, inter,
                                 runtime.eps, 0, runtime.cos.data_ptr(), runtime.sin.data_ptr(),
                                 runtime.norm.data_ptr(), structs)  # fmt: skip
        self.hidden = info.hidden_size

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, starts: list[int], cache, mask, plan) -> torch.Tensor:
        """x: embeddings [B, T, H] (overwritten); returns the final-normed hidden states [B, T, H]."""
        batch, n_new, _ = x.shape
        x = x.contiguous()
        out = torch.empty_like(x)
        pos = positions.to(torch.int64).expand(batch, n_new).contiguous()
        start = torch.tensor(starts, dtype=torch.int64)
        strides = torch.tensor([cache.k.stride(0), cache.k.stride(1), cache.k.stride(2), cache.k.stride(3)])
        mask_rows, mask_ptr = 0, None
        if mask is not None:
            mask = mask.to(torch.uint8).contiguous()
            mask_rows = 1 if mask.dim() == 2 else mask.shape[0]
            mask_ptr = mask.data_ptr()
        attn = ffn = None
        if plan is not None and not plan.is_full:
            attn, ffn = (torch.tensor(flags, dtype=torch.uint8) for flags in (plan.attn, plan.ffn))
        status = self.lib.lib.argen_forward(
            ctypes.byref(self.model), torch.get_num_threads(), batch, n_new, x.data_ptr(), out.data_ptr(),
            pos.data_ptr(), start.data_ptr(), cache.k.data_ptr(), cache.v.data_ptr(), strides.data_ptr(), mask_ptr,
            mask_rows, None if attn is None else attn.data_ptr(), None if ffn is None else ffn.data_ptr(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("the fused CPU forward could not allocate its buffers")
        return out
