"""`caad`: context-aware adaptive decoding, grounded in a store built from reference texts.

Each step runs the model on the pending token as plain decoding does, then looks up the `top_n`
store entries whose context embedding (final hidden state) is nearest the current one, weighs them
by softmax(cosine similarity / `temperature`) and blends their next-token distribution into the
model's, in probability space:

    p = (1 - blend) * p_model + blend * p_retrieved

The probability form, not a sum of logits: the stored distributions are sparse (top-k, or one
token), whose missing tokens have no finite logit; a mixture of probabilities is a distribution for
any blend in [0, 1], equals the model at 0 and the store at 1. The sampler then reads log p as the
logits (so temperature, top-p, greedy apply as usual). Lossy.

The store (recipes/caad_store.py, `argen caad-store`) is resolved above the strategy like a
companion model: the Python API takes a path (or a loaded store), a server only the names of the
stores its operator loaded (`argen serve --caad-store NAME=PATH`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from argen.errors import InvalidRequestError
from argen.recipes.caad_store import GroundingStore
from argen.strategies.base import DecodeState, Step, Strategy, run

MAX_TOP_N = 64


class CAAD(Strategy):
    name = "caad"
    exact = False
    companion_options = {"store": "store"}

    def __init__(self, store: object = None, top_n: int = 8, blend: float = 0.3, temperature: float = 0.1) -> None:
        if not (store is None or isinstance(store, str | Path | GroundingStore)):
            raise ValueError(f"store must be a CAAD store file or a loaded store; got {type(store).__name__}")
        if not isinstance(top_n, int) or isinstance(top_n, bool) or not 1 <= top_n <= MAX_TOP_N:
            raise ValueError(f"top_n must be an integer between 1 and {MAX_TOP_N}")
        if not 0.0 <= blend <= 1.0:
            raise ValueError("blend must be between 0 and 1")
        if not 1e-3 <= temperature <= 100.0:
            raise ValueError("temperature must be between 0.001 and 100")
        self.store = store
        self.top_n = top_n
        self.blend = float(blend)
        self.temperature = float(temperature)
        self._store: GroundingStore | None = store if isinstance(store, GroundingStore) else None

    def prepare(self, base, companions: dict | None = None) -> None:
        found = (companions or {}).get("store")
        if isinstance(found, GroundingStore):
            self._store = found

    def check(self, runtime, prompt_len: int, params) -> None:
        if self._store is None:
            raise InvalidRequestError(
                "strategy 'caad' needs a grounding store: build one with `argen caad-store --input refs.jsonl "
                "--out STORE` and pass store=STORE (over HTTP: the name of a store the server loaded)"
            )

    def blended(self, logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The next-token logits after blending the retrieved distribution (log probabilities)."""
        if self._store is None:
            return logits
        scores, idx = self._store.search(hidden, self.top_n)
        retrieved = self._store.distribution(scores, idx, self.temperature, logits.shape[-1]).to(logits.device)
        p = (1.0 - self.blend) * torch.softmax(logits.float(), dim=-1) + self.blend * retrieved
        return torch.log(p)

    def step(self, state: DecodeState) -> Step:
        out = yield from run(state.feed([state.tokens[-1]], num_logits=1))
        logits = self.blended(out.requested_logits()[-1], out.hidden[-1])
        return [state.sample(logits, state.n_generated)]

    def options(self) -> dict:
        return {"store": str(self.store) if self.store is not None else None} | {
            k: v for k, v in vars(self).items() if not k.startswith("_") and k != "store"
        }
