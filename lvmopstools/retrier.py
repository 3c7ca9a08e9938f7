"""Retry a failing function, synchronous or coroutine, with exponential backoff.

:class:`Retrier` is the reference retry decorator of lvmopstools. It wraps a
function so that an :class:`Exception` raised by it is retried up to
``max_attempts`` times, sleeping between attempts. Coroutine functions stay
coroutine functions and sleep with :func:`asyncio.sleep`; regular functions stay
regular and sleep with :func:`time.sleep`. Both sleeps are looked up when they
are called, so a virtual clock that patches them is followed.

What it does not do: it does not retry on a returned value (only on raised
exceptions), it does not bound the total time spent retrying (only each attempt
of a coroutine, with ``attempt_timeout``), and it keeps no state between calls
of the wrapped function (each call starts again at attempt 1).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import random
import time
from collections.abc import Callable, Collection, Coroutine, Iterable
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, ParamSpec, TypeVar, overload

__all__ = ["Retrier"]

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

#: Upper bound of the jitter added to every exponential backoff delay, seconds.
MAX_JITTER = 0.1


def _describe(func: Callable[..., Any]) -> str:
    """Return a short name for ``func`` to use in log lines and messages."""
    return getattr(func, "__qualname__", None) or repr(func)


def _is_real(value: object) -> bool:
    """Return True for an int or float that is not a bool and not NaN."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return not math.isnan(value)


