"""Tests of what only MockBroker does: its life cycle, message log and faults.

The behaviours MockBroker shares with RabbitMQ are checked against both in
``test_amqp_contract.py``; this module covers the rest. Every test gets a
fresh broker from the ``broker`` fixture, which at teardown stops it and
checks that nothing is left: no connection, no listening socket, no timer or
task of the broker, and a closed port. Fault tests also check that the fault
left nothing behind once it has run its course.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aio_pika
import aiormq
import pytest
import pytest_asyncio
from _actor_support import QuietActor
from _amqp_support import WAIT, closed_with, drain
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue
from clu import AMQPClient
from pamqp import body as body_frame
from pamqp import commands, frame
from pamqp import header as header_frame

from lvmopstools.testing.amqp import (
    CloseChannel,
    DelayMessages,
    DropConnections,
    DropMessages,
    DuplicateMessages,
    MockBroker,
    NackConfirms,
    PublishedMessage,
    RefuseConnections,
    RestartBroker,
    WithholdConfirms,
    fault_from_dict,
)
from lvmopstools.testing.amqp.channel import Channel
from lvmopstools.testing.amqp.external import ExternalBroker
from lvmopstools.testing.amqp.model import AMQPError
from lvmopstools.testing.amqp.wire import decode_method, deliver_frame
from lvmopstools.testing.clock import VirtualClock

Connect = Callable[..., Awaitable[AbstractConnection]]
T = TypeVar("T")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def port_is_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest_asyncio.fixture
async def broker() -> AsyncIterator[MockBroker]:
    """A started MockBroker; teardown checks that it leaves nothing behind."""
    mock = MockBroker()
    await mock.start()
    try:
        yield mock
    finally:
        await mock.stop()
    assert mock.leftovers() == []
    assert port_is_closed(mock.port)


@pytest_asyncio.fixture
async def connect(broker: MockBroker) -> AsyncIterator[Connect]:
    """A factory of aio_pika connections to ``broker``, closed at teardown."""
    opened: list[AbstractConnection] = []

    async def make(*, robust: bool = False, **kwargs: Any) -> AbstractConnection:
        opener = aio_pika.connect_robust if robust else aio_pika.connect
        async with asyncio.timeout(WAIT):
            connection = await opener(broker.url, **kwargs)
        opened.append(connection)
        return connection

    yield make

    for connection in reversed(opened):
        if not connection.is_closed:
            await connection.close()
    await broker.wait_connections(0, timeout=WAIT)


@pytest_asyncio.fixture
async def channel(connect: Connect) -> AbstractChannel:
    return await (await connect()).channel()


async def waiting_task(wait: Callable[[], Awaitable[T]]) -> asyncio.Task[T]:
    """Start ``wait()`` in a task; return once the broker has its waiter.

    The broker's waits register their waiter before they first suspend, so
    once the task has signalled and then suspended, the waiter is in place.
    """
    registered = asyncio.Event()

    async def run() -> T:
        registered.set()
        return await wait()

    task = asyncio.create_task(run())
    async with asyncio.timeout(WAIT):
        await registered.wait()
    return task


# --- life cycle ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": -1}, "port must be an integer >= 0, got -1"),
        ({"heartbeat": 1.5}, "heartbeat must be an integer >= 0, got 1.5"),
        ({"frame_max": 100}, "frame_max must be an integer >= 4096, got 100"),
        ({"channel_max": True}, "channel_max must be an integer >= 1, got True"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MockBroker(**kwargs)


def test_url_needs_a_started_broker() -> None:
    with pytest.raises(RuntimeError, match="the broker has no port yet; start it"):
        _ = MockBroker().url


@pytest.mark.asyncio
async def test_start_stop_and_start_again_on_the_same_port() -> None:
    broker = MockBroker(user="ops", password="secret", vhost="lvm")
    tasks_before = asyncio.all_tasks()

    await broker.start()
    port, url = broker.port, broker.url
    with pytest.raises(RuntimeError, match="the broker is already started"):
        await broker.start()
    await broker.stop()
    closed = port_is_closed(port)
    await broker.stop()  # a second stop does nothing
    async with broker:
        connection = await aio_pika.connect(broker.url)
        await connection.close()
        await broker.wait_connections(0, timeout=WAIT)

    assert url == f"amqp://ops:secret@127.0.0.1:{port}/lvm"
    assert closed
    assert broker.port == port
    assert not broker.is_running
    assert broker.leftovers() == []
    assert asyncio.all_tasks() - tasks_before == set()


@pytest.mark.asyncio
async def test_url_quotes_credentials_and_vhost() -> None:
    broker = MockBroker(user="ops:1", password="p@ss/w#rd", vhost="lvm/test")

    async with broker:
        url = broker.url
        async with asyncio.timeout(WAIT):
            connection = await aio_pika.connect(url)
        channel = await connection.channel()
        await channel.declare_queue(exclusive=True)
        await connection.close()
        await broker.wait_connections(0, timeout=WAIT)

    assert url == f"amqp://ops%3A1:p%40ss%2Fw%23rd@127.0.0.1:{broker.port}/lvm%2Ftest"
    assert broker.leftovers() == []


@pytest.mark.asyncio
async def test_stop_closes_client_connections(
    broker: MockBroker, connect: Connect
) -> None:
    connection = await connect()
    closing = connection.transport.connection.closing  # type: ignore[union-attr]

    await broker.stop()
    reason = await closed_with(closing)

    assert isinstance(reason, aiormq.exceptions.ConnectionClosed)
    assert "CONNECTION_FORCED - broker forced connection closure with reason " in str(
        reason
    )
    assert broker.leftovers() == []


@pytest.mark.asyncio
async def test_accepted_sockets_send_without_delay(
    broker: MockBroker, connect: Connect
) -> None:
    await connect()

    (connection,) = broker._connections
    assert connection.transport is not None
    sock = connection.transport.get_extra_info("socket")
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


@pytest.mark.asyncio
async def test_leftovers_name_what_is_open(
    broker: MockBroker, connect: Connect
) -> None:
    await connect()

    (peer,) = broker.connections
    assert broker.leftovers() == [
        f"connection from {peer}",
        f"listening socket on 127.0.0.1:{broker.port}",
    ]


@pytest.mark.asyncio
async def test_wait_running_times_out_on_a_stopped_broker() -> None:
    broker = MockBroker()
    await broker.start()
    await broker.stop()

    with pytest.raises(
        TimeoutError,
        match=f"the broker did not listen on port {broker.port} within 0.01 s; it "
        "is stopped or still refusing connections",
    ):
        await broker.wait_running(timeout=0.01)


@pytest.mark.asyncio
async def test_wait_connections_times_out_with_the_count(broker: MockBroker) -> None:
    with pytest.raises(
        TimeoutError, match=r"expected 2 open connections within 0.01 s, but 0 are"
    ):
        await broker.wait_connections(2, timeout=0.01)


async def raw_open(port: int, heartbeat: int = 0) -> Any:
    """Open a bare AMQP connection; return (reader, writer, read_frame)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def read() -> Any:
        head = await reader.readexactly(7)
        rest = await reader.readexactly(struct.unpack(">I", head[3:])[0] + 1)
        return frame.unmarshal(head + rest)[2]

    async with asyncio.timeout(WAIT):
        writer.write(b"AMQP\x00\x00\x09\x01")
        await read()
        start_ok = commands.Connection.StartOk(
            mechanism="PLAIN", response="\x00guest\x00guest"
        )
        writer.write(frame.marshal(start_ok, 0))
        await read()
        tune_ok = commands.Connection.TuneOk(0, 131072, heartbeat)
        writer.write(frame.marshal(tune_ok, 0))
        writer.write(frame.marshal(commands.Connection.Open("/"), 0))
        await read()
    return reader, writer, read


