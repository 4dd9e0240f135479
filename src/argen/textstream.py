"""Incremental detokenization with stop strings: turns growing token lists into text deltas.

Text is re-decoded from the whole output each time (cheap at these lengths, and the only way to be
right for byte-level BPE, where one character can span tokens). A delta is held back while it ends
in an incomplete character or in what could be the start of a stop string.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.emitted = 0  # characters of text already handed out
        self.text = ""
        self.stopped_at: int | None = None  # tokens kept once a stop string matched

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, output_ids: list[int]) -> str:
        """Update with the whole output so far; return the new text that is safe to show."""
        full = self._decode(output_ids)
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
                if full[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return self._take(safe)

    def flush(self) -> str:
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        delta = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return delta

    def _tokens_to_reach(self, ids: list[int], stop: str) -> int:
        for n in range(1, len(ids) + 1):
            if stop in self._decode(ids[:n]):
                return n
        return len(ids)
