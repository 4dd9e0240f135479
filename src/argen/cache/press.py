"""KV-cache presses: compress what a sequence's paged cache holds to a budget, a fraction of the
positions the sequence has seen (0.5 keeps half), after the prefill (after each prefill chunk) and
as decoding grows the cache.

How a press runs (engine/sequence.py `Sequence.press`): between a strategy's steps, never inside
one, so the pending-token convention holds throughout (the cache holds every kept token but the
pending last one), and a verifier's `move_slots` / `truncate` work on the pressed cache as on any
other. A press is *due* when the cache uses more blocks than its target needs; it then rewrites the
cache to exactly `target(n)` positions (`SeqKV.rewrite`: the blocks past them go back to the pool).
The removed count joins `DecodeState.position_shift` (later tokens keep their true RoPE positions:
token i sits at i + shift, and the kept keys keep the rotation they were written with) and
`DecodeState.kv_evicted` (so `n`, the positions the sequence has seen, stays known).

Every layer and head shares one block table, so a press leaves the same number of slots in all
of them (`StreamingLLM` and `KVMerger` the same positions; `H2O` and `SnapKV` each head's own:
press_attention.py). `PrefixKV` gives each layer a count of its own, in a front laid out by layer
(cache/layer_front.py). The quantizing presses (`KVQuant`, `GEAR`: press_quant.py) keep every
position instead, and move the oldest whole groups of them into a low-bit store (cache/quant.py).
The interface is in press_base.py; here the presses are registered by name for the API, the CLI
and the server.
"""

from __future__ import annotations

import inspect

import torch

from argen.cache.press_attention import H2O, PrefixKV, QueryWindow, SnapKV, allot
from argen.cache.press_base import PRESS_CHUNK, Press, _count, read
from argen.cache.press_quant import GEAR, KVQuant
from argen.errors import InvalidRequestError

__all__ = [
    "GEAR",
    "H2O",
    "PRESSES",
    "PRESS_CHUNK",
    "KVMerger",
    "KVQuant",
    "Press",
    "PrefixKV",
    "QueryWindow",
    "SnapKV",
    "StreamingLLM",
    "allot",
    "make_press",
    "press_options",
]


