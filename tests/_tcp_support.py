"""What the TCP toolkit's tests share: a real-time bound and a leak check.

Imported by ``tests/test_tcp_server.py`` and ``tests/test_tcp_proxy.py``; not a
test module itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import os
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any

from lvmopstools.testing import _clock_io

__all__ = ["LIMIT", "REAL_LIMIT", "bound_every_test", "nothing_left_open"]

# Loop seconds: virtual under a VirtualClock, where an idle loop reaches them at
# once and a stalled one (an in_flight() hold) never does. REAL_LIMIT bounds
# every test, its teardown included, in real time (see real_time_limit).
LIMIT = 30
REAL_LIMIT = 30.0


@contextlib.contextmanager
def real_time_limit(seconds: float = REAL_LIMIT) -> Iterator[None]:
    """Cancel the current task if the block runs for ``seconds`` of real time.

    A thread's timer counts real time, which a virtual clock does not touch;
    the block then raises TimeoutError.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        loop.call_soon_threadsafe(task.cancel)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    except asyncio.CancelledError:
        if not expired.is_set():
            raise
        task.uncancel()
        msg = f"the test ran for more than {seconds} real seconds"
        raise TimeoutError(msg) from None
    finally:
        timer.cancel()


def _bounded(
    test: Callable[..., Coroutine[Any, Any, None]],
) -> Callable[..., Coroutine[Any, Any, None]]:
    """Run ``test``, setup to teardown of what it opens, under real_time_limit."""

    @functools.wraps(test)
    async def bounded(*args: Any, **kwargs: Any) -> None:
        with real_time_limit():
            await test(*args, **kwargs)

    return bounded


def _sockets() -> set[str]:
    """Return the socket inodes this process holds open."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:"):
                found.add(target)
    return found


@contextlib.asynccontextmanager
async def nothing_left_open() -> AsyncIterator[None]:
    """Assert that the block leaves no socket, task, hold or owned address."""
    sockets = _sockets()
    tasks = asyncio.all_tasks()
    owned = {port: dict(hosts) for port, hosts in _clock_io._owned.items()}
    holds = _clock_io.holds()

    yield

    assert _sockets() - sockets == set()
    assert asyncio.all_tasks() - tasks == set()
    assert _clock_io._owned == owned
    assert _clock_io.holds() == holds  # No in_flight() hold left behind.


def bound_every_test(namespace: dict[str, Any]) -> None:
    """Wrap every ``test_*`` coroutine function of a module in real_time_limit.

    Call it at the bottom of a test module with ``globals()``: each test then
    runs under a real-time bound, its own teardown of what it opened included.
    """
    for name, test in list(namespace.items()):
        if name.startswith("test_") and inspect.iscoroutinefunction(test):
            namespace[name] = _bounded(test)
