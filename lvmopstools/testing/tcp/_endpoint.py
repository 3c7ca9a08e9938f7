"""What FlakyServer and FaultProxy share: the listener, the faults, the log.

A private module. :class:`Endpoint` owns a
:class:`~lvmopstools.testing.tcp._listener.Listener` (the listening socket,
which really closes the port to refuse connections and opens the same port
again), the list of active faults and their trigger state, the event log, the
connections it accepted and the tasks it started, and the registration of its
address with the virtual clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, Self, TypeVar

from lvmopstools.testing.clock import current_clock, register_owned_address
from lvmopstools.testing.tcp._listener import Listener
from lvmopstools.testing.tcp._triggers import FaultState
from lvmopstools.testing.tcp.faults import Fault, RefuseConnections, Scope
from lvmopstools.testing.tcp.records import Event, EventLog

if TYPE_CHECKING:
    import socket
    from types import TracebackType

    from faker import Faker

    from lvmopstools.testing.tcp._link import Link

__all__ = ["Endpoint"]

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Fault)


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
            msg = (
                f"{name}: host must be a non-empty string such as '127.0.0.1', "
                f"got {host!r}"
            )
            raise TypeError(msg)

        if (
            isinstance(port, bool)
            or not isinstance(port, int)
            or not 0 <= port <= 65535
        ):
            msg = (
                f"{name}: port must be an integer from 0 to 65535 (0 picks a "
                f"free port), got {port!r}"
            )
            raise ValueError(msg)

        if isinstance(seed, bool) or not isinstance(seed, int):
            msg = f"{name}: seed must be an integer, got {seed!r}"
            raise TypeError(msg)

        self.name = name
        self.seed = seed
        self.log = EventLog()
        self._faker: Faker | None = None

        self._listener = Listener(self, host=host, port=port, on_accept=self._accepted)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started_at = 0.0
        self._opened = False
        self._closing = False
        self._unregister: Callable[[], None] | None = None
        self._links: set[Link] = set()

        self._faults: list[FaultState] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._errors: list[BaseException] = []
        self._accepted_count = 0

    @property
    def faker(self) -> Faker:
        """The :class:`faker.Faker` seeded with ``seed`` (created on first use)."""
        if self._faker is None:
            from faker import Faker

            self._faker = Faker()
            self._faker.seed_instance(self.seed)
        return self._faker

    # --- addresses ---------------------------------------------------------------

    @property
    def host(self) -> str:
        """The host clients connect to."""
        return self._listener.host

    @property
    def port(self) -> int:
        """The port clients connect to (known once opened)."""
        if not self._opened:
            msg = (
                f"{self.name} is not open yet, so it has no port: use "
                "'async with' or await open() first"
            )
            raise RuntimeError(msg)
        return self._listener.port

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)``, where clients connect."""
        return (self.host, self.port)

    @property
    def listening(self) -> bool:
        """True while the port accepts connections."""
        return self._listener.listening

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
        """Start listening (and apply any refuse fault added before).

        ``async with`` calls it; call it directly only with :meth:`close`.

        Raises
        ------
        RuntimeError
            If it was opened before (an endpoint opens once).
        OSError
            If the port cannot be bound.
        """
        if self._opened:
            msg = (
                f"{self.name} was already opened on {self.host}:{self.port}; "
                "an endpoint opens once: create a new one"
            )
            raise RuntimeError(msg)

        self._loop = asyncio.get_running_loop()
        self._started_at = self._loop.time()
        self._listener.open(self._loop)
        self._opened = True
        self._unregister = register_owned_address(self.host, self.port)
        self.record("opened", host=self.host, port=self.port)
        log.debug("%s listening on %s:%d", self.name, self.host, self.port)

        for state in list(self._faults):
            if state.fault.scope == "listener":
                self._listener.schedule(state)

    async def close(self, *, raise_errors: bool = True) -> None:
        """Close the port, every connection, timer and task; idempotent.

        Connections are aborted, without the :class:`SlowClose` delay; the
        method returns once every socket is closed. The listening address is
        unregistered from the virtual clock.

        Parameters
        ----------
        raise_errors
            Keyword only. Raise the first error that happened in the
            background (a failing reply function, an error inside a
            connection's callbacks or timers, a failed ``accept()``, a port
            that could not be opened again), after cleaning up. ``async
            with`` passes False when the block raised, so that the block's
            error is the one seen; the errors stay in the log as ``"error"``
            events.
        """
        if self._closing or not self._opened:
            return
        self._closing = True

        for state in self._faults:
            state.cancel_timers()
        self._listener.shut()

        # Links first: a task cancelled before its first step cleans nothing
        # up, so each link closes what it holds (an accepted socket not yet
        # adopted, its target connection). Tasks started meanwhile (a proxy
        # connecting to its target) are caught by the next round.
        while self._links or self._tasks:
            links = list(self._links)
            tasks = list(self._tasks)
            for link in links:
                link.abort()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*(link.wait_closed() for link in links))

        if self._unregister is not None:
            self._unregister()
            self._unregister = None
        self.record("closed")
        log.debug("%s closed", self.name)

        if raise_errors and self._errors:
            raise self._errors[0]

    @property
    def connections(self) -> int:
        """The number of connections open now."""
        return len(self._links)

    def make_link(self, number: int, fired: list[Fault]) -> Link:
        """Return the protocol of an accepted connection (subclasses)."""
        raise NotImplementedError

    def link_lost(self, link: Link, exc: Exception | None) -> None:
        """Forget a connection that asyncio closed."""
        self._links.discard(link)
        self.record("closed", link.number, error=None if exc is None else repr(exc))

    def _accepted(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        """Number, record and adopt a connection the listener accepted."""
        self._accepted_count += 1
        number = self._accepted_count
        self.record("accepted", number, peer=f"{peer[0]}:{peer[1]}")
        fired = [fault for fault, _ in self.select("connection", connection=number)]
        link = self.make_link(number, fired)
        link.sock = conn
        self._links.add(link)
        self.spawn(self._adopt(conn, link))

    async def _adopt(self, sock: socket.socket, link: Link) -> None:
        """Wrap an accepted socket in a transport driven by ``link``."""
        assert self._loop is not None
        try:
            await self._loop.connect_accepted_socket(link.adopt, sock)
        except BaseException:
            self._links.discard(link)
            sock.close()
            raise

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
        if exc is None:
            return
        if self._closing:
            # The endpoint is shutting down: a connection torn down mid-way.
            log.debug("%s: task ended on close with %r", self.name, exc)
            return
        self.fail(exc)

    def fail(self, exc: BaseException) -> None:
        """Record a background error, to be raised by :meth:`close`."""
        log.debug("%s: background error %r", self.name, exc)
        self._errors.append(exc)
        self.record("error", error=repr(exc))

    # --- faults ------------------------------------------------------------------

    @property
    def has_faults(self) -> bool:
        """True while at least one fault is active."""
        return bool(self._faults)

    @property
    def faults(self) -> tuple[Fault, ...]:
        """The active faults, in the order they were added."""
        return tuple(state.fault for state in self._faults)

    def add_fault(self, fault: F) -> F:
        """Start applying ``fault``; returns it, to pass to :meth:`remove_fault`.

        A fault of the ``connection`` scope applies to connections accepted
        from now on; the others apply from the next request, reply or chunk
        on every connection, open or new. Bytes already delayed by a fault
        keep their delay when it is removed, and nothing overtakes them.

        Parameters
        ----------
        fault
            One of the faults of :mod:`lvmopstools.testing.tcp.faults`. Its
            trigger counts from this call. Faults add up: several latencies
            sum, the lowest bandwidth wins.

        Returns
        -------
        Fault
            ``fault`` itself.

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
        self.record("fault_added", fault=fault.kind, trigger=fault.trigger.kind)
        if fault.scope == "listener" and self._opened and not self._closing:
            self._listener.schedule(state)
        return fault

    def remove_fault(self, fault: Fault) -> None:
        """Stop applying ``fault`` (the object :meth:`add_fault` returned).

        Removing a :class:`RefuseConnections` opens the same port again.

        Parameters
        ----------
        fault
            The active fault.

        Raises
        ------
        ValueError
            If ``fault`` is not active here.
        PortTakenError
            If the port cannot be opened again (another socket took it).
        """
        for state in self._faults:
            if state.fault is fault:
                break
        else:
            msg = (
                f"{self.name}: fault {fault!r} is not active; pass the object that "
                "add_fault() returned"
            )
            raise ValueError(msg)

        self._faults.remove(state)
        state.cancel_timers()
        self.record("fault_removed", fault=fault.kind)
        if isinstance(fault, RefuseConnections) and self._opened:
            self._listener.unrefuse(state, background=False)

    def clear_faults(self) -> None:
        """Remove every active fault, last added first."""
        for state in reversed(list(self._faults)):
            self.remove_fault(state.fault)

    @contextlib.contextmanager
    def fault(self, fault: F) -> Iterator[F]:
        """Apply ``fault`` for the duration of a ``with`` block.

        ::

            with device.fault(Latency(2.0)):
                ...  # every reply takes two more seconds

        Parameters
        ----------
        fault
            The fault; it is removed on leaving the block (also on error),
            unless it was removed inside.

        Returns
        -------
        contextlib.AbstractContextManager
            Yields ``fault``.
        """
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

        Used by the connections; each call is one occasion for every fault
        of ``scope`` (and ``direction``) that is active.

        Returns
        -------
        list
            The ``(fault, state)`` pairs that fire on this occasion, each
            recorded as a ``"fault"`` event.
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
                self.record("fault", connection, fault=fault.kind, direction=direction)
        return fired

    # --- records -----------------------------------------------------------------

    def elapsed(self) -> float:
        """Seconds (virtual under a clock) since the server or proxy opened."""
        if self._loop is None:
            return 0.0
        return self._loop.time() - self._started_at

    def record(self, kind: str, connection: int | None = None, **details: Any) -> None:
        """Append an event to :attr:`log`, stamped with the loop time."""
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
