"""Real I/O bookkeeping for the virtual clock (private).

Two process-wide registries that tell :class:`~lvmopstools.testing.VirtualClock`
whether it may jump: the count of ``in_flight()`` holds (real-time work the
toolkit has started and not finished) and the listening addresses the toolkit
owns. :class:`SelectorProxy` stands in for an event loop's selector and makes
the jump decision each time the loop is about to wait.

This module does not look at sockets the selector does not know about (a
blocking socket used from a thread), and it cannot tell whether a foreign
server is about to answer: it only waits the quiet period for it.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "InFlight",
    "SelectorProxy",
    "holds",
    "register_owned_address",
]

log = logging.getLogger(__name__)

# How long the loop waits for real I/O at a time while in_flight() is held.
IN_FLIGHT_POLL = 0.001

_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
_LOCALHOST = frozenset({"localhost", "127.0.0.1", "::1"})

_lock = threading.Lock()
_holds = 0
# port -> {host: number of registrations}
_owned: dict[int, dict[str, int]] = {}
# Bumped on every change of _owned, so that ownership caches know to refresh.
_owned_generation = 0


def holds() -> int:
    """Return the number of ``in_flight()`` holds active in the process."""
    return _holds


class InFlight:
    """Context manager counting one hold while it is entered (reentrant)."""

    __slots__ = ()

    def __enter__(self) -> None:
        global _holds
        with _lock:
            _holds += 1

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        global _holds
        with _lock:
            _holds -= 1


def acquire_hold() -> Callable[[], None]:
    """Take one hold and return the function that releases it (once)."""
    global _holds
    with _lock:
        _holds += 1
    released = False

    def release() -> None:
        global _holds
        nonlocal released
        with _lock:
            if not released:
                released = True
                _holds -= 1

    return release


def register_owned_address(host: str, port: int) -> Callable[[], None]:
    """Record ``(host, port)`` as owned; return the function that undoes it."""
    global _owned_generation
    if not isinstance(host, str) or not isinstance(port, int) or port <= 0:
        msg = (
            f"cannot register owned address host={host!r}, port={port!r}: "
            "host must be a str and port a positive int (the port the server "
            "actually listens on, not 0)."
        )
        raise ValueError(msg)

    with _lock:
        hosts = _owned.setdefault(port, {})
        hosts[host] = hosts.get(host, 0) + 1
        _owned_generation += 1
    done = False

    def unregister() -> None:
        global _owned_generation
        nonlocal done
        with _lock:
            if done:
                return
            done = True
            hosts = _owned[port]
            hosts[host] -= 1
            if hosts[host] == 0:
                del hosts[host]
            if not hosts:
                del _owned[port]
            _owned_generation += 1

    return unregister


def _address_is_owned(address: object) -> bool:
    """Tell whether a socket address (host, port, ...) is owned."""
    if not isinstance(address, tuple) or len(address) < 2:
        return False

    hosts = _owned.get(address[1])
    if not hosts:
        return False

    host = address[0]
    if host in hosts or not _WILDCARD_HOSTS.isdisjoint(hosts):
        return True
    return host in _LOCALHOST and not _LOCALHOST.isdisjoint(hosts)


def _fd_is_owned(fd: int) -> bool:
    """Tell whether the socket behind ``fd`` has an owned local or peer address."""
    try:
        # Wraps the descriptor without duplicating it; detach() below makes
        # sure the socket object never closes it.
        sock = socket.socket(fileno=fd)
    except OSError:
        return False  # Not a socket: a pipe or a file the loop watches.

    try:
        for read_address in (sock.getsockname, sock.getpeername):
            try:
                if _address_is_owned(read_address()):
                    return True
            except OSError:
                continue  # Not connected (yet): no peer address.
        return False
    finally:
        sock.detach()


class ClockControl(Protocol):
    """What the selector proxy needs from the clock."""

    quiet_period: float

    def jump_limit(self) -> float | None:
        """Return how far time may jump now (loop time), or None for no jump."""
        ...

    def idle(self, next_timer: float | None, limit: float) -> bool:
        """Move virtual time: nothing is runnable and no real I/O is pending.

        Returns False when there is nothing to jump to (no timer, no limit).
        """
        ...


class SelectorProxy:
    """Stand-in for an event loop's selector that jumps virtual time.

    Every method except :meth:`select` goes to the real selector. ``select``
    returns real events when there are any, and otherwise tells the clock that
    the loop is idle, after waiting for ``in_flight()`` holds to end and, when
    the selector watches sockets the toolkit does not own, a real quiet period.
    """

    def __init__(
        self,
        selector: selectors.BaseSelector,
        clock: ClockControl,
        self_pipe_fd: int,
        scheduled: Callable[[], float | None],
    ) -> None:
        self.real = selector
        self._clock = clock
        self._self_pipe_fd = self_pipe_fd
        self._next_timer = scheduled
        self._owned_cache: dict[int, bool] = {}
        self._cache_generation = _owned_generation

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def register(
        self, fileobj: Any, events: int, data: Any = None
    ) -> selectors.SelectorKey:
        """Register with the real selector and forget cached ownership."""
        key = self.real.register(fileobj, events, data)
        self._owned_cache.pop(key.fd, None)
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        """Unregister from the real selector and forget cached ownership."""
        key = self.real.unregister(fileobj)
        self._owned_cache.pop(key.fd, None)
        return key

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        """Return the real selector's key map."""
        return self.real.get_map()

    def _watches_foreign_sockets(self) -> bool:
        """Tell whether some registered descriptor is not owned by the toolkit."""
        if self._cache_generation != _owned_generation:
            self._owned_cache.clear()
            self._cache_generation = _owned_generation

        cache = self._owned_cache
        for key in self.real.get_map().values():
            fd = key.fd
            owned = cache.get(fd)
            if owned is None:
                owned = fd == self._self_pipe_fd or _fd_is_owned(fd)
                cache[fd] = owned
            if not owned:
                return True
        return False

    def select(
        self, timeout: float | None = None
    ) -> list[tuple[selectors.SelectorKey, int]]:
        """Return ready events, or jump virtual time when the loop is idle."""
        real = self.real
        if timeout is not None and timeout <= 0:
            return real.select(0)

        clock = self._clock
        limit = clock.jump_limit()
        if limit is None:
            # Manual mode with nobody advancing: only real I/O can happen.
            return real.select(timeout)

        events = real.select(0)
        if events:
            return events

        # Phase 1: real-time work in flight; never jump past it.
        while _holds:
            events = real.select(IN_FLIGHT_POLL)
            if events:
                return events

        # Phase 2: sockets nobody told us about; give them the quiet period.
        quiet = clock.quiet_period
        if quiet > 0 and self._watches_foreign_sockets():
            events = real.select(quiet)
            if events:
                return events
            if _holds:
                return []  # Work started meanwhile; the next select waits for it.

        # Phase 3: idle. With nothing to jump to, wait for I/O as a real loop.
        next_timer = self._next_timer() if timeout is not None else None
        if clock.idle(next_timer, limit):
            return []
        return real.select(None)
