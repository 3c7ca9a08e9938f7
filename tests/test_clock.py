"""Tests of lvmopstools.testing.clock: VirtualClock and the shared clock contract."""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import itertools
import pickle
import sys
import threading
import time
import types
from collections.abc import Callable
from typing import Any

import pytest

from lvmopstools.actor import ActorState, CheckError, ErrorCodesBase, LVMActor
from lvmopstools.testing import _clock_io, _clock_patch
from lvmopstools.testing.clock import (
    VirtualClock,
    current_clock,
    in_flight,
    register_owned_address,
)

# A start far from the real now, so virtual and real readings cannot be confused.
START = datetime.datetime(2001, 2, 3, 4, 5, 6, tzinfo=datetime.UTC)

REAL_FUNCTIONS: list[tuple[Any, str, Any]] = [
    (time, "time", time.time),
    (time, "time_ns", time.time_ns),
    (time, "monotonic", time.monotonic),
    (time, "monotonic_ns", time.monotonic_ns),
    (time, "perf_counter", time.perf_counter),
    (time, "perf_counter_ns", time.perf_counter_ns),
    (time, "sleep", time.sleep),
    (datetime, "datetime", datetime.datetime),
    (datetime, "date", datetime.date),
]


def assert_restored(loop: asyncio.AbstractEventLoop) -> None:
    """Check that every patched function and the loop are the real ones."""
    for module, name, real in REAL_FUNCTIONS:
        assert getattr(module, name) is real, f"{module.__name__}.{name}"

    for name in ("time", "run_in_executor"):
        assert name not in vars(loop)
    assert not isinstance(vars(loop)["_selector"], _clock_io.SelectorProxy)
    assert loop not in _clock_patch._clocks
    assert current_clock() is None


# --- reading virtual time -------------------------------------------------------


@pytest.mark.asyncio
async def test_sleep_moves_only_virtual_time() -> None:
    loop = asyncio.get_running_loop()
    async with VirtualClock(start=START) as clock:
        loop_start = loop.time()
        await asyncio.sleep(300)

        assert clock.time() == 300
        assert loop.time() - loop_start == 300
        assert time.monotonic() == loop.time()
        assert time.time() == START.timestamp() + 300
        assert clock.now() == START + datetime.timedelta(seconds=300)


@pytest.mark.asyncio
async def test_every_time_function_reads_the_same_virtual_time() -> None:
    async with VirtualClock(start=START) as clock:
        before = (time.perf_counter(), time.monotonic_ns(), time.perf_counter_ns())
        await asyncio.sleep(90)

        assert time.perf_counter() - before[0] == pytest.approx(90, abs=1e-6)
        assert (time.monotonic_ns() - before[1]) / 1e9 == pytest.approx(90, abs=1e-6)
        assert (time.perf_counter_ns() - before[2]) / 1e9 == pytest.approx(90, abs=1e-6)
        assert time.time_ns() == round((START.timestamp() + 90) * 1e9)

        now = datetime.datetime.now(datetime.UTC)
        assert now == START + datetime.timedelta(seconds=90)
        assert datetime.datetime.utcnow() == now.replace(tzinfo=None)
        expected_local = datetime.datetime.fromtimestamp(START.timestamp() + 90)
        assert datetime.datetime.now() == expected_local
        assert datetime.datetime.today() == expected_local
        assert datetime.date.today() == expected_local.date()
        assert clock.time() == 90


@pytest.mark.asyncio
async def test_replaced_datetime_classes_accept_real_instances() -> None:
    real = datetime.datetime(2020, 1, 1)
    async with VirtualClock(start=START):
        assert datetime.datetime is not _clock_patch.real_datetime
        assert isinstance(real, datetime.datetime)
        assert isinstance(real.date(), datetime.date)
        assert isinstance(datetime.datetime.now(), _clock_patch.real_datetime)
        assert issubclass(_clock_patch.real_datetime, datetime.date)


