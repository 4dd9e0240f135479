"""Incremental detokenization with stop strings: turns growing token lists into text deltas.

Tokens are decoded as they arrive with `tokenizers`' `DecodeStream`, which keeps the little context
a byte-level BPE needs (one character can span tokens) and returns nothing until a character is
whole, so each token costs the same however long the output is. A tokenizer without a `tokenizers`
backend (a slow, pure-Python one) falls back to re-decoding the whole output each time. A delta is
held back while it could be the start of a stop string. Special tokens are left out of the text
unless `skip_special_tokens` is False; `include_stop` keeps the stop string that ended the text.
"""

from __future__ import annotations


def _decode_stream(tokenizer, skip_special_tokens: bool = True):
    """A DecodeStream over the tokenizer's `tokenizers` backend, or (None, None) for a slow one."""
    from tokenizers.decoders import DecodeStream
    from transformers import PreTrainedTokenizerFast

    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        return None, None
    return DecodeStream(skip_special_tokens=skip_special_tokens), tokenizer.backend_tokenizer


class TextStream:
    def __init__(
        self, tokenizer, stop: list[str], *, skip_special_tokens: bool = True, include_stop: bool = False
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip_special_tokens, self.include_stop = skip_special_tokens, include_stop
        self.emitted = 0  # characters of text already handed out
        self.text = ""
        self.stopped_at: int | None = None  # tokens kept once a stop string matched
        self._stream, self._backend = _decode_stream(tokenizer, skip_special_tokens)
        self._fed = 0  # output tokens the stream has decoded
        self._ids: list[int] = []
        self._search_from: int | None = None  # where stop strings are looked for from (None: not yet)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _full_text(self, output_ids: list[int]) -> str:
        if self._stream is None:
            return self._decode(output_ids)
        text = self.text
        for token in output_ids[self._fed :]:
            text += self._stream.step(self._backend, token) or ""
        self._fed = len(output_ids)
        return text

    def push(self, output_ids: list[int], stops: bool = True) -> str:
        """Update with the whole output so far; return the new text that is safe to show. `stops`
        False: stop strings are not looked for yet (min_tokens), and later only in text not shown
        before, so a streamed text never takes back what it showed."""
        self._ids = output_ids
        full = self._full_text(output_ids)
        if not stops or not self.stop:
            self.text = full
            return self._take(self._whole(full, len(full)))
        if self._search_from is None:
            self._search_from = self.emitted
        start = max(self._search_from, self.emitted)
        hits = [(full.find(s, max(start - len(s), self._search_from)), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            cut, stop = min(hits)
            self.text = full[: cut + len(stop) if self.include_stop else cut]
            self.stopped_at = self._tokens_to_reach(output_ids, stop, cut)
            return self._take(len(self.text))
        self.text = full
        safe = self._whole(full, len(full))
        for s in self.stop:  # hold back the longest tail that could start a stop string
            tail = safe
            at = full.find(s[0], max(self.emitted, safe - len(s) + 1), safe)
            while at >= 0:
                if s.startswith(full[at:safe]):
                    tail = at
                    break
                at = full.find(s[0], at + 1, safe)
            safe = min(safe, tail)
        return self._take(safe)

    def _whole(self, full: str, end: int) -> int:
        """`end`, less a trailing incomplete character (shown once the next token completes it)."""
        while end > self.emitted and full[end - 1] == "\ufffd":
            end -= 1
        return end

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

    def _tokens_to_reach(self, ids: list[int], stop: str, at: int) -> int:
        """The fewest leading tokens whose text holds `stop` at or after character `at` (text only
        grows with tokens, so a binary search: once per request, a few decodes whatever the length)."""
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._decode(ids[:mid]).find(stop, at) >= 0:
                hi = mid
            else:
                lo = mid + 1
        return lo
