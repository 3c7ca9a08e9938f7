"""One accepted connection and its two directions of bytes (private).

A :class:`Link` is the protocol of a connection accepted by a
:class:`~lvmopstools.testing.tcp.FlakyServer` or a
:class:`~lvmopstools.testing.tcp.FaultProxy`. It owns two :class:`Pipe`
objects, one per direction, that deliver bytes in order, each piece at the
loop time the data faults gave it, and that stop at a byte budget
(:class:`~lvmopstools.testing.tcp.faults.CloseAfterBytes`). Delays are
``loop.call_at`` timers, so they run in virtual time under a clock; nothing in
here holds :func:`~lvmopstools.testing.clock.in_flight`. :func:`set_reset` makes
closing a connection's socket send a reset instead of a FIN.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import struct
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lvmopstools.testing.tcp.faults import (
    Blackhole,
    CloseAfterBytes,
    CloseOnAccept,
    Fault,
    SlowClose,
)

if TYPE_CHECKING:
    from lvmopstools.testing.tcp._endpoint import Endpoint

__all__ = ["Budget", "Link", "Pipe", "set_reset"]

log = logging.getLogger(__name__)


def set_reset(sock: Any) -> None:
    """Make closing ``sock`` send a TCP reset (RST) instead of a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        # The socket is already gone; closing it sends nothing either way.
        log.debug("cannot set SO_LINGER on %r", sock, exc_info=True)


class Budget:
    """Bytes a connection may still carry before it is closed."""

    __slots__ = ("fault", "remaining")

    def __init__(self, fault: CloseAfterBytes) -> None:
        self.fault = fault
        self.remaining = fault.nbytes


