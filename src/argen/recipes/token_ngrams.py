"""A token n-gram model of the text on this machine, for superposed decoding's n-gram interpolation.

Superposed decoding (strategies/superposed.py) scores each of its drafts' candidate tokens with the
model's distribution interpolated with an n-gram model's, which tells the drafts apart (they share
one superposed pass, so the model's distribution is the same for all of them). The paper builds its
n-gram models from a large corpus; here the corpus is the English prose `recipes/local_text.py`
finds on this machine (standard-library docstrings, package READMEs, man pages), tokenized with the
served model's tokenizer, at most MAX_CORPUS_TOKENS tokens: deterministic for a machine and a
tokenizer, and bounded in size.

The counts are kept as sorted numpy arrays (one per order, an n-gram packed into one uint64 key),
not dicts of tuples: a million tokens make millions of n-grams, which as Python tuples would take
hundreds of MB. They are cached under `cache_dir()/ngrams/`, keyed by the tokenizer's vocabulary and
the settings, built on first use (a few minutes: reading the corpus) or by `build_local_ngrams`.

The probability is the maximum-likelihood estimate at the longest context seen in the corpus
(backing off one token at a time, down to the unigram): c(context, token) / c(context, ·).
"""

from __future__ import annotations

import hashlib
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_ORDER = 4  # the longest n-gram counted (a request's ngram_order is at most this)
MAX_CORPUS_TOKENS = 1_000_000  # bounds the tables (and the cache file) whatever the machine holds
VERSION = 1  # bump when the tables' layout or the corpus selection changes


@dataclass
class TokenNGrams:
    """Counts of token n-grams of orders 1..order. `grams[n]`: sorted packed keys of the n-grams seen,
    `counts[n]` their counts; `contexts[n]`/`totals[n]`: the (n-1)-token contexts that were followed by
    something, and how often (n = 1: the empty context, the corpus size)."""

    order: int
    bits: int  # bits per token in a packed key
    grams: dict[int, np.ndarray]
    counts: dict[int, np.ndarray]
    contexts: dict[int, np.ndarray]
    totals: dict[int, np.ndarray]

    @classmethod
    def count(cls, sequences: list[list[int]], order: int, vocab_size: int) -> TokenNGrams:
        """The tables of `sequences` (n-grams never cross from one sequence into the next)."""
        bits = max(1, int(vocab_size - 1).bit_length())
        if order < 1 or order * bits > 64:
            raise ValueError(f"an n-gram of order {order} over {vocab_size} tokens does not fit a 64-bit key")
        grams, counts, contexts, totals = {}, {}, {}, {}
        for n in range(1, order + 1):
            keys, ctx_keys = [], []
            for seq in sequences:
                if len(seq) < n:
                    continue
                ids = np.asarray(seq, dtype=np.uint64)
                windows = np.lib.stride_tricks.sliding_window_view(ids, n)
                keys.append(_pack(windows, bits))
                ctx_keys.append(_pack(windows[:, : n - 1], bits))
            all_keys = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
            all_ctx = np.concatenate(ctx_keys) if ctx_keys else np.zeros(0, np.uint64)
            grams[n], counts[n] = np.unique(all_keys, return_counts=True)
            contexts[n], totals[n] = np.unique(all_ctx, return_counts=True)
        return cls(order, bits, grams, counts, contexts, totals)

    def prob(self, context: list[int], token: int, order: int | None = None) -> float:
        """P(token | the last order - 1 tokens of context): the maximum-likelihood estimate at the
        longest context the corpus has seen, backing off to shorter ones (0.0 if the token never
        followed that context; the unigram's if no context was seen)."""
        order = self.order if order is None else min(order, self.order)
        for n in range(min(order, len(context) + 1), 0, -1):
            ctx = context[len(context) - (n - 1) :] if n > 1 else []
            total = _lookup(self.contexts[n], self.totals[n], _pack_one(ctx, self.bits))
            if total:
                return _lookup(self.grams[n], self.counts[n], _pack_one([*ctx, token], self.bits)) / total
        return 0.0

    def save(self, path: Path) -> None:
        names = ("grams", "counts", "contexts", "totals")
        arrays = {f"{name}{n}": getattr(self, name)[n] for name in names for n in self.grams}
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, order=np.int64(self.order), bits=np.int64(self.bits), **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> TokenNGrams:
        with np.load(path, allow_pickle=False) as data:  # numbers only: a cache file runs no code
            order, bits = int(data["order"]), int(data["bits"])
            tables = {
                name: {n: data[f"{name}{n}"] for n in range(1, order + 1)}
                for name in ("grams", "counts", "contexts", "totals")
            }
        return cls(order, bits, **tables)


