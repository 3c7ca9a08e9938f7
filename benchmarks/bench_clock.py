"""VirtualClock speed next to looptime, and what the plugin costs other tests.

Three cases, each measured for both tools in the same process:

- bare sleep loop: ``asyncio.sleep(1)`` in a loop; virtual seconds per real
  second, for our clock and for looptime on the same loop body.
- actor hour: an :class:`~lvmopstools.actor.LVMActor` on an in-process
  :class:`~lvmopstools.testing.amqp.MockBroker`, with ``check_interval=30``
  and a check that passes, run for one virtual hour (120 checks, each one a
  loop turn plus the broker traffic of an unchanged state: none). Real
  milliseconds per simulated hour, ours and looptime's. An informative row
  runs the same hour with clu's own timed-command list, which LVMActor
  replaces with one that does not poll while empty.
- plugin overhead: a pytest session of plain asyncio tests that use no clock,
  run in a subprocess with our plugin loaded, with no time plugin at all, and
  with looptime's plugin enabled (``--looptime``). The ratio to the bare run
  is what each plugin adds to tests that never asked for it.

Real time is read through :mod:`lvmopstools.testing._clock_patch`, whose
``real_*`` functions are never replaced, since the clock replaces copies of
``time.perf_counter`` it finds in other modules' namespaces.

Run on its own with ``python benchmarks/bench_clock.py [--quick]``, or through
``python benchmarks/run.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from _table import Row, format_table

from lvmopstools.testing import _clock_patch
from lvmopstools.testing.clock import VirtualClock

__all__ = ["run"]

HOUR = 3600.0
CHECK_INTERVAL = 30.0


def _real() -> float:
    return _clock_patch.real_perf_counter()


# --- the workloads --------------------------------------------------------------


async def _sleep_loop(count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(1.0)


Body = Callable[[Callable[[], Any]], Awaitable[float]]


def _actor_hour_body(*, clu_list: bool = False) -> Body:
    """Return the actor hour as a body: it returns the real seconds it took.

    With ``clu_list=True`` the actor gets clu's own ``TimedCommandList`` back
    in place of LVMActor's lazy one: it polls every 0.5 s although it holds
    no command, about 7,200 wake-ups an hour.
    """
    from clu.command import TimedCommandList

    from lvmopstools.actor import ErrorCodesBase, LVMActor
    from lvmopstools.testing.amqp import MockBroker

    class HealthyActor(LVMActor):
        checks = 0

        async def _check_internal(self) -> None:
            self.checks += 1

        async def _troubleshoot_internal(
            self, error_code: ErrorCodesBase, exception: Exception | None = None
        ) -> bool:
            return True

    async def body(enter: Callable[[], Any]) -> float:
        async with MockBroker() as broker:
            actor = HealthyActor(
                name="bench-actor", url=broker.url, check_interval=CHECK_INTERVAL
            )
            if clu_list:
                actor.timed_commands = TimedCommandList(actor)
            await actor.start()
            try:
                async with enter():
                    start = _real()
                    await asyncio.sleep(HOUR)
                    elapsed = _real() - start
            finally:
                await actor.stop()
        expected = int(HOUR / CHECK_INTERVAL)
        if actor.checks < expected:
            msg = f"actor hour ran {actor.checks} checks, expected {expected}"
            raise RuntimeError(msg)
        return elapsed

    return body


# --- the contenders -------------------------------------------------------------


class _Ours:
    """Runs a body under ``VirtualClock`` on a fresh asyncio loop."""

    name = "lvmopstools"

    def run(self, body: Body) -> float:
        return asyncio.run(body(lambda: VirtualClock(quiet_period=0)))


class _Looptime:
    """Runs a body on a new looptime loop (time compaction is on from the start)."""

    name = "looptime"

    def run(self, body: Body) -> float:
        import looptime

        loop = looptime.new_event_loop(start=0)
        try:
            return loop.run_until_complete(body(contextlib.nullcontext))
        finally:
            loop.close()


def _sleep_body(count: int) -> Body:
    async def body(enter: Callable[[], Any]) -> float:
        async with enter():
            start = _real()
            await _sleep_loop(count)
            return _real() - start

    return body


def _best(runner: Any, body: Any, repeat: int) -> float:
    return min(runner.run(body) for _ in range(repeat))


# --- plugin overhead ------------------------------------------------------------

PLAIN_TESTS = """
import asyncio
import pytest

@pytest.mark.asyncio
@pytest.mark.parametrize("n", range({count}))
async def test_plain(n):
    for _ in range(20):
        await asyncio.sleep(0)
    assert n >= 0