@pytest.mark.asyncio
async def test_datetimes_made_under_the_clock_are_real_and_pickle_as_usual() -> None:
    usual = pickle.dumps(datetime.datetime(2001, 2, 3, 4, 5, 6))
    async with VirtualClock(start=START):
        made = [
            datetime.datetime(2001, 2, 3, 4, 5, 6),
            datetime.datetime.fromtimestamp(0),
            datetime.datetime.fromisoformat("2001-02-03"),
            datetime.datetime.now() + datetime.timedelta(days=1),
            datetime.date(2001, 2, 3),
            datetime.date.today(),
        ]
        pickled = [pickle.dumps(value) for value in made]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            in_thread = pool.submit(pickle.dumps, made[0]).result()

    assert {type(value) for value in made} == {
        _clock_patch.real_datetime,
        _clock_patch.real_date,
    }
    assert pickled[0] == usual == in_thread
    assert [pickle.loads(data) for data in pickled] == made


@pytest.mark.asyncio
async def test_subclasses_defined_under_the_clock_check_as_usual() -> None:
    async with VirtualClock(start=START):

        class Stamp(datetime.datetime):
            pass

        stamp = Stamp(2001, 2, 3)
        assert type(stamp) is Stamp
        assert isinstance(stamp, Stamp)
        assert not isinstance(datetime.datetime(2001, 2, 3), Stamp)
        assert isinstance(stamp, datetime.datetime)


@pytest.mark.asyncio
async def test_a_never_patched_module_imported_under_a_clock_is_put_back() -> None:
    # A module of the never-patched list (here under "threading") that is
    # first imported while a clock runs copies the replacement, as queue
    # does with ``from time import monotonic``; it must get the real one back.
    name = "threading_probe_for_the_clock"
    async with VirtualClock():
        probe = types.ModuleType(name)
        probe.monotonic = time.monotonic  # type: ignore[attr-defined]
        assert probe.monotonic is not _clock_patch.real_monotonic  # type: ignore[attr-defined]
        sys.modules[name] = probe
    try:
        assert probe.monotonic is _clock_patch.real_monotonic  # type: ignore[attr-defined]
    finally:
        del sys.modules[name]


@pytest.mark.asyncio
async def test_module_that_copied_datetime_gets_the_virtual_one() -> None:
    import clu.base  # Did "from datetime import datetime" at import time.

    async with VirtualClock(start=START):
        assert clu.base.datetime.now(datetime.UTC) == START

    assert clu.base.datetime is _clock_patch.real_datetime


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("start", "expected"),
    [
        (START, START.timestamp()),
        (START.replace(tzinfo=None), START.timestamp()),
        (START.timestamp(), START.timestamp()),
        (1_000_000, 1_000_000.0),
    ],
)
async def test_start_forms(start: Any, expected: float) -> None:
    async with VirtualClock(start=start):
        assert time.time() == expected


@pytest.mark.asyncio
async def test_default_start_is_the_real_now() -> None:
    before = _clock_patch.real_time()
    async with VirtualClock():
        now = time.time()
    after = _clock_patch.real_time()

    assert before <= now <= after


@pytest.mark.asyncio
@pytest.mark.parametrize("start", ["2020-01-01", True, float("nan")])
async def test_bad_start(start: Any) -> None:
    loop = asyncio.get_running_loop()
    handle = loop.call_later(10, lambda: None)
    when = handle.when()

    with pytest.raises(TypeError, match=r"start must be a datetime .* got "):
        VirtualClock(start=start)

    assert handle.when() == when  # Refused before the loop was touched.
    handle.cancel()


@pytest.mark.parametrize("quiet", [-1, float("inf"), "5ms", True])
def test_bad_quiet_period(quiet: Any) -> None:
    with pytest.raises(ValueError, match=r"quiet_period must be a finite number .*"):
        VirtualClock(quiet_period=quiet)


# --- timers and timeouts ---------------------------------------------------------


@pytest.mark.asyncio
async def test_call_later_runs_in_order_at_exact_virtual_times() -> None:
    seen: list[tuple[str, float]] = []
    async with VirtualClock() as clock:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        loop.call_later(20, lambda: seen.append(("b", clock.time())))
        loop.call_later(5, lambda: seen.append(("a", clock.time())))
        loop.call_later(60, done.set_result, None)
        await done

    assert seen == [("a", 5), ("b", 20)]


