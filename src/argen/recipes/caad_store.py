"""CAAD's grounding store: (context embedding, next-token distribution) pairs from reference texts.

`build_store` runs the model over each reference text once and keeps, for every position i, the
final hidden state at i (normalised: the context embedding, compared by cosine similarity) and a
sparse next-token distribution:

- `values="logits"` (the issue's form): the model's own next-token distribution at i, cut to its
  top `top_k` tokens and renormalised (a dense [V] row per position would be 200 KB for a 49k
  vocabulary; the top 32 hold nearly all the mass of a confident context);
- `values="tokens"` (kNN-LM's form): the token the reference text actually has at i + 1, with
  probability 1: what grounds the output in the reference rather than in the model's own guess.

The store is saved as safetensors with the model's fingerprint, and a store for other weights is
refused when loaded. `search` finds the `n` nearest contexts: exact (one matmul over the normalised
embeddings) below `INDEX_THRESHOLD` entries, and through a faiss HNSW index beyond it (built once
per loaded store; faiss is the `caad` extra, a well-kept library rather than a hand-written graph).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from argen.errors import ArgenError
from argen.strategies.speculative.skip_calibration import fingerprint

INDEX_THRESHOLD = 4096  # below this many entries exact search is as fast as any index
MAX_TEXTS = 10_000  # bounded input: texts read from the JSONL
MAX_TOKENS_PER_TEXT = 1024  # each text is cut to this many tokens
MAX_ENTRIES = 2_000_000
VALUE_FORMS = ("logits", "tokens")
HNSW_M = 32  # graph degree: faiss' usual default for recall ~0.99 at this size
HNSW_EF_SEARCH = 128


@dataclass
class GroundingStore:
    keys: torch.Tensor  # [N, H] float32, unit norm
    ids: torch.Tensor  # [N, K] int64: the tokens of each entry's next-token distribution
    probs: torch.Tensor  # [N, K] float32: their probabilities (each row sums to 1; padding has 0)
    model_fingerprint: str
    values: str = "logits"
    _index: object = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.keys.shape[0]

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"fingerprint": self.model_fingerprint, "values": self.values, "format": "argen-caad-store-1"}
        save_file({"keys": self.keys, "ids": self.ids, "probs": self.probs}, str(path), metadata=meta)
        return path

    def search_exact(self, query: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cosine similarities [n], entry indices [n]) of the `n` nearest entries, by brute force."""
        q = torch.nn.functional.normalize(query.float().reshape(1, -1), dim=-1)
        scores, idx = torch.topk((q @ self.keys.T)[0], min(n, len(self)))
        return scores, idx

    def search(self, query: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The `n` nearest entries: exact below INDEX_THRESHOLD entries, the HNSW index beyond."""
        if len(self) < INDEX_THRESHOLD:
            return self.search_exact(query, n)
        return self.search_index(query, n)

    def search_index(self, query: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.index()
        q = torch.nn.functional.normalize(query.float().reshape(1, -1), dim=-1).numpy()
        scores, idx = index.search(q, min(n, len(self)))  # type: ignore[attr-defined]
        keep = idx[0] >= 0  # faiss pads with -1 when the graph yields fewer
        return torch.from_numpy(scores[0][keep]).float(), torch.from_numpy(idx[0][keep]).long()

    def index(self) -> object:
        """The faiss HNSW index over the keys (inner product = cosine on unit vectors), built once."""
        if self._index is None:
            try:
                import faiss  # optional dependency (the caad extra), imported only for a large store
            except ImportError as exc:
                raise ArgenError(
                    f"a CAAD store of {len(self)} entries is searched with faiss: pip install 'argen[caad]'"
                ) from exc
            index = faiss.IndexHNSWFlat(self.keys.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = HNSW_EF_SEARCH
            index.add(self.keys.numpy())
            self._index = index
        return self._index

    def distribution(self, scores: torch.Tensor, idx: torch.Tensor, temperature: float, vocab: int) -> torch.Tensor:
        """The retrieved next-token distribution [vocab]: the entries' sparse distributions weighted by
        softmax(similarity / temperature)."""
        weights = torch.softmax(scores / temperature, dim=0)
        dist = torch.zeros(vocab)
        dist.index_add_(0, self.ids[idx].reshape(-1), (weights[:, None] * self.probs[idx]).reshape(-1))
        return dist


@dataclass
class LoadedStores:
    """The stores loaded for a runtime (its memo's record): file -> store, so every request shares one
    copy (and one index)."""

    by_path: dict[str, GroundingStore] = field(default_factory=dict)


def load_store(runtime, source) -> GroundingStore:
    """A store file (or a loaded store, returned as is), refused unless it was built from `runtime`'s
    weights; loaded once per runtime."""
    if isinstance(source, GroundingStore):
        return source
    if not isinstance(source, str | Path):
        raise ArgenError(f"a CAAD store is a path to a store file; got {type(source).__name__}")
    path = Path(source).expanduser()
    if not path.is_file():
        raise ArgenError(f"CAAD store file {str(path)!r} does not exist; build one with `argen caad-store`")
    try:
        from safetensors import safe_open  # the metadata is read before the tensors

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise ArgenError(f"{str(path)!r} is not a CAAD store (safetensors): {exc}") from exc
    if meta.get("format") != "argen-caad-store-1":
        raise ArgenError(f"{str(path)!r} is not a CAAD store; build one with `argen caad-store`")
    if meta.get("fingerprint") != fingerprint(runtime):
        raise ArgenError(
            f"CAAD store {str(path)!r} was built from other weights (fingerprint {meta.get('fingerprint')}, this "
            f"model's is {fingerprint(runtime)}); build it again with `argen caad-store` for this model"
        )
    loaded = runtime.memo.get(LoadedStores).by_path
    key = str(path.resolve())
    if key not in loaded:
        tensors = load_file(str(path))
        loaded[key] = GroundingStore(
            tensors["keys"], tensors["ids"], tensors["probs"], meta["fingerprint"], meta["values"]
        )
    return loaded[key]


def read_texts(path: Path) -> list[str]:
    """The `text` of each line of a JSONL file (at most MAX_TEXTS)."""
    texts = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ArgenError(f'{path}:{n}: not JSON ({exc.msg}); each line is {{"text": ...}}') from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ArgenError(f"{path}:{n}: each line is an object with a string field 'text'")
            texts.append(record["text"])
            if len(texts) > MAX_TEXTS:
                raise ArgenError(f"{path}: more than {MAX_TEXTS} texts; split the file")
    if not texts:
        raise ArgenError(f"{path}: no texts")
    return texts


@torch.inference_mode()
def build_store(
    runtime,
    token_lists: Iterable[list[int]],
    *,
    values: str = "logits",
    top_k: int = 32,
    progress: bool = False,
) -> GroundingStore:
    """The store of every position of every token list (each cut to MAX_TOKENS_PER_TEXT): the final
    hidden state there and the next-token distribution (see the module docstring)."""
    if values not in VALUE_FORMS:
        raise ArgenError(f"values must be one of {', '.join(VALUE_FORMS)}; got {values!r}")
    if not 1 <= top_k <= 1024:
        raise ArgenError("top_k must be between 1 and 1024")
    from tqdm import tqdm  # only a build shows progress

    keys, ids, probs = [], [], []
    lists = list(token_lists)
    for tokens in tqdm(lists, desc="caad store", unit="text", disable=not progress):
        tokens = tokens[:MAX_TOKENS_PER_TEXT]
        if len(tokens) < 2:
            continue
        cache = runtime.new_cache(1, len(tokens))
        try:
            t = torch.tensor([tokens], device=runtime.device)
            logits, hidden = runtime.forward(t, torch.arange(len(tokens), device=runtime.device)[None], cache)
        finally:
            for c in cache if isinstance(cache, list) else [cache]:
                c.free()
        # Position i predicts token i + 1: the last position has no reference continuation, and is kept
        # only for the model's own logits.
        n = len(tokens) - 1
        keys.append(torch.nn.functional.normalize(hidden[0, :n].float().cpu(), dim=-1))
        if values == "logits":
            p, i = torch.topk(torch.softmax(logits[0, :n].float().cpu(), dim=-1), top_k, dim=-1)
            ids.append(i)
            probs.append(p / p.sum(-1, keepdim=True))
        else:
            ids.append(torch.tensor(tokens[1 : n + 1])[:, None])
            probs.append(torch.ones(n, 1))
        if sum(k.shape[0] for k in keys) > MAX_ENTRIES:
            raise ArgenError(f"the store would hold more than {MAX_ENTRIES} entries; use fewer texts")
    if not keys:
        raise ArgenError("no text has two tokens or more; nothing to store")
    return GroundingStore(
        torch.cat(keys), torch.cat(ids).long(), torch.cat(probs).float(), fingerprint(runtime), values
    )
