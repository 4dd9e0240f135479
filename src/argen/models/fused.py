"""The native runtime's fused CPU forward (`kernels/cpu_forward.c`): a whole packed pass over a few
new tokens of several sequences in one call, for quantized weights, reading their keys and values
from the paged KV memory. `LlamaRuntime.forward_packed` takes it for decode steps, verification
passes, beams and batched rows (at most `MAX_NEW_TOKENS` tokens per sequence); prefill chunks go
through torch. Its results do not depend on what else shares the pass (batch
invariance, see the C file), so exact strategies reproduce plain decoding bit for bit on it."""

from __future__ import annotations

import ctypes
import itertools

import torch

from argen.models.kernels import LayerStruct, ModelStruct

# At most this many new tokens per sequence, and rows in all, take the fused path; longer feeds
# (long prefill chunks) take torch's, whose GEMMs (on weights dequantized per call) win only there:
# since the kernels' outer-product tiles (issue 25), a whole fused pass beats dequantize + GEMM up to
# about 256 rows (SmolLM2's shapes, one thread: 2.7x at 48 rows, 1.3x at 96-256, 0.8x at 512;
# benchmarks/kernel_peak: "Prefill").
MAX_NEW_TOKENS = 256
MAX_ROWS = 256


class FusedForward:
    def __init__(self, runtime) -> None:
        info, layers = runtime.info, runtime.layers
        self.lib = layers[0].qkv.lib  # the build the weights were packed for
        structs = (LayerStruct * info.n_layers)()
        for s, layer in zip(structs, layers):
            s.attn_norm, s.ffn_norm = layer.attn_norm.data_ptr(), layer.ffn_norm.data_ptr()
            s.qkv, s.o, s.gate_up, s.down = layer.qkv.struct, layer.o.struct, layer.gate_up.struct, layer.down.struct
        self.layers = structs  # kept alive: the model struct points into it
        inter = layers[0].gate_up.out_features // 2
        self.model = ModelStruct(
            info.n_layers,
            info.n_heads,
            info.n_kv_heads,
            info.head_dim,
            info.hidden_size,
            inter,
            runtime.eps,
            0,
            runtime.cos.data_ptr(),
            runtime.sin.data_ptr(),
            runtime.norm.data_ptr(),
            structs,
        )
        self.hidden = info.hidden_size

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, segments, starts: list[int], plan) -> torch.Tensor:
        """x: embeddings [N, H] of every segment's new tokens, in order (overwritten); returns the
        final-normed hidden states [N, H]. The caches already have room (reserved) for the tokens."""
        pool = segments[0].cache.pool
        x = x.contiguous()
        out = torch.empty_like(x)
        counts = [len(seg.tokens) for seg in segments]
        cu = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int64)
        tables = [seg.cache.blocks for seg in segments]
        table_cu = torch.tensor([0, *itertools.accumulate(len(t) for t in tables)], dtype=torch.int64)
        flat_tables = torch.tensor([b for t in tables for b in t], dtype=torch.int32)
        masks, mask_at, at = [], [], 0
        for seg, n in zip(segments, counts, strict=True):
            if seg.mask is None:
                mask_at.append(-1)
            else:
                masks.append(seg.mask.to(torch.uint8).reshape(-1))
                mask_at.append(at)
                at += n * n
        mask = torch.cat(masks).contiguous() if masks else None
        k = pool.k
        strides = torch.tensor([k.stride(0), k.stride(2), k.stride(1), k.stride(3)], dtype=torch.int64)
        pos = positions.to(torch.int64).contiguous()
        start = torch.tensor(starts, dtype=torch.int64)
        attn = ffn = None
        if plan is not None and not plan.is_full:
            attn, ffn = (torch.tensor(flags, dtype=torch.uint8) for flags in (plan.attn, plan.ffn))
        where = torch.tensor(mask_at, dtype=torch.int64)
        status = self.lib.lib.argen_forward(
            ctypes.byref(self.model),
            torch.get_num_threads(),
            len(segments),
            cu.data_ptr(),
            x.data_ptr(),
            out.data_ptr(),
            pos.data_ptr(),
            start.data_ptr(),
            flat_tables.data_ptr(),
            table_cu.data_ptr(),
            pool.block_size,
            k.data_ptr(),
            pool.v.data_ptr(),
            strides.data_ptr(),
            None if mask is None else mask.data_ptr(),
            where.data_ptr(),
            None if attn is None else attn.data_ptr(),
            None if ffn is None else ffn.data_ptr(),
        )
        if status != 0:
            raise MemoryError("the fused CPU forward could not allocate its buffers")
        return out
