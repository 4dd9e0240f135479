"""The weight paths `quant=` chooses among (no heavy imports: the CLI reads this to build its parser).

- auto: the fastest path here that keeps the model's own weights: "exact" for a GGUF file when
  argen's CPU kernels build on this machine, else "none"
- exact: a GGUF's Q4_0 / Q4_1 / Q8_0 blocks as stored, fp32 activations (no second quantization)
- none: every weight dequantized to the runtime's dtype (the reference path)
- q8_0, q4_1, q4_0: quantize fp32 weights at load (for checkpoints that come in fp32; lossy)
- exact-a8, q8_0-a8, q4_1-a8, q4_0-a8: those weights, with the activations rounded to 8 bits per
  block of 32 in every quantized matmul, as llama.cpp computes (lossy; one-row decode about twice
  as fast). Exact strategies stay exact on it: a row's arithmetic never depends on its pass.
"""

A8 = "-a8"  # the suffix that turns on 8-bit activations
QUANTS = ("auto", "exact", "none", "q8_0", "q4_1", "q4_0", "exact-a8", "q8_0-a8", "q4_1-a8", "q4_0-a8")


def split_quant(quant: str) -> tuple[str, bool]:
    """("exact", True) for "exact-a8": the weight path and whether activations are 8-bit."""
    return (quant[: -len(A8)], True) if quant.endswith(A8) else (quant, False)
