"""Argument checks shared by the fault and trigger records (private).

Each check raises TypeError or ValueError with a message that names the record
and the field, shows the value, and says what to pass instead.
"""

from __future__ import annotations

import math

__all__ = ["check_count", "check_number"]


def check_number(
    owner: str,
    name: str,
    value: object,
    *,
    positive: bool,
    infinite: str = "pass a finite value",
) -> None:
    """Raise if ``value`` is not a finite real number that is >= 0 (or > 0).

    ``infinite`` tells the user what to do instead of an infinite value.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        msg = f"{owner}: {name} must be a number of seconds or bytes, got {value!r}"
        raise TypeError(msg)

    if not math.isfinite(value):
        msg = f"{owner}: {name} must be a finite number, got {value!r}; {infinite}"
        raise ValueError(msg)

    if positive and not value > 0:
        msg = (
            f"{owner}: {name} must be greater than 0, got {value!r}; "
            "pass a positive value"
        )
        raise ValueError(msg)

    if not positive and not value >= 0:
        msg = (
            f"{owner}: {name} must be 0 or more, got {value!r}; "
            "pass a non-negative value"
        )
        raise ValueError(msg)


def check_count(owner: str, name: str, value: object, *, minimum: int) -> None:
    """Raise if ``value`` is not an integer of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        msg = f"{owner}: {name} must be an integer, got {value!r}"
        raise TypeError(msg)

    if value < minimum:
        msg = f"{owner}: {name} must be at least {minimum}, got {value!r}"
        raise ValueError(msg)
