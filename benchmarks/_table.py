"""Rows and the side-by-side table that ``benchmarks/run.py`` prints.

Every ``benchmarks/bench_<area>.py`` returns a list of :class:`Row`: one
measurement of ours next to one rival's, the ratio between them, and the
target that ratio is held to. :func:`format_table` lays the rows out as an
aligned plain-text table. :func:`best_per_call` is the shared timer.

Ratios are what carry from one machine to another; the absolute figures are
printed for context only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Row", "best_per_call", "format_table", "time_calls"]

NOT_INSTALLED = "not installed"


@dataclass(frozen=True)
class Row:
    """One line of the benchmark table.

    Parameters
    ----------
    case
        What was measured, e.g. ``"sync success path"``.
    ours
        Our figure, in ``unit``; None if it could not be measured.
    rival
        The name of what we are compared with, e.g. ``"tenacity"``.
    rival_value
        The rival's figure, in ``unit``; None when the rival is not installed.
    unit
        The unit of ``ours`` and ``rival_value``, e.g. ``"us/call"``.
    ratio
        The compared quantity, as the target states it (``ours/rival`` or
        ``rival/ours``); None when it cannot be computed.
    target
        The target in words, naming the ratio, e.g. ``"ours/minimal <= 1.5"``.
        Empty when the row is informative only.
    met
        Whether the target is met; None when there is no target or no ratio.
    note
        Anything the reader needs, e.g. ``"not installed"``.
    """

    case: str
    ours: float | None
    rival: str
    rival_value: float | None
    unit: str
    ratio: float | None
    target: str = ""
    met: bool | None = None
    note: str = ""

    @classmethod
    def rival_missing(
        cls, case: str, ours: float | None, rival: str, unit: str, target: str = ""
    ) -> Row:
        """Return the row for a rival whose package is not installed."""
        return cls(case, ours, rival, None, unit, None, target, None, NOT_INSTALLED)


def best_per_call(run: Callable[[int], float], number: int, repeat: int) -> float:
    """Return the best time per call, in microseconds, over ``repeat`` runs.

    Parameters
    ----------
    run
        Called as ``run(number)``; makes ``number`` calls and returns the
        elapsed seconds (measured with :func:`time.perf_counter`).
    number
        Calls per run.
    repeat
        Runs; the fastest is kept, since noise only ever adds time.
    """
    best = min(run(number) for _ in range(repeat))
    return best / number * 1e6


def time_calls(func: Callable[[], object]) -> Callable[[int], float]:
    """Return a ``run(number)`` timer that calls ``func`` ``number`` times."""

    def run(number: int) -> float:
        loop = range(number)
        start = time.perf_counter()
        for _ in loop:
            func()
        return time.perf_counter() - start

    return run


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _met(met: bool | None) -> str:
    return {True: "yes", False: "NO", None: "-"}[met]


def format_table(rows: Sequence[tuple[str, Row]]) -> str:
    """Lay out ``(area, row)`` pairs as an aligned plain-text table.

    Parameters
    ----------
    rows
        The area each row belongs to (``"retrier"`` for ``bench_retrier.py``)
        and the row.

    Returns
    -------
    str
        The table, with a header line, one line per row, no trailing newline.
    """
    header = (
        "area",
        "case",
        "ours",
        "rival",
        "rival value",
        "unit",
        "ratio",
        "target",
        "met",
        "note",
    )
    lines = [header]
    for area, row in rows:
        lines.append(
            (
                area,
                row.case,
                _number(row.ours),
                row.rival,
                _number(row.rival_value),
                row.unit,
                _number(row.ratio),
                row.target,
                _met(row.met),
                row.note,
            )
        )

    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    numeric = {2, 4, 6}
    out = []
    for line in lines:
        cells = [
            cell.rjust(width) if i in numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)
