"""One forward pass to time, as the scripts time it (`benchmarks/kernel_peak`, `benchmarks/fast_path`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


@contextmanager
def verify_pass(runtime, ids: list[int], rows: int) -> Iterator[Callable[[], None]]:
    """After `ids` is prefilled, a function that feeds `rows` more tokens in one pass with every fed
    row's logits (what a speculative verifier pays) and truncates the cache back, so that it can be
    timed again and again; the cache is freed on leaving."""
    cache = runtime.new_cache(1, len(ids) + rows)
    n = len(ids)

    def one() -> None:
        runtime.forward(torch.tensor([ids[:rows]]), torch.arange(n, n + rows)[None], cache, num_logits=rows)
        cache.truncate(n)

    try:
        runtime.forward(torch.tensor([ids]), torch.arange(n)[None], cache, num_logits=0)
        yield one
    finally:
        cache.free()
