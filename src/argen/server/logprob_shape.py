"""Log-prob records (argen/logprobs.py) in OpenAI's shapes: the legacy completions object (tokens,
token_logprobs, top_logprobs, text_offset) and chat's `content` list (token, logprob, bytes,
top_logprobs). JSON has no -infinity, so a token the sampling processors filtered out gets -9999."""

from __future__ import annotations

from argen.logprobs import TokenLogprob
from argen.server import protocol as p

NEG_FLOOR = -9999.0


def _finite(value: float) -> float:
    return value if value > NEG_FLOOR else NEG_FLOOR  # also NaN, which fails every comparison


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others for 256 + n."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in kept]
    return {b: chr(b) for b in kept} | {b: chr(256 + i) for i, b in enumerate(extra)}


class Tokens:
    """A tokenizer's view of single tokens: their text and bytes, and where they start in a text."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._byte_of = None  # byte-level BPE: the character that stands for each byte, inverted
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and type(backend.decoder).__name__ == "ByteLevel":
            self._byte_of = {ch: b for b, ch in _bytes_to_unicode().items()}
        self._text: dict[int, str] = {}

    def text(self, token: int) -> str:
        """The token's text; a token that is part of a character is "bytes:\\xe2\\x80", as OpenAI's."""
        if token not in self._text:
            text = self.tokenizer.decode([token])
            raw = self._raw(token)
            if "\ufffd" in text and raw is not None and b"\xef\xbf\xbd" not in bytes(raw):
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self._text[token] = text
        return self._text[token]

    def _raw(self, token: int) -> list[int] | None:
        if self._byte_of is None:
            return None
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if piece is None or not all(ch in self._byte_of for ch in piece):
            return None
        return [self._byte_of[ch] for ch in piece]

    def bytes(self, token: int) -> list[int]:
        """The token's own bytes (a byte-level token may be part of a character), else its text's UTF-8."""
        raw = self._raw(token)
        return raw if raw is not None else list(self.tokenizer.decode([token]).encode("utf-8"))

    def offsets(self, base: int = 0) -> Offsets:
        return Offsets(self.tokenizer, base)


class Offsets:
    """Character offsets of successive tokens in their decoded text (special tokens skipped, as the
    returned text is): incremental with `tokenizers`' DecodeStream, one step a token."""

    def __init__(self, tokenizer, base: int = 0) -> None:
        from tokenizers.decoders import DecodeStream
        from transformers import PreTrainedTokenizerFast

        self.tokenizer, self.at = tokenizer, base
        fast = isinstance(tokenizer, PreTrainedTokenizerFast)
        # A fast tokenizer's incremental decoder and its backend (None: a slow tokenizer).
        self._stream = (DecodeStream(skip_special_tokens=True), tokenizer.backend_tokenizer) if fast else None

    def take(self, tokens: list[int]) -> list[int]:
        out = []
        for token in tokens:
            out.append(self.at)
            if self._stream is not None:
                stream, backend = self._stream
                self.at += len(stream.step(backend, token) or "")
            else:  # a slow tokenizer: each token's own text
                self.at += len(self.tokenizer.decode([token], skip_special_tokens=True))
        return out


def completion_logprobs(
    tokens: Tokens, ids: list[int], records: list[TokenLogprob | None], offsets: Offsets
) -> p.CompletionLogprobs:
    """The legacy object for `ids` (a record None: null, as the prompt's first token). top_logprobs
    holds the k alternatives and the chosen token, as OpenAI's does."""
    tops: list[dict[str, float] | None] = []
    for token, record in zip(ids, records, strict=True):
        if record is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for t, value in [*record.top, (token, record.logprob)]:
            top.setdefault(tokens.text(t), _finite(value))  # two ids with one text: the likelier stays
        tops.append(top)
    return p.CompletionLogprobs(
        tokens=[tokens.text(t) for t in ids],
        token_logprobs=[None if r is None else _finite(r.logprob) for r in records],
        top_logprobs=tops,
        text_offset=offsets.take(ids),
    )


def chat_logprobs(tokens: Tokens, records: list[TokenLogprob | None]) -> p.ChatLogprobs:
    def entry(token: int, value: float) -> dict:
        return {"token": tokens.text(token), "logprob": _finite(value), "bytes": tokens.bytes(token)}

    content = [
        p.TokenLogprob(**entry(r.token, r.logprob), top_logprobs=[p.TopLogprob(**entry(t, v)) for t, v in r.top])
        for r in records
        if r is not None
    ]
    return p.ChatLogprobs(content=content)


def prompt_logprob_entry(tokens: Tokens, record: TokenLogprob, k: int) -> dict[str, p.PromptLogprob]:
    """vLLM's entry for one prompt token: {token id: {logprob, rank, decoded_token}}, the prompt's own
    token first, then its k likeliest alternatives (ranks 1..k)."""
    entry = {
        str(record.token): p.PromptLogprob(
            logprob=_finite(record.logprob), rank=record.rank, decoded_token=tokens.text(record.token)
        )
    }
    for rank, (token, value) in enumerate(record.top[:k], start=1):
        entry.setdefault(
            str(token), p.PromptLogprob(logprob=_finite(value), rank=rank, decoded_token=tokens.text(token))
        )
    return entry
