"""Lossy compute skipping: strategies that emit the tokens of a partial model (`exact = False`).

- `skip_decode.py`: `SkipDecode`, fewer layers for later tokens, on a monotone schedule (no KV entry
  is ever needed that was not computed).
- `ffn_skip.py`: `FFNSkip`, FFN sub-blocks skipped where they barely change the hidden state.

Both feed a `Plan` to the native runtime; their passes are target passes (not drafts): nothing
verifies them. The benchmark harness's drift report (`python -m benchmarks drift`) measures what they lose.
"""

from argen.strategies.skipping.ffn_skip import FFNSkip
from argen.strategies.skipping.skip_decode import SkipDecode

__all__ = ["FFNSkip", "SkipDecode"]