class StreamingLLM(Press):
    """Attention sinks + a recent window (Xiao et al. 2023, "Efficient Streaming Language Models with
    Attention Sinks"): keep the first `sinks` positions and the most recent ones, evict the middle."""

    name = "streaming-llm"
    paper = "Xiao et al. 2023, arXiv:2309.17453"

    def __init__(self, budget: float = 0.5, sinks: int = 4, chunk: int = PRESS_CHUNK) -> None:
        super().__init__(budget, chunk)
        self.sinks = _count("sinks", sinks)

    def plan(self, cache, target: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        length = cache.lengths[0]
        sinks = min(self.sinks, target - 1)  # at least the newest position stays
        recent = list(range(length - (target - sinks), length))
        k, v = read(cache, recent)
        return sinks, k, v


class KVMerger(Press):
    """Merges runs of consecutive positions whose keys are alike (Wang et al. 2024, "Model Tells You
    Where to Merge: Adaptive KV Cache Merging for LLMs on Long-Context Tasks"). The similarity of
    neighbours i, i+1 is the cosine of their keys, averaged over layers and heads (one block table
    for all of them: a merge must be the same everywhere). To reach the budget, the most similar
    `length - target` neighbour pairs are joined (the paper's threshold, set where the budget
    falls), outside the first `sinks` and the last `recent` positions; each run of joined pairs is a
    merging set. A set becomes one position: keys and values averaged with Gaussian-kernel weights
    exp(-|k_i - k_p|^2 / 2 sigma^2) around its pivot p, per layer and head, sigma^2 being the set's
    mean squared distance to the pivot. The paper's pivot is the set's most-attended token; argen's
    runtime does not return attention weights, so the pivot here is the member whose key is closest
    by cosine to the set's mean key."""

    name = "kvmerger"
    paper = "Wang et al. 2024, arXiv:2407.08454"

    def __init__(self, budget: float = 0.5, sinks: int = 4, recent: int = 16, chunk: int = PRESS_CHUNK) -> None:
        super().__init__(budget, chunk)
        self.sinks = _count("sinks", sinks)
        self.recent = _count("recent", recent)

    def plan(self, cache, target: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        length = cache.lengths[0]
        sinks = min(self.sinks, target - 1)
        recent = min(self.recent, target - 1 - sinks)
        zone = list(range(sinks, length - recent))  # merged into target - sinks - recent positions
        k, v = read(cache, zone)
        unit = torch.nn.functional.normalize(k, dim=-1)
        similarity = (unit[:, :, 1:] * unit[:, :, :-1]).sum(-1).mean((0, 1))  # [len(zone) - 1]
        joined = torch.zeros(len(zone) - 1, dtype=torch.bool)
        joined[similarity.topk(length - target).indices] = True
        # Merging sets: a new set starts wherever a neighbour pair is not joined.
        set_of = torch.cat([torch.zeros(1, dtype=torch.long), (~joined).long().cumsum(0)])  # [Z]
        n_sets = int(set_of[-1]) + 1
        first = int(joined.long().argmax())  # zone index of the first set with more than one member
        merged_k, merged_v = _merge(k, v, unit, set_of, n_sets)
        tail = list(range(length - recent, length))
        tk, tv = read(cache, tail) if tail else (k[:, :, :0], v[:, :, :0])
        # Sets before `first` are single positions, unchanged: the rewrite starts at the first merged one.
        return (sinks + first, torch.cat([merged_k[:, :, first:], tk], 2), torch.cat([merged_v[:, :, first:], tv], 2))


def _merge(
    k: torch.Tensor, v: torch.Tensor, unit: torch.Tensor, set_of: torch.Tensor, n_sets: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each set's keys and values [L, H, n_sets, D], Gaussian-kernel weighted around its pivot: the
    member whose key is closest by cosine to the set's mean key (averaged over layers and heads; the
    first such member on a tie). A set of one keeps its key and value exactly."""
    dtype, device = k.dtype, k.device
    k, v, unit, set_of = k.float(), v.float(), unit.float(), set_of.to(device)
    L, H, Z, D = k.shape

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, device=device)

    centroid = zeros(L, H, n_sets, D).index_add_(2, set_of, unit)
    closeness = (unit * centroid[:, :, set_of]).sum(-1).mean((0, 1))  # [Z]
    best = torch.full((n_sets,), -torch.inf, device=device).scatter_reduce(0, set_of, closeness, "amax")
    candidates = torch.where(closeness >= best[set_of], torch.arange(Z, device=device), Z)
    pivot = torch.full((n_sets,), Z, device=device).scatter_reduce(0, set_of, candidates, "amin")  # [n_sets]
    dist = (k - k[:, :, pivot[set_of]]).pow(2).sum(-1)  # [L, H, Z]
    count = zeros(n_sets).index_add_(0, set_of, torch.ones(Z, device=device))
    sigma2 = (zeros(L, H, n_sets).index_add_(2, set_of, dist) / count).clamp_min(1e-12)
    weight = torch.exp(-dist / (2 * sigma2[:, :, set_of]))
    weight = (weight / zeros(L, H, n_sets).index_add_(2, set_of, weight)[:, :, set_of]).unsqueeze(-1)
    merged_k = zeros(L, H, n_sets, D).index_add_(2, set_of, weight * k)
    merged_v = zeros(L, H, n_sets, D).index_add_(2, set_of, weight * v)
    return merged_k.to(dtype), merged_v.to(dtype)


PRESSES: dict[str, type[Press]] = {
    cls.name: cls for cls in (StreamingLLM, KVMerger, H2O, SnapKV, PrefixKV, KVQuant, GEAR)
}


def press_options(cls: type[Press]) -> dict[str, object]:
    params = inspect.signature(cls.__init__).parameters
    return {n: p.default for n, p in params.items() if n != "self"}


def make_press(spec) -> Press | None:
    """A press from None (no press), a name (`"streaming-llm"`), a dict (`{"name": "kvmerger",
    "budget": 0.35}`) or a Press (returned as is)."""
    if spec is None or isinstance(spec, Press):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise InvalidRequestError(f"a press is a name, a dict with 'name' and its options, or a Press; got {spec!r}")
    name = spec["name"]
    if name not in PRESSES:
        raise InvalidRequestError(f"unknown press {name!r}; valid presses: {', '.join(sorted(PRESSES))}")
    cls = PRESSES[name]
    options = {k: v for k, v in spec.items() if k != "name"}
    valid = press_options(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listed = ", ".join(f"{k} (default {v!r})" for k, v in valid.items())
        raise InvalidRequestError(f"unknown option(s) {', '.join(unknown)} for press {name!r}; valid: {listed}")
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"bad option for press {name!r}: {exc}") from exc
