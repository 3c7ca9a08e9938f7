"""One client connection to the mock AMQP broker: framing and handshake.

:class:`BrokerConnection` is the asyncio protocol behind every accepted socket.
It splits the byte stream into AMQP 0-9-1 frames (partial frames and several
frames per read included), runs the connection handshake (PLAIN credentials,
tuning, virtual host), sends heartbeats at the negotiated interval, assembles
published messages from their method, header and body frames, and hands
channel methods to :class:`~lvmopstools.testing.amqp.channel.Channel`.

Errors end the way RabbitMQ ends them: a channel error sends ``channel.close``
and keeps the connection; a connection error sends ``connection.close`` and
waits for ``close-ok``; a stream that can no longer be parsed (garbage bytes,
a bad frame end, an oversized frame) gets ``connection.close`` 501
FRAME_ERROR and the socket is closed at once. A bad protocol header is
answered with the AMQP 0-9-1 header and the socket is closed. An unexpected
exception inside the broker is logged and answered with ``connection.close``
541 INTERNAL_ERROR naming it, never with a silently dropped socket.

What it does not simulate: SASL mechanisms other than PLAIN, the
``connection.secure`` challenge, ``connection.blocked``, TLS, and closing a
connection whose client stops sending heartbeats (the broker sends its own
heartbeats but does not enforce the client's).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import TYPE_CHECKING, Any

from pamqp import commands, frame, header, heartbeat

from .channel import Channel
from .model import AMQPError, Message
from .wire import FRAME_HEAD, decode_method

if TYPE_CHECKING:
    from .server import MockBroker

__all__ = ["BrokerConnection"]

log = logging.getLogger(__name__)

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_END = 0xCE
_HEARTBEAT = frame.marshal(heartbeat.Heartbeat(), 0)

#: Seconds (loop time) to wait for ``connection.close-ok`` before closing.
CLOSE_OK_TIMEOUT = 3.0


class BrokerConnection(asyncio.Protocol):
    """The broker's side of one client connection.

    Parameters
    ----------
    broker
        The broker that accepted the connection.
    """

    def __init__(self, broker: MockBroker) -> None:
        self.broker = broker
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.stage = "header"
        self.channels: dict[int, Channel] = {}
        self.closing_channels: set[int] = set()
        self.client_properties: dict[str, Any] = {}
        self.frame_max = broker.frame_max
        self.channel_max = broker.channel_max
        self.heartbeat = 0
        self._buffer = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    # --- asyncio protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Register the connection with the broker."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = f"{peer[0]}:{peer[1]}"
        self.broker._connection_made(self)
        log.debug("connection from %s", self.peer)

    def data_received(self, data: bytes) -> None:
        """Parse every complete frame in the buffer."""
        if self.stage == "closed":
            return
        self._buffer += data
        try:
            self._parse()
        except AMQPError as err:
            self.fail(err)
        except Exception as err:
            # A bug in the broker must not kill the socket silently: the
            # client gets connection.close 541, as from a RabbitMQ crash.
            log.exception("mock broker failed on a frame from %s", self.peer)
            self.fail(AMQPError(541, f"mock broker error {type(err).__name__}: {err}"))

    def connection_lost(self, exc: Exception | None) -> None:
        """Release channels, exclusive queues and timers."""
        self.stage = "closed"
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for channel in list(self.channels.values()):
            channel.shut()
        self.channels.clear()
        self.broker.state.drop_owner(self)
        self.broker._connection_lost(self)
        log.debug("connection from %s lost (%r)", self.peer, exc)

    # --- sending ---

    def send_method(self, channel: int, method: Any) -> None:
        """Send one method frame."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame.marshal(method, channel))

    def send_content(
        self, channel: int, method: Any, message: Message, *, encoded: bool = False
    ) -> None:
        """Send a method frame followed by a message's header and body frames.

        ``method`` is a pamqp method, or with ``encoded=True`` the bytes of
        a whole method frame (see :func:`.wire.deliver_frame`).
        """
        if self.transport is None or self.transport.is_closing():
            return

        parts = [
            method if encoded else frame.marshal(method, channel),
            FRAME_HEAD.pack(2, channel, len(message.header)),
            message.header,
            b"\xce",
        ]
        body = message.body
        step = self.frame_max - 8 if self.frame_max else len(body) or 1
        for start in range(0, len(body), step):
            chunk = body[start : start + step]
            parts += [FRAME_HEAD.pack(3, channel, len(chunk)), chunk, b"\xce"]
        self.transport.write(b"".join(parts))

    def capability(self, name: str) -> bool:
        """Whether the client announced a capability in its properties."""
        capabilities = self.client_properties.get("capabilities") or {}
        return bool(capabilities.get(name, False))

    # --- closing ---

    def fail(self, err: AMQPError, method: Any = None) -> None:
        """Close the connection with an error, as RabbitMQ does."""
        if self.stage in ("closing", "closed"):
            return
        log.debug("closing connection %s: %s", self.peer, err.text)
        class_id, method_id = _ids(method)
        self.send_method(
            0, commands.Connection.Close(err.code, err.text, class_id, method_id)
        )
        self._release()
        if err.code == 501 or self.stage in ("header", "start"):
            # The stream cannot be trusted any further (or the client is not
            # past authentication): close at once, as RabbitMQ does.
            self.stage = "closed"
            self.close_transport()
            return
        self.stage = "closing"
        self._timer = self._loop.call_later(CLOSE_OK_TIMEOUT, self.close_transport)

    def close_channel(self, number: int, err: AMQPError, method: Any) -> None:
        """Close one channel with an error and wait for its ``close-ok``."""
        # Encode first: a text that does not fit must leave the channel as it was.
        class_id, method_id = _ids(method)
        close = commands.Channel.Close(err.code, err.text, class_id, method_id)
        encoded = frame.marshal(close, number)

        channel = self.channels.pop(number, None)
        if channel is not None:
            channel.shut()
        self.closing_channels.add(number)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encoded)

    def reset(self) -> None:
        """Abort the socket so that the client sees a connection reset."""
        if self.transport is None or self.transport.is_closing():
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0 turns close() into a TCP RST.
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        self.transport.abort()

    def close_transport(self) -> None:
        """Close the socket after the pending writes."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _release(self) -> None:
        for channel in list(self.channels.values()):
            channel.shut()
        self.channels.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # --- parsing ---

    def _parse(self) -> None:
        buffer = self._buffer
        if self.stage == "header":
            if len(buffer) < 8:
                if not PROTOCOL_HEADER.startswith(bytes(buffer)):
                    self._bad_header()
                return
            if buffer[:8] != PROTOCOL_HEADER:
                self._bad_header()
                return
            del buffer[:8]
            self._send_start()

        offset = 0
        size_limit = self.frame_max or 2**32
        try:
            while len(buffer) - offset >= 7 and self.stage != "closed":
                found = self._frame_at(buffer, offset, size_limit)
                if found is None:
                    break
                kind, number, payload, offset = found
                self._frame(kind, number, payload)
        finally:
            # Consumed frames go even when one of them failed, so that the
            # client's close-ok, which follows, is read and not the bad frame.
            del buffer[:offset]

    @staticmethod
    def _frame_at(
        buffer: bytearray, offset: int, size_limit: int
    ) -> tuple[int, int, bytes, int] | None:
        """Return the frame at ``offset`` and the next offset, or None if partial.

        Raises
        ------
        AMQPError
            501 FRAME_ERROR for an oversized frame or a bad frame-end byte.
        """
        kind, number, size = FRAME_HEAD.unpack_from(buffer, offset)
        if size + 8 > size_limit:
            del buffer[:]
            raise AMQPError(
                501,
                f"frame of type {kind} has a {size}-byte payload; frames "
                f"may hold at most {size_limit - 8} (negotiated frame_max "
                f"{size_limit})",
            )
        end = offset + 7 + size
        if len(buffer) <= end:
            return None
        if buffer[end] != FRAME_END:
            marker = buffer[end]
            del buffer[:]
            raise AMQPError(
                501,
                f"frame of type {kind} ends with {marker:#04x} instead of the "
                f"frame-end marker {FRAME_END:#04x}",
            )
        return kind, number, bytes(buffer[offset + 7 : end]), end + 1

    def _bad_header(self) -> None:
        log.debug("bad protocol header from %s", self.peer)
        assert self.transport is not None
        self.transport.write(PROTOCOL_HEADER)
        self.stage = "closed"
        self.close_transport()

    def _frame(self, kind: int, number: int, payload: bytes) -> None:
        if kind == 8:
            return
        if kind == 1:
            self._method(number, decode_method(payload))
        elif kind == 2:
            self._content_header(number, payload)
        elif kind == 3:
            self._content_body(number, payload)
        else:
            raise AMQPError(501, f"unknown frame type {kind}")

    def _method(self, number: int, method: Any) -> None:
        if number == 0:
            self._connection_method(method)
            return
        if self.stage == "closing":
            return
        if self.stage != "open":
            raise AMQPError(504, f"channel {number} used before connection.open")

        if number in self.closing_channels:
            # After channel.close, only its close-ok (or a crossing close) counts.
            if isinstance(method, commands.Channel.CloseOk | commands.Channel.Close):
                self.closing_channels.discard(number)
            return

        channel = self.channels.get(number)
        if isinstance(method, commands.Channel.Open):
            self._open_channel(number, channel)
            return
        if channel is None:
            raise AMQPError(504, f"expected 'channel.open' on channel {number}")
        if channel.publishing is not None:
            raise AMQPError(
                505,
                "expected content header for class 60, got non content header "
                f"frame {method.name!r} instead",
            )

        if isinstance(method, commands.Channel.Close):
            channel.shut()
            del self.channels[number]
            self.send_method(number, commands.Channel.CloseOk())
            return
        if isinstance(method, commands.Channel.CloseOk):
            return

        try:
            channel.handle(method)
        except AMQPError as err:
            if err.connection:
                self.fail(err, method)
            else:
                self.close_channel(number, err, method)

    def _open_channel(self, number: int, channel: Channel | None) -> None:
        if channel is not None:
            raise AMQPError(504, f"second 'channel.open' seen on channel {number}")
        if self.channel_max and number > self.channel_max:
            raise AMQPError(
                530, f"channel {number} exceeds channel_max {self.channel_max}"
            )
        self.channels[number] = Channel(self, number)
        self.send_method(number, commands.Channel.OpenOk())

    def _content_header(self, number: int, payload: bytes) -> None:
        channel = self.channels.get(number)
        if channel is None or channel.publishing is None or channel.header is not None:
            if number in self.closing_channels or self.stage == "closing":
                return
            raise AMQPError(505, f"unexpected content header frame on channel {number}")

        content = header.ContentHeader()
        try:
            content.unmarshal(payload)
        except (struct.error, ValueError) as err:
            raise AMQPError(502, f"malformed content header: {err}") from err
        channel.header = content
        channel.header_raw = payload
        channel.body_left = content.body_size
        if content.body_size == 0:
            self._published(channel)

    def _content_body(self, number: int, payload: bytes) -> None:
        channel = self.channels.get(number)
        if channel is None or channel.header is None:
            if number in self.closing_channels or self.stage == "closing":
                return
            raise AMQPError(505, f"unexpected content body frame on channel {number}")

        channel.body_parts.append(payload)
        channel.body_left -= len(payload)
        if channel.body_left <= 0:
            self._published(channel)

    def _published(self, channel: Channel) -> None:
        method, content = channel.publishing, channel.header
        assert method is not None
        message = Message(
            method.exchange,
            method.routing_key,
            channel.header_raw,
            b"".join(channel.body_parts),
            content.properties,
        )
        channel.publishing = None
        channel.header = None
        channel.body_parts = []
        self.broker._published(channel, method, message)

    # --- connection class (channel 0) ---

    def _send_start(self) -> None:
        properties: dict[str, Any] = {
            "product": "lvmopstools MockBroker",
            "version": "0.1",
            "platform": "Python",
            "capabilities": {
                "publisher_confirms": True,
                "exchange_exchange_bindings": False,
                "basic.nack": True,
                "consumer_cancel_notify": True,
                "connection.blocked": False,
                "authentication_failure_close": True,
                "per_consumer_qos": True,
            },
        }
        self.stage = "start"
        self.send_method(
            0,
            commands.Connection.Start(
                server_properties=properties, mechanisms="PLAIN", locales="en_US"
            ),
        )

    def _connection_method(self, method: Any) -> None:
        if isinstance(method, commands.Connection.Close):
            self.send_method(0, commands.Connection.CloseOk())
            self._release()
            self.stage = "closed"
            self.close_transport()
            return
        if isinstance(method, commands.Connection.CloseOk):
            self.stage = "closed"
            self.close_transport()
            return
        if self.stage == "closing":
            return

        expected = {
            "start": commands.Connection.StartOk,
            "tune": commands.Connection.TuneOk,
            "tuned": commands.Connection.Open,
        }.get(self.stage)
        if expected is None or not isinstance(method, expected):
            raise AMQPError(503, f"unexpected method {method.name!r} on channel 0")

        if isinstance(method, commands.Connection.StartOk):
            self._start_ok(method)
        elif isinstance(method, commands.Connection.TuneOk):
            self._tune_ok(method)
        elif isinstance(method, commands.Connection.Open):
            self._open(method)

    def _start_ok(self, method: commands.Connection.StartOk) -> None:
        self.client_properties = dict(method.client_properties or {})
        if method.mechanism != "PLAIN":
            raise AMQPError(
                403, f"unsupported authentication mechanism {method.mechanism!r}"
            )

        response: str | bytes = method.response or b""
        raw = response.encode() if isinstance(response, str) else bytes(response)
        fields = raw.split(b"\x00")
        user = fields[1].decode(errors="replace") if len(fields) == 3 else ""
        password = fields[2].decode(errors="replace") if len(fields) == 3 else ""
        if (user, password) != (self.broker.user, self.broker.password):
            raise AMQPError(
                403,
                "Login was refused using authentication mechanism PLAIN. For "
                "details see the broker logfile.",
            )

        self.stage = "tune"
        self.send_method(
            0,
            commands.Connection.Tune(
                self.channel_max, self.frame_max, self.broker.heartbeat
            ),
        )

    def _tune_ok(self, method: commands.Connection.TuneOk) -> None:
        if method.frame_max and method.frame_max < 4096:
            raise AMQPError(
                530, f"frame_max={method.frame_max} < 4096 is below the minimum"
            )
        if method.frame_max:
            self.frame_max = min(self.frame_max or method.frame_max, method.frame_max)
        if method.channel_max:
            self.channel_max = min(
                self.channel_max or method.channel_max, method.channel_max
            )
        # Limitation: the broker sends heartbeats at this interval but never
        # closes a connection whose client stops sending its own; RabbitMQ
        # would after two missed intervals. Use DropConnections instead.
        self.heartbeat = method.heartbeat
        self.stage = "tuned"

    def _open(self, method: commands.Connection.Open) -> None:
        if method.virtual_host != self.broker.vhost:
            # RabbitMQ's wording; this broker serves one virtual host only.
            raise AMQPError(530, f"vhost {method.virtual_host} not found")
        self.stage = "open"
        self.send_method(0, commands.Connection.OpenOk())
        if self.heartbeat:
            self._beat()

    def _beat(self) -> None:
        # Send at half the interval, so a client that checks every interval
        # always sees one in time.
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(_HEARTBEAT)
        self._timer = self._loop.call_later(self.heartbeat / 2, self._beat)


def _ids(method: Any) -> tuple[int, int]:
    if method is None:
        return 0, 0
    return method.index >> 16, method.index & 0xFFFF
