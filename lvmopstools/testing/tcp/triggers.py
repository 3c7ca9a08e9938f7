"""Triggers: the rules that say when a fault applies, as data.

A trigger is a small frozen dataclass with a stable ``kind`` name and
plain-typed fields, like the faults of :mod:`lvmopstools.testing.tcp.faults`
that carry it (and that module re-exports every trigger). The server or proxy
consults a fault's trigger on each *occasion* of the fault's scope (an
accepted connection, a chunk read, a reply; see the faults module) and counts
the occasions from 1. Nothing here does any I/O or keeps any state: the
counts and random generators live with the server or proxy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from lvmopstools.testing.tcp._checks import check_count, check_number

__all__ = [
    "AfterN",
    "Always",
    "EveryKth",
    "FirstN",
    "Matches",
    "Probability",
    "TimeWindow",
    "Trigger",
]


@dataclass(frozen=True)
class Trigger:
    """Base class of the rules that say when a fault applies.

    The server or proxy counts, per fault, the occasions on which the trigger
    was consulted (see the module docstring for what an occasion is); the
    count starts at 1.
    """

    kind: ClassVar[str] = "trigger"


@dataclass(frozen=True)
class Always(Trigger):
    """Apply on every occasion (the default trigger)."""

    kind: ClassVar[str] = "always"


@dataclass(frozen=True)
class FirstN(Trigger):
    """Apply on the first ``count`` occasions only.

    Parameters
    ----------
    count
        How many occasions (connections, requests or replies) to affect.
    """

    kind: ClassVar[str] = "first"
    count: int

    def __post_init__(self) -> None:
        check_count("FirstN", "count", self.count, minimum=1)


@dataclass(frozen=True)
class AfterN(Trigger):
    """Apply on every occasion after the first ``count`` ones.

    Parameters
    ----------
    count
        How many occasions to let through unaffected first.
    """

    kind: ClassVar[str] = "after"
    count: int

    def __post_init__(self) -> None:
        check_count("AfterN", "count", self.count, minimum=0)


@dataclass(frozen=True)
class EveryKth(Trigger):
    """Apply on the ``k``-th, ``2k``-th, ... occasions.

    Parameters
    ----------
    k
        The period; ``EveryKth(1)`` is the same as :class:`Always`.
    """

    kind: ClassVar[str] = "every"
    k: int

    def __post_init__(self) -> None:
        check_count("EveryKth", "k", self.k, minimum=1)


@dataclass(frozen=True)
class TimeWindow(Trigger):
    """Apply from ``start`` to ``end`` seconds after the server or proxy opened.

    Times are read from the event loop, so they are virtual seconds when a
    :class:`~lvmopstools.testing.clock.VirtualClock` is active.

    Parameters
    ----------
    start
        Seconds after opening at which the window opens (inclusive).
    end
        Seconds after opening at which the window closes (exclusive), or
        None for a window that never closes.
    """

    kind: ClassVar[str] = "window"
    start: float = 0.0
    end: float | None = None

    def __post_init__(self) -> None:
        check_number("TimeWindow", "start", self.start, positive=False)
        if self.end is not None:
            check_number(
                "TimeWindow",
                "end",
                self.end,
                positive=False,
                infinite="use end=None for a window that stays open",
            )
            if self.end <= self.start:
                msg = (
                    f"TimeWindow: end ({self.end!r}) must be after start "
                    f"({self.start!r}); use end=None for a window that stays open"
                )
                raise ValueError(msg)

    def contains(self, elapsed: float) -> bool:
        """Return True if ``elapsed`` seconds after opening is inside the window."""
        return self.start <= elapsed and (self.end is None or elapsed < self.end)


@dataclass(frozen=True)
class Probability(Trigger):
    """Apply on each occasion with probability ``p``, from a seeded RNG.

    Parameters
    ----------
    p
        The probability, from 0 to 1.
    seed
        Seed of the random generator (one generator per active fault), so a
        run is reproducible.
    """

    kind: ClassVar[str] = "probability"
    p: float
    seed: int = 0

    def __post_init__(self) -> None:
        check_number("Probability", "p", self.p, positive=False)
        if self.p > 1:
            msg = f"Probability: p must be between 0 and 1, got {self.p!r}"
            raise ValueError(msg)
        check_count("Probability", "seed", self.seed, minimum=-(2**63))


@dataclass(frozen=True)
class Matches(Trigger):
    """Apply when the request matches a regular expression.

    The pattern is searched (:func:`re.search`) in the request bytes. Only
    faults with the ``data`` or ``reply`` scope see a request; for a
    downstream fault it is the request being answered (for the proxy: the last
    chunk the client sent on that connection).

    Parameters
    ----------
    pattern
        A bytes regular expression.
    """

    kind: ClassVar[str] = "match"
    pattern: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, bytes):
            msg = (
                f"Matches: pattern must be a bytes regular expression, got "
                f"{self.pattern!r}; write it as b'...'"
            )
            raise TypeError(msg)
        try:
            re.compile(self.pattern)
        except re.error as exc:
            msg = (
                f"Matches: pattern {self.pattern!r} is not a valid regular "
                f"expression ({exc}); fix the pattern"
            )
            raise ValueError(msg) from exc
