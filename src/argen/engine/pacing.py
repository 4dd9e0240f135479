"""Pacing long prefills so that they do not stall the other sequences (the server's batches).

A prefill chunk is fixed at its positions (so that a prompt is computed the same way however busy the
batch is: outputs stay batch-invariant), so it cannot be cut to fit a round's time the way
Sarathi-Serve sizes its chunks. What can be chosen is *when* it runs: the pacer lets a long chunk
(more than `free_tokens` tokens) into a round only while the time the other sequences have lost to
long chunks is within (slowdown - 1) times their own time. So while a long prompt is prefilled, the
others (decoding, or prefilling a short prompt, which is never held back) run on average at least
1/slowdown as fast as without it, give or take one chunk; alone, a long prompt runs at full speed.
An 8,191-token prompt took a steady client from 0.2 s to 67 s a request before.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFILL_SLOWDOWN = 1.5  # the server's default
FREE_TOKENS = 64  # chunks up to this many tokens are never held back (short prompts start at once)


@dataclass
class PrefillPacer:
    """Decides, round by round, whether long prefill chunks may run. `debt`: seconds the other
    sequences have lost to long chunks beyond their allowance; `own`: their round's time without a
    long chunk (a moving average)."""

    slowdown: float = PREFILL_SLOWDOWN
    free_tokens: int = FREE_TOKENS
    debt: float = 0.0
    own: float | None = None

    def __post_init__(self) -> None:
        if not self.slowdown > 1 or self.free_tokens < 0:
            raise ValueError("the prefill slowdown must be more than 1 (1.5: others run at 2/3 of their speed)")

    def paced(self, tokens: int) -> bool:
        """Whether a chunk of this many tokens is a long one (subject to pacing)."""
        return tokens > self.free_tokens

    def allows(self) -> bool:
        """Whether a long chunk may run this round, when other sequences share it."""
        return self.debt <= 0

    def record(self, seconds: float, long_chunks: bool, others: bool) -> None:
        """Account for a round that took `seconds`: whether it ran long chunks, whether other
        sequences were in it. Rounds without others are nobody's loss."""
        if not others:
            return
        if long_chunks:
            own = self.own if self.own is not None else 0.0
            # Lost: the round beyond the others' own part and its allowance (no credit for later).
            self.debt = max(0.0, self.debt + seconds - self.slowdown * own)
        else:
            self.own = seconds if self.own is None else 0.8 * self.own + 0.2 * seconds
            self.debt = max(0.0, self.debt - (self.slowdown - 1) * seconds)
