"""What FlakyServer and FaultProxy share: the listener, the faults, the log.

A private module. :class:`Endpoint` owns the listening socket (so that it can
really close the port to refuse connections and open the same port again),
the list of active faults and their trigger state, the event log, the tasks it
started, and the registration of its address with the virtual clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import socket
import struct
from collections.abc import Coroutine, Iterator
from typing import TYPE_CHECKING, Any, Self, TypeVar

from faker import Faker

from lvmopstools.testing.clock import current_clock, register_owned_address
from lvmopstools.testing.tcp.faults import (
    AfterN,
    Always,
    EveryKth,
    Fault,
    FirstN,
    Matches,
    Probability,
    RefuseConnections,
    Scope,
    TimeWindow,
)
from lvmopstools.testing.tcp.records import Event, EventLog

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["Endpoint", "FaultState", "PortTakenError", "set_reset"]

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Fault)

_BACKLOG = 128
_ACCEPT_BATCH = 32


class PortTakenError(OSError):
    """The port could not be opened again after refusing connections."""


def set_reset(sock: Any) -> None:
    """Make closing ``sock`` send a TCP reset (RST) instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class FaultState:
    """An active fault with the state its trigger needs."""

    __slots__ = ("fault", "handles", "occasions", "rng", "trigger_rng")

    def __init__(self, fault: Fault) -> None:
        self.fault = fault
        self.occasions = 0
        seed = getattr(fault, "seed", 0)
        self.rng = random.Random(seed)
        trigger = fault.trigger
        self.trigger_rng = random.Random(
            trigger.seed if isinstance(trigger, Probability) else 0
        )
        self.handles: list[asyncio.TimerHandle] = []

    def fires(self, elapsed: float, request: bytes | None) -> bool:
        """Count one occasion and return True if the trigger fires on it."""
        self.occasions += 1
        trigger = self.fault.trigger
        n = self.occasions

        if isinstance(trigger, Always):
            return True
        if isinstance(trigger, FirstN):
            return n <= trigger.count
        if isinstance(trigger, AfterN):
            return n > trigger.count
        if isinstance(trigger, EveryKth):
            return n % trigger.k == 0
        if isinstance(trigger, TimeWindow):
            return trigger.contains(elapsed)
        if isinstance(trigger, Probability):
            return self.trigger_rng.random() < trigger.p
        if isinstance(trigger, Matches):
            return (
                request is not None and re.search(trigger.pattern, request) is not None
            )

        msg = f"trigger {trigger!r} is not supported by FlakyServer or FaultProxy"
        raise NotImplementedError(msg)


