"""Retrier cost per call, next to a minimal wrapper, tenacity, stamina and backoff.

Four cases, each measured for every contender in the same process:

- sync / async success path: a function that returns at once, wrapped with
  three attempts; the cost of one call through the wrapper.
- sync / async fail-fail-succeed: the function fails twice, then returns;
  every contender waits zero seconds between attempts and the sleeps are
  replaced by no-ops for the measurement, so the row shows retry bookkeeping
  (exception handling, hooks, logging), not the cost of ``sleep(0)``.

Log records that the contenders emit on a retry (ours and stamina's) are
created and dropped by a NullHandler, so they cost what they cost in
production without printing.

Run on its own with ``python benchmarks/bench_retrier.py [--quick]``, or
through ``python benchmarks/run.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from _table import Row, best_per_call, format_table, time_calls

from lvmopstools.retrier import Retrier

__all__ = ["run"]

ATTEMPTS = 3
UNIT = "us/call"
RIVALS = ("tenacity", "stamina", "backoff")


# --- the contenders -------------------------------------------------------------


def minimal_retry(func: Callable[..., Any]) -> Callable[..., Any]:
    """The smallest correct sync retry wrapper: ATTEMPTS tries, no wait."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(ATTEMPTS):
            try:
                return func(*args, **kwargs)
            except Exception:
                if attempt == ATTEMPTS - 1:
                    raise
        return None

    return wrapper


def minimal_retry_async(func: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """The smallest correct async retry wrapper: ATTEMPTS tries, no wait."""

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(ATTEMPTS):
            try:
                return await func(*args, **kwargs)
            except Exception:
                if attempt == ATTEMPTS - 1:
                    raise
        return None

    return wrapper


def ours(func: Callable[..., Any]) -> Callable[..., Any]:
    return Retrier(max_attempts=ATTEMPTS, delay=0, use_exponential_backoff=False)(func)


def with_tenacity(func: Callable[..., Any]) -> Callable[..., Any]:
    import tenacity

    return tenacity.retry(
        stop=tenacity.stop_after_attempt(ATTEMPTS),
        wait=tenacity.wait_none(),
        reraise=True,
    )(func)


def with_stamina(func: Callable[..., Any]) -> Callable[..., Any]:
    import stamina

    return stamina.retry(
        on=Exception,
        attempts=ATTEMPTS,
        timeout=None,
        wait_initial=0.0,
        wait_max=0.0,
        wait_jitter=0.0,
    )(func)


def with_backoff(func: Callable[..., Any]) -> Callable[..., Any]:
    import backoff

    return backoff.on_exception(
        backoff.constant, Exception, max_tries=ATTEMPTS, interval=0, jitter=None
    )(func)


CONTENDERS: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
    "tenacity": with_tenacity,
    "stamina": with_stamina,
    "backoff": with_backoff,
}


# --- the workloads --------------------------------------------------------------


def succeed() -> int:
    return 1


async def succeed_async() -> int:
    return 1


def fail_twice() -> Callable[[], int]:
    """Return a function that fails twice in every three calls, then succeeds."""
    calls = 0

    def flaky() -> int:
        nonlocal calls
        calls += 1
        if calls % ATTEMPTS:
            raise OSError("transient")
        return 1

    return flaky


def fail_twice_async() -> Callable[[], Awaitable[int]]:
    """Return the coroutine function version of :func:`fail_twice`."""
    state = fail_twice()

    async def flaky() -> int:
        return state()

    return flaky


def time_async_calls(func: Callable[[], Awaitable[object]]) -> Callable[[int], float]:
    """Return a ``run(number)`` timer awaiting ``func()`` ``number`` times."""

    async def calls(number: int) -> float:
        loop = range(number)
        start = time.perf_counter()
        for _ in loop:
            await func()
        return time.perf_counter() - start

    def run(number: int) -> float:
        return asyncio.run(calls(number))

    return run


