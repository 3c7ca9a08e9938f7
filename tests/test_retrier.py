"""Tests for lvmopstools.retrier.Retrier.

The sleeps between attempts are replaced by recorders (``time.sleep`` and
``asyncio.sleep`` as the retrier module looks them up), so the tests check the
schedule without waiting for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import random
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from lvmopstools import retrier as retrier_module
from lvmopstools.retrier import Retrier

REAL_ASYNCIO_SLEEP = asyncio.sleep


class SleepRecorder:
    """Stands in for ``time.sleep`` and ``asyncio.sleep``; records the delays."""

    def __init__(self) -> None:
        self.sync_delays: list[float] = []
        self.async_delays: list[float] = []
        self.async_sleeping = asyncio.Event()
        self.block_async = False

    def sleep(self, seconds: float) -> None:
        self.sync_delays.append(seconds)

    async def async_sleep(self, seconds: float) -> None:
        self.async_delays.append(seconds)
        self.async_sleeping.set()
        if self.block_async:
            await asyncio.Event().wait()
        await REAL_ASYNCIO_SLEEP(0)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> SleepRecorder:
    """Replace the retrier's sleeps by a recorder for the test's duration."""
    recorder = SleepRecorder()
    monkeypatch.setattr(retrier_module.time, "sleep", recorder.sleep)
    monkeypatch.setattr(retrier_module.asyncio, "sleep", recorder.async_sleep)
    return recorder


class FlakyFunction:
    """A function that raises the given exceptions in turn, then returns ``value``."""

    def __init__(self, failures: list[BaseException], value: object = "ok") -> None:
        self.failures = list(failures)
        self.raised: list[BaseException] = []
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.value = value

    def __call__(self, *args: Any, **kwargs: Any) -> object:
        self.calls.append((args, kwargs))
        if self.failures:
            error = self.failures.pop(0)
            self.raised.append(error)
            raise error
        return self.value

    def as_coroutine_function(self) -> Callable[..., Coroutine[Any, Any, object]]:
        async def flaky(*args: Any, **kwargs: Any) -> object:
            await REAL_ASYNCIO_SLEEP(0)
            return self(*args, **kwargs)

        return flaky


def expected_backoff(
    seed: int, attempts: range, delay: float, base: float, cap: float
) -> list[float]:
    """The documented schedule, computed from the seed with its own Random."""
    rng = random.Random(seed)
    return [min(delay + base**n + rng.random() * 0.1, cap) for n in attempts]


# --- reference parameters ---------------------------------------------------


def test_defaults_and_order_match_the_reference() -> None:
    fields = [(f.name, f.default) for f in dataclasses.fields(Retrier)][:6]

    assert fields == [
        ("max_attempts", 3),
        ("delay", 0.01),
        ("raise_on_max_attempts", True),
        ("use_exponential_backoff", True),
        ("exponential_backoff_base", 2.0),
        ("max_delay", 32.0),
    ]
    assert Retrier(5, 0.5, False, False, 3.0, 10.0) == Retrier(
        max_attempts=5,
        delay=0.5,
        raise_on_max_attempts=False,
        use_exponential_backoff=False,
        exponential_backoff_base=3.0,
        max_delay=10.0,
    )


def test_extras_are_keyword_only() -> None:
    extras = [f for f in dataclasses.fields(Retrier) if f.kw_only]

    assert [f.name for f in extras] == [
        "on_retry",
        "never_retry",
        "attempt_timeout",
        "seed",
        "rng",
    ]
    with pytest.raises(TypeError, match="positional arguments"):
        Retrier(3, 0.01, True, True, 2.0, 32.0, print)  # type: ignore[misc]


# --- calculate_delay ---------------------------------------------------------


def test_calculate_delay_follows_the_formula_with_a_seed() -> None:
    retrier = Retrier(delay=0.25, exponential_backoff_base=1.5, seed=1234)

    delays = [retrier.calculate_delay(n) for n in range(1, 6)]

    assert delays == expected_backoff(1234, range(1, 6), 0.25, 1.5, 32.0)
    jitters = [d - 0.25 - 1.5**n for n, d in zip(range(1, 6), delays, strict=True)]
    assert all(0 <= j <= 0.1 for j in jitters)
    assert len(set(jitters)) == 5


def test_seed_and_rng_give_the_same_schedule() -> None:
    seeded = Retrier(seed=99)
    given = Retrier(rng=random.Random(99))

    assert [seeded.calculate_delay(n) for n in (1, 2, 3)] == [
        given.calculate_delay(n) for n in (1, 2, 3)
    ]


def test_unseeded_retriers_have_their_own_random_source() -> None:
    first, second = Retrier(), Retrier()

    assert first._random is not second._random


def test_calculate_delay_is_capped_by_max_delay() -> None:
    retrier = Retrier(delay=1.0, max_delay=5.0, seed=3)

    assert retrier.calculate_delay(1) < 5.0
    assert retrier.calculate_delay(3) == 5.0
    assert retrier.calculate_delay(5000) == 5.0  # 2.0 ** 5000 overflows a float


def test_calculate_delay_without_backoff_is_delay_alone() -> None:
    rng = random.Random(5)
    state = rng.getstate()
    retrier = Retrier(delay=40.0, use_exponential_backoff=False, rng=rng)

    assert [retrier.calculate_delay(n) for n in (1, 2, 7)] == [40.0, 40.0, 40.0]
    assert rng.getstate() == state


@pytest.mark.parametrize("attempt", [0, -1, 1.5, True])
def test_calculate_delay_rejects_bad_attempts(attempt: Any) -> None:
    with pytest.raises(ValueError, match=rf"attempt must be .*got {attempt!r}"):
        Retrier().calculate_delay(attempt)


# --- validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_attempts": 0}, r"max_attempts must be an integer of at least 1, got 0"),
        ({"max_attempts": 2.5}, r"max_attempts .* got 2\.5"),
        ({"max_attempts": True}, r"max_attempts .* got True"),
        ({"delay": -0.1}, r"delay must be a finite number .* got -0\.1"),
        ({"delay": float("inf")}, r"delay must be .* got inf"),
        ({"delay": float("nan")}, r"delay must be .* got nan"),
        ({"delay": "1"}, r"delay must be .* got '1'"),
        ({"max_delay": -1}, r"max_delay must be a number .* got -1"),
        ({"exponential_backoff_base": 0.5}, r"exponential_backoff_base .* got 0\.5"),
        ({"exponential_backoff_base": float("inf")}, r"backoff_base .* got inf"),
        ({"attempt_timeout": 0}, r"attempt_timeout must be .* > 0 or None, got 0"),
        ({"attempt_timeout": -2.0}, r"attempt_timeout .* got -2\.0"),
        ({"seed": 1, "rng": random.Random(1)}, r"pass either seed \(1\) or rng"),
    ],
)
def test_bad_parameters_raise_value_error(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Retrier(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"on_retry": 3}, r"on_retry must be a callable .* got 3"),
        ({"never_retry": (ValueError, "x")}, r"Exception subclasses, got 'x'"),
        ({"never_retry": KeyboardInterrupt}, r"got <class 'KeyboardInterrupt'>"),
        ({"rng": 42}, r"rng must be a random\.Random instance, got 42"),
    ],
)
def test_bad_parameter_types_raise_type_error(
    kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(TypeError, match=match):
        Retrier(**kwargs)


def test_wrapping_a_non_callable_raises() -> None:
    with pytest.raises(TypeError, match=r"Retrier wraps a callable, got 42"):
        Retrier()(42)  # type: ignore[call-overload]


def test_attempt_timeout_on_a_sync_function_is_rejected_at_wrap_time() -> None:
    def read() -> int:
        return 1

    retrier = Retrier(attempt_timeout=1.0)

    with pytest.raises(TypeError, match=r"attempt_timeout=1\.0 applies to corout"):
        retrier(read)


def test_never_retry_accepts_a_single_class_or_a_set() -> None:
    assert Retrier(never_retry=KeyError)._never_retry == (KeyError,)  # type: ignore[arg-type]
    assert set(Retrier(never_retry={KeyError, OSError})._never_retry) == {
        KeyError,
        OSError,
    }


# --- wrapping ---------------------------------------------------------------------


def test_sync_function_stays_sync_with_its_metadata() -> None:
    def read_pressure(channel: int, unit: str = "torr") -> float:
        """Read a gauge."""
        return 1.0

    wrapped = Retrier()(read_pressure)

    assert not inspect.iscoroutinefunction(wrapped)
    assert wrapped.__name__ == "read_pressure"
    assert wrapped.__doc__ == "Read a gauge."
    assert wrapped.__wrapped__ is read_pressure  # type: ignore[attr-defined]
    assert inspect.signature(wrapped) == inspect.signature(read_pressure)
    assert wrapped(2) == 1.0


@pytest.mark.asyncio
@pytest.mark.parametrize("attempt_timeout", [None, 5.0])
async def test_coroutine_function_stays_coroutine_function(
    attempt_timeout: float | None,
) -> None:
    async def move_to(x: int, y: int) -> tuple[int, int]:
        """Move somewhere."""
        return (x, y)

    wrapped = Retrier(attempt_timeout=attempt_timeout)(move_to)

    assert inspect.iscoroutinefunction(wrapped)
    assert wrapped.__name__ == "move_to"
    assert wrapped.__doc__ == "Move somewhere."
    assert inspect.signature(wrapped) == inspect.signature(move_to)
    assert await wrapped(1, y=2) == (1, 2)


# --- sync retries -----------------------------------------------------------------


def test_sync_retries_until_success_with_the_documented_schedule(
    sleeps: SleepRecorder,
) -> None:
    flaky = FlakyFunction([OSError("a"), OSError("b")], value=42)

    result = Retrier(max_attempts=3, seed=7)(flaky)("x", key=1)

    assert result == 42
    assert flaky.calls == [(("x",), {"key": 1})] * 3
    assert sleeps.sync_delays == expected_backoff(7, range(1, 3), 0.01, 2.0, 32.0)
    assert sleeps.async_delays == []


def test_sync_last_exception_propagates_unchanged(sleeps: SleepRecorder) -> None:
    flaky = FlakyFunction([ValueError(n) for n in range(4)])

    with pytest.raises(ValueError, match=r"^3$") as excinfo:
        Retrier(max_attempts=4, seed=1)(flaky)()

    assert excinfo.value is flaky.raised[-1]
    assert excinfo.value.__context__ is None
    assert len(flaky.calls) == 4
    assert len(sleeps.sync_delays) == 3  # none after the last attempt


def test_sync_returns_none_when_told_not_to_raise(
    sleeps: SleepRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    flaky = FlakyFunction([OSError("down")] * 2)

    with caplog.at_level(logging.WARNING, logger="lvmopstools.retrier"):
        result = Retrier(max_attempts=2, raise_on_max_attempts=False)(flaky)()

    assert result is None
    assert len(flaky.calls) == 2
    assert len(sleeps.sync_delays) == 1
    levels = [(r.levelname, r.getMessage().split(":")[0]) for r in caplog.records]
    assert levels == [
        ("WARNING", "retry scheduled"),
        ("ERROR", "retries exhausted"),
    ]
    assert caplog.records[-1].exc_info is not None


def test_exhausted_retries_are_logged_once_at_error(
    sleeps: SleepRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    flaky = FlakyFunction([OSError("down")] * 3)

    with (
        caplog.at_level(logging.WARNING, logger="lvmopstools.retrier"),
        pytest.raises(OSError, match="down"),
    ):
        Retrier(max_attempts=3, seed=0)(flaky)()

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.args[1] for r in warnings] == [1, 2]  # type: ignore[index]
    assert len(errors) == 1
    assert "FlakyFunction" in errors[0].getMessage()
    assert "failed 3 times, raising OSError('down')" in errors[0].getMessage()


def test_max_attempts_one_calls_once_without_sleeping(sleeps: SleepRecorder) -> None:
    flaky = FlakyFunction([OSError("once")])

    with pytest.raises(OSError, match="once"):
        Retrier(max_attempts=1)(flaky)()

    assert len(flaky.calls) == 1
    assert sleeps.sync_delays == []


def test_zero_delay_makes_no_sleep_call(sleeps: SleepRecorder) -> None:
    flaky = FlakyFunction([OSError()] * 3)

    Retrier(max_attempts=4, delay=0, use_exponential_backoff=False)(flaky)()

    assert len(flaky.calls) == 4
    assert sleeps.sync_delays == []


def test_each_call_starts_again_at_attempt_one(sleeps: SleepRecorder) -> None:
    flaky = FlakyFunction([OSError()] * 3)
    wrapped = Retrier(max_attempts=2, raise_on_max_attempts=False, seed=2)(flaky)

    assert wrapped() is None
    assert wrapped() == "ok"
    rng = random.Random(2)
    assert sleeps.sync_delays == [0.01 + 2.0 + rng.random() * 0.1 for _ in "ab"]


@pytest.mark.parametrize("raise_on_max_attempts", [True, False])
def test_never_retry_classes_propagate_at_once(
    sleeps: SleepRecorder, raise_on_max_attempts: bool
) -> None:
    class FatalDeviceError(KeyError):
        pass

    flaky = FlakyFunction([FatalDeviceError("gone")])
    retrier = Retrier(
        raise_on_max_attempts=raise_on_max_attempts, never_retry=(KeyError,)
    )

    with pytest.raises(FatalDeviceError, match="gone") as excinfo:
        retrier(flaky)()

    assert excinfo.value is flaky.raised[0]
    assert len(flaky.calls) == 1
    assert sleeps.sync_delays == []


def test_other_exceptions_are_still_retried_with_never_retry(
    sleeps: SleepRecorder,
) -> None:
    flaky = FlakyFunction([OSError(), OSError(), KeyError("late")])

    with pytest.raises(KeyError, match="late"):
        Retrier(max_attempts=5, never_retry=[KeyError])(flaky)()

    assert len(flaky.calls) == 3
    assert len(sleeps.sync_delays) == 2


@pytest.mark.parametrize("error", [KeyboardInterrupt(), SystemExit(2)])
def test_base_exceptions_pass_straight_through_sync(
    sleeps: SleepRecorder, error: BaseException
) -> None:
    flaky = FlakyFunction([error])

    with pytest.raises(type(error)) as excinfo:
        Retrier(raise_on_max_attempts=False)(flaky)()

    assert excinfo.value is error
    assert len(flaky.calls) == 1
    assert sleeps.sync_delays == []


def test_on_retry_receives_each_failure_and_its_attempt(
    sleeps: SleepRecorder,
) -> None:
    seen: list[tuple[Exception, int]] = []
    flaky = FlakyFunction([OSError("1"), OSError("2"), OSError("3")])

    with pytest.raises(OSError, match="3"):
        Retrier(on_retry=lambda e, n: seen.append((e, n)))(flaky)()

    assert seen == [(flaky.raised[0], 1), (flaky.raised[1], 2)]


def test_an_on_retry_error_ends_the_retries(sleeps: SleepRecorder) -> None:
    def refuse(error: Exception, attempt: int) -> None:
        raise RuntimeError(f"stop after {attempt}")

    flaky = FlakyFunction([OSError("first")] * 3)

    with pytest.raises(RuntimeError, match="stop after 1") as excinfo:
        Retrier(on_retry=refuse)(flaky)()

    assert excinfo.value.__context__ is flaky.raised[0]
    assert len(flaky.calls) == 1
    assert sleeps.sync_delays == []


# --- async retries ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_async_retries_until_success_with_the_documented_schedule(
    sleeps: SleepRecorder,
) -> None:
    flaky = FlakyFunction([OSError(), OSError(), OSError()], value="done")
    wrapped = Retrier(max_attempts=4, delay=0.5, seed=11)(flaky.as_coroutine_function())

    assert await wrapped(3) == "done"
    assert flaky.calls == [((3,), {})] * 4
    assert sleeps.async_delays == expected_backoff(11, range(1, 4), 0.5, 2.0, 32.0)
    assert sleeps.sync_delays == []


@pytest.mark.asyncio
async def test_async_last_exception_propagates_unchanged(
    sleeps: SleepRecorder,
) -> None:
    flaky = FlakyFunction([ConnectionError(n) for n in range(3)])

    with pytest.raises(ConnectionError, match=r"^2$") as excinfo:
        await Retrier(seed=4)(flaky.as_coroutine_function())()

    assert excinfo.value is flaky.raised[-1]
    assert len(sleeps.async_delays) == 2


@pytest.mark.asyncio
async def test_async_returns_none_when_told_not_to_raise(
    sleeps: SleepRecorder,
) -> None:
    flaky = FlakyFunction([OSError()] * 3)
    retrier = Retrier(
        raise_on_max_attempts=False, delay=0, use_exponential_backoff=False
    )

    assert await retrier(flaky.as_coroutine_function())() is None
    assert len(flaky.calls) == 3
    assert sleeps.async_delays == []


@pytest.mark.asyncio
async def test_async_never_retry_and_on_retry(sleeps: SleepRecorder) -> None:
    seen: list[int] = []
    flaky = FlakyFunction([OSError(), PermissionError("denied")])
    retrier = Retrier(
        max_attempts=5,
        never_retry=(PermissionError,),
        on_retry=lambda e, n: seen.append(n),
    )

    with pytest.raises(PermissionError, match="denied"):
        await retrier(flaky.as_coroutine_function())()

    assert seen == [1]
    assert len(flaky.calls) == 2


@pytest.mark.asyncio
async def test_cancelled_error_raised_inside_is_not_retried(
    sleeps: SleepRecorder,
) -> None:
    flaky = FlakyFunction([asyncio.CancelledError()])

    with pytest.raises(asyncio.CancelledError):
        await Retrier(max_attempts=5)(flaky.as_coroutine_function())()

    assert len(flaky.calls) == 1
    assert sleeps.async_delays == []


@pytest.mark.asyncio
async def test_cancelling_a_task_in_an_attempt_is_prompt_and_not_retried(
    sleeps: SleepRecorder,
) -> None:
    started = asyncio.Event()
    calls = 0

    @Retrier(max_attempts=5)
    async def wait_for_device() -> None:
        nonlocal calls
        calls += 1
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(wait_for_device())
    async with asyncio.timeout(5):
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    assert calls == 1
    assert sleeps.async_delays == []
    assert asyncio.all_tasks() == {asyncio.current_task()}


@pytest.mark.asyncio
async def test_cancelling_a_task_during_the_backoff_stops_the_retries(
    sleeps: SleepRecorder,
) -> None:
    sleeps.block_async = True
    flaky = FlakyFunction([OSError()] * 3)
    task = asyncio.create_task(Retrier(seed=8)(flaky.as_coroutine_function())())

    async with asyncio.timeout(5):
        await sleeps.async_sleeping.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    assert len(flaky.calls) == 1
    assert len(sleeps.async_delays) == 1
    assert asyncio.all_tasks() == {asyncio.current_task()}


# --- attempt_timeout --------------------------------------------------------------


class HangingDevice:
    """A coroutine function that hangs on its first ``hangs`` calls."""

    def __init__(self, hangs: int) -> None:
        self.hangs = hangs
        self.calls = 0
        self.cancelled = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.hangs:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return "answered"


@pytest.mark.asyncio
async def test_attempt_timeout_fails_a_slow_attempt_and_retries(
    sleeps: SleepRecorder,
) -> None:
    device = HangingDevice(hangs=2)
    errors: list[Exception] = []

    async def query() -> str:
        return await device()

    retrier = Retrier(attempt_timeout=0.01, on_retry=lambda e, n: errors.append(e))
    async with asyncio.timeout(5):
        result = await retrier(query)()

    assert result == "answered"
    assert device.calls == 3
    assert device.cancelled == 2
    assert [type(e) for e in errors] == [TimeoutError, TimeoutError]


@pytest.mark.asyncio
async def test_attempt_timeout_raises_timeout_error_when_exhausted(
    sleeps: SleepRecorder,
) -> None:
    device = HangingDevice(hangs=10)

    async def query() -> str:
        return await device()

    async with asyncio.timeout(5):
        with pytest.raises(TimeoutError):
            await Retrier(max_attempts=2, attempt_timeout=0.01)(query)()

    assert device.calls == 2
    assert device.cancelled == 2
    assert len(sleeps.async_delays) == 1
    assert asyncio.all_tasks() == {asyncio.current_task()}


@pytest.mark.asyncio
async def test_attempt_timeout_returns_none_when_told_not_to_raise(
    sleeps: SleepRecorder,
) -> None:
    device = HangingDevice(hangs=10)

    async def query() -> str:
        return await device()

    retrier = Retrier(max_attempts=2, attempt_timeout=0.01, raise_on_max_attempts=False)
    async with asyncio.timeout(5):
        assert await retrier(query)() is None

    assert device.calls == 2


@pytest.mark.asyncio
async def test_attempt_timeout_leaves_fast_attempts_alone(
    sleeps: SleepRecorder,
) -> None:
    flaky = FlakyFunction([OSError("first")], value=7)
    wrapped = Retrier(attempt_timeout=30.0)(flaky.as_coroutine_function())

    assert await wrapped() == 7
    assert len(flaky.calls) == 2
    assert len(sleeps.async_delays) == 1


@pytest.mark.asyncio
async def test_cancelling_during_a_timed_attempt_is_not_retried(
    sleeps: SleepRecorder,
) -> None:
    device = HangingDevice(hangs=10)

    async def query() -> str:
        return await device()

    task = asyncio.create_task(Retrier(attempt_timeout=60.0)(query)())
    async with asyncio.timeout(5):
        while device.calls == 0:
            await REAL_ASYNCIO_SLEEP(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    assert device.calls == 1
    assert sleeps.async_delays == []