class Pipe:
    """One direction of a link: bytes delivered in order, on time.

    Parameters
    ----------
    link
        The connection the pipe belongs to.
    direction
        ``"upstream"`` (from the client) or ``"downstream"`` (to the client).
    sink
        Called with each piece of data when it is due.
    """

    __slots__ = ("budgets", "busy_until", "direction", "link", "queue", "sink", "timer")

    def __init__(
        self, link: Link, direction: str, sink: Callable[[bytes], None]
    ) -> None:
        self.link = link
        self.direction = direction
        self.sink = sink
        # bytes to deliver, or a function to call (close, EOF) that ends the pipe
        self.queue: deque[tuple[float, bytes | Callable[[], None]]] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self.busy_until = -math.inf
        self.budgets: list[Budget] = []

    @property
    def idle(self) -> bool:
        """True when nothing waits in the pipe."""
        return not self.queue

    def send(
        self, data: bytes, latency: float, steps: list[tuple[float, bytes]]
    ) -> None:
        """Queue ``data`` after ``latency``, as ``(pause, piece)`` steps."""
        if not latency and not self.queue and len(steps) == 1 and not steps[0][0]:
            self.deliver(data)
            return

        # Limitation: bytes held back by a delay stay in memory and the
        # sender is not paused meanwhile (flow control does not cross a
        # delay): a fast sender behind a slow Bandwidth fault grows the queue.
        due = max(self.link.loop.time() + latency, self.busy_until)
        for pause, piece in steps:
            due += pause
            self.queue.append((due, piece))
        self.busy_until = due
        self._arm()

    def send_close(self, *, reset: bool = False) -> None:
        """Close the link once everything queued before has been delivered."""
        self.send_last(lambda: self.link.close(reset=reset))

    def send_last(self, action: Callable[[], None]) -> None:
        """Call ``action`` once everything queued before has been delivered.

        Nothing queued after it is delivered.
        """
        if not self.queue:
            action()
            return

        self.queue.append((self.busy_until, action))

    def deliver(self, data: bytes) -> None:
        """Hand ``data`` to the sink now, stopping at the byte budget."""
        for budget in self.budgets:
            if len(data) >= budget.remaining:
                data = data[: budget.remaining]
                if data:
                    self._count(data)
                    self.sink(data)
                self.link.record("fault", fault=budget.fault.kind, at="limit")
                self.link.close(reset=budget.fault.reset)
                return

        self._count(data)
        self.sink(data)

    def _count(self, data: bytes) -> None:
        for budget in self.budgets:
            budget.remaining -= len(data)

    def _arm(self) -> None:
        if self.timer is None and self.queue:
            self.timer = self.link.loop.call_at(self.queue[0][0], self._fire)

    def _fire(self) -> None:
        self.timer = None
        try:
            self._deliver_due()
        except Exception as exc:
            self.link.crashed(exc)

    def _deliver_due(self) -> None:
        now = self.link.loop.time()
        queue = self.queue
        while queue and queue[0][0] <= now:
            _, piece = queue.popleft()
            if not isinstance(piece, bytes):
                queue.clear()
                piece()
                return
            self.deliver(piece)
        self._arm()

    def cancel(self) -> None:
        """Drop everything queued and stop the timer."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()


class Link(asyncio.Protocol):
    """An accepted connection of a server or proxy, with its connection faults.

    Parameters
    ----------
    endpoint
        The server or proxy that accepted the connection.
    number
        The connection number (from 1, in accept order).
    fired
        The connection-scope faults whose trigger fired for this connection.
    """

    def __init__(self, endpoint: Endpoint, number: int, fired: list[Fault]) -> None:
        self.endpoint = endpoint
        self.number = number
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        # The accepted socket, until the loop wraps it in a transport.
        self.sock: socket.socket | None = None
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self.closing = False
        self.half_closed = False
        self.eof_seen = False
        self.bytes_in = 0
        self.bytes_out = 0

        self.blackhole: Blackhole | None = None
        self.close_on_accept: CloseOnAccept | None = None
        self.slow_close = 0.0
        self.up = Pipe(self, "upstream", self.upstream_sink)
        self.down = Pipe(self, "downstream", self.downstream_sink)
        self._handles: list[asyncio.TimerHandle] = []
        self._apply_connection_faults(fired)

    def _apply_connection_faults(self, fired: list[Fault]) -> None:
        for fault in fired:
            if isinstance(fault, Blackhole):
                self.blackhole = fault
            elif isinstance(fault, CloseOnAccept):
                self.close_on_accept = fault
            elif isinstance(fault, SlowClose):
                self.slow_close = max(self.slow_close, fault.delay)
            elif isinstance(fault, CloseAfterBytes):
                budget = Budget(fault)
                if fault.direction in ("upstream", "both"):
                    self.up.budgets.append(budget)
                if fault.direction in ("downstream", "both"):
                    self.down.budgets.append(budget)

    def adopt(self) -> Link:
        """Hand the accepted socket to the loop; the protocol factory."""
        self.sock = None
        return self

    # --- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        fault = self.close_on_accept
        if fault is not None:
            self.call_later(fault.delay, self.close, reset=fault.reset)
        elif self.blackhole is not None and self.blackhole.close_after is not None:
            self.call_later(self.blackhole.close_after, self.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.up.cancel()
        self.down.cancel()
        for handle in self._handles:
            handle.cancel()
        self._handles.clear()
        self.lost_peer()
        if not self.lost.done():
            self.lost.set_result(None)
        self.endpoint.link_lost(self, exc)

    def data_received(self, data: bytes) -> None:
        try:
            self.received(data)
        except Exception as exc:
            self.crashed(exc)

    # --- for subclasses -----------------------------------------------------------

    def received(self, data: bytes) -> None:
        """Take bytes read from the client."""
        raise NotImplementedError

    def upstream_sink(self, data: bytes) -> None:
        """Take bytes coming from the client, once they are due."""
        raise NotImplementedError

    def downstream_sink(self, data: bytes) -> None:
        """Write bytes to the client, once they are due."""
        assert self.transport is not None
        self.bytes_out += len(data)
        self.transport.write(data)

    def lost_peer(self) -> None:
        """Close whatever else the link opened (the proxy's upstream)."""

    async def wait_closed(self) -> None:
        """Wait until every socket of the link is closed."""
        await self.lost

    def close_peer(self, *, reset: bool) -> None:
        """Close whatever else the link opened, as :meth:`close` does."""

    # --- helpers ------------------------------------------------------------------

    def call_later(
        self, delay: float, callback: Callable[..., None], *args: Any, **kw: Any
    ) -> None:
        """Run ``callback`` after ``delay`` loop seconds unless the link is lost."""

        def run() -> None:
            try:
                callback(*args, **kw)
            except Exception as exc:
                self.crashed(exc)

        self._handles.append(self.loop.call_later(delay, run))

    def crashed(self, exc: Exception) -> None:
        """Abort the link after an error in one of its callbacks or timers.

        The error is kept by the endpoint, whose ``close()`` raises it.
        """
        self.endpoint.fail(exc)
        self.abort()

    def record(self, kind: str, **details: Any) -> None:
        """Add an event of this connection to the endpoint's log."""
        self.endpoint.record(kind, self.number, **details)

    def close(self, *, reset: bool = False) -> None:
        """Close the connection (after the slow-close delay, if any); idempotent.

        Parameters
        ----------
        reset
            Close with a TCP reset (RST) instead of a FIN.
        """
        if self.closing:
            return
        self.closing = True
        self.up.cancel()

        if self.slow_close:
            self.record("fault", fault="slow_close", delay=self.slow_close)
            self.call_later(self.slow_close, self._close_now, reset)
            return
        self._close_now(reset)

    def abort(self) -> None:
        """Close at once, without the slow-close delay (endpoint shutdown)."""
        self.closing = True
        self.up.cancel()
        self.down.cancel()
        self.close_peer(reset=True)
        if self.transport is not None:
            self.transport.abort()
        elif self.sock is not None:
            # The loop never took the accepted socket (the endpoint closed
            # before adopting it): close it here and end the link as asyncio
            # would have.
            sock, self.sock = self.sock, None
            set_reset(sock)
            sock.close()
            self.connection_lost(None)

    def _close_now(self, reset: bool) -> None:
        self.down.cancel()
        self.record(
            "closing", reset=reset, bytes_in=self.bytes_in, bytes_out=self.bytes_out
        )
        self.close_peer(reset=reset)
        transport = self.transport
        if transport is None or transport.is_closing():
            return

        if reset:
            set_reset(transport.get_extra_info("socket"))
            transport.abort()
        elif not self.eof_seen and transport.can_write_eof():
            # A FIN after the bytes already written; the link keeps reading
            # (and dropping) until the client closes too, since closing a
            # socket with unread bytes would send a reset instead.
            transport.write_eof()
            self.half_closed = True
        else:
            transport.close()

    def eof_received(self) -> bool | None:
        """Close when the client closed too; subclasses decide otherwise."""
        self.eof_seen = True
        if self.half_closed:
            return None  # Both sides sent their FIN: asyncio closes the transport.
        if self.closing:
            return True  # A slow close is pending; it closes the transport.
        try:
            return self.client_eof()
        except Exception as exc:
            self.crashed(exc)
            return None

    def client_eof(self) -> bool | None:
        """React to the client's FIN while the link is not closing."""
        self.close()
        return True