@contextlib.contextmanager
def no_sleeping() -> Iterator[None]:
    """Replace ``time.sleep`` and ``asyncio.sleep`` by no-ops, then restore them."""

    async def no_async_sleep(delay: float, result: Any = None) -> Any:
        return result

    real_sleep, real_async_sleep = time.sleep, asyncio.sleep
    time.sleep = lambda seconds: None
    asyncio.sleep = no_async_sleep  # type: ignore[assignment]
    try:
        yield
    finally:
        time.sleep, asyncio.sleep = real_sleep, real_async_sleep


@contextlib.contextmanager
def logs_dropped() -> Iterator[None]:
    """Give the root logger a NullHandler if it has none, so nothing prints.

    Records are still created and passed on, so logging costs what it does in
    an application that has handlers configured but filters these out.
    """
    root = logging.getLogger()
    if root.handlers:
        yield
        return

    handler = logging.NullHandler()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)


# --- measurement ----------------------------------------------------------------


def _measure(
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
    make_func: Callable[[], Callable[..., Any]],
    is_async: bool,
    number: int,
    repeat: int,
) -> float:
    wrapped = wrap(make_func())
    timer = time_async_calls(wrapped) if is_async else time_calls(wrapped)
    return best_per_call(timer, number, repeat)


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _success_rows(
    case: str, values: dict[str, float | None], minimal: float, mine: float
) -> list[Row]:
    rows = [
        Row(
            case,
            mine,
            "minimal wrapper",
            minimal,
            UNIT,
            mine / minimal,
            "ours/minimal <= 1.5",
            mine / minimal <= 1.5,
        )
    ]
    for name in RIVALS:
        value = values[name]
        target = "" if name == "backoff" else f"{name}/ours >= 20"
        if value is None:
            rows.append(Row.rival_missing(case, mine, name, UNIT, target))
            continue
        ratio = value / mine
        met = None if not target else ratio >= 20
        rows.append(Row(case, mine, name, value, UNIT, ratio, target, met))
    return rows


def _failure_rows(
    case: str, values: dict[str, float | None], minimal: float, mine: float
) -> list[Row]:
    info = "informative, ratio is "
    ratio = mine / minimal
    rows = [
        Row(case, mine, "minimal wrapper", minimal, UNIT, ratio, note=info + "ours/min")
    ]
    for name in RIVALS:
        value = values[name]
        if value is None:
            rows.append(Row.rival_missing(case, mine, name, UNIT))
            continue
        ratio = value / mine
        rows.append(Row(case, mine, name, value, UNIT, ratio, note=info + "rival/ours"))
    return rows


def _measure_case(
    case: str,
    make_func: Callable[[], Callable[..., Any]],
    is_async: bool,
    number: int,
    repeat: int,
) -> tuple[float, float, dict[str, float | None]]:
    """Return (minimal, ours, {rival: figure or None}) for one case, in us/call."""
    minimal_wrap = minimal_retry_async if is_async else minimal_retry
    with no_sleeping():
        minimal = _measure(minimal_wrap, make_func, is_async, number, repeat)
        mine = _measure(ours, make_func, is_async, number, repeat)
        values: dict[str, float | None] = {}
        for name in RIVALS:
            if not _installed(name):
                values[name] = None
                continue
            wrap = CONTENDERS[name]
            values[name] = _measure(wrap, make_func, is_async, number, repeat)

    return minimal, mine, values


def run(quick: bool = False) -> list[Row]:
    """Measure every case for every contender; return the table rows.

    Parameters
    ----------
    quick
        Few iterations, for a smoke run in CI; the figures are then rough.
    """
    number, repeat = (200, 3) if quick else (20_000, 7)
    cases: list[tuple[str, Callable[[], Callable[..., Any]], bool, bool]] = [
        ("sync success path", lambda: succeed, False, True),
        ("async success path", lambda: succeed_async, True, True),
        ("sync fail-fail-succeed", fail_twice, False, False),
        ("async fail-fail-succeed", fail_twice_async, True, False),
    ]

    rows: list[Row] = []
    with logs_dropped():
        for case, make_func, is_async, success in cases:
            minimal, mine, values = _measure_case(
                case, make_func, is_async, number, repeat
            )
            build = _success_rows if success else _failure_rows
            rows.extend(build(case, values, minimal, mine))

    return rows


if __name__ == "__main__":
    print(format_table([("retrier", row) for row in run("--quick" in sys.argv)]))