@pytest.mark.asyncio
async def test_wait_for_and_timeout_expire_in_virtual_time() -> None:
    async with VirtualClock() as clock:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.Event().wait(), 5)
        assert clock.time() == 5

        with pytest.raises(TimeoutError):
            async with asyncio.timeout(2.5):
                await asyncio.sleep(3600)
        assert clock.time() == 7.5


@pytest.mark.asyncio
async def test_time_sleep_advances_without_blocking() -> None:
    async with VirtualClock() as clock:
        loop = asyncio.get_running_loop()
        fired: asyncio.Future[float] = loop.create_future()
        loop.call_later(1, lambda: fired.set_result(clock.time()))
        time.sleep(10)  # noqa: ASYNC251 (virtual: advances the clock)

        assert clock.time() == 10
        assert not fired.done()  # Synchronous: the timer runs once the loop runs.

        assert await fired == 10


@pytest.mark.asyncio
async def test_time_sleep_negative_is_refused() -> None:
    async with VirtualClock() as clock:
        with pytest.raises(ValueError, match=r"sleep length must be non-negative"):
            time.sleep(-1)  # noqa: ASYNC251 (virtual: advances the clock)
        assert clock.time() == 0


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("seconds", "error", "message"),
    [
        (float("nan"), ValueError, "Invalid value NaN"),
        (float("inf"), OverflowError, "timestamp out of range"),
    ],
)
async def test_time_sleep_refuses_what_the_real_one_refuses(
    seconds: float, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        _clock_patch.real_sleep(seconds)

    async with VirtualClock() as clock:
        with pytest.raises(error, match=message):
            time.sleep(seconds)  # noqa: ASYNC251 (virtual: advances the clock)
        assert clock.time() == 0


@pytest.mark.asyncio
async def test_long_sleep_loop_is_exact() -> None:
    async with VirtualClock() as clock:
        for _ in range(1000):
            await asyncio.sleep(0.25)

        assert clock.time() == 250


# --- manual mode -----------------------------------------------------------------


@pytest.mark.asyncio
async def test_manual_mode_does_not_jump() -> None:
    async with VirtualClock(autojump=False) as clock:
        sleeper = asyncio.create_task(asyncio.sleep(1))
        for _ in range(20):
            await asyncio.sleep(0)

        assert not sleeper.done()
        assert clock.time() == 0
        await clock.advance(1)
        assert sleeper.done()


@pytest.mark.asyncio
async def test_advance_runs_every_timer_on_the_way_in_order() -> None:
    seen: list[tuple[str, float]] = []
    async with VirtualClock(autojump=False) as clock:
        loop = asyncio.get_running_loop()

        def first() -> None:
            seen.append(("first", clock.time()))
            # Scheduled during the advance, still inside it: must run too.
            loop.call_later(2, lambda: seen.append(("chained", clock.time())))

        loop.call_later(3, first)
        loop.call_later(4, lambda: seen.append(("second", clock.time())))
        loop.call_later(10, lambda: seen.append(("late", clock.time())))

        await clock.advance(6)

        assert seen == [("first", 3), ("second", 4), ("chained", 5)]
        assert clock.time() == 6

        await clock.advance(4)
        assert seen[-1] == ("late", 10)


@pytest.mark.asyncio
async def test_advance_wakes_sleeping_tasks() -> None:
    async with VirtualClock(autojump=False) as clock:

        async def sleeper() -> float:
            await asyncio.sleep(3)
            return clock.time()

        task = asyncio.create_task(sleeper())
        await clock.advance(2)
        assert not task.done()

        await clock.advance(2)
        assert task.done()
        assert task.result() == 3
        assert clock.time() == 4


@pytest.mark.asyncio
async def test_advance_until_stops_at_the_first_instant() -> None:
    async with VirtualClock(autojump=False) as clock:
        ticks: list[float] = []

        async def ticker() -> None:
            while True:
                await asyncio.sleep(1.5)
                ticks.append(clock.time())

        task = asyncio.create_task(ticker())
        await clock.advance_until(lambda: len(ticks) >= 3, timeout=60)
        task.cancel()

        assert ticks == [1.5, 3.0, 4.5]
        assert clock.time() == 4.5


@pytest.mark.asyncio
async def test_advance_until_times_out_at_the_virtual_deadline() -> None:
    async with VirtualClock(autojump=False) as clock:
        message = r"advance_until\(\): .* was still false after 7 virtual seconds"
        with pytest.raises(TimeoutError, match=message):
            await clock.advance_until(lambda: False, timeout=7)

        assert clock.time() == 7


@pytest.mark.asyncio
async def test_advance_until_passes_predicate_errors() -> None:
    async with VirtualClock() as clock:
        calls: list[float] = []

        def predicate() -> bool:
            calls.append(clock.time())
            if len(calls) > 1:
                raise KeyError("broken predicate")
            return False

        with pytest.raises(KeyError, match="broken predicate"):
            await clock.advance_until(predicate, timeout=5)

        assert clock._request is None


@pytest.mark.asyncio
async def test_advance_in_autojump_mode() -> None:
    async with VirtualClock() as clock:
        await clock.advance(12.5)
        assert clock.time() == 12.5


@pytest.mark.asyncio
@pytest.mark.parametrize("seconds", [-1, float("nan"), float("inf"), "1"])
async def test_advance_bad_seconds(seconds: Any) -> None:
    async with VirtualClock() as clock:
        with pytest.raises(ValueError, match=r"advance\(\) needs finite virtual"):
            await clock.advance(seconds)


@pytest.mark.asyncio
async def test_advance_until_bad_arguments() -> None:
    async with VirtualClock() as clock:
        with pytest.raises(ValueError, match=r"needs a callable predicate, got 3"):
            await clock.advance_until(3, timeout=1)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"needs timeout=None or finite"):
            await clock.advance_until(lambda: True, timeout=-2)


