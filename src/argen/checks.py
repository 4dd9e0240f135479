"""Checks on numbers given by users (sampling parameters, strategy options): they must be finite.
NaN fails every comparison and infinity passes some, so a range check alone lets them through, to
decode nonsense or overflow far from the value that caused it."""

from __future__ import annotations

import math


def finite_number(value) -> float | None:
    """`value` as a float if it is a finite int or float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return number if math.isfinite(number) else None


def number_option(name: str, value, low: float | None = None, high: float | None = None, hint: str = "") -> float:
    """The option as a float, or a ValueError saying which finite range it must lie in."""
    number = finite_number(value)
    if number is None or (low is not None and number < low) or (high is not None and number > high):
        bounds = (
            f" in [{low:g}, {high:g}]"
            if low is not None and high is not None
            else (f" >= {low:g}" if low is not None else f" <= {high:g}" if high is not None else "")
        )
        raise ValueError(f"{name} must be a finite number{bounds}{hint}; got {value!r}")
    return number
