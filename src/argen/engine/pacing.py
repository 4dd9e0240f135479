"""Pacing long prefills so that they do not stall the other requests (the server's batches).

A prefill chunk is fixed at its positions (so that a prompt is computed the same way however busy the
batch is: outputs stay batch-invariant), so it cannot be cut to fit a round's time the way
Sarathi-Serve sizes its chunks. What can be chosen is *when* it runs: while other requests are
active, long chunks (more than `free_tokens` tokens) may take at most (slowdown - 1) / slowdown of
the wall time, a token bucket in seconds: a round that runs one costs its duration, and the bucket
refills at that rate. So the others run on average at least 1/slowdown as fast as without the long
prompt, give or take one chunk; short prompts are never held back; with nobody else active for
ACTIVE_SECONDS, a long prompt prefills at full speed. Activity is counted in wall time, not only in
rounds that have other sequences: a client between two requests is still a client (a chunk started
in that gap made a steady client's every request wait for a chunk whole). An 8,191-token prompt took
a steady client from 0.2 s to 67 s a request before.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFILL_SLOWDOWN = 1.5  # the server's default
FREE_TOKENS = 64  # chunks up to this many tokens are never held back (short prompts start at once)
ACTIVE_SECONDS = 1.0  # other requests count as active this long after the last one was in a round


@dataclass
class PrefillPacer:
    """Decides, round by round, whether long prefill chunks wait. `debt`: seconds of long chunks run
    beyond the share of wall time earned while others were active (`clock`: when it was last
    brought up to date, on the caller's clock)."""

    slowdown: float = PREFILL_SLOWDOWN
    free_tokens: int = FREE_TOKENS
    debt: float = 0.0
    clock: float = 0.0
    last_others: float = float("-inf")  # when other sequences last shared a round

    def __post_init__(self) -> None:
        if not self.slowdown > 1 or self.free_tokens < 0:
            raise ValueError("the prefill slowdown must be more than 1 (1.5: others run at 2/3 of their speed)")

    @property
    def share(self) -> float:
        """The share of wall time long chunks may take while others are active."""
        return (self.slowdown - 1) / self.slowdown

    def paced(self, tokens: int) -> bool:
        """Whether a chunk of this many tokens is a long one (subject to pacing)."""
        return tokens > self.free_tokens

    def active(self, now: float) -> bool:
        return now - self.last_others < ACTIVE_SECONDS

    def _earn(self, now: float) -> None:
        if self.active(self.clock):
            self.debt = max(0.0, self.debt - self.share * (now - self.clock))
        else:
            self.debt = 0.0  # nobody was there to lose anything
        self.clock = now

    def holds(self, others: bool, now: float) -> bool:
        """Whether long chunks wait this round: while others are active and the long chunks run so far
        have taken more than their share of the time."""
        self._earn(now)
        if others:
            self.last_others = now
        return self.active(now) and self.debt > 0

    def resume_at(self) -> float:
        """When a long chunk held with nobody else in the batch may run: once its share is earned, or
        once the others are no longer active."""
        return min(self.clock + self.debt / self.share, self.last_others + ACTIVE_SECONDS)

    def record(self, seconds: float, long_chunks: bool, others: bool, now: float) -> None:
        """Account for a round that ended at `now` and took `seconds`: whether it ran long chunks,
        whether other sequences were in it. A long chunk started while others were active costs the
        whole round (their part of it included), even if they were between two requests: the next
        one waited for it."""
        self._earn(now)
        if others:
            self.last_others = now
        if long_chunks and self.active(now - seconds):
            self.debt += seconds