@pytest.mark.asyncio
async def test_two_advances_at_once_are_refused() -> None:
    async with VirtualClock(autojump=False) as clock:
        first = asyncio.create_task(clock.advance(5))
        await asyncio.sleep(0)

        with pytest.raises(RuntimeError, match=r"another advance\(\) or advance_"):
            await clock.advance(1)

        await first
        assert clock.time() == 5


@pytest.mark.asyncio
async def test_advance_needs_an_active_clock() -> None:
    clock = VirtualClock()
    with pytest.raises(RuntimeError, match=r"advance\(\) needs an active clock"):
        await clock.advance(1)


@pytest.mark.asyncio
async def test_advance_from_another_loop_is_refused() -> None:
    async with VirtualClock() as clock:

        async def from_other_loop() -> None:
            await clock.advance(1)

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(asyncio.run, from_other_loop())
            with pytest.raises(RuntimeError, match=r"called from event loop .* runs"):
                await asyncio.wrap_future(future)


# --- misuse ------------------------------------------------------------------------


def test_entering_outside_a_running_loop() -> None:
    coroutine = VirtualClock().__aenter__()
    with pytest.raises(RuntimeError, match=r"inside a running event loop"):
        coroutine.send(None)


@pytest.mark.asyncio
async def test_nesting_two_clocks_on_one_loop() -> None:
    async with VirtualClock() as outer:
        with pytest.raises(RuntimeError, match=r"already active on this event loop"):
            async with VirtualClock():
                pass

        assert current_clock() is outer


@pytest.mark.asyncio
async def test_reentering_a_clock() -> None:
    clock = VirtualClock()
    async with clock:
        pass

    with pytest.raises(RuntimeError, match=r"cannot be reused"):
        async with clock:
            pass
    assert_restored(asyncio.get_running_loop())


@pytest.mark.asyncio
async def test_unsupported_loop_is_refused() -> None:
    class OtherLoop:
        pass

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(asyncio.events, "_get_running_loop", lambda: OtherLoop())
        with pytest.raises(NotImplementedError, match=r"does not support the event"):
            await VirtualClock().__aenter__()


