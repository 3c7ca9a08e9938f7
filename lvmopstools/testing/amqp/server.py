"""MockBroker: an in-process AMQP 0-9-1 broker on loopback, for tests.

``async with MockBroker() as broker:`` listens on 127.0.0.1 on a free port;
unmodified aio_pika, aiormq and clu clients connect to ``broker.url`` exactly
as they connect to RabbitMQ. The broker routes messages, records every
publish (:meth:`MockBroker.messages`, :meth:`MockBroker.replies`,
:meth:`MockBroker.wait_for_message`) and fails on demand
(:meth:`MockBroker.inject` with a fault from
:mod:`lvmopstools.testing.amqp.faults`). A test can wait for its state
(:meth:`MockBroker.wait_connections`, :meth:`MockBroker.wait_running`) and
check that it left nothing open (:meth:`MockBroker.leftovers`). The
fault-injection controls are its base class, in :mod:`._injection`.

What it does not simulate: more than one virtual host, users other than the
configured one, persistence across restarts (a restart loses every queue and
exchange, as a RabbitMQ node without durable state does), memory and disk
alarms, TLS, and the RabbitMQ management API. See the ``model``, ``channel``
and ``connection`` modules for the protocol features left out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from pamqp import commands

from ..clock import register_owned_address
from ._injection import FaultInjection
from .faults import (
    DelayMessages,
    DropMessages,
    DuplicateMessages,
    MessageRules,
    NackConfirms,
    WithholdConfirms,
)
from .model import BrokerState, Envelope, Message
from .records import CluReply, MessageLog, PublishedMessage, record_of

if TYPE_CHECKING:
    from .channel import Channel
    from .connection import BrokerConnection

__all__ = ["MockBroker"]

log = logging.getLogger(__name__)


class MockBroker(FaultInjection):
    """An in-process AMQP 0-9-1 broker on loopback.

    Parameters
    ----------
    host
        The address to listen on; loopback by default.
    port
        The port; 0 picks a free one (kept across restarts).
    user
        The only accepted user name (PLAIN authentication).
    password
        Its password; wrong credentials get 403 ACCESS_REFUSED.
    vhost
        The only virtual host; others get 530 NOT_ALLOWED.
    heartbeat
        The heartbeat interval the broker proposes, in seconds (0 disables).
    frame_max
        The largest frame the broker proposes, in bytes.
    channel_max
        The highest channel number the broker proposes.

    Attributes
    ----------
    is_mock
        Always True; :class:`~lvmopstools.testing.amqp.external.ExternalBroker`
        (a real broker behind the same interface) has False.

    Examples
    --------
    >>> async with MockBroker() as broker:          # doctest: +SKIP
    ...     connection = await aio_pika.connect_robust(broker.url)

    .. note::
        The broker runs on the event loop that starts it, and its timers
        (heartbeats, delays, downtime) follow ``loop.time()``, so they run in
        virtual time under a :class:`~lvmopstools.testing.VirtualClock`.
    """

    is_mock = True

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        user: str = "guest",
        password: str = "guest",
        vhost: str = "/",
        heartbeat: int = 60,
        frame_max: int = 131072,
        channel_max: int = 2047,
    ) -> None:
        for name, value, low in (
            ("port", port, 0),
            ("heartbeat", heartbeat, 0),
            ("frame_max", frame_max, 4096),
            ("channel_max", channel_max, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                msg = f"{name} must be an integer >= {low}, got {value!r}"
                raise ValueError(msg)

        self.host = host
        self.user = user
        self.password = password
        self.vhost = vhost
        self.heartbeat = heartbeat
        self.frame_max = frame_max
        self.channel_max = channel_max
        self.state = BrokerState(vhost)

        self._port = port
        self._server: asyncio.Server | None = None
        self._connections: list[BrokerConnection] = []
        #: Every message published to the broker (see :class:`.MessageLog`).
        self.log = MessageLog()
        #: The message rules in force (see :class:`.MessageRules`).
        self.rules = MessageRules()
        self._count_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._listen_waiters: list[asyncio.Future[None]] = []
        self._timers: set[asyncio.TimerHandle] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._unregister: Callable[[], None] | None = None
        self._lost: asyncio.Event | None = None
        self._started = False
        # The restart downtime and refusal state (see FaultInjection).
        super().__init__()

    # --- life cycle ---

    async def __aenter__(self) -> MockBroker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        """The listening port (0 before the first start)."""
        return self._port

    @property
    def url(self) -> str:
        """The ``amqp://`` URL, with credentials, that clients connect to."""
        if not self._port:
            msg = "the broker has no port yet; start it first (async with MockBroker())"
            raise RuntimeError(msg)
        user, password = quote(self.user, safe=""), quote(self.password, safe="")
        vhost = "" if self.vhost == "/" else quote(self.vhost, safe="")
        return f"amqp://{user}:{password}@{self.host}:{self._port}/{vhost}"

    @property
    def is_running(self) -> bool:
        """Whether the broker accepts connections."""
        return self._server is not None

    async def start(self) -> None:
        """Listen for connections (on the same port after a stop)."""
        if self._started:
            msg = "the broker is already started; stop it before starting it again"
            raise RuntimeError(msg)
        self._end_downtime(resume=False)
        self._started = True
        await self._listen()
        log.info("mock broker listening on %s:%d", self.host, self._port)

    async def stop(self) -> None:
        """Close every connection and the listening socket, and cancel timers.

        Open connections get ``connection.close`` 320 CONNECTION_FORCED, as
        from a RabbitMQ node shutting down. Queues and exchanges are lost.
        During a restart, it cancels the restart: the broker stays stopped.
        """
        self._end_downtime(resume=False)
        await self._stop()

    async def _stop(self) -> None:
        if not self._started:
            return
        self._started = False
        # Timers and tasks first: a pending reopen must not listen again.
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self._refusal = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._close_listener()

        self._drop(
            None, "close", "broker forced connection closure with reason 'shutdown'"
        )
        await self._wait_connections_lost()
        self.state = BrokerState(self.vhost)
        if self._unregister is not None:
            self._unregister()
            self._unregister = None
        log.info("mock broker on port %d stopped", self._port)

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, self.host, self._port, reuse_address=True
        )
        self._port = self._server.sockets[0].getsockname()[1]
        if self._unregister is None:
            self._unregister = register_owned_address(self.host, self._port)
        for future in self._listen_waiters:
            if not future.done():
                future.set_result(None)

    def _protocol(self) -> asyncio.Protocol:
        from .connection import BrokerConnection

        return BrokerConnection(self)

    def _close_listener(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _wait_connections_lost(self) -> None:
        if not self._connections:
            return
        self._lost = asyncio.Event()
        try:
            async with asyncio.timeout(2.0):
                await self._lost.wait()
        except TimeoutError:
            log.debug("forcing %d connections closed", len(self._connections))
            for connection in list(self._connections):
                connection.reset()
        finally:
            self._lost = None

    def _connection_made(self, connection: BrokerConnection) -> None:
        self._connections.append(connection)
        self._connections_changed()

    def _connection_lost(self, connection: BrokerConnection) -> None:
        if connection in self._connections:
            self._connections.remove(connection)
        if not self._connections and self._lost is not None:
            self._lost.set()
        self._connections_changed()

    def _connections_changed(self) -> None:
        for count, future in self._count_waiters:
            if not future.done() and len(self._connections) == count:
                future.set_result(None)

    async def wait_running(
        self,
        *,
        timeout: float = 5.0,  # noqa: ASYNC109 - a per-call bound reads best here
    ) -> None:
        """Wait until the broker accepts connections (after a refusal, say).

        Raises
        ------
        TimeoutError
            If it does not listen within ``timeout`` seconds (loop time).
        """
        if self.is_running:
            return

        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._listen_waiters.append(future)
        try:
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            msg = (
                f"the broker did not listen on port {self._port} within {timeout} s; "
                "it is stopped or still refusing connections"
            )
            raise TimeoutError(msg) from None
        finally:
            self._listen_waiters.remove(future)

    def leftovers(self) -> list[str]:
        """Describe what the broker still holds open; empty once fully stopped.

        A fixture can assert ``broker.leftovers() == []`` after :meth:`stop`
        to check that no client connection, listening socket, timer or task
        of the broker outlived it.

        Returns
        -------
        list[str]
            One phrase per open resource, e.g. ``"connection from 127.0.0.1:5"``.
        """
        found = [f"connection from {peer}" for peer in self.connections]
        if self._server is not None:
            found.append(f"listening socket on {self.host}:{self._port}")
        found += [f"timer {timer!r}" for timer in self._timers]
        found += [f"task {task.get_name()!r}" for task in self._tasks]
        return found

    # --- observability ---

    async def wait_connections(
        self,
        count: int,
        *,
        timeout: float = 5.0,  # noqa: ASYNC109 - a per-call bound reads best here
    ) -> None:
        """Wait until exactly ``count`` client connections are open.

        Parameters
        ----------
        count
            The number of open connections to wait for (0: all closed).
        timeout
            Seconds (loop time) to wait.

        Raises
        ------
        TimeoutError
            If the count is not reached within ``timeout``.
        """
        if len(self._connections) == count:
            return

        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = (count, future)
        self._count_waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            msg = (
                f"expected {count} open connections within {timeout} s, but "
                f"{len(self._connections)} are open: {self.connections!r}"
            )
            raise TimeoutError(msg) from None
        finally:
            self._count_waiters.remove(waiter)

    @property
    def connections(self) -> list[str]:
        """The open client connections, as ``"host:port"`` of each client socket."""
        return [c.peer for c in self._connections]

    def messages(
        self,
        routing_key: str | None = None,
        *,
        exchange: str | None = None,
    ) -> list[PublishedMessage]:
        """Return the recorded messages, oldest first.

        See :meth:`MessageLog.messages <.records.MessageLog.messages>`.
        """
        return self.log.messages(routing_key, exchange=exchange)

    def replies(
        self,
        sender: str | None = None,
        *,
        message_code: str | None = None,
        keyword: str | None = None,
    ) -> list[CluReply]:
        """Return the clu replies published so far, oldest first.

        See :meth:`MessageLog.replies <.records.MessageLog.replies>`.
        """
        return self.log.replies(sender, message_code=message_code, keyword=keyword)

    def clear_records(self) -> None:
        """Forget the recorded messages."""
        self.log.clear()

    async def wait_for_message(
        self,
        predicate: Callable[[PublishedMessage], bool] | None = None,
        *,
        timeout: float = 5.0,  # noqa: ASYNC109 - a per-call bound reads best here
        past: bool = True,
    ) -> PublishedMessage:
        """Wait until a published message satisfies ``predicate`` and return it.

        See :meth:`MessageLog.wait_for_message
        <.records.MessageLog.wait_for_message>`.
        """
        return await self.log.wait_for_message(predicate, timeout=timeout, past=past)

    async def wait_for_reply(
        self,
        predicate: Callable[[CluReply], bool],
        *,
        timeout: float = 5.0,  # noqa: ASYNC109 - a per-call bound reads best here
        past: bool = True,
    ) -> CluReply:
        """Wait until a clu reply satisfies ``predicate`` and return it.

        See :meth:`MessageLog.wait_for_reply <.records.MessageLog.wait_for_reply>`.
        """
        return await self.log.wait_for_reply(predicate, timeout=timeout, past=past)

    # --- publishing ---

    def _published(self, channel: Channel, method: Any, message: Message) -> None:
        seq = channel.next_confirm()
        rule = (
            self.rules.winner(message.exchange, message.routing_key)
            if self.rules
            else None
        )

        def confirm(ok: bool) -> None:
            if seq is None or isinstance(rule, WithholdConfirms):
                return
            if not channel.is_open:
                return
            frame = (
                commands.Basic.Ack(seq)
                if ok
                else commands.Basic.Nack(seq, requeue=False)
            )
            channel.send(frame)

        def route(copies: int) -> tuple[str, ...]:
            queues = self.state.route(message.exchange, message.routing_key)
            for _ in range(copies):
                for queue in queues:
                    queue.messages.append(Envelope(message))
                    queue.dispatch()
            if not queues and method.mandatory and channel.is_open:
                returned = commands.Basic.Return(
                    312, "NO_ROUTE", message.exchange, message.routing_key
                )
                channel.connection.send_content(channel.number, returned, message)
            return tuple(q.name for q in queues)

        routed: tuple[str, ...] = ()
        if isinstance(rule, NackConfirms):
            confirm(False)
        elif isinstance(rule, DropMessages):
            confirm(True)
        elif isinstance(rule, DelayMessages):

            def _route_then_confirm() -> None:
                route(1)
                confirm(True)

            self._later(rule.delay, _route_then_confirm)
        else:
            copies = 1 + rule.copies if isinstance(rule, DuplicateMessages) else 1
            routed = route(copies)
            confirm(True)

        self.log.add(
            record_of(
                message,
                connection=channel.connection.peer,
                channel=channel.number,
                routed=routed,
                fault=rule.kind if rule is not None else None,
            )
        )

    def _later(self, delay: float, callback: Callable[[], object]) -> None:
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timers.discard(timer)
            callback()

        timer = loop.call_later(delay, fire)
        self._timers.add(timer)
