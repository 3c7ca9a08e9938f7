"""What the TCP tests share: the fault table, a real-time bound, a leak check.

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
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from lvmopstools.retrier import Retrier
from lvmopstools.socket import AsyncSocketHandler
from lvmopstools.testing import _clock_io
from lvmopstools.testing.clock import VirtualClock
from lvmopstools.testing.tcp import (
    Bandwidth,
    Blackhole,
    CloseAfterBytes,
    CloseOnAccept,
    CorruptReply,
    Fault,
    Latency,
    PartialReply,
    RefuseConnections,
    Slice,
    SlowClose,
    StopAnswering,
    TimeWindow,
    WrongReply,
)

__all__ = [
    "LIMIT",
    "OUTCOMES",
    "REAL_LIMIT",
    "ask",
    "bound_every_test",
    "check_fault_outcome",
    "nothing_left_open",
    "pinger",
]

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


# --- every fault through AsyncSocketHandler and Retrier -----------------------------

RETRY = {"max_attempts": 2, "delay": 0, "seed": 0}
WAIT = Retrier(**RETRY).calculate_delay(1)  # Before the second attempt.
TIMEOUT = 3
PONG = b"pong\n"
GARBLED = b"<five garbled bytes>"
HUNG_UP = ConnectionError  # The callback's own error: EOF before a whole line.

OUTCOMES: list[tuple[Fault, object, int, float]] = [
    # fault, reply or exception raised, attempts made, virtual seconds taken
    (RefuseConnections(trigger=TimeWindow(0, 1)), PONG, 2, WAIT),
    (CloseOnAccept(), HUNG_UP, 2, WAIT),
    (CloseOnAccept(reset=True), ConnectionResetError, 2, WAIT),
    (CloseOnAccept(delay=1), HUNG_UP, 2, 1 + WAIT + 1),
    (Blackhole(), TimeoutError, 2, TIMEOUT + WAIT + TIMEOUT),
    (Blackhole(close_after=1), HUNG_UP, 2, 1 + WAIT + 1),
    (CloseAfterBytes(2), HUNG_UP, 2, WAIT),
    (
        CloseAfterBytes(2, direction="upstream", reset=True),
        ConnectionResetError,
        2,
        WAIT,
    ),
    (SlowClose(2), PONG, 1, 0),
    (Latency(1, direction="both"), PONG, 1, 2),
    (Bandwidth(1), TimeoutError, 2, TIMEOUT + WAIT + TIMEOUT),
    (Slice(1, delay=0.1), PONG, 1, 0.4),
    (PartialReply(), HUNG_UP, 2, WAIT),
    (PartialReply(reset=True), ConnectionResetError, 2, WAIT),
    (CorruptReply(), GARBLED, 1, 0),
    (WrongReply(), TimeoutError, 2, TIMEOUT + WAIT + TIMEOUT),  # No earlier reply.
    (StopAnswering(), TimeoutError, 2, TIMEOUT + WAIT + TIMEOUT),
]

Endpoint = Callable[[Fault], AbstractAsyncContextManager[tuple[Any, int]]]


async def ask(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> bytes:
    """Send one line, return the line read back; raise if the server hung up."""
    writer.write(request + b"\n")
    reply = await reader.readline()
    if not reply.endswith(b"\n"):
        msg = f"server hung up, got {reply!r}"
        raise ConnectionError(msg)
    return reply


def pinger(request: bytes = b"ping") -> Callable[..., Any]:
    """Return an AsyncSocketHandler callback that asks ``request`` once."""

    async def callback(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bytes:
        return await ask(reader, writer, request)

    return callback


async def check_fault_outcome(
    endpoint: Endpoint, fault: Fault, outcome: object, attempts: int, elapsed: float
) -> None:
    """Drive ``fault`` through AsyncSocketHandler and Retrier; check the outcome.

    ``endpoint(fault)`` opens the device (or the proxy in front of it) and
    gives it with the port the client connects to. The reply or exception,
    the attempts made and the virtual time taken must be those of the table.
    """
    retried: list[Exception] = []
    params = {**RETRY, "on_retry": lambda error, attempt: retried.append(error)}
    async with VirtualClock() as clock, endpoint(fault) as (device, client_port):
        ping = AsyncSocketHandler(
            "127.0.0.1", client_port, timeout=TIMEOUT, retrier_params=params
        )
        async with asyncio.timeout(LIMIT):
            if isinstance(outcome, type):
                with pytest.raises(outcome):
                    await ping(pinger())
            else:
                reply = await ping(pinger())
                if outcome is GARBLED:
                    assert len(reply) == len(PONG)
                    assert reply != PONG
                else:
                    assert reply == outcome
        assert clock.time() == pytest.approx(elapsed, abs=1e-9)

    assert len(retried) == attempts - 1
    refused = 1 if isinstance(fault, RefuseConnections) else 0
    assert device.count("accepted") == attempts - refused