# --- restoration -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_restored_after_normal_exit() -> None:
    loop = asyncio.get_running_loop()
    async with VirtualClock(start=START) as clock:
        assert current_clock() is clock
        assert time.time is not REAL_FUNCTIONS[0][2]
        await asyncio.sleep(100)

    assert_restored(loop)
    assert clock.time() == 100
    assert not clock.active


@pytest.mark.asyncio
async def test_restored_after_an_exception() -> None:
    loop = asyncio.get_running_loop()

    async def failing_body() -> None:
        async with VirtualClock():
            await asyncio.sleep(1)
            raise ZeroDivisionError("in the body")

    with pytest.raises(ZeroDivisionError, match="in the body"):
        await failing_body()

    assert_restored(loop)


def _fail_scan() -> None:
    raise RuntimeError("injected: scan failed")


def _swap_then_fail(to_fake: bool) -> None:
    _REAL_SWAP(to_fake)
    if to_fake:
        raise RuntimeError("injected: swap failed after swapping")


def _fail_proxy(*args: Any) -> None:
    raise RuntimeError("injected: no selector proxy")


_REAL_SWAP = _clock_patch._swap
START_FAILURES = {
    "scan": (_clock_patch, "_scan_new_modules", _fail_scan),
    "swap": (_clock_patch, "_swap", _swap_then_fail),
    "proxy": (_clock_io, "SelectorProxy", _fail_proxy),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("failure", START_FAILURES.values(), ids=START_FAILURES.keys())
async def test_a_failed_start_leaves_everything_real(
    failure: tuple[Any, str, Callable[..., None]],
) -> None:
    loop = asyncio.get_running_loop()
    handle = loop.call_later(60, lambda: None)
    when = handle.when()

    clock = VirtualClock()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(*failure)
            with pytest.raises(RuntimeError, match=r"^injected: "):
                await clock.__aenter__()

        assert_restored(loop)
        assert handle.when() == when
        assert clock.loop is None
        assert not clock.active
        async with clock:  # the same clock can be entered again
            await asyncio.sleep(5)
        assert clock.time() == 5
    finally:
        handle.cancel()


@pytest.mark.asyncio
async def test_pending_timers_keep_their_remaining_delay_after_exit() -> None:
    loop = asyncio.get_running_loop()
    async with VirtualClock():
        await asyncio.sleep(7200)
        handle = loop.call_later(30, lambda: None)

    remaining = handle.when() - loop.time()
    handle.cancel()
    assert remaining == pytest.approx(30, abs=0.5)


@pytest.mark.asyncio
async def test_current_clock_outside_a_loop_is_none() -> None:
    async with VirtualClock():
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            assert pool.submit(current_clock).result() is None
    assert current_clock() is None


# --- threads and other loops are not under the clock ---------------------------------


@pytest.mark.asyncio
async def test_thread_pool_reads_real_time() -> None:
    async with VirtualClock(start=START) as clock:
        await asyncio.sleep(50)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            real_now = pool.submit(time.time).result()
            real_date = pool.submit(datetime.date.today).result()
            pool.submit(time.sleep, 0).result()  # A real sleep, not an advance.

        assert real_now > START.timestamp() + 365 * 86400
        assert real_date.year > START.year
        assert clock.time() == 50


@pytest.mark.asyncio
async def test_a_loop_in_another_thread_keeps_real_time() -> None:
    def other_thread() -> tuple[float, float, float]:
        async def main() -> tuple[float, float, float]:
            loop = asyncio.get_running_loop()
            before = loop.time()
            await asyncio.sleep(0.001)
            return time.time(), loop.time() - before, time.monotonic() - loop.time()

        return asyncio.run(main())

    async with VirtualClock(start=START) as clock:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            wall, elapsed, skew = pool.submit(other_thread).result()

        assert wall > START.timestamp() + 365 * 86400
        assert elapsed > 0  # Its sleep took real time, not a virtual jump.
        assert abs(skew) < 1  # Its monotonic() and loop.time() are both real.
        assert clock.time() == 0


# --- in-flight work, executor work, owned addresses -----------------------------------


@pytest.mark.asyncio
async def test_in_flight_is_a_counting_noop_without_clock() -> None:
    before = _clock_io.holds()
    with in_flight():
        with in_flight():
            assert _clock_io.holds() == before + 2
    assert _clock_io.holds() == before


@pytest.mark.asyncio
async def test_in_flight_holds_off_the_jump() -> None:
    async with VirtualClock() as clock:
        loop = asyncio.get_running_loop()
        released = loop.create_future()
        sleeper = asyncio.create_task(asyncio.sleep(10))

        with in_flight():
            # Real work finishing on a thread after a real delay.
            timer = threading.Timer(
                0.05, loop.call_soon_threadsafe, (released.set_result, None)
            )
            timer.start()
            done, _ = await asyncio.wait(
                {released, sleeper}, return_when=asyncio.FIRST_COMPLETED
            )

        assert done == {released}
        assert clock.time() == 0
        await sleeper
        assert clock.time() == 10
        timer.join()


@pytest.mark.asyncio
async def test_executor_work_holds_off_the_jump() -> None:
    async with VirtualClock() as clock:
        loop = asyncio.get_running_loop()
        go = threading.Event()
        timer = threading.Timer(0.05, go.set)

        def slow_work() -> float:
            go.wait(5)
            return time.time()  # In the worker thread: real time.

        sleeper = asyncio.create_task(asyncio.sleep(10))
        work = loop.run_in_executor(None, slow_work)
        timer.start()
        pending: set[asyncio.Future[Any]] = {work, sleeper}
        done, _ = await asyncio.wait(pending, return_when="FIRST_COMPLETED")

        assert done == {work}
        assert clock.time() == 0
        assert _clock_io.holds() == 0
        await sleeper
        timer.join()


@pytest.mark.asyncio
async def test_register_owned_address_and_undo() -> None:
    undo = register_owned_address("127.0.0.1", 40001)
    assert _clock_io._address_is_owned(("127.0.0.1", 40001))
    assert _clock_io._address_is_owned(("localhost", 40001))
    assert not _clock_io._address_is_owned(("127.0.0.1", 40002))

    undo()
    undo()  # Second call does nothing.
    assert not _clock_io._address_is_owned(("127.0.0.1", 40001))

    undo_any = register_owned_address("0.0.0.0", 40003)
    assert _clock_io._address_is_owned(("10.1.2.3", 40003))
    undo_any()
    assert 40003 not in _clock_io._owned


@pytest.mark.parametrize(("host", "port"), [(None, 80), ("127.0.0.1", 0), ("h", "80")])
def test_register_owned_address_bad_input(host: Any, port: Any) -> None:
    with pytest.raises(ValueError, match=r"cannot register owned address host="):
        register_owned_address(host, port)


# --- real I/O against virtual timeouts ------------------------------------------------


ROUNDS = 200
CLIENTS = 20  # Concurrent connections, so 200 rounds of 50 ms take ~0.5 s.
LATENCY = 0.05


async def _run_rounds(port: int, host: str = "127.0.0.1") -> int:
    """Send ROUNDS requests over CLIENTS connections; return the replies."""

    async def client() -> int:
        reader, writer = await asyncio.open_connection(host, port)
        replies = 0
        try:
            for _ in range(ROUNDS // CLIENTS):
                writer.write(b"ping\n")
                line = await asyncio.wait_for(reader.readline(), 5)
                replies += line == b"pong\n"
        finally:
            writer.close()
            await writer.wait_closed()
        return replies

    async with asyncio.timeout(60):
        return sum(await asyncio.gather(*(client() for _ in range(CLIENTS))))


def _real_delay(loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
    """Return a future set after LATENCY real seconds, by a thread timer."""
    future: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not future.done():
            future.set_result(None)

    threading.Timer(LATENCY, loop.call_soon_threadsafe, (wake,)).start()
    return future


@pytest.mark.asyncio
async def test_owned_server_with_real_latency_no_spurious_timeout() -> None:
    loop = asyncio.get_running_loop()

    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while await reader.readline():
            with in_flight():
                await _real_delay(loop)
                writer.write(b"pong\n")
        writer.close()

    async with VirtualClock(quiet_period=0) as clock:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        undo = register_owned_address("127.0.0.1", port)
        try:
            replies = await _run_rounds(port, host="localhost")
        finally:
            undo()
            server.close()
            await server.wait_closed()

        assert replies == ROUNDS
        assert clock.time() < 5


class _ThreadServer:
    """A blocking TCP server in threads that answers after a real delay."""

    def __init__(self) -> None:
        import socket

        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.stop = threading.Event()
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(connection,))
            thread.start()
            self.threads.append(thread)

    def _serve(self, connection: Any) -> None:
        with connection, connection.makefile("rb") as lines:
            for _ in lines:
                self.stop.wait(LATENCY)  # Real latency (a thread, no clock).
                connection.sendall(b"pong\n")

    def close(self) -> None:
        import socket

        self.stop.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # Wakes the blocked accept().
        except OSError:
            pass
        self.listener.close()
        self.acceptor.join(5)
        for thread in self.threads:
            thread.join(5)


@pytest.mark.asyncio
async def test_foreign_server_with_quiet_period_no_spurious_timeout() -> None:
    server = _ThreadServer()
    try:
        # A quiet period well past the latency, for a loaded machine.
        async with VirtualClock(quiet_period=10 * LATENCY) as clock:
            replies = await _run_rounds(server.port)
            assert replies == ROUNDS
            assert clock.time() < 5
    finally:
        server.close()
    assert not any(thread.is_alive() for thread in server.threads)


@pytest.mark.asyncio
async def test_foreign_server_without_quiet_period_times_out() -> None:
    # The control: without the quiet period the clock jumps past the real reply.
    server = _ThreadServer()
    try:
        async with VirtualClock(quiet_period=0) as clock:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"ping\n")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.readline(), 5)
            assert clock.time() == 5
            writer.close()
            await writer.wait_closed()
    finally:
        server.close()


