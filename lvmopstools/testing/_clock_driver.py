"""How a virtual clock moves its time: idle-loop jumps and advances (private).

:class:`ClockDriver` is the part of :class:`~lvmopstools.testing.VirtualClock`
that decides when virtual loop time moves and how far. The selector proxy of
:mod:`lvmopstools.testing._clock_io` asks it, each time the event loop would
wait, how far time may jump (:meth:`~ClockDriver.jump_limit`) and then tells
it that the loop is idle (:meth:`~ClockDriver.idle`). ``advance()`` and
``advance_until()`` leave one :class:`AdvanceRequest` that the idle loop
settles, and the blocking ``time.sleep()`` under the clock moves time at once
(:meth:`~ClockDriver.sleep_virtually`).

It is not for reading or converting the time (wall time, ``perf_counter``,
datetimes), nor for starting and stopping the clock on an event loop: that is
:mod:`lvmopstools.testing.clock`, which also sets the virtual loop time this
class moves. It does not decide whether real I/O is pending: the selector
proxy only calls :meth:`~ClockDriver.idle` once it has waited for it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

__all__ = ["AdvanceRequest", "ClockDriver", "is_seconds"]

_INF = float("inf")


def is_seconds(value: object) -> bool:
    """Return True if ``value`` is a finite real number of seconds, 0 or more.

    Booleans are refused although they are ints: ``advance(True)`` is a bug.
    """
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and value >= 0
    )


class AdvanceRequest:
    """A pending ``advance`` or ``advance_until`` on the clock.

    Parameters
    ----------
    future
        Resolved with True when the predicate held, False when time reached
        ``limit`` first, or the exception the predicate raised.
    limit
        The loop time at which the advance stops; infinite for none.
    predicate
        The ``advance_until`` predicate, or None for a plain ``advance``.
    """

    __slots__ = ("future", "limit", "predicate")

    def __init__(
        self,
        future: asyncio.Future[bool],
        limit: float,
        predicate: Callable[[], object] | None,
    ) -> None:
        self.future = future
        self.limit = limit
        self.predicate = predicate


class ClockDriver:
    """Move virtual loop time: jumps of an idle loop, advances and sleeps.

    The base class of :class:`~lvmopstools.testing.VirtualClock`. It owns the
    pending advance (at most one at a time) and moves ``_now``, the virtual
    loop time, which the clock sets when it starts. From the clock it reads
    ``autojump``, ``_active`` and ``_loop`` (whether it runs, and on which
    loop) and ``time()``, for its error messages.
    """

    autojump: bool
    _now: float
    _active: bool
    _loop: asyncio.AbstractEventLoop | None

    if TYPE_CHECKING:

        def time(self) -> float:
            """Return the virtual seconds elapsed since the clock started."""
            ...

    def __init__(self) -> None:
        self._request: AdvanceRequest | None = None

    def jump_limit(self) -> float | None:
        """Return the loop time up to which an idle loop may jump, or None.

        Called by the selector proxy; not meant for tests.
        """
        request = self._request
        if request is not None:
            return request.limit
        return _INF if self.autojump else None

    def idle(self, next_timer: float | None, limit: float) -> bool:
        """Move virtual time because the loop is idle; tell whether it moved.

        Called by the selector proxy; not meant for tests.
        """
        request = self._request
        if request is not None and request.predicate is not None:
            try:
                satisfied = bool(request.predicate())
            except BaseException as error:
                self._finish(request, error)
                return True
            if satisfied:
                self._finish(request, True)
                return True

        if next_timer is not None and next_timer <= limit:
            self._now = max(self._now, next_timer)
            return True

        if limit == _INF:
            return False

        self._now = max(self._now, limit)
        if request is not None:
            self._finish(request, False)
        return True

    def _finish(self, request: AdvanceRequest, outcome: bool | BaseException) -> None:
        self._request = None
        if request.future.done():
            return
        if isinstance(outcome, BaseException):
            request.future.set_exception(outcome)
        else:
            request.future.set_result(outcome)

    def _cancel_request(self) -> None:
        """Cancel the pending advance, if any (the clock is stopping)."""
        request, self._request = self._request, None
        if request is not None and not request.future.done():
            request.future.cancel()

    def sleep_virtually(self, seconds: float) -> None:
        """Move virtual time forward by ``seconds`` (``time.sleep`` under the clock).

        Timers that become due run when control returns to the event loop.
        """
        self._now += seconds

    def _check_loop(self, method: str) -> asyncio.AbstractEventLoop:
        """Return the running loop, checking it is this clock's loop."""
        if not self._active:
            msg = (
                f"{method}() needs an active clock, but {self!r} is not running: "
                "call it inside 'async with clock:'."
            )
            raise RuntimeError(msg)

        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            msg = (
                f"{method}() was called from event loop {loop!r}, but this clock "
                f"runs on {self._loop!r}: use each clock on its own loop only."
            )
            raise RuntimeError(msg)

        if self._request is not None:
            msg = (
                f"{method}() was called while another advance() or "
                "advance_until() is waiting on this clock: await them one at a "
                "time."
            )
            raise RuntimeError(msg)
        return loop

    async def advance(self, seconds: float) -> None:
        """Move virtual time forward, running every timer due on the way.

        Timers run in order at their own virtual time, including timers that
        callbacks schedule during the advance. Returns when time has reached
        the target and the loop is idle. Works in both modes.

        Parameters
        ----------
        seconds
            Virtual seconds to move forward; finite and >= 0.

        Raises
        ------
        ValueError
            If ``seconds`` is negative or not finite.
        RuntimeError
            If the clock is not active, runs on another loop, or another
            advance is already waiting.
        """
        if not is_seconds(seconds):
            msg = f"advance() needs finite virtual seconds >= 0, got {seconds!r}."
            raise ValueError(msg)

        loop = self._check_loop("advance")
        await self._wait(
            AdvanceRequest(loop.create_future(), self._now + seconds, None)
        )

    async def advance_until(
        self,
        predicate: Callable[[], object],
        *,
        timeout: float | None,  # noqa: ASYNC109 (virtual seconds, not a real timeout)
    ) -> None:
        """Move virtual time until ``predicate()`` is true.

        The predicate is called now and then each time the loop is idle, before
        each jump, so time stops at the first instant it holds.

        Parameters
        ----------
        predicate
            A function of no arguments; truthy means done.
        timeout
            Keyword only. Virtual seconds after which to give up, or None for
            no limit (then, with no timer left, the loop waits for real I/O).

        Raises
        ------
        TimeoutError
            If ``predicate()`` is still false ``timeout`` virtual seconds later.
        ValueError
            If ``timeout`` is negative or not finite, or ``predicate`` is not
            callable.
        RuntimeError
            As for :meth:`advance`.
        """
        if not callable(predicate):
            msg = f"advance_until() needs a callable predicate, got {predicate!r}."
            raise ValueError(msg)
        if timeout is not None and not is_seconds(timeout):
            msg = (
                f"advance_until() needs timeout=None or finite virtual seconds "
                f">= 0, got {timeout!r}."
            )
            raise ValueError(msg)

        loop = self._check_loop("advance_until")
        if predicate():
            return

        limit = _INF if timeout is None else self._now + timeout
        request = AdvanceRequest(loop.create_future(), limit, predicate)
        if not await self._wait(request):
            msg = (
                f"advance_until(): {predicate!r} was still false after {timeout!r} "
                f"virtual seconds (clock.time() = {self.time():.6f})."
            )
            raise TimeoutError(msg)

    async def _wait(self, request: AdvanceRequest) -> bool:
        self._request = request
        try:
            return await request.future
        finally:
            if self._request is request:
                self._request = None
