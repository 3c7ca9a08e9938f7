"""Run every ``benchmarks/bench_<area>.py`` and print one side-by-side table.

Each bench module exposes ``run(quick: bool) -> list[Row]`` (``Row`` from
``benchmarks/_table.py``). This script imports the modules it finds next to
it, calls them in name order, and prints their rows as one table of ratios.

Usage::

    python benchmarks/run.py            # full measurement
    python benchmarks/run.py --quick    # few iterations, a CI smoke run
    python benchmarks/run.py --only retrier --only tcp

The exit status is 0 unless a bench module failed to import or crashed; a
crash is reported on stderr with its traceback and the other areas still run.
A rival package that is not installed is a row saying so, not a crash.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _table import Row, format_table  # noqa: E402  (needs HERE on sys.path)

__all__ = ["discover", "main"]

PREFIX = "bench_"


def discover() -> list[str]:
    """Return the area names of the bench modules present, sorted."""
    return sorted(path.stem.removeprefix(PREFIX) for path in HERE.glob("bench_*.py"))


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Print lvmopstools' benchmarks side by side with their rivals."
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="few iterations (a smoke run for CI; the figures are rough)",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        default=[],
        help="run only this area (bench_NAME.py); may be repeated",
    )
    return parser.parse_args(argv)


def _run_area(area: str, quick: bool) -> list[Row] | None:
    """Import and run one bench module; return None if it crashed."""
    try:
        module = importlib.import_module(PREFIX + area)
        rows = module.run(quick=quick)
    except Exception:
        print(f"benchmark {area!r} crashed:", file=sys.stderr)
        traceback.print_exc()
        return None

    return list(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected benchmarks, print the table, return the exit status."""
    args = _parse(argv)
    available = discover()

    unknown = sorted(set(args.only) - set(available))
    if unknown:
        print(
            f"unknown benchmark area(s) {unknown!r}; available: {available!r}",
            file=sys.stderr,
        )
        return 2

    selected = [area for area in available if not args.only or area in args.only]
    table: list[tuple[str, Row]] = []
    crashed: list[str] = []
    for area in selected:
        print(f"running {area}...", file=sys.stderr, flush=True)
        rows = _run_area(area, args.quick)
        if rows is None:
            crashed.append(area)
            continue
        table.extend((area, row) for row in rows)

    print(format_table(table))
    if crashed:
        print(f"crashed: {', '.join(crashed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