"""

BASE_ARGS = ("-q", "-p", "no:cacheprovider", "-p", "no:faker", "-p", "asyncio")


def _pytest_session(folder: Path, plugin_args: tuple[str, ...]) -> float:
    """Run the plain tests once in a subprocess; return its real seconds."""
    command = [sys.executable, "-m", "pytest", *BASE_ARGS, *plugin_args, str(folder)]
    start = _real()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    elapsed = _real() - start
    if result.returncode != 0:
        msg = f"pytest {plugin_args!r} failed:\n{result.stdout}\n{result.stderr}"
        raise RuntimeError(msg)
    return elapsed


def _plugin_rows(quick: bool) -> list[Row]:
    count = 100 if quick else 400
    repeat = 2 if quick else 5
    looptime_off = ("-p", "no:looptime_plugin", "-p", "no:looptime_timeproxies")
    looptime_off += ("-p", "no:looptime_chronometers")
    sessions = {
        "bare": (*looptime_off, "-p", "no:lvmopstools"),
        "ours": (*looptime_off, "-p", "lvmopstools"),
        "looptime": ("-p", "no:lvmopstools", "--looptime"),
    }
    have_looptime = importlib.util.find_spec("looptime") is not None
    if not have_looptime:
        sessions = {
            "bare": ("-p", "no:lvmopstools"),
            "ours": ("-p", "lvmopstools"),
        }

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder)
        (path / "test_plain.py").write_text(PLAIN_TESTS.format(count=count))
        (path / "pytest.ini").write_text(
            "[pytest]\nasyncio_mode = strict\n"
            "asyncio_default_fixture_loop_scope = function\n"
        )
        best: dict[str, float] = dict.fromkeys(sessions, float("inf"))
        # Interleave the sessions so that machine noise hits them alike.
        for _ in range(repeat):
            for name, args in sessions.items():
                best[name] = min(best[name], _pytest_session(path, args))

    unit = f"s/{count} tests"
    case = "plugin overhead, tests without clock"
    ratio = best["ours"] / best["bare"]
    rows = [
        Row(
            case,
            best["ours"],
            "no plugin",
            best["bare"],
            unit,
            ratio,
            "ours/bare <= 1.05",
            ratio <= 1.05,
            "whole pytest subprocess, best of runs",
        )
    ]
    if have_looptime:
        rows.append(
            Row(
                case,
                best["ours"],
                "looptime --looptime",
                best["looptime"],
                unit,
                best["looptime"] / best["bare"],
                "",
                None,
                "ratio = looptime/bare, for comparison",
            )
        )
    else:
        rows.append(Row.rival_missing(case, best["ours"], "looptime", unit))
    return rows


# --- the table ------------------------------------------------------------------


def run(quick: bool = False) -> list[Row]:
    """Measure the three cases; return the table rows.

    The actor's log lines are silenced while it runs and the logger levels put
    back afterwards, so that the other areas measured in the same process
    (the retrier's logging cost) are not changed.
    """
    loggers = [logging.getLogger(name) for name in ("clu", "lvmopstools")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        return _run(quick)
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _run(quick: bool) -> list[Row]:
    repeat = 2 if quick else 5
    sleeps = 2_000 if quick else 20_000
    have_looptime = importlib.util.find_spec("looptime") is not None
    ours = _Ours()
    rival = _Looptime()
    rows: list[Row] = []

    # (a) bare sleep loop: virtual seconds per real second.
    body = _sleep_body(sleeps)
    our_speed = sleeps / _best(ours, body, repeat)
    case = "bare sleep loop"
    unit = "virtual s/real s"
    if have_looptime:
        their_speed = sleeps / _best(rival, body, repeat)
        ratio = our_speed / their_speed
        rows.append(
            Row(
                case,
                our_speed,
                rival.name,
                their_speed,
                unit,
                ratio,
                "ours/looptime >= 0.5",
                ratio >= 0.5,
            )
        )
    else:
        rows.append(Row.rival_missing(case, our_speed, rival.name, unit))

    # (b) one simulated hour of an LVMActor check loop on the mock broker.
    actor_body = _actor_hour_body()
    our_ms = _best(ours, actor_body, repeat) * 1e3
    case = "LVMActor check loop, 1 h"
    unit = "real ms/virtual h"
    rows.append(
        Row(
            case,
            our_ms,
            "target",
            50.0,
            unit,
            our_ms / 50.0,
            "ours/50 ms <= 1",
            our_ms <= 50.0,
        )
    )
    polling_ms = _best(ours, _actor_hour_body(clu_list=True), repeat) * 1e3
    rows.append(
        Row(
            "LVMActor check loop, 1 h, clu's timed-command list",
            polling_ms,
            "lazy list",
            our_ms,
            unit,
            polling_ms / our_ms,
            "",
            None,
            "informative: clu's list polls every 0.5 s; ratio = clu's/lazy",
        )
    )
    if have_looptime:
        their_ms = _best(rival, actor_body, repeat) * 1e3
        rows.append(
            Row(
                case,
                our_ms,
                rival.name,
                their_ms,
                unit,
                our_ms / their_ms,
                "",
                None,
                "ratio = ours/looptime (real time, lower is faster)",
            )
        )
    else:
        rows.append(Row.rival_missing(case, our_ms, rival.name, unit))

    # (c) what the plugin costs tests that do not use it.
    rows.extend(_plugin_rows(quick))
    return rows


if __name__ == "__main__":
    table = run(quick="--quick" in sys.argv[1:])
    print(format_table([("clock", row) for row in table]))