@pytest.mark.asyncio
async def test_foreign_socket_detection_is_cached_and_refreshed() -> None:
    server = _ThreadServer()
    try:
        async with VirtualClock() as clock:
            loop = asyncio.get_running_loop()
            proxy: Any = vars(loop)["_selector"]
            assert not proxy._watches_foreign_sockets()

            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            await asyncio.sleep(0)
            assert proxy._watches_foreign_sockets()

            undo = register_owned_address("127.0.0.1", server.port)
            assert not proxy._watches_foreign_sockets()
            undo()
            assert proxy._watches_foreign_sockets()

            writer.close()
            await writer.wait_closed()
            assert not proxy._watches_foreign_sockets()
            assert clock.time() == 0
    finally:
        server.close()


# --- the library under the clock ------------------------------------------------------


def _expected_delays(seed: int, attempts: int, **params: float) -> list[float]:
    """The documented backoff formula, with a twin of the retrier's rng."""
    import random

    from lvmopstools.retrier import MAX_JITTER

    rng = random.Random(seed)
    delays = []
    for attempt in range(1, attempts):
        jitter = rng.uniform(0.0, MAX_JITTER)
        raw = params["delay"] + params["base"] ** attempt + jitter
        delays.append(min(raw, params["max_delay"]))
    return delays


