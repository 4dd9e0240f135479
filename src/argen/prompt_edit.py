"""An edit of a previous prompt (insert, delete or replace a span): what the Python API, the CLI and the
server take; the Engine then reuses the previous prompt's cached keys after the edit (PIE,
cache/pie.py) rather than computing them again."""

from __future__ import annotations

from dataclasses import dataclass

from argen.errors import InvalidRequestError


@dataclass(frozen=True)
class PromptEdit:
    """Characters [start, end) of a text prompt replaced by `text` (or, for a prompt of token ids, ids
    [start, end) replaced by `tokens`): start == end inserts, an empty replacement deletes."""

    start: int
    end: int
    text: str = ""
    tokens: tuple[int, ...] | None = None

    @classmethod
    def of(cls, spec) -> PromptEdit:
        """A PromptEdit from itself or a dict {"start", "end", "text" or "tokens"}."""
        if isinstance(spec, PromptEdit):
            return spec
        if (
            not isinstance(spec, dict)
            or not {"start", "end"} <= set(spec)
            or set(spec) - {"start", "end", "text", "tokens"}
        ):
            raise InvalidRequestError(
                'an edit is a PromptEdit or {"start": int, "end": int, "text": str} (or "tokens")'
            )
        tokens = spec.get("tokens")
        return cls(spec["start"], spec["end"], spec.get("text", ""), None if tokens is None else tuple(tokens))

    @classmethod
    def parse(cls, spec: str) -> PromptEdit:
        """`START:END=TEXT` (the command line's form): characters START..END-1 replaced by TEXT."""
        span, sep, text = spec.partition("=")
        start, colon, end = span.partition(":")
        if not sep or not colon or not start.strip().isdigit() or not end.strip().isdigit():
            raise InvalidRequestError(
                f"an edit is START:END=TEXT (characters START..END-1 replaced by TEXT; 5:5=x inserts, "
                f"5:9= deletes); got {spec!r}"
            )
        return cls(int(start), int(end), text)

    def apply(self, previous):
        """The edited prompt: a string for a string, token ids for token ids."""
        for name, value in (("start", self.start), ("end", self.end)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidRequestError(f"edit {name} must be an integer; got {value!r}")
        if isinstance(previous, str):
            if self.tokens is not None:
                raise InvalidRequestError("a text prompt's edit replaces characters: give text, not tokens")
            if not isinstance(self.text, str):
                raise InvalidRequestError("edit text must be a string")
            self._check_span(len(previous), "characters")
            return previous[: self.start] + self.text + previous[self.end :]
        if isinstance(previous, list) and previous and all(isinstance(t, int) for t in previous):
            if self.text:
                raise InvalidRequestError("a token-id prompt's edit replaces tokens: give tokens, not text")
            self._check_span(len(previous), "tokens")
            return previous[: self.start] + list(self.tokens or ()) + previous[self.end :]
        raise InvalidRequestError("an edit applies to a text prompt or a prompt of token ids (not chat messages)")

    def _check_span(self, length: int, unit: str) -> None:
        if not 0 <= self.start <= self.end <= length:
            raise InvalidRequestError(
                f"edit span {self.start}:{self.end} is outside the previous prompt ({length} {unit}); "
                "0 <= start <= end <= its length"
            )