def _pack(windows: np.ndarray, bits: int) -> np.ndarray:
    """Keys of rows of token ids [M, n] (n = 0: the empty context, key 0)."""
    key = np.zeros(windows.shape[0], dtype=np.uint64)
    for j in range(windows.shape[1]):
        key = (key << np.uint64(bits)) | windows[:, j].astype(np.uint64)
    return key


def _pack_one(ids: list[int], bits: int) -> np.uint64:
    key = 0
    for t in ids:
        key = (key << bits) | int(t)
    return np.uint64(key)


def _lookup(keys: np.ndarray, values: np.ndarray, key: np.uint64) -> int:
    i = int(np.searchsorted(keys, key))
    return int(values[i]) if i < len(keys) and keys[i] == key else 0


_BUILDING = threading.Lock()
_LOADED: dict[str, TokenNGrams] = {}
_BY_TOKENIZER: dict[int, tuple[object, TokenNGrams]] = {}  # the tokenizer held, so its id is not reused


def ngram_path(tokenizer, vocab_size: int) -> Path:
    """Where the tables for this tokenizer live in the cache (keyed by its vocabulary)."""
    from argen.models.sources import cache_dir  # the cache's root; models/ is not needed otherwise

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    key = hashlib.sha256(repr((VERSION, MAX_ORDER, MAX_CORPUS_TOKENS, vocab_size, vocab)).encode()).hexdigest()[:16]
    return cache_dir() / "ngrams" / f"local-{key}.npz"


def local_ngrams(tokenizer, vocab_size: int, build: bool = True) -> TokenNGrams | None:
    """The n-gram tables of this machine's text for `tokenizer`: from memory, the cache, or built now
    (and cached; None instead when `build` is False and they are not cached). Order MAX_ORDER, or less
    where a 64-bit key holds fewer tokens of this vocabulary. One build at a time (the lock): threads
    asking together wait for it, and `ast.parse` (the corpus reads Python sources) is not safe to run
    in several threads at once on CPython 3.11."""
    with _BUILDING:
        return _local_ngrams(tokenizer, vocab_size, build)


def _local_ngrams(tokenizer, vocab_size: int, build: bool) -> TokenNGrams | None:
    known = _BY_TOKENIZER.get(id(tokenizer))
    if known is not None and known[0] is tokenizer:  # hashing a vocabulary costs more than a decode step
        return known[1]
    path = ngram_path(tokenizer, vocab_size)
    if str(path) in _LOADED:
        _BY_TOKENIZER[id(tokenizer)] = (tokenizer, _LOADED[str(path)])
        return _LOADED[str(path)]
    if path.exists():
        tables = TokenNGrams.load(path)
    elif not build:
        return None
    else:
        tables = build_local_ngrams(tokenizer, vocab_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tables.save(path)
    _LOADED[str(path)] = tables
    _BY_TOKENIZER[id(tokenizer)] = (tokenizer, tables)
    return tables


def build_local_ngrams(tokenizer, vocab_size: int) -> TokenNGrams:
    """Count the n-grams of the local prose corpus (local_text.py), at most MAX_CORPUS_TOKENS tokens."""
    from argen.recipes.local_text import local_corpus  # reads the disk for minutes: only when building

    print("argen: building the n-gram tables of this machine's text (once; cached)...", file=sys.stderr)
    sequences, total = [], 0
    for passage in local_corpus().prose:
        ids = list(tokenizer(passage, add_special_tokens=False)["input_ids"])[: MAX_CORPUS_TOKENS - total]
        sequences.append(ids)
        total += len(ids)
        if total >= MAX_CORPUS_TOKENS:
            break
    bits = max(1, int(vocab_size - 1).bit_length())
    return TokenNGrams.count(sequences, min(MAX_ORDER, 64 // bits), vocab_size)