class Endpoint:
    """Base of FlakyServer and FaultProxy: listener, faults, log, cleanup.

    Parameters
    ----------
    host
        Address to listen on.
    port
        Port to listen on; 0 picks a free port.
    name
        Name used in the event log and in messages.
    seed
        Seed of :attr:`faker`, used for garbage replies.
    """

    def __init__(self, *, host: str, port: int, name: str, seed: int) -> None:
        if not isinstance(host, str) or not host:
            msg = f"{name}: host must be a non-empty string such as '127.0.0.1', got {host!r}"
            raise TypeError(msg)

        if (
            isinstance(port, bool)
            or not isinstance(port, int)
            or not 0 <= port <= 65535
        ):
            msg = f"{name}: port must be an integer from 0 to 65535 (0 picks a free port), got {port!r}"
            raise ValueError(msg)

        self.name = name
        self.log = EventLog()
        self.faker = Faker()
        self.faker.seed_instance(seed)

        self._host = host
        self._port = port
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started_at = 0.0
        self._opened = False
        self._closing = False
        self._unregister: Any = None

        self._faults: list[FaultState] = []
        self._refusers: set[FaultState] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._errors: list[BaseException] = []
        self._accepted_count = 0

    # --- addresses ---------------------------------------------------------------

    @property
    def host(self) -> str:
        """The host clients connect to."""
        return self._host

    @property
    def port(self) -> int:
        """The port clients connect to (known once opened)."""
        if not self._opened:
            msg = f"{self.name} is not open yet: use 'async with' or await open() first"
            raise RuntimeError(msg)
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)``, where clients connect."""
        return (self.host, self.port)

    @property
    def listening(self) -> bool:
        """True while the port accepts connections."""
        return self._listener is not None

    # --- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close(raise_errors=exc_type is None)

    async def open(self) -> None:
        """Start listening (and apply any refuse fault added before)."""
        if self._opened:
            msg = f"{self.name} is already open on {self._host}:{self._port}"
            raise RuntimeError(msg)

        self._loop = asyncio.get_running_loop()
        self._started_at = self._loop.time()
        self._listen()
        self._opened = True
        self._unregister = register_owned_address(self._host, self._port)
        self._record("opened", host=self._host, port=self._port)
        log.debug("%s listening on %s:%d", self.name, self._host, self._port)

        for state in self._faults:
            if state.fault.scope == "listener":
                self._schedule_listener_fault(state)

    async def close(self, *, raise_errors: bool = True) -> None:
        """Close the port, every connection and every task; idempotent.

        Parameters
        ----------
        raise_errors
            Raise the first error that happened in the background (a failing
            handler, a port that could not be opened again), after cleaning up.
        """
        if self._closing or not self._opened:
            return
        self._closing = True

        for state in self._faults:
            self._cancel_handles(state)
        self._close_listener(record=False)
        self._close_connections()

        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

        if self._unregister is not None:
            self._unregister()
            self._unregister = None
        self._record("closed")
        log.debug("%s closed", self.name)

        if raise_errors and self._errors:
            raise self._errors[0]

    def _close_connections(self) -> None:
        """Close every open connection (subclasses)."""
        raise NotImplementedError

    def _accepted(self, sock: socket.socket, number: int) -> None:
        """Take over an accepted connection (subclasses)."""
        raise NotImplementedError

    def _faults_changed(self) -> None:
        """Called after a fault was added or removed (subclasses may react)."""

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as a task that :meth:`close` cancels and awaits."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.fail(exc)

    def fail(self, exc: BaseException) -> None:
        """Record a background error, to be raised by :meth:`close`."""
        log.debug("%s: background error %r", self.name, exc)
        self._errors.append(exc)
        self._record("error", error=repr(exc))

    # --- the listening socket ----------------------------------------------------

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._host, self._port))
            sock.listen(_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise

        self._port = sock.getsockname()[1]
        self._listener = sock
        assert self._loop is not None
        self._loop.add_reader(sock.fileno(), self._on_acceptable, sock)

    def _on_acceptable(self, sock: socket.socket) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("%s: accept failed: %r", self.name, exc)
                return

            conn.setblocking(False)
            self._accepted_count += 1
            peer = conn.getpeername()
            self._record("accepted", self._accepted_count, peer=f"{peer[0]}:{peer[1]}")
            self._accepted(conn, self._accepted_count)

    def _close_listener(self, *, record: bool = True) -> None:
        sock = self._listener
        if sock is None:
            return

        self._listener = None
        assert self._loop is not None
        self._loop.remove_reader(sock.fileno())
        sock.close()
        if record:
            self._record("listener_closed", port=self._port)
            log.debug("%s: port %d closed", self.name, self._port)

    def _reopen_listener(self) -> None:
        try:
            self._listen()
        except OSError as exc:
            msg = (
                f"{self.name}: cannot listen on {self._host}:{self._port} again after "
                f"refusing connections ({exc.strerror or exc}); another socket took the "
                "port meanwhile. Close it, or use a fresh server"
            )
            raise PortTakenError(exc.errno, msg) from exc

        self._record("listener_reopened", port=self._port)
        log.debug("%s: port %d open again", self.name, self._port)

    def _refuse(self, state: FaultState) -> None:
        self._refusers.add(state)
        self._close_listener()

    def _unrefuse(self, state: FaultState, *, background: bool) -> None:
        self._refusers.discard(state)
        if self._refusers or self._closing or self._listener is not None:
            return

        try:
            self._reopen_listener()
        except PortTakenError as exc:
            if not background:
                raise
            self.fail(exc)

    def _schedule_listener_fault(self, state: FaultState) -> None:
        assert self._loop is not None
        trigger = state.fault.trigger
        self._record("fault", fault=state.fault.kind)

        if not isinstance(trigger, TimeWindow):
            self._refuse(state)
            return

        elapsed = self.elapsed()
        if trigger.contains(elapsed):
            self._refuse(state)
        elif elapsed < trigger.start:
            handle = self._loop.call_later(trigger.start - elapsed, self._refuse, state)
            state.handles.append(handle)

        if trigger.end is not None and elapsed < trigger.end:
            handle = self._loop.call_later(
                trigger.end - elapsed,
                lambda: self._unrefuse(state, background=True),
            )
            state.handles.append(handle)

    @staticmethod
    def _cancel_handles(state: FaultState) -> None:
        for handle in state.handles:
            handle.cancel()
        state.handles.clear()

    # --- faults ------------------------------------------------------------------

    @property
    def faults(self) -> tuple[Fault, ...]:
        """The active faults, in the order they were added."""
        return tuple(state.fault for state in self._faults)

    def add_fault(self, fault: F) -> F:
        """Start applying ``fault``; returns it, to pass to :meth:`remove_fault`.

        Raises
        ------
        TypeError
            If ``fault`` is not a :class:`~lvmopstools.testing.tcp.faults.Fault`.
        """
        if not isinstance(fault, Fault):
            msg = (
                f"{self.name}: add_fault() takes a Fault such as Latency(0.5) or "
                f"RefuseConnections(), got {fault!r}"
            )
            raise TypeError(msg)

        state = FaultState(fault)
        self._faults.append(state)
        self._record("fault_added", fault=fault.kind, trigger=fault.trigger.kind)
        if fault.scope == "listener" and self._opened and not self._closing:
            self._schedule_listener_fault(state)
        self._faults_changed()
        return fault

    def remove_fault(self, fault: Fault) -> None:
        """Stop applying ``fault`` (the object :meth:`add_fault` returned).

        Raises
        ------
        ValueError
            If ``fault`` is not active here.
        """
        for index, state in enumerate(self._faults):
            if state.fault is fault:
                break
        else:
            msg = (
                f"{self.name}: fault {fault!r} is not active; pass the object that "
                "add_fault() returned"
            )
            raise ValueError(msg)

        del self._faults[index]
        self._cancel_handles(state)
        self._record("fault_removed", fault=fault.kind)
        self._faults_changed()
        if isinstance(fault, RefuseConnections) and self._opened:
            self._unrefuse(state, background=False)

    def clear_faults(self) -> None:
        """Remove every active fault, last added first."""
        for state in reversed(self._faults):
            self.remove_fault(state.fault)

    @contextlib.contextmanager
    def fault(self, fault: F) -> Iterator[F]:
        """Apply ``fault`` for the duration of a ``with`` block."""
        self.add_fault(fault)
        try:
            yield fault
        finally:
            if any(state.fault is fault for state in self._faults):
                self.remove_fault(fault)

    def select(
        self,
        scope: Scope,
        *,
        direction: str | None = None,
        request: bytes | None = None,
        connection: int | None = None,
    ) -> list[tuple[Fault, FaultState]]:
        """Consult the triggers of the active faults of one scope.

        Returns the faults that fire on this occasion (each one recorded as a
        ``"fault"`` event), with their state.
        """
        fired: list[tuple[Fault, FaultState]] = []
        if not self._faults:
            return fired

        elapsed = self.elapsed()
        for state in self._faults:
            fault = state.fault
            if fault.scope != scope:
                continue
            if direction is not None and getattr(fault, "direction", direction) not in (
                direction,
                "both",
            ):
                continue
            if state.fires(elapsed, request):
                fired.append((fault, state))
                self._record("fault", connection, fault=fault.kind, direction=direction)
        return fired

    # --- records -----------------------------------------------------------------

    def elapsed(self) -> float:
        """Seconds (virtual under a clock) since the server or proxy opened."""
        if self._loop is None:
            return 0.0
        return self._loop.time() - self._started_at

    def _record(self, kind: str, connection: int | None = None, **details: Any) -> None:
        now = self._loop.time() if self._loop is not None else 0.0
        clock = current_clock()
        self.log.append(
            Event(
                time=now,
                elapsed=now - self._started_at,
                clock_time=clock.time() if clock is not None else None,
                source=self.name,
                kind=kind,
                connection=connection,
                details=details,
            )
        )

    def events(
        self, kind: str | None = None, connection: int | None = None
    ) -> list[Event]:
        """Return the recorded events, optionally of one kind or connection."""
        return self.log.select(kind, connection)

    def count(self, kind: str) -> int:
        """Return how many events of ``kind`` were recorded."""
        return self.log.count(kind)