@dataclass
class Retrier:
    """Retry a function when it raises an exception.

    The object returned by this class wraps a function that is then called up
    to ``max_attempts`` times until it succeeds::

        def read_pressure():
            ...

        retrier = Retrier(max_attempts=5)
        retrier(read_pressure)()

    The wrapped function can be a coroutine function, in which case the wrapper
    is a coroutine function too. Most often the class is used as a decorator::

        @Retrier(max_attempts=4, delay=0.1)
        async def move_to(x, y):
            ...

        await move_to(1, 2)

    Only :class:`Exception` subclasses are retried. :class:`asyncio.CancelledError`,
    :class:`KeyboardInterrupt`, :class:`SystemExit` and any other
    :class:`BaseException` propagate at once, as do the classes in
    ``never_retry``. When the last attempt fails, its exception propagates
    unchanged (the same object), or, with ``raise_on_max_attempts=False``, the
    wrapped call returns :obj:`None`.

    Parameters
    ----------
    max_attempts
        The maximum number of attempts before giving up (1 means no retry).
    delay
        The delay between attempts, in seconds.
    raise_on_max_attempts
        Whether to raise the last exception when the maximum number of attempts
        is reached. Otherwise the wrapped function returns :obj:`None` after the
        last attempt.
    use_exponential_backoff
        Whether to use exponential backoff for the delay between attempts. If
        :obj:`True`, the delay is ``delay + exponential_backoff_base ** attempt
        + random_ms``, where ``random_ms`` is a random number between 0 and
        100 ms used to avoid synchronisation issues (see :meth:`calculate_delay`).
    exponential_backoff_base
        The base for the exponential backoff.
    max_delay
        The maximum delay between attempts when using exponential backoff.
    on_retry
        Keyword only. Called as ``on_retry(exception, attempt)`` each time a
        retry is scheduled, before sleeping; ``attempt`` is the 1-based number
        of the attempt that just failed (the same number passed to
        :meth:`calculate_delay`). It is not called after the last attempt. An
        exception raised by ``on_retry`` propagates and ends the retries.
    never_retry
        Keyword only. Exception classes that are never retried: when the
        wrapped function raises one of them (or a subclass), it propagates at
        once, whatever ``raise_on_max_attempts`` says.
    attempt_timeout
        Keyword only. The maximum duration of each attempt, in seconds, for
        coroutine functions only. An attempt that runs longer is cancelled and
        counts as failed with :class:`TimeoutError`. :obj:`None` (the default)
        sets no timeout and costs nothing.
    seed
        Keyword only. Seed for a fresh :class:`random.Random` used for the
        jitter, so that a schedule can be reproduced. Do not combine with
        ``rng``.
    rng
        Keyword only. The random source for the jitter. By default each
        ``Retrier`` gets its own :class:`random.Random`, seeded by Python from
        the operating system's entropy (never from the wall clock).

    Raises
    ------
    ValueError
        If a parameter is out of range; the message names it and its value.
    TypeError
        If ``on_retry``, ``never_retry`` or ``rng`` has the wrong type.

    Notes
    -----
    The wrapped function keeps its static signature, including its return
    type. With ``raise_on_max_attempts=False`` it may return :obj:`None`, which
    that static type does not show.

    A zero delay (``delay=0`` without backoff) makes no sleep call at all, for
    regular and coroutine functions alike.

    Every scheduled retry is logged at WARNING and exhausted retries at ERROR
    (without traceback when the exception propagates, since the caller then
    handles it).

    .. note::
        Coroutine functions are recognised with
        :func:`inspect.iscoroutinefunction`. An object whose ``__call__`` is a
        coroutine function, or a regular function that returns an awaitable,
        is wrapped as a regular function: its awaitable is returned without
        being awaited, so failures raised while awaiting it are not retried.
    """

    max_attempts: int = 3
    delay: float = 0.01
    raise_on_max_attempts: bool = True
    use_exponential_backoff: bool = True
    exponential_backoff_base: float = 2.0
    max_delay: float = 32.0
    _: KW_ONLY
    on_retry: Callable[[Exception, int], object] | None = None
    never_retry: Collection[type[Exception]] = ()
    attempt_timeout: float | None = None
    seed: int | None = None
    rng: random.Random | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._validate_numbers()

        if self.on_retry is not None and not callable(self.on_retry):
            msg = (
                f"on_retry must be a callable taking (exception, attempt), "
                f"got {self.on_retry!r}; pass a function or None."
            )
            raise TypeError(msg)

        self._never_retry = self._validate_never_retry(self.never_retry)
        self._random = self._make_random()

    def _validate_numbers(self) -> None:
        """Check the numeric parameters; raise ValueError naming the first bad one."""
        attempts = self.max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            msg = (
                f"max_attempts must be an integer of at least 1, got {attempts!r}; "
                "use 1 to call the function once without retrying."
            )
            raise ValueError(msg)

        if not _is_real(self.delay) or not 0 <= self.delay < math.inf:
            msg = f"delay must be a finite number of seconds >= 0, got {self.delay!r}."
            raise ValueError(msg)

        if not _is_real(self.max_delay) or not self.max_delay >= 0:
            msg = f"max_delay must be a number of seconds >= 0, got {self.max_delay!r}."
            raise ValueError(msg)

        base = self.exponential_backoff_base
        if not _is_real(base) or not base >= 1 or math.isinf(base):
            msg = (
                f"exponential_backoff_base must be a finite number >= 1, got {base!r}; "
                "use 1 for a constant backoff or use_exponential_backoff=False."
            )
            raise ValueError(msg)

        timeout = self.attempt_timeout
        if timeout is not None and (not _is_real(timeout) or not timeout > 0):
            msg = (
                f"attempt_timeout must be a number of seconds > 0 or None, "
                f"got {timeout!r}; use None for no per-attempt timeout."
            )
            raise ValueError(msg)

    @staticmethod
    def _validate_never_retry(classes: object) -> tuple[type[Exception], ...]:
        """Return ``classes`` as a tuple usable in ``isinstance``, or raise."""
        items: tuple[object, ...]
        if isinstance(classes, type) or not isinstance(classes, Iterable):
            items = (classes,)
        else:
            items = tuple(classes)

        normalized: list[type[Exception]] = []
        for cls in items:
            if not (isinstance(cls, type) and issubclass(cls, Exception)):
                msg = (
                    f"never_retry must hold Exception subclasses, got {cls!r}; "
                    "BaseException subclasses such as CancelledError are never "
                    "retried anyway."
                )
                raise TypeError(msg)
            normalized.append(cls)

        return tuple(normalized)

    def _make_random(self) -> random.Random:
        """Return the random source for the jitter from ``seed`` and ``rng``."""
        if self.rng is not None and self.seed is not None:
            msg = (
                f"pass either seed ({self.seed!r}) or rng ({self.rng!r}), not both; "
                "seed creates its own random.Random."
            )
            raise ValueError(msg)

        if self.rng is not None:
            if not isinstance(self.rng, random.Random):
                msg = f"rng must be a random.Random instance, got {self.rng!r}."
                raise TypeError(msg)
            return self.rng

        return random.Random(self.seed)

    def calculate_delay(self, attempt: int) -> float:
        """Calculate the delay to wait after a failed attempt.

        With exponential backoff the delay is ``min(delay +
        exponential_backoff_base ** attempt + random_ms, max_delay)``, where
        ``random_ms`` is drawn uniformly in [0, 0.1] s from the retrier's random
        source. Without backoff it is ``delay``, not capped by ``max_delay``.

        Parameters
        ----------
        attempt
            The 1-based number of the attempt that just failed: 1 for the delay
            between the first and second attempts.

        Returns
        -------
        float
            The delay, in seconds.

        Raises
        ------
        ValueError
            If ``attempt`` is not an integer >= 1.
        """
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            msg = f"attempt must be an integer >= 1 (1-based), got {attempt!r}."
            raise ValueError(msg)

        if not self.use_exponential_backoff:
            return self.delay

        random_ms = self._random.uniform(0.0, MAX_JITTER)
        try:
            backoff = self.exponential_backoff_base**attempt
        except OverflowError:
            # float ** int raises instead of returning inf past ~1e308.
            return self.max_delay

        return min(self.delay + backoff + random_ms, self.max_delay)

    def _after_failure(self, error: Exception, attempt: int, name: str) -> float | None:
        """Decide what follows a failed attempt, from inside its ``except`` block.

        Re-raises the exception being handled (bare ``raise``) when it must
        propagate, returns None when the wrapped call must return None, and
        otherwise returns the delay to sleep before the next attempt.
        """
        if self._never_retry and isinstance(error, self._never_retry):
            raise

        if attempt >= self.max_attempts:
            if self.raise_on_max_attempts:
                log.error(
                    "retries exhausted: %s failed %d times, raising %r",
                    name,
                    attempt,
                    error,
                )
                raise

            log.error(
                "retries exhausted: %s failed %d times, returning None",
                name,
                attempt,
                exc_info=error,
            )
            return None

        wait = self.calculate_delay(attempt)
        log.warning(
            "retry scheduled: %s attempt %d/%d failed with %r; next in %.3f s",
            name,
            attempt,
            self.max_attempts,
            error,
            wait,
        )
        if self.on_retry is not None:
            self.on_retry(error, attempt)

        return wait

    @overload
    def __call__(
        self, func: Callable[P, Coroutine[Any, Any, T]]
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...

    @overload
    def __call__(self, func: Callable[P, T]) -> Callable[P, T]: ...

    def __call__(self, func: Callable[P, Any]) -> Callable[P, Any]:
        """Wrap ``func`` so that it is retried when it raises an exception.

        Parameters
        ----------
        func
            A regular function or a coroutine function.

        Returns
        -------
        callable
            A function of the same kind (regular or coroutine function), with
            ``func``'s signature and :func:`functools.wraps` metadata.

        Raises
        ------
        TypeError
            If ``func`` is not callable, or if ``attempt_timeout`` is set and
            ``func`` is not a coroutine function.
        """
        if not callable(func):
            msg = f"Retrier wraps a callable, got {func!r}."
            raise TypeError(msg)

        if inspect.iscoroutinefunction(func):
            if self.attempt_timeout is not None:
                return self._wrap_async_with_timeout(func, self.attempt_timeout)
            return self._wrap_async(func)

        if self.attempt_timeout is not None:
            msg = (
                f"attempt_timeout={self.attempt_timeout!r} applies to coroutine "
                f"functions only, but {_describe(func)!r} is a regular function; "
                "remove attempt_timeout or wrap an async def function."
            )
            raise TypeError(msg)

        return self._wrap_sync(func)

    def _wrap_sync(self, func: Callable[P, T]) -> Callable[P, T]:
        """Wrap a regular function; the first attempt is a bare try/call/return."""
        after_failure = self._after_failure
        name = _describe(func)

        @functools.wraps(func)
        def retrying(*args: P.args, **kwargs: P.kwargs) -> T:
            try:
                return func(*args, **kwargs)
            except Exception as exc:
                wait = after_failure(exc, 1, name)

            attempt = 1
            while wait is not None:
                if wait > 0:
                    time.sleep(wait)

                attempt += 1
                try:
                    return func(*args, **kwargs)
                except Exception as exc:
                    wait = after_failure(exc, attempt, name)

            return None  # type: ignore[return-value]  # raise_on_max_attempts=False

        return retrying

    def _wrap_async(
        self, func: Callable[P, Coroutine[Any, Any, T]]
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        """Wrap a coroutine function; the first attempt is a bare try/await."""
        after_failure = self._after_failure
        name = _describe(func)

        @functools.wraps(func)
        async def retrying(*args: P.args, **kwargs: P.kwargs) -> T:
            try:
                return await func(*args, **kwargs)
            except Exception as exc:
                wait = after_failure(exc, 1, name)

            attempt = 1
            while wait is not None:
                if wait > 0:
                    await asyncio.sleep(wait)

                attempt += 1
                try:
                    return await func(*args, **kwargs)
                except Exception as exc:
                    wait = after_failure(exc, attempt, name)

            return None  # type: ignore[return-value]  # raise_on_max_attempts=False

        return retrying

    def _wrap_async_with_timeout(
        self, func: Callable[P, Coroutine[Any, Any, T]], timeout: float
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        """Wrap a coroutine function, bounding each attempt by ``timeout``."""
        after_failure = self._after_failure
        name = _describe(func)

        @functools.wraps(func)
        async def retrying(*args: P.args, **kwargs: P.kwargs) -> T:
            attempt = 0
            while True:
                attempt += 1
                try:
                    async with asyncio.timeout(timeout):
                        return await func(*args, **kwargs)
                except Exception as exc:
                    wait = after_failure(exc, attempt, name)

                if wait is None:
                    return None  # type: ignore[return-value]  # no raise wanted
                if wait > 0:
                    await asyncio.sleep(wait)

        return retrying
