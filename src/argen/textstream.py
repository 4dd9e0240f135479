"""Incremental detokenization with stop strings: turns growing token lists into text deltas.

Tokens are decoded as they arrive with `tokenizers`' `DecodeStream`, which keeps the little context
a byte-level BPE needs (one character can span tokens) and returns nothing until a character is
whole, so each token costs the same however long the output is. A tokenizer without a `tokenizers`
backend (a slow, pure-Python one) falls back to re-decoding the whole output each time. A delta is
held back while it could be the start of a stop string.
"""

from __future__ import annotations


def _decode_stream(tokenizer):
    """A DecodeStream over the tokenizer's `tokenizers` backend, or (None, None) for a slow one."""
    from tokenizers.decoders import DecodeStream
    from transformers import PreTrainedTokenizerFast

    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        return None, None
    return DecodeStream(skip_special_tokens=True), tokenizer.backend_tokenizer


class TextStream:
    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.emitted = 0  # characters of text already handed out
        self.text = ""
        self.stopped_at: int | None = None  # tokens kept once a stop string matched
        self._stream, self._backend = _decode_stream(tokenizer)
        self._fed = 0  # output tokens the stream has decoded
        self._ids: list[int] = []

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _full_text(self, output_ids: list[int]) -> str:
        if self._stream is None:
            return self._decode(output_ids)
        text = self.text
        for token in output_ids[self._fed :]:
            text += self._stream.step(self._backend, token) or ""
        self._fed = len(output_ids)
        return text

    def push(self, output_ids: list[int]) -> str:
        """Update with the whole output so far; return the new text that is safe to show."""
        self._ids = output_ids
        full = self._full_text(output_ids)
        hits = [(full.find(s, max(0, self.emitted - len(s))), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            cut, stop = min(hits)
            self.text = full[:cut]
            self.stopped_at = self._tokens_to_reach(output_ids, stop)
            return self._take(len(self.text))
        self.text = full
        safe = len(full)
        while safe > self.emitted and full[safe - 1] == "\ufffd":
            safe -= 1
        for s in self.stop:
            for k in range(min(len(s) - 1, safe - self.emitted), 0, -1):
                if full.endswith(s[:k], 0, safe):
                    safe -= k
                    break
        return self._take(safe)

    def flush(self) -> str:
        """The rest of the text, once the output is final. With a stream, the text becomes the whole
        output's decode (one decode a request), which also shows a character the last token left
        incomplete, as `tokenizer.decode` does."""
        if self._stream is not None and self.stopped_at is None and self._ids:
            self.text = self._decode(self._ids)
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        delta = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return delta

    def _tokens_to_reach(self, ids: list[int], stop: str) -> int:
        """The fewest leading tokens whose text contains `stop` (text only grows with tokens, so a
        binary search: once per request, a few decodes whatever the length)."""
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if stop in self._decode(ids[:mid]):
                hi = mid
            else:
                lo = mid + 1
        return lo