def _timestamps_to_delays(stamps: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(stamps)]


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_retrier_backoff_schedule_in_virtual_time(kind: str) -> None:
    from lvmopstools.retrier import Retrier

    params = {"delay": 0.5, "base": 2.0, "max_delay": 32.0}
    retrier = Retrier(
        max_attempts=5,
        delay=params["delay"],
        exponential_backoff_base=params["base"],
        max_delay=params["max_delay"],
        seed=1234,
    )
    stamps: list[float] = []

    async with VirtualClock() as clock:
        if kind == "sync":

            @retrier
            def failing_sync() -> None:
                stamps.append(clock.time())
                raise OSError("down")

            call: Callable[[], Any] = failing_sync
            with pytest.raises(OSError, match="down"):
                call()
        else:

            @retrier
            async def failing_async() -> None:
                stamps.append(clock.time())
                raise OSError("down")

            with pytest.raises(OSError, match="down"):
                await failing_async()

    expected = _expected_delays(1234, 5, **params)
    assert stamps[0] == 0
    assert _timestamps_to_delays(stamps) == pytest.approx(expected, abs=1e-9)


@pytest.mark.asyncio
async def test_retrier_max_delay_caps_in_virtual_time() -> None:
    from lvmopstools.retrier import Retrier

    params = {"delay": 1.0, "base": 10.0, "max_delay": 30.0}
    retrier = Retrier(
        max_attempts=4,
        delay=params["delay"],
        exponential_backoff_base=params["base"],
        max_delay=params["max_delay"],
        seed=7,
    )
    stamps: list[float] = []

    @retrier
    async def failing() -> None:
        stamps.append(time.monotonic())
        raise ConnectionError("refused")

    async with VirtualClock():
        with pytest.raises(ConnectionError, match="refused"):
            await failing()

    delays = _timestamps_to_delays(stamps)
    assert delays == pytest.approx(_expected_delays(7, 4, **params), abs=1e-9)
    assert delays[1:] == pytest.approx([30.0, 30.0], abs=1e-9)  # 100 s, 1000 s capped
    assert delays[0] < 30