@pytest.mark.asyncio
@pytest.mark.virtual_clock
async def test_heartbeats_follow_the_loop_clock(broker: MockBroker) -> None:
    _, writer, read = await raw_open(broker.port, heartbeat=60)
    loop = asyncio.get_running_loop()

    beats, times = [], []
    try:
        async with asyncio.timeout(WAIT * 10):
            for _ in range(3):
                beats.append(await read())
                times.append(loop.time())
    finally:
        writer.close()
        await writer.wait_closed()

    assert [b.name for b in beats] == ["Heartbeat"] * 3
    # One every half interval, so a client checking every interval never misses.
    assert times[2] - times[1] == pytest.approx(30, abs=1e-6)
    assert times[1] - times[0] == pytest.approx(30, abs=1e-6)


# --- what it does not implement ---------------------------------------------------


async def _underlay(connection: AbstractConnection) -> aiormq.abc.AbstractChannel:
    channel = await connection.channel()
    return await channel.get_underlay_channel()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("call", "text"),
    [
        (lambda ch: ch.tx_select(), "method 'tx.select' is not implemented"),
        (lambda ch: ch.basic_recover(), "method 'basic.recover' is not implemented"),
        (
            lambda ch: ch.exchange_declare(unique("x"), exchange_type="headers"),
            "exchange type 'headers' is not implemented by the mock broker",
        ),
        (lambda ch: ch.basic_qos(prefetch_size=10), r"prefetch_size!=0 \(10\)"),
        (lambda ch: ch.flow(active=False), "active=false"),
        (
            lambda ch: ch.basic_publish(b"x", routing_key="k", immediate=True),
            "immediate=true",
        ),
    ],
    ids=["tx.select", "basic.recover", "headers", "prefetch_size", "flow", "immediate"],
)
async def test_unimplemented_methods_close_the_connection(
    connect: Connect, call: Callable[[Any], Awaitable[Any]], text: str
) -> None:
    bystander = await connect()
    channel = await _underlay(await connect())

    with pytest.raises(
        aiormq.exceptions.ConnectionNotImplemented, match=f"NOT_IMPLEMENTED - {text}"
    ):
        await call(channel)
    survivor = await bystander.channel()

    assert not survivor.is_closed
    await survivor.declare_queue(exclusive=True)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("arguments", "text"),
    [
        ({"x-message-ttl": 1000}, "queue argument 'x-message-ttl' (value 1000) is"),
        ({"x-expires": 500}, "queue argument 'x-expires' (value 500) is"),
        ({"x-max-length": 2}, "queue argument 'x-max-length' (value 2) is"),
        (
            {"x-dead-letter-exchange": "dlx"},
            "queue argument 'x-dead-letter-exchange' (value 'dlx') is",
        ),
        ({"x-max-priority": 5}, "queue argument 'x-max-priority' (value 5) is"),
        (
            {"x-overflow": "reject-publish"},
            "queue argument 'x-overflow' (value 'reject-publish') is",
        ),
        (
            {"x-queue-type": "quorum"},
            "queue argument 'x-queue-type' (value 'quorum') is not implemented "
            "by the mock broker; only classic queues are",
        ),
    ],
    ids=[
        "ttl",
        "expires",
        "max-length",
        "dead-letter",
        "priority",
        "overflow",
        "quorum",
    ],
)
async def test_unsimulated_queue_arguments_close_the_connection(
    connect: Connect, arguments: dict[str, Any], text: str
) -> None:
    channel = await (await connect()).channel()

    with pytest.raises(
        aiormq.exceptions.ConnectionNotImplemented,
        match=f"NOT_IMPLEMENTED - {re.escape(text)}",
    ):
        await channel.declare_queue(unique("q"), arguments=arguments)


