"""The weight paths `quant=` chooses among (no heavy imports: the CLI reads this to build its parser).

- auto: the fastest path here that keeps the model's own weights: "exact" for a GGUF file when
  argen's CPU kernels build on this machine, else "none"
- exact: a GGUF's Q4_0 / Q4_1 / Q8_0 blocks as stored, fp32 activations (no second quantization)
- none: every weight dequantized to the runtime's dtype (the reference path)
- q8_0, q4_1, q4_0: quantize fp32 weights at load (for checkpoints that come in fp32; lossy)
"""

QUANTS = ("auto", "exact", "none", "q8_0", "q4_1", "q4_0")
