"""FaultProxy: a TCP proxy on loopback that injects faults into live traffic.

The proxy listens on 127.0.0.1, opens one connection to the target for each
client connection, and forwards bytes both ways. With no fault active, a
chunk read from one side is written to the other in the same callback, with
no task, copy or timer in between. With faults active, the same faults as
:class:`~lvmopstools.testing.tcp.FlakyServer` apply; since the proxy does not
know the protocol it carries, each chunk read from the client counts as one
request and each chunk read from the target as one reply.

What it does not simulate: anything below TCP (loss, reordering, MTU), TLS
termination, and replies cut on protocol boundaries (a reply fault acts on
whatever chunk the target's socket returned).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from lvmopstools.testing.clock import in_flight
from lvmopstools.testing.tcp._endpoint import Endpoint
from lvmopstools.testing.tcp._link import Link
from lvmopstools.testing.tcp._shaping import plan_delivery, rewrite_reply

if TYPE_CHECKING:
    from lvmopstools.testing.tcp.faults import Fault

__all__ = ["FaultProxy"]

log = logging.getLogger(__name__)


class FaultProxy(Endpoint):
    """A TCP proxy on 127.0.0.1 in front of a real server, with faults.

    Use it as an async context manager and point the client at ``host`` and
    ``port`` instead of the target::

        async with FaultProxy("127.0.0.1", rabbitmq_port) as proxy:
            proxy.add_fault(Latency(0.5, direction="both"))
            ...

    Parameters
    ----------
    target_host
        The host of the real server.
    target_port
        The port of the real server.
    faults
        Keyword only. Faults active from the start (see :meth:`add_fault`).
    host
        Keyword only. The address to listen on, ``"127.0.0.1"`` by default.
    port
        Keyword only. The port, 0 (the default) for a free one.
    name
        Keyword only. The name in the event log.
    seed
        Keyword only. Seed of :attr:`faker`, used by corrupt replies.
    record_data
        Keyword only. Record a ``"data"`` event for every chunk forwarded
        (with its direction and size). Off by default, so that an unfaulted
        proxy costs as little as possible; the ``"closing"`` event of each
        connection always carries its byte counts, and :attr:`bytes_upstream`
        and :attr:`bytes_downstream` count every byte.
    terminator
        Keyword only. For a line protocol, the line terminator: a garbage
        :class:`~lvmopstools.testing.tcp.faults.CorruptReply` then keeps it
        at the end of a chunk that ends with it, and keeps it out of the
        garbage. None (the default) garbles every byte.

    Raises
    ------
    TypeError, ValueError
        If an argument has the wrong type or value; the message names it.

    .. note::
        While it connects to the target the proxy holds
        :func:`~lvmopstools.testing.clock.in_flight`, so a virtual clock does
        not jump past a connection that is being set up. It holds nothing
        while a request waits for the target's reply: it cannot know when a
        target that is not a toolkit server will answer. For such a target
        the clock only waits its real ``quiet_period`` before each jump, as
        for any foreign socket, so a reply that takes longer than that (a
        broker in another process under load) can arrive after the clock
        jumped past a client's timeout. Hold ``in_flight()`` in the test
        around such a wait, or run that test in real time.

    .. note::
        On exit every client connection, every connection to the target,
        every timer and task is closed and the listening address is
        unregistered from the virtual clock, also when the block raised. The
        target itself is left alone.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        faults: Iterable[Fault] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        name: str = "FaultProxy",
        seed: int = 0,
        record_data: bool = False,
        terminator: bytes | None = None,
    ) -> None:
        super().__init__(host=host, port=port, name=name, seed=seed)
        if not isinstance(target_host, str) or not target_host:
            msg = (
                f"{name}: target_host must be a non-empty string such as "
                f"'127.0.0.1', got {target_host!r}"
            )
            raise TypeError(msg)
        if (
            isinstance(target_port, bool)
            or not isinstance(target_port, int)
            or not 0 < target_port < 65536
        ):
            msg = (
                f"{name}: target_port must be the port the real server listens "
                f"on, an integer from 1 to 65535, got {target_port!r}"
            )
            raise ValueError(msg)

        self.target_host = target_host
        self.target_port = target_port
        if terminator is not None and (
            not isinstance(terminator, bytes) or not terminator
        ):
            msg = (
                f"{name}: terminator must be non-empty bytes such as b'\\n', or "
                f"None for a protocol without one, got {terminator!r}"
            )
            raise ValueError(msg)

        self.record_data = bool(record_data)
        self.terminator = terminator
        self._closed_up = 0
        self._closed_down = 0
        for fault in faults:
            self.add_fault(fault)

    def __repr__(self) -> str:
        where = f"{self.host}:{self.port}" if self.listening else "not listening"
        target = f"{self.target_host}:{self.target_port}"
        return f"<FaultProxy {self.name!r} {where} -> {target}>"

    @property
    def bytes_upstream(self) -> int:
        """Bytes received from clients so far, on every connection."""
        links = self._links_of_type()
        return self._closed_up + sum(link.bytes_in for link in links)

    @property
    def bytes_downstream(self) -> int:
        """Bytes received from the target so far, on every connection."""
        links = self._links_of_type()
        return self._closed_down + sum(link.bytes_down for link in links)

    def _links_of_type(self) -> list[_ProxyLink]:
        return [link for link in self._links if isinstance(link, _ProxyLink)]

    def make_link(self, number: int, fired: list[Fault]) -> Link:
        """Return the protocol of a client connection."""
        return _ProxyLink(self, number, fired)

    def link_lost(self, link: Link, exc: Exception | None) -> None:
        """Forget a connection and keep its byte counts."""
        if isinstance(link, _ProxyLink):
            self._closed_up += link.bytes_in
            self._closed_down += link.bytes_down
        super().link_lost(link, exc)