@pytest.mark.asyncio
async def test_unknown_method_is_named(broker: MockBroker) -> None:
    reader, writer, read = await raw_open(broker.port)
    try:
        writer.write(struct.pack(">BHIHH", 1, 0, 4, 99, 99) + b"\xce")
        close = await read()
        writer.write(frame.marshal(commands.Connection.CloseOk(), 0))
        async with asyncio.timeout(WAIT):
            rest = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()

    assert isinstance(close, commands.Connection.Close)
    assert (close.reply_code, close.reply_text) == (
        540,
        "NOT_IMPLEMENTED - unknown method 99.99",
    )
    assert rest == b""  # closed after close-ok


@pytest.mark.asyncio
async def test_a_broker_bug_closes_the_connection_with_internal_error(
    connect: Connect, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: Channel, method: Any) -> None:
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(Channel, "_queue_purge", broken)
    connection = await connect()
    bystander = await (await connect()).channel()
    channel = await connection.channel()
    queue = await channel.declare_queue(unique("q"), exclusive=True)
    closing = connection.transport.connection.closing  # type: ignore[union-attr]

    with pytest.raises(
        aiormq.exceptions.ConnectionInternalError,
        match="INTERNAL_ERROR - mock broker error ZeroDivisionError: simulated bug",
    ):
        await queue.purge()
    reason = await closed_with(closing)

    assert isinstance(reason, aiormq.exceptions.ConnectionInternalError)
    assert "mock broker failed on a frame from" in caplog.text
    assert not bystander.is_closed
    await bystander.declare_queue(exclusive=True)


@pytest.mark.asyncio
async def test_exclusive_consumer_refuses_a_second_one(
    channel: AbstractChannel,
) -> None:
    queue = await channel.declare_queue(unique("q"), auto_delete=True)

    async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        return None

    await queue.consume(ignore, exclusive=True)
    with pytest.raises(
        aiormq.exceptions.ChannelAccessRefused,
        match=f"ACCESS_REFUSED - queue '{queue.name}' in vhost '/' in exclusive use",
    ):
        await queue.consume(ignore)


