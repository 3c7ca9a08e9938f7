"""One virtual clock for an asyncio event loop, the wall clock and blocking sleeps.

While ``async with VirtualClock() as clock:`` is active, virtual time is the
only time on the event loop that entered it: ``loop.time()``,
``asyncio.sleep``, ``asyncio.wait_for`` / ``asyncio.timeout``,
``loop.call_later``, ``time.time()``, ``time.time_ns()``, ``time.monotonic()``,
``time.perf_counter()``, ``datetime.datetime.now()`` / ``utcnow()`` /
``today()``, ``datetime.date.today()`` and the blocking ``time.sleep()`` all
read it. Virtual time stands still while code runs and moves only when the
clock moves it, so a schedule can be asserted exactly.

Time moves in one of two ways:

- autojump (the default): when no callback is ready, no real I/O is pending
  and no work is in flight, the clock jumps to the next timer;
- manual: ``await clock.advance(seconds)`` and
  ``await clock.advance_until(predicate, timeout=...)``.

The clock does not jump while real I/O may still be on its way. Servers,
proxies and brokers of the toolkit hold :func:`in_flight` while they work in
real time, and declare their listening addresses with
:func:`register_owned_address`; for any other socket the event loop watches
the clock first waits a real quiet period (``quiet_period``) for it.

What it does not simulate: it does not make CPU time virtual (code that runs
for a real second takes zero virtual seconds); it does not move the time of
other threads or other event loops (they keep the real functions); it does
not see sockets used from threads, and it cannot know that a foreign server
is slower than the quiet period.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
from asyncio import selector_events
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from lvmopstools.testing import _clock_driver, _clock_io, _clock_patch

if TYPE_CHECKING:
    import contextlib
    from concurrent.futures import Executor
    from types import TracebackType

__all__ = [
    "VirtualClock",
    "current_clock",
    "in_flight",
    "register_owned_address",
]

log = logging.getLogger(__name__)

DEFAULT_QUIET_PERIOD = 0.005

_IN_FLIGHT = _clock_io.InFlight()
# Virtual loop time starts on this grid (per second); see VirtualClock._start_on.
_GRID = 2**16


def _start_epoch(start: datetime.datetime | float | None) -> float:
    """Return the epoch seconds for the ``start`` argument."""
    if start is None:
        return _clock_patch.real_time()

    if isinstance(start, datetime.datetime):
        if start.tzinfo is None:
            start = start.replace(tzinfo=datetime.UTC)
        return start.timestamp()

    if isinstance(start, int | float) and not isinstance(start, bool):
        if math.isfinite(start):
            return float(start)

    msg = (
        f"start must be a datetime (aware, or naive meaning UTC), epoch seconds "
        f"as a finite float, or None for the real now; got {start!r}."
    )
    raise TypeError(msg)


class VirtualClock(_clock_driver.ClockDriver):
    """Virtual time for the running event loop, the wall clock and sleeps.

    Use it as an async context manager inside a running event loop::

        async with VirtualClock(start=datetime(2026, 1, 1)) as clock:
            await asyncio.sleep(300)  # returns at once
            assert clock.time() == 300

    Parameters
    ----------
    start
        Keyword only. The wall time at which the clock starts: an aware
        :class:`datetime.datetime`, a naive one (read as UTC), epoch seconds,
        or None (the default) for the real now. ``time.time()`` and
        ``datetime.datetime.now()`` move on from it with virtual time.
    autojump
        Keyword only. If True (the default), jump to the next timer whenever
        the loop is idle. If False, time moves only through :meth:`advance`,
        :meth:`advance_until` and ``time.sleep``. Can be changed while the
        clock runs.
    quiet_period
        Keyword only. Real seconds to wait for I/O before each jump when the
        loop watches sockets that the toolkit does not own (a server in a
        thread, another process). A larger value is safer with slow foreign
        servers and makes every jump slower by that much; 0 never waits. It
        is not paid when every socket is owned (see
        :func:`register_owned_address`). Default 0.005.

    Raises
    ------
    TypeError
        If ``start`` has the wrong type.
    ValueError
        If ``quiet_period`` is negative or not finite.

    .. note::
        While the clock is active on a loop, ``time.sleep(s)`` called from
        that loop's thread advances virtual time by ``s`` and returns at once;
        being synchronous, it cannot run the timers that become due, which
        run when control returns to the loop. Threads and loops not under a
        clock get the real functions: the replacements check, on every call,
        which event loop runs in the calling thread.

    .. note::
        Modules that copied ``datetime.datetime``, ``datetime.date`` or a
        ``time`` function into their namespace (``from datetime import
        datetime``) before the clock started get the virtual one too, except
        the standard-library modules that wait in real time with such a copy
        (``threading``, ``queue``, ``subprocess``, ``concurrent``, ``asyncio``
        and a few more) and pytest itself. ``datetime.datetime.now()`` returns
        a real :class:`datetime.datetime`, and ``isinstance`` with the
        replaced classes accepts real datetimes.

    .. note::
        Only the selector event loops of :mod:`asyncio` are supported (the
        default loop on Linux and macOS); uvloop and the Windows proactor
        loop raise NotImplementedError. Threads started by the code under
        test other than through ``loop.run_in_executor`` (or
        ``asyncio.to_thread``) are invisible to the clock, which may jump
        while they work unless they hold :func:`in_flight`.

    .. note::
        Work in an executor holds off every jump until it ends, so a worker
        thread that waits for something only a virtual timer will do
        (``to_thread(event.wait)`` with ``call_later(1, event.set)``) stalls
        the clock: it polls for I/O and never reaches the timer. Holds are
        counted for the whole process, so real work under one clock also
        delays the jumps of a clock on another loop until it ends.

    .. note::
        When the clock exits, ``loop.time()``, ``time.monotonic()`` and
        ``time.perf_counter()`` are the real ones again, which read less
        than the last virtual value by the virtual time that passed. Timers
        still scheduled keep their remaining delay. On entry, virtual loop
        time starts up to 2**-16 s (15 us) after the real one; an absolute
        deadline taken from ``loop.time()`` before the clock started (for
        ``loop.call_at``) comes that much earlier.

    .. note::
        Calling the replaced ``datetime.datetime`` or ``datetime.date``, or
        their class methods, makes real objects, and datetimes pickle as
        usual while the classes are replaced. ``type(value) is
        datetime.datetime`` is False under a clock (``isinstance`` is True).
    """

    def __init__(
        self,
        *,
        start: datetime.datetime | float | None = None,
        autojump: bool = True,
        quiet_period: float = DEFAULT_QUIET_PERIOD,
    ) -> None:
        if not _clock_driver.is_seconds(quiet_period):
            msg = (
                f"quiet_period must be a finite number of real seconds >= 0, "
                f"got {quiet_period!r}."
            )
            raise ValueError(msg)

        super().__init__()
        self.autojump = bool(autojump)
        self.quiet_period = float(quiet_period)
        self._start = start
        _start_epoch(start)  # Checked now, so that a bad start fails at once.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._entered = False
        self._active = False
        self._origin = 0.0
        self._now = 0.0
        self._wall_origin = 0.0
        self._perf_origin = 0.0
        self._undo: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        state = "active" if self._active else "inactive"
        return (
            f"<VirtualClock {state} time={self.time():.6f} "
            f"autojump={self.autojump} quiet_period={self.quiet_period}>"
        )

    # --- reading the time ---------------------------------------------------

    def time(self) -> float:
        """Return the virtual seconds elapsed since the clock started."""
        return self._now - self._origin

    def now(self, tz: datetime.tzinfo | None = datetime.UTC) -> datetime.datetime:
        """Return the virtual wall time as a datetime.

        Parameters
        ----------
        tz
            Time zone of the result; UTC by default, None for naive local time.
        """
        return _clock_patch.real_datetime.fromtimestamp(self.wall_time(), tz)

    def loop_time(self) -> float:
        """Return the virtual ``loop.time()`` (and ``time.monotonic()``)."""
        return self._now

    def wall_time(self) -> float:
        """Return the virtual ``time.time()``: epoch seconds."""
        return self._wall_origin + (self._now - self._origin)

    def perf_time(self) -> float:
        """Return the virtual ``time.perf_counter()``."""
        return self._perf_origin + (self._now - self._origin)

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the clock is bound to (None before it starts)."""
        return self._loop

    @property
    def active(self) -> bool:
        """Whether the clock is running (entered and not exited)."""
        return self._active

    # --- entering and leaving -----------------------------------------------

    async def __aenter__(self) -> VirtualClock:
        self._start_on(self._check_can_start())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()

    def _check_can_start(self) -> selector_events.BaseSelectorEventLoop:
        """Return the running loop, or raise if the clock cannot start on it."""
        if self._entered:
            msg = (
                f"{self!r} was already entered once; a VirtualClock cannot be "
                "reused: create a new VirtualClock for each block."
            )
            raise RuntimeError(msg)

        loop = asyncio.events._get_running_loop()
        if loop is None:
            msg = (
                "VirtualClock must be entered inside a running event loop: use "
                "'async with VirtualClock()' in a coroutine run by asyncio."
            )
            raise RuntimeError(msg)

        other = _clock_patch._clocks.get(loop)
        if other is not None:
            msg = (
                f"a VirtualClock is already active on this event loop ({other!r}); "
                "clocks cannot be nested: use the active one (current_clock())."
            )
            raise RuntimeError(msg)

        if not isinstance(loop, selector_events.BaseSelectorEventLoop) or not all(
            hasattr(loop, name) for name in ("_selector", "_scheduled", "_ssock")
        ):
            msg = (
                f"VirtualClock does not support the event loop {loop!r} "
                f"({type(loop).__module__}.{type(loop).__qualname__}): only "
                "asyncio's selector event loops are supported (not uvloop or "
                "the proactor loop)."
            )
            raise NotImplementedError(msg)

        return loop

    def _start_on(self, loop: selector_events.BaseSelectorEventLoop) -> None:
        """Set the clock's origins on ``loop``, then patch it (see _patch_loop).

        A failure on the way puts back what was patched and leaves the clock
        as it was before: not started, and free to enter.
        """
        loop_any = cast(Any, loop)
        self._entered = True
        self._loop = loop
        # Virtual loop time starts at the next multiple of 2**-16 s (15 us) of
        # the real loop time, so that sums of binary fractions (0.25, 0.5 s)
        # stay exact: clock.time() reads 250, not 249.99999999999997, after a
        # thousand 0.25 s sleeps.
        real_now = _clock_patch.real_monotonic()
        self._origin = self._now = math.ceil(real_now * _GRID) / _GRID
        try:
            self._wall_origin = _start_epoch(self._start)
            self._perf_origin = _clock_patch.real_perf_counter()
            self._patch_loop(loop)
        except BaseException:
            while self._undo:
                self._undo.pop()()
            self._entered = False
            self._loop = None
            raise

        # Timers already scheduled move with loop time and keep their remaining
        # delay; loop time never goes back.
        for handle in loop_any._scheduled:
            handle._when += self._origin - real_now
        self._active = True
        log.debug("virtual clock started at wall time %.6f", self._wall_origin)

    def _patch_loop(self, loop: selector_events.BaseSelectorEventLoop) -> None:
        """Patch the loop's clock, selector and executor hook, and time functions.

        The undo of each step goes to ``_undo``, in order.
        """
        # Limitation: this relies on private attributes of CPython 3.11's
        # BaseEventLoop and BaseSelectorEventLoop: _selector (replaced by a
        # proxy), _scheduled (the timer heap, read for the next timer and
        # shifted on start and exit), _ssock (the self-pipe) and
        # TimerHandle._when.
        loop_any = cast(Any, loop)
        self._replace_attribute(loop_any, "time", self.loop_time)
        real_run_in_executor = loop.run_in_executor

        def run_in_executor(
            executor: Executor | None, func: Callable[..., Any], *args: Any
        ) -> asyncio.Future[Any]:
            future = real_run_in_executor(executor, func, *args)
            release = _clock_io.acquire_hold()
            future.add_done_callback(lambda _: release())
            return future

        self._replace_attribute(loop_any, "run_in_executor", run_in_executor)

        # _scheduled can be replaced by a new list when cancelled timers are
        # purged, so read it through the loop each time.
        def next_timer() -> float | None:
            heap = loop_any._scheduled
            return heap[0]._when if heap else None

        proxy = _clock_io.SelectorProxy(
            loop_any._selector, self, loop_any._ssock.fileno(), next_timer
        )
        self._replace_attribute(loop_any, "_selector", proxy)
        _clock_patch.install(loop, self)
        self._undo.append(lambda: _clock_patch.uninstall(loop))

    def _replace_attribute(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name`` and remember how to put the old state back."""
        had_own = name in vars(obj)
        old = vars(obj).get(name)
        setattr(obj, name, value)

        def undo() -> None:
            if had_own:
                setattr(obj, name, old)
            else:
                delattr(obj, name)

        self._undo.append(undo)

    def _stop(self) -> None:
        """Undo everything ``_start_on`` did, in reverse order."""
        if not self._active:
            return
        self._active = False
        loop = cast(Any, self._loop)

        self._cancel_request()

        while self._undo:
            self._undo.pop()()

        # Keep the remaining delay of the timers still scheduled: they were
        # set in virtual loop time, which the loop leaves now.
        shift = _clock_patch.real_monotonic() - self._now
        for handle in loop._scheduled:
            handle._when += shift
        log.debug("virtual clock stopped after %.6f virtual seconds", self.time())


def current_clock() -> VirtualClock | None:
    """Return the clock active on the running event loop, or None.

    Returns None outside a running loop too.
    """
    if not _clock_patch._clocks:
        return None
    loop = asyncio.events._get_running_loop()
    if loop is None:
        return None
    return cast("VirtualClock | None", _clock_patch._clocks.get(loop))


def in_flight() -> contextlib.AbstractContextManager[None]:
    """Hold off virtual-time jumps while real-time work proceeds.

    While at least one hold is active anywhere in the process, no active clock
    jumps; it keeps polling for real I/O instead. Hold it only while work goes
    on in real time (between reading a request and writing its reply, while
    forwarding bytes), never across a virtual delay (``asyncio.sleep``,
    ``call_later``): the clock must be free to jump to those, or the test
    stalls. A no-op without an active clock, reentrant, cheap (one lock), and
    thread-safe.

    Returns
    -------
    contextlib.AbstractContextManager
        A context manager to use in a ``with`` statement.
    """
    return _IN_FLIGHT


def register_owned_address(host: str, port: int) -> Callable[[], None]:
    """Declare a listening address as owned by the toolkit.

    Sockets whose local or peer address is owned (the listening socket itself,
    the connections it accepts, clients connected to it) do not make the clock
    wait its real-time quiet period before jumping. A wildcard host (``""``,
    ``"0.0.0.0"``, ``"::"``) owns the port on every address, and the local
    names ``localhost``, ``127.0.0.1`` and ``::1`` stand for one another.
    Process-wide; works with or without a clock.

    Parameters
    ----------
    host
        The host the server listens on.
    port
        The port it actually listens on (not 0).

    Returns
    -------
    Callable[[], None]
        A function that removes the registration; calling it again does nothing.

    Raises
    ------
    ValueError
        If ``host`` is not a str or ``port`` is not a positive int.
    """
    return _clock_io.register_owned_address(host, port)