class _TargetSide(asyncio.Protocol):
    """The proxy's connection to the target; hands everything to its link."""

    def __init__(self, link: _ProxyLink) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = link.loop.create_future()
        self.created = False

    def create(self) -> _TargetSide:
        """Return the protocol; the factory, called once the socket connected."""
        self.created = True
        return self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        link = self.link
        link.bytes_down += len(data)
        client = link.transport
        if (
            link.simple
            and not link.closing
            and not link.down.queue
            and not link.endpoint.has_faults
        ):
            assert client is not None
            link.bytes_out += len(data)
            client.write(data)
            return

        try:
            link.from_target(data)
        except Exception as exc:
            link.crashed(exc)

    def eof_received(self) -> bool | None:
        try:
            self.link.target_closed()
        except Exception as exc:
            self.link.crashed(exc)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self.link.target_closed()

    def pause_writing(self) -> None:
        if self.link.transport is not None:
            self.link.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.link.transport is not None:
            self.link.transport.resume_reading()


class _ProxyLink(Link):
    """A client connection of the proxy and its connection to the target."""

    endpoint: FaultProxy

    def __init__(self, endpoint: FaultProxy, number: int, fired: list[Fault]) -> None:
        super().__init__(endpoint, number, fired)
        self.bytes_down = 0
        self.target: _TargetSide | None = None
        self.upstream: asyncio.Transport | None = None
        self.waiting: list[bytes] = []
        self.eof_pending = False
        self.silenced = False
        self.previous: bytes | None = None
        self.last_request: bytes | None = None
        # No connection fault fired and no data events wanted: bytes may
        # pass straight while the proxy has no fault and the pipes are empty.
        self.simple = not fired and not endpoint.record_data

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.has_target and not self.closing:
            self.endpoint.spawn(self._connect())

    @property
    def has_target(self) -> bool:
        """False when a connection fault keeps the proxy from the target."""
        return self.blackhole is None and self.close_on_accept is None

    async def _connect(self) -> None:
        proxy = self.endpoint
        target = _TargetSide(self)
        self.target = target  # From now on, wait_closed() waits for it too.
        # Limitation: a virtual clock cannot jump while this hold lasts, so a
        # target that never answers the SYN stalls virtual time until the
        # operating system gives up; a loopback target answers or refuses
        # at once.
        try:
            with in_flight():
                await self.loop.create_connection(
                    target.create, proxy.target_host, proxy.target_port
                )
        except BaseException as exc:
            if not target.created:
                # No transport was made, so no connection_lost will come.
                target.lost.set_result(None)
            if not isinstance(exc, OSError):
                raise
            self.record("target_unreachable", error=repr(exc))
            log.debug("%s: cannot reach the target: %r", proxy.name, exc)
            self.close()
            return

        self.upstream = target.transport
        self.record("target_connected")
        if self.closing:
            self.close_peer(reset=False)
            return

        waiting, self.waiting = self.waiting, []
        for data in waiting:
            self.upstream_sink(data)
        if self.eof_pending:
            self._send_eof()

    async def wait_closed(self) -> None:
        await self.lost
        if self.target is not None:
            await self.target.lost

    # --- client to target ---------------------------------------------------------

    def received(self, data: bytes) -> None:
        """Take bytes read from the client: pass them on, or through the faults."""
        self.bytes_in += len(data)
        upstream = self.upstream
        if (
            upstream is not None
            and self.simple
            and not self.closing
            and not self.up.queue
            and not self.endpoint.has_faults
        ):
            upstream.write(data)
            return
        self._from_client(data)

    def _from_client(self, data: bytes) -> None:
        if self.closing or self.blackhole or self.close_on_accept:
            self.record("dropped", nbytes=len(data))
            return

        proxy = self.endpoint
        if proxy.record_data:
            self.record("data", direction="upstream", nbytes=len(data))
        self.last_request = data
        fired = proxy.select(
            "data", direction="upstream", request=data, connection=self.number
        )
        latency, steps = plan_delivery(data, fired)
        self.up.send(data, latency, steps)

    def upstream_sink(self, data: bytes) -> None:
        if self.upstream is None:
            self.waiting.append(data)
            return
        self.upstream.write(data)

    def client_eof(self) -> bool | None:
        if not self.has_target:
            # Nobody else will ever answer: close, as the client did.
            self.close()
            return True
        self.up.send_last(self._send_eof)
        return True

    def _send_eof(self) -> None:
        upstream = self.upstream
        if upstream is None:
            self.eof_pending = True
            return
        if upstream.can_write_eof() and not upstream.is_closing():
            upstream.write_eof()

    # --- target to client ---------------------------------------------------------

    def from_target(self, data: bytes) -> None:
        """Take one chunk from the target through the reply and data faults."""
        if self.closing or self.silenced:
            self.record("dropped", nbytes=len(data), direction="downstream")
            return

        proxy = self.endpoint
        if proxy.record_data:
            self.record("data", direction="downstream", nbytes=len(data))
        number = self.number
        fired = proxy.select("reply", request=self.last_request, connection=number)
        rewrite = rewrite_reply(
            data, self.previous, fired, proxy.faker, proxy.terminator
        )
        self.previous = data
        if rewrite.silence:
            self.silenced = True
            self.record("silenced", nbytes=len(data))
            return

        fired = proxy.select(
            "data", direction="downstream", request=self.last_request, connection=number
        )
        latency, steps = plan_delivery(rewrite.reply, fired)
        self.down.send(rewrite.reply, latency, steps)
        if rewrite.close:
            self.down.send_close(reset=rewrite.reset)

    def target_closed(self) -> None:
        """The target closed its side: close the client's after what is queued."""
        if self.closing:
            return
        self.record("target_closed")
        self.down.send_close()

    # --- flow control and closing -------------------------------------------------

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    def close_peer(self, *, reset: bool) -> None:
        upstream = self.upstream
        if upstream is None:
            return
        if reset:
            upstream.abort()  # Also when a close() is already flushing.
        elif not upstream.is_closing():
            upstream.close()

    def lost_peer(self) -> None:
        upstream = self.upstream
        if upstream is not None and not upstream.is_closing():
            upstream.abort()
