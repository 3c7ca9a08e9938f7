"""The listening port of a server or proxy, and its refusals (private).

A :class:`Listener` owns the listening socket of an
:class:`~lvmopstools.testing.tcp._endpoint.Endpoint`: it binds the port,
accepts connections and hands each one over, and, for
:class:`~lvmopstools.testing.tcp.faults.RefuseConnections`, really closes the
port and opens the same port again once no refusal is left. It is not the
place for what happens to a connection after ``accept()`` (the endpoint and
its :class:`~lvmopstools.testing.tcp._link.Link` objects do that), nor for the
list of active faults: the endpoint passes in the refusals to apply.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from lvmopstools.testing.tcp.triggers import TimeWindow

if TYPE_CHECKING:
    import asyncio

    from lvmopstools.testing.tcp._endpoint import Endpoint
    from lvmopstools.testing.tcp._triggers import FaultState

__all__ = ["Listener", "PortTakenError"]

log = logging.getLogger(__name__)

_BACKLOG = 128
_ACCEPT_BATCH = 32


class PortTakenError(OSError):
    """The port could not be opened again after refusing connections."""


class Listener:
    """The listening socket of an endpoint, closed while a refusal lasts.

    Parameters
    ----------
    endpoint
        The server or proxy the port belongs to: its name goes in the
        messages, and its log and background errors receive what happens.
    host
        Address to listen on.
    port
        Port to listen on; 0 picks a free port when first opened, and that
        port is the one opened again after a refusal.
    on_accept
        Called with each accepted socket (non-blocking, with ``TCP_NODELAY``)
        and the peer address.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        host: str,
        port: int,
        on_accept: Callable[[socket.socket, tuple[str, int]], None],
    ) -> None:
        self.endpoint = endpoint
        self.host = host
        self.port = port
        self._on_accept = on_accept
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shut = False
        self._refusers: set[FaultState] = set()

    @property
    def listening(self) -> bool:
        """True while the port accepts connections."""
        return self._sock is not None

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind the port and accept connections on ``loop``.

        Parameters
        ----------
        loop
            The running loop, which watches the socket.

        Raises
        ------
        OSError
            If the port cannot be bound.
        """
        self._loop = loop
        self._listen()

    def shut(self) -> None:
        """Close the port for good: a refusal that ends does not open it again."""
        self._shut = True
        self._close(record=False)

    # --- refusals ----------------------------------------------------------------

    def schedule(self, state: FaultState) -> None:
        """Apply a listener fault now, or at the start and end of its window.

        Parameters
        ----------
        state
            The active fault; its timers go to ``state.handles``.
        """
        assert self._loop is not None
        trigger = state.fault.trigger

        if not isinstance(trigger, TimeWindow):
            self.refuse(state)
            return

        elapsed = self.endpoint.elapsed()
        if trigger.contains(elapsed):
            self.refuse(state)
        elif elapsed < trigger.start:
            handle = self._loop.call_later(trigger.start - elapsed, self.refuse, state)
            state.handles.append(handle)

        if trigger.end is not None and elapsed < trigger.end:
            handle = self._loop.call_later(
                trigger.end - elapsed,
                lambda: self.unrefuse(state, background=True),
            )
            state.handles.append(handle)

    def refuse(self, state: FaultState) -> None:
        """Close the port until ``state`` and every other refusal end.

        Parameters
        ----------
        state
            The refusing fault.
        """
        self._refusers.add(state)
        if self._sock is not None:
            self.endpoint.record("fault", fault=state.fault.kind)
        self._close()

    def unrefuse(self, state: FaultState, *, background: bool) -> None:
        """End the refusal of ``state``; open the port if none is left.

        Parameters
        ----------
        state
            The refusing fault.
        background
            Keyword only. True in a timer: a port that cannot be opened again
            is then a background error of the endpoint instead of raised.

        Raises
        ------
        PortTakenError
            If the port cannot be opened again and ``background`` is False.
        """
        self._refusers.discard(state)
        if self._refusers or self._shut or self._sock is not None:
            return

        try:
            self._reopen()
        except PortTakenError as exc:
            if not background:
                raise
            self.endpoint.fail(exc)

    # --- the socket --------------------------------------------------------------

    def _listen(self) -> None:
        # Limitation: IPv4 only; an IPv6 host fails with bind()'s OSError.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise

        self.port = sock.getsockname()[1]
        self._sock = sock
        assert self._loop is not None
        self._loop.add_reader(sock.fileno(), self._on_acceptable, sock)

    def _on_acceptable(self, sock: socket.socket) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._accept_failed(sock, exc)
                return

            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._on_accept(conn, peer)

    def _accept_failed(self, sock: socket.socket, exc: OSError) -> None:
        # Limitation: the port stops accepting (the socket stays readable while
        # the error lasts, so watching it would spin the loop); clients that
        # connect from now on wait in the backlog until close().
        assert self._loop is not None
        self._loop.remove_reader(sock.fileno())
        msg = (
            f"{self.endpoint.name}: accept() failed on port {self.port} "
            f"({exc.strerror or exc!r}), so the port stopped accepting "
            "connections; raise the open-file limit (ulimit -n) or close the "
            "connections the test no longer needs"
        )
        error = OSError(exc.errno, msg)
        error.__cause__ = exc
        self.endpoint.fail(error)

    def _close(self, *, record: bool = True) -> None:
        sock = self._sock
        if sock is None:
            return

        self._sock = None
        assert self._loop is not None
        self._loop.remove_reader(sock.fileno())
        sock.close()
        if record:
            self.endpoint.record("listener_closed", port=self.port)
            log.debug("%s: port %d closed", self.endpoint.name, self.port)

    def _reopen(self) -> None:
        try:
            self._listen()
        except OSError as exc:
            msg = (
                f"{self.endpoint.name}: cannot listen on {self.host}:{self.port} "
                f"again after refusing connections ({exc.strerror or exc}); "
                "another socket took the port meanwhile. Close it, or use a "
                "fresh server"
            )
            raise PortTakenError(exc.errno, msg) from exc

        self.endpoint.record("listener_reopened", port=self.port)
        log.debug("%s: port %d open again", self.endpoint.name, self.port)