@pytest.mark.asyncio
async def test_socket_handler_timeouts_in_virtual_time() -> None:
    from lvmopstools.socket import AsyncSocketHandler

    connections = 0
    closed = asyncio.Event()

    async def silent(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        nonlocal connections
        connections += 1
        await reader.read()  # Never answers; returns when the client closes.
        writer.close()
        closed.set()

    async with VirtualClock() as clock:
        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        undo = register_owned_address("127.0.0.1", port)
        handler = AsyncSocketHandler(
            "127.0.0.1",
            port,
            timeout=5,
            retrier_params={
                "max_attempts": 3,
                "delay": 1.0,
                "use_exponential_backoff": False,
            },
        )

        async def ask(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> bytes:
            writer.write(b"status\n")
            return await reader.readline()

        try:
            with pytest.raises(TimeoutError, match=r"within timeout=5 s"):
                await handler(ask)
            elapsed = clock.time()
        finally:
            undo()
            server.close()
            await server.wait_closed()

    assert connections == 3
    assert elapsed == 3 * 5 + 2 * 1.0


class _StuckActor(LVMActor):
    """An LVMActor whose check always fails; it records virtual timestamps."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started_at: list[float] = []
        self.checked_at: list[float] = []

    def _now(self) -> float:
        clock = current_clock()
        assert clock is not None, "the actor must run under the virtual clock"
        return clock.time()

    async def start(self) -> _StuckActor:
        await super().start()
        self.started_at.append(self._now())
        return self

    async def _check_internal(self) -> None:
        self.checked_at.append(self._now())
        raise CheckError("the device does not answer")

    async def _troubleshoot_internal(
        self, error_code: ErrorCodesBase, exception: Exception | None = None
    ) -> bool:
        return False


@pytest.mark.asyncio
@pytest.mark.virtual_clock(quiet_period=0)
async def test_actor_restarts_at_the_virtual_second_the_logic_implies(
    virtual_clock: VirtualClock, mock_amqp_broker: Any
) -> None:
    # The check fails at t=0, so the actor is not ready from then on. The loop
    # wakes every 30 s; the first wake-up that finds more than 300 s of
    # not-ready time is at t=330, and it reloads the actor instead of
    # checking. The reloaded actor checks at once (t=330), fails, and is due
    # for its next restart 330 s later. So the checks fall on every multiple
    # of 30 s, once each, and the starts on multiples of 330 s.
    actor = _StuckActor(
        name="stuck-under-clock",
        url=mock_amqp_broker.url,
        check_interval=30,
        restart_after=300,
    )
    await actor.start()
    try:
        await virtual_clock.advance_until(
            lambda: len(actor.started_at) >= 3, timeout=1000
        )
        loops = [
            task
            for task in asyncio.all_tasks()
            if task.get_name() == f"{actor.name}-check-loop" and not task.done()
        ]
    finally:
        await actor.stop()

    assert actor.started_at == [0, 330, 660]
    assert actor.checked_at[:22] == [30.0 * k for k in range(22)]
    assert actor.state & ActorState.TROUBLESHOOT_FAILED
    assert len(loops) == 1