class RecordingTransport(asyncio.Transport):
    """A transport that keeps what the broker writes, for feeding it by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def frames(self) -> list[Any]:
        found, data = [], bytes(self.written)
        while data:
            size, _, method = frame.unmarshal(data)
            found.append(method)
            data = data[size:]
        return found


@pytest.mark.asyncio
async def test_frames_split_at_every_byte_are_reassembled(broker: MockBroker) -> None:
    stream = b"AMQP\x00\x00\x09\x01" + b"".join(
        frame.marshal(method, number)
        for number, method in [
            (
                0,
                commands.Connection.StartOk(
                    mechanism="PLAIN", response="\x00guest\x00guest"
                ),
            ),
            (0, commands.Connection.TuneOk(2047, 131072, 0)),
            (0, commands.Connection.Open("/")),
            (1, commands.Channel.Open()),
            (1, commands.Queue.Declare(queue="split", exclusive=True)),
            (1, commands.Basic.Publish(routing_key="split")),
        ]
    )
    body = b"reassembled"
    header = frame.marshal(
        header_frame.ContentHeader(0, len(body), commands.Basic.Properties()), 1
    )
    stream += header + frame.marshal(body_frame.ContentBody(body), 1)
    stream += frame.marshal(commands.Basic.Get(queue="split", no_ack=True), 1)
    transport = RecordingTransport()
    protocol = broker._protocol()
    protocol.connection_made(transport)

    for index in range(len(stream)):
        protocol.data_received(stream[index : index + 1])
    protocol.connection_lost(None)
    answers = transport.frames()

    assert [type(a).__name__ for a in answers] == [
        "Start",
        "Tune",
        "OpenOk",
        "OpenOk",
        "DeclareOk",
        "GetOk",
        "ContentHeader",
        "ContentBody",
    ]
    assert answers[-1].value == body
    assert broker.messages("split")[0].body == body


# --- the hand-written codecs -----------------------------------------------------


def _payload(method: Any) -> bytes:
    return frame.marshal(method, 1)[7:-1]


@pytest.mark.parametrize(
    "method",
    [
        commands.Basic.Publish(),
        commands.Basic.Publish(0, "sdss_exchange", "command.actor", True, False),
        commands.Basic.Publish(0, "x", "é.ü", False, True),
        commands.Basic.Publish(0, "a" * 127, "k" * 255, True, True),
        commands.Basic.Ack(),
        commands.Basic.Ack(2**63 - 1, True),
        commands.Basic.Ack(7, False),
    ],
)
def test_fast_decoders_agree_with_pamqp(method: Any) -> None:
    decoded = decode_method(_payload(method))

    assert type(decoded) is type(method)
    assert vars(decoded) == vars(method)


@pytest.mark.parametrize(
    ("tag", "delivery_tag", "redelivered", "exchange", "key"),
    [
        ("amq.ctag-x", 1, False, "", "q"),
        ("ctag", 2**63 - 1, True, "sdss_exchange", "reply.é"),
    ],
)
def test_deliver_frame_agrees_with_pamqp(
    tag: str, delivery_tag: int, redelivered: bool, exchange: str, key: str
) -> None:
    method = commands.Basic.Deliver(tag, delivery_tag, redelivered, exchange, key)

    encoded = deliver_frame(
        3, tag.encode(), delivery_tag, redelivered, exchange.encode(), key.encode()
    )

    assert encoded == frame.marshal(method, 3)


@pytest.mark.asyncio
async def test_malformed_publish_closes_the_connection(broker: MockBroker) -> None:
    _, writer, read = await raw_open(broker.port)
    try:
        writer.write(frame.marshal(commands.Channel.Open(), 1))
        await read()
        truncated = _payload(commands.Basic.Publish(0, "x", "key"))[:-3]
        writer.write(struct.pack(">BHI", 1, 1, len(truncated)) + truncated + b"\xce")
        close = await read()
    finally:
        writer.close()
        await writer.wait_closed()

    assert isinstance(close, commands.Connection.Close)
    assert close.reply_code == 502
    assert close.reply_text.startswith("SYNTAX_ERROR - malformed 'Basic.Publish' frame")


# --- the message log ---------------------------------------------------------------


@pytest.mark.asyncio
async def test_every_publish_is_recorded(
    broker: MockBroker, channel: AbstractChannel
) -> None:
    exchange = await channel.declare_exchange(
        "sdss_exchange", aio_pika.ExchangeType.TOPIC, auto_delete=True
    )
    queue = await channel.declare_queue(unique("q"), exclusive=True)
    await queue.bind(exchange, "command.#")
    loop = asyncio.get_running_loop()
    before = loop.time()

    await exchange.publish(
        aio_pika.Message(b'{"a": 1}', headers={"h": 1}, correlation_id="c1"),
        "command.probe",
    )
    await exchange.publish(aio_pika.Message(b"x"), "reply.nobody", mandatory=False)
    await channel.default_exchange.publish(aio_pika.Message(b"d"), queue.name)

    first, second, third = broker.messages()
    assert (first.exchange, first.routing_key, first.body) == (
        "sdss_exchange",
        "command.probe",
        b'{"a": 1}',
    )
    assert first.headers == {"h": 1}
    assert first.properties["correlation_id"] == "c1"
    assert first.json() == {"a": 1}
    assert first.routed_to == (queue.name,)
    assert second.routed_to == ()
    assert third.exchange == ""
    assert before <= first.loop_time <= loop.time()
    assert first.virtual_time is None
    assert first.connection in broker.connections
    assert broker.messages("command.*") == [first]
    assert broker.messages("#", exchange="") == [third]
    assert broker.messages("reply.#", exchange="sdss_exchange") == [second]
    broker.clear_records()
    assert broker.messages() == []


def test_a_body_that_is_not_json_says_so() -> None:
    record = PublishedMessage("x", "key", b"\xff\x00")

    with pytest.raises(ValueError, match=r"the body of the message to 'key' is not"):
        record.json()


@pytest.mark.asyncio
@pytest.mark.virtual_clock
async def test_records_carry_virtual_time(
    virtual_clock: Any, broker: MockBroker, channel: AbstractChannel
) -> None:
    await asyncio.sleep(42)

    await channel.default_exchange.publish(
        aio_pika.Message(b"t"), "nowhere", mandatory=False
    )

    (record,) = broker.messages()
    assert record.virtual_time == virtual_clock.time()
    assert record.virtual_time == pytest.approx(42.0, abs=1.0)


@pytest.mark.asyncio
async def test_wait_for_message(broker: MockBroker, channel: AbstractChannel) -> None:
    await channel.default_exchange.publish(
        aio_pika.Message(b"old"), "k.old", mandatory=False
    )
    waiter = await waiting_task(
        lambda: broker.wait_for_message(
            lambda m: m.routing_key.startswith("k."), past=False
        )
    )

    await channel.default_exchange.publish(
        aio_pika.Message(b"new"), "k.new", mandatory=False
    )
    async with asyncio.timeout(WAIT):
        found = await waiter
    old = await broker.wait_for_message(lambda m: m.body == b"old")

    assert (found.body, old.body) == (b"new", b"old")
    with pytest.raises(TimeoutError, match=r"no published message matched .* 2 "):
        await broker.wait_for_message(lambda m: False, timeout=0.01)


@pytest.mark.asyncio
@pytest.mark.parametrize("wait", ["message", "reply"])
async def test_a_predicate_that_raises_fails_only_its_waiter(
    broker: MockBroker, connect: Connect, wait: str
) -> None:
    connection = await connect()
    channel = await connection.channel()

    def broken(item: Any) -> bool:
        return bool(item.keywords["missing"] if wait == "reply" else item.headers["x"])

    async def waiting() -> Any:
        if wait == "reply":
            return await broker.wait_for_reply(broken, past=False)
        return await broker.wait_for_message(broken, past=False)

    waiter = await waiting_task(waiting)
    others = await waiting_task(lambda: broker.wait_for_message(past=False))
    reply = aio_pika.Message(b"{}", headers={"sender": "a", "message_code": ":"})
    confirmed = await channel.default_exchange.publish(
        reply, "reply.broadcast", mandatory=False
    )

    with pytest.raises(KeyError, match="missing" if wait == "reply" else "'x'"):
        async with asyncio.timeout(WAIT):
            await waiter
    async with asyncio.timeout(WAIT):
        seen = await others
    assert isinstance(confirmed, commands.Basic.Ack)
    assert seen.routing_key == "reply.broadcast"
    assert not connection.is_closed
    await channel.declare_queue(exclusive=True)


@pytest.mark.asyncio
async def test_clu_replies_are_decoded(broker: MockBroker) -> None:
    actor = QuietActor(name=unique("actor"), url=broker.url, check_interval=3600)
    client = AMQPClient(name=unique("client"), url=broker.url)
    await actor.start()
    await client.start()
    try:
        async with asyncio.timeout(WAIT):
            command = await (await client.send_command(actor.name, "actor-state"))
        done = await broker.wait_for_reply(
            lambda r: r.sender == actor.name and r.is_done
        )
    finally:
        await client.stop()
        await actor.stop()

    assert command.status.did_succeed
    assert done.message_code == ":"
    assert done.commander_id is not None
    assert done.commander_id.startswith(client.name)
    assert done.command_id is not None
    assert "RUNNING" in done.keywords["state"]["flags"]
    assert not done.broadcast
    assert broker.replies(actor.name, message_code=":", keyword="state") == [done]
    assert broker.replies("somebody-else") == []
    assert broker.messages(f"command.{actor.name}")  # the command itself


# --- faults: actions ----------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.virtual_clock
async def test_restart_robust_clients_reconnect(
    virtual_clock: VirtualClock, broker: MockBroker, connect: Connect
) -> None:
    connection = await connect(robust=True)
    channel = await connection.channel()
    queue = await channel.declare_queue(unique("q"), auto_delete=True)
    reconnected = asyncio.Event()
    reconnected_at: list[float] = []

    def on_reconnect(*_: Any) -> None:
        reconnected_at.append(virtual_clock.time())
        reconnected.set()

    connection.reconnect_callbacks.add(on_reconnect)  # type: ignore[attr-defined]
    port = broker.port

    restarted_at = virtual_clock.time()
    await broker.inject(RestartBroker(downtime=3.0))
    back_at = virtual_clock.time()
    async with asyncio.timeout(WAIT * 10):
        await reconnected.wait()
    await channel.default_exchange.publish(aio_pika.Message(b"back"), queue.name)

    assert back_at - restarted_at == pytest.approx(3.0, abs=1e-3)
    assert reconnected_at[0] - restarted_at >= 3.0
    assert broker.port == port
    assert await drain(queue) == [b"back"]  # the topology was declared again
    assert len(broker.connections) == 1


def signal_stops(
    broker: MockBroker, monkeypatch: pytest.MonkeyPatch
) -> tuple[asyncio.Event, asyncio.Event]:
    """Return events set when the broker begins and ends stopping itself."""
    begun, ended = asyncio.Event(), asyncio.Event()
    stop = broker._stop

    async def stop_and_signal() -> None:
        begun.set()
        await stop()
        ended.set()

    monkeypatch.setattr(broker, "_stop", stop_and_signal)
    return begun, ended


@pytest.mark.asyncio
@pytest.mark.virtual_clock
@pytest.mark.parametrize("call", ["stop", "start"])
async def test_stop_or_start_during_a_restart_cancels_it(
    broker: MockBroker, call: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, stopped = signal_stops(broker, monkeypatch)
    restarting = asyncio.create_task(broker.inject(RestartBroker(downtime=30.0)))
    async with asyncio.timeout(WAIT):
        await stopped.wait()
    during = broker.leftovers()

    await (broker.stop() if call == "stop" else broker.start())
    right_after = broker.leftovers()
    async with asyncio.timeout(WAIT * 10):
        await restarting
    await asyncio.sleep(60)  # virtual: past the downtime the restart asked for

    if call == "stop":
        assert not broker.is_running
        assert right_after == []
        assert broker.leftovers() == []
    else:
        assert broker.is_running
        assert broker.leftovers() == [f"listening socket on 127.0.0.1:{broker.port}"]
    assert any(item.startswith("timer") for item in during)


@pytest.mark.asyncio
@pytest.mark.virtual_clock
async def test_stop_while_a_restart_is_stopping_cancels_it(
    broker: MockBroker, connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    await connect()  # so that stopping waits for a client to go
    begun, _ = signal_stops(broker, monkeypatch)
    restarting = asyncio.create_task(broker.inject(RestartBroker(downtime=30.0)))
    async with asyncio.timeout(WAIT):
        await begun.wait()

    await broker.stop()
    async with asyncio.timeout(WAIT * 10):
        await restarting
    await asyncio.sleep(60)  # virtual: past the downtime the restart asked for

    assert not broker.is_running
    assert broker.leftovers() == []


@pytest.mark.asyncio
@pytest.mark.virtual_clock
async def test_actor_answers_again_after_a_restart(broker: MockBroker) -> None:
    actor = QuietActor(name=unique("actor"), url=broker.url, check_interval=3600)
    client = AMQPClient(name=unique("client"), url=broker.url)
    await actor.start()
    await client.start()
    reconnected = [asyncio.Event(), asyncio.Event()]
    for event, robust in zip(
        reconnected,
        (actor.connection.connection, client.connection.connection),
        strict=True,
    ):
        robust.reconnect_callbacks.add(lambda *_, event=event: event.set())
    try:
        await broker.inject(RestartBroker())
        async with asyncio.timeout(60):
            for event in reconnected:
                await event.wait()
            command = await (await client.send_command(actor.name, "actor-state"))
    finally:
        await client.stop()
        await actor.stop()

    assert command.status.did_succeed


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("reset", ConnectionError),
        ("close", aiormq.exceptions.ConnectionClosed),
    ],
)
async def test_drop_connections(
    broker: MockBroker, connect: Connect, mode: str, error: type[Exception]
) -> None:
    victims = [await connect(), await connect()]
    survivor = await connect()
    closings = [c.transport.connection.closing for c in victims]  # type: ignore[union-attr]

    await broker.inject(DropConnections(count=2, mode=mode))
    reasons = [await closed_with(closing) for closing in closings]
    await broker.wait_connections(1, timeout=WAIT)
    queue = await (await survivor.channel()).declare_queue(exclusive=True)

    assert all(isinstance(r, error) for r in reasons), reasons
    if mode == "close":
        assert all(
            "CONNECTION_FORCED - closed by a DropConnections" in str(r) for r in reasons
        )
    assert queue.name.startswith("amq.gen-")


@pytest.mark.asyncio
@pytest.mark.virtual_clock
async def test_refuse_connections_for_a_while(
    broker: MockBroker, connect: Connect
) -> None:
    open_before = await connect()
    loop = asyncio.get_running_loop()

    await broker.inject(RefuseConnections(duration=30))
    refused_at = loop.time()
    with pytest.raises(aiormq.exceptions.AMQPConnectionError):
        await aio_pika.connect(broker.url)
    during = broker.leftovers()
    still = await (await open_before.channel()).declare_queue(exclusive=True)
    await broker.wait_running(timeout=31)
    after = await connect()

    assert loop.time() - refused_at == pytest.approx(30, abs=1e-3)
    assert any(item.startswith("timer") for item in during)
    assert still.name.startswith("amq.gen-")
    assert not after.is_closed
    assert not any(item.startswith(("timer", "task")) for item in broker.leftovers())


@pytest.mark.asyncio
@pytest.mark.virtual_clock
@pytest.mark.parametrize(
    ("first", "second", "refused_for"),
    [(20.0, 50.0, 50.0), (50.0, 20.0, 50.0)],
    ids=["extended", "kept"],
)
async def test_a_second_refusal_ends_at_the_later_deadline(
    broker: MockBroker, first: float, second: float, refused_for: float
) -> None:
    loop = asyncio.get_running_loop()

    start = loop.time()
    await broker.inject(RefuseConnections(duration=first))
    await broker.inject(RefuseConnections(duration=second))
    timers = [item for item in broker.leftovers() if item.startswith("timer")]
    await broker.wait_running(timeout=refused_for + 10)

    assert loop.time() - start == pytest.approx(refused_for, abs=1e-3)
    assert len(timers) == 1


@pytest.mark.asyncio
async def test_refusing_connections_needs_a_running_broker() -> None:
    broker = MockBroker()
    await broker.start()
    await broker.stop()

    with pytest.raises(
        RuntimeError,
        match="cannot refuse connections: the broker is stopped; inject "
        "RefuseConnections while it is running",
    ):
        await broker.inject(RefuseConnections(duration=1.0))

    assert broker.leftovers() == []


@pytest.mark.asyncio
@pytest.mark.virtual_clock
async def test_refusing_connections_during_a_restart_is_refused(
    broker: MockBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, stopped = signal_stops(broker, monkeypatch)
    restarting = asyncio.create_task(broker.inject(RestartBroker(downtime=30.0)))
    async with asyncio.timeout(WAIT):
        await stopped.wait()

    with pytest.raises(RuntimeError, match="the broker is restarting; inject"):
        await broker.inject(RefuseConnections(duration=1.0))
    async with asyncio.timeout(WAIT * 10):
        await restarting

    assert broker.is_running


@pytest.mark.asyncio
async def test_close_channel_fault(broker: MockBroker, connect: Connect) -> None:
    connection = await connect()
    target = await connection.channel()
    other = await connection.channel()
    queue = await target.declare_queue(unique("q"), exclusive=True)

    async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        return None

    await queue.consume(ignore)
    closing = (await target.get_underlay_channel()).closing

    await broker.inject(
        CloseChannel(code=404, text="NOT_FOUND - gone", queue=queue.name)
    )
    reason = await closed_with(closing)

    assert isinstance(reason, aiormq.exceptions.ChannelNotFoundEntity)
    assert "NOT_FOUND - gone" in str(reason)
    assert not other.is_closed
    await other.declare_queue(exclusive=True)


@pytest.mark.asyncio
async def test_close_channel_fault_with_the_longest_text(
    broker: MockBroker, connect: Connect
) -> None:
    channel = await (await connect()).channel()
    closing = (await channel.get_underlay_channel()).closing
    text = "PRECONDITION_FAILED - " + "é" * 116 + "x"  # 255 bytes

    await broker.inject(CloseChannel(text=text))
    reason = await closed_with(closing)

    assert isinstance(reason, aiormq.exceptions.ChannelPreconditionFailed)
    assert reason.args == (text,)


@pytest.mark.asyncio
async def test_a_close_that_cannot_be_encoded_leaves_the_channel_open(
    broker: MockBroker, connect: Connect
) -> None:
    channel = await (await connect()).channel()
    (connection,) = broker._connections
    (number,) = connection.channels
    err = AMQPError(406, "fits")
    err.text = "x" * 256

    with pytest.raises(TypeError, match="string exceeds maximum length of 255"):
        connection.close_channel(number, err, None)
    async with asyncio.timeout(WAIT):
        queue = await channel.declare_queue(exclusive=True)

    assert number in connection.channels
    assert number not in connection.closing_channels
    assert queue.name.startswith("amq.gen-")


@pytest.mark.asyncio
async def test_inject_refuses_what_is_not_a_fault(broker: MockBroker) -> None:
    with pytest.raises(TypeError, match=r"'nope' is not a broker fault; use one from"):
        await broker.inject("nope")  # type: ignore[arg-type]


# --- faults: message rules ------------------------------------------------------------


@pytest_asyncio.fixture
async def routed(
    channel: AbstractChannel,
) -> tuple[aio_pika.abc.AbstractExchange, AbstractQueue]:
    """A topic exchange and a queue that receives everything published to it."""
    exchange = await channel.declare_exchange(
        unique("x"), aio_pika.ExchangeType.TOPIC, auto_delete=True
    )
    queue = await channel.declare_queue(unique("q"), exclusive=True)
    await queue.bind(exchange, "#")
    return exchange, queue


@pytest.mark.asyncio
async def test_drop_messages_matching_a_pattern(
    broker: MockBroker, routed: tuple[Any, AbstractQueue]
) -> None:
    exchange, queue = routed
    handle = await broker.inject(DropMessages(pattern="reply.*", count=2))
    assert handle is not None

    results = [
        await exchange.publish(aio_pika.Message(key.encode()), key)
        for key in ("reply.a", "command.a", "reply.b", "reply.c")
    ]

    assert await drain(queue) == [b"command.a", b"reply.c"]
    assert all(isinstance(r, commands.Basic.Ack) for r in results)
    assert [m.fault for m in broker.messages()] == [
        "drop_messages",
        None,
        "drop_messages",
        None,
    ]
    assert (handle.hits, handle.active) == (2, False)


@pytest.mark.asyncio
async def test_duplicate_messages(
    broker: MockBroker, routed: tuple[Any, AbstractQueue]
) -> None:
    exchange, queue = routed
    await broker.inject(DuplicateMessages(pattern="status.#", copies=2))

    await exchange.publish(aio_pika.Message(b"s"), "status.now")
    await exchange.publish(aio_pika.Message(b"o"), "other")

    assert await drain(queue) == [b"s", b"s", b"s", b"o"]


@pytest.mark.asyncio
@pytest.mark.virtual_clock
async def test_delay_messages(
    broker: MockBroker, routed: tuple[Any, AbstractQueue]
) -> None:
    exchange, queue = routed
    await broker.inject(DelayMessages(pattern="slow.#", delay=5.0))
    loop = asyncio.get_running_loop()
    arrivals: asyncio.Queue[tuple[bytes, float]] = asyncio.Queue()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await arrivals.put((message.body, loop.time()))

    await queue.consume(on_message, no_ack=True)
    sent = loop.time()
    slow = asyncio.create_task(exchange.publish(aio_pika.Message(b"slow"), "slow.x"))
    await exchange.publish(aio_pika.Message(b"fast"), "fast.x")
    async with asyncio.timeout(WAIT * 10):
        first, second = await arrivals.get(), await arrivals.get()
        confirmed = await slow

    assert (first[0], second[0]) == (b"fast", b"slow")
    assert first[1] - sent < 5.0
    assert second[1] - sent == pytest.approx(5.0, abs=1e-3)
    assert isinstance(confirmed, commands.Basic.Ack)
    assert broker.messages("slow.#")[0].fault == "delay_messages"


@pytest.mark.asyncio
@pytest.mark.virtual_clock
async def test_withhold_confirms(
    broker: MockBroker, routed: tuple[Any, AbstractQueue]
) -> None:
    exchange, queue = routed
    await broker.inject(WithholdConfirms(pattern="held"))

    with pytest.raises(TimeoutError):
        await exchange.publish(aio_pika.Message(b"h"), "held", timeout=30)
    confirmed = await exchange.publish(aio_pika.Message(b"n"), "normal")

    assert isinstance(confirmed, commands.Basic.Ack)
    assert await drain(queue) == [b"h", b"n"]  # routed, only not confirmed


@pytest.mark.asyncio
async def test_nack_confirms(
    broker: MockBroker, routed: tuple[Any, AbstractQueue]
) -> None:
    exchange, queue = routed
    handle = await broker.inject(NackConfirms(pattern="#", exchange=exchange.name))
    assert handle is not None

    with pytest.raises(aiormq.exceptions.DeliveryError):
        await exchange.publish(aio_pika.Message(b"n"), "any")
    handle.remove()
    handle.remove()  # idempotent
    confirmed = await exchange.publish(aio_pika.Message(b"y"), "any")

    assert isinstance(confirmed, commands.Basic.Ack)
    assert await drain(queue) == [b"y"]


@pytest.mark.asyncio
@pytest.mark.virtual_clock
async def test_one_rule_acts_and_counts_when_several_match(
    broker: MockBroker, routed: tuple[Any, AbstractQueue]
) -> None:
    exchange, queue = routed
    delay = await broker.inject(DelayMessages(delay=5.0, count=1))
    nack = await broker.inject(NackConfirms(count=1))
    assert delay is not None
    assert nack is not None

    with pytest.raises(aiormq.exceptions.DeliveryError):
        await exchange.publish(aio_pika.Message(b"1"), "k")
    counts_after_first = (nack.hits, nack.active, delay.hits, delay.active)
    async with asyncio.timeout(WAIT * 10):
        confirmed = await exchange.publish(aio_pika.Message(b"2"), "k")

    assert counts_after_first == (1, False, 0, True)
    assert (delay.hits, delay.active) == (1, False)
    assert isinstance(confirmed, commands.Basic.Ack)
    assert [m.fault for m in broker.messages()] == ["nack_confirms", "delay_messages"]
    assert await drain(queue) == [b"2"]


@pytest.mark.asyncio
async def test_the_rule_added_first_wins_among_the_same_kind(
    broker: MockBroker, routed: tuple[Any, AbstractQueue]
) -> None:
    exchange, queue = routed
    once = await broker.inject(DuplicateMessages(copies=1))
    thrice = await broker.inject(DuplicateMessages(copies=3))
    assert once is not None
    assert thrice is not None

    await exchange.publish(aio_pika.Message(b"d"), "k")

    assert await drain(queue) == [b"d", b"d"]
    assert (once.hits, thrice.hits) == (1, 0)


@pytest.mark.asyncio
async def test_clear_faults(
    broker: MockBroker, routed: tuple[Any, AbstractQueue]
) -> None:
    exchange, queue = routed
    handles = [
        await broker.inject(DropMessages()),
        await broker.inject(DuplicateMessages()),
    ]

    broker.clear_faults()
    await exchange.publish(aio_pika.Message(b"plain"), "k")

    assert await drain(queue) == [b"plain"]
    assert not any(h.active for h in handles if h is not None)


# --- faults as data -----------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        RestartBroker(downtime=2.0),
        DropConnections(count=1, mode="close"),
        RefuseConnections(duration=3.0),
        CloseChannel(code=406, text="PRECONDITION_FAILED - x", queue="q"),
        DelayMessages(pattern="a.#", delay=1.5, count=3),
        DropMessages(pattern="reply.*", exchange="sdss_exchange"),
        DuplicateMessages(copies=2),
        WithholdConfirms(),
        NackConfirms(count=1),
    ],
    ids=lambda fault: fault.kind,
)
def test_faults_round_trip_through_plain_data(fault: Any) -> None:
    data = fault.to_dict()

    assert data["kind"] == fault.kind
    assert fault_from_dict(data) == fault


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"kind": "explode"}, "unknown broker fault kind 'explode'; use one of"),
        ({}, "unknown broker fault kind None"),
        (
            {"kind": "drop_messages", "patern": "#"},
            r"unknown field\(s\) \['patern'\] for broker fault 'drop_messages'",
        ),
        (
            {"kind": "delay_messages", "delay": -1},
            "delay must be a finite number of seconds >= 0, got -1",
        ),
        (
            {"kind": "drop_connections", "mode": "gently"},
            "mode must be 'reset' or 'close', got 'gently'",
        ),
        (
            {"kind": "drop_messages", "count": 0},
            r"count must be a positive integer or None \(no limit\), got 0",
        ),
        (
            {"kind": "close_channel", "code": 999},
            r"code must be an AMQP reply code \(200-599\), got 999",
        ),
        (
            {"kind": "duplicate_messages", "copies": 0},
            "copies must be a positive integer, got 0",
        ),
        (
            {"kind": "drop_messages", "count": True},
            r"count must be a positive integer or None \(no limit\), got True",
        ),
        (
            {"kind": "drop_connections", "count": False},
            r"count must be a positive integer or None \(no limit\), got False",
        ),
        (
            {"kind": "duplicate_messages", "copies": True},
            "copies must be a positive integer, got True",
        ),
        (
            {"kind": "close_channel", "text": None},
            "text must be a string, got None",
        ),
        (
            {"kind": "close_channel", "text": "x" * 256},
            r"text must fit an AMQP reply text \(255 bytes in UTF-8\), got 256 "
            r"bytes: 'xxxxxxxx",
        ),
        (
            {"kind": "close_channel", "text": "é" * 128},
            r"text must fit an AMQP reply text \(255 bytes in UTF-8\), got 256 ",
        ),
    ],
)
def test_bad_fault_data_is_refused(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fault_from_dict(data)


# --- the real-broker stand-in ------------------------------------------------------


def test_external_broker_names_what_needs_the_mock() -> None:
    external = ExternalBroker("amqp://guest:guest@rabbit.example:5672/")

    assert (external.url, external.is_mock) == (
        "amqp://guest:guest@rabbit.example:5672/",
        False,
    )
    assert repr(external) == "ExternalBroker('rabbit.example')"
    with pytest.raises(
        NotImplementedError,
        match=r"amqp_broker.inject needs the in-process MockBroker, but this run",
    ):
        _ = external.inject
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        _ = external.nothing


def test_external_broker_checks_the_url() -> None:
    with pytest.raises(
        ValueError, match=r"the real broker URL must look like amqp://.*got 'http://x/'"
    ):
        ExternalBroker("http://x/")
