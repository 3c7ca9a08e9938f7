"""The contract between MockBroker and RabbitMQ: the same tests on both.

Every test here takes the ``broker_url`` fixture, parametrized as ``mock``
(a fresh :class:`~lvmopstools.testing.amqp.MockBroker`) and ``rabbitmq`` (the
session's throwaway RabbitMQ node from the ``rabbitmq_url`` fixture, or the
broker named by ``--lvm-amqp-url``). A behaviour the mock gets wrong fails
the ``mock`` case and passes the ``rabbitmq`` one. Names of exchanges, queues
and actors are unique per test, since the real node is shared by the session.

On the mock, teardown also checks that every connection the test opened is
gone, and that the listening socket is closed after the broker stops.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiormq
import pytest
import pytest_asyncio
from _actor_support import QuietActor
from _amqp_support import WAIT, closed_with, drain
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue
from clu import AMQPClient
from clu.exceptions import CluError
from pamqp import commands, frame

from lvmopstools.testing.amqp import MockBroker

Connect = Callable[..., Awaitable[AbstractConnection]]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def port_is_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(params=["mock", "rabbitmq"])
def broker_kind(request: pytest.FixtureRequest) -> str | None:
    """``None`` for the mock, or the URL of the real broker."""
    if request.param == "rabbitmq":
        url: str = request.getfixturevalue("rabbitmq_url")
        return url
    return None


@pytest_asyncio.fixture
async def broker_url(broker_kind: str | None) -> AsyncIterator[str]:
    """The URL of the broker under test; on the mock, checks nothing is left."""
    if broker_kind is not None:
        yield broker_kind
        return

    broker = MockBroker()
    await broker.start()
    try:
        yield broker.url
        await broker.wait_connections(0, timeout=WAIT)
    finally:
        await broker.stop()
    assert broker.connections == []
    assert not broker.is_running
    assert port_is_closed(broker.port)


@pytest_asyncio.fixture
async def connect(broker_url: str) -> AsyncIterator[Connect]:
    """A factory of aio_pika connections, all closed at teardown."""
    opened: list[AbstractConnection] = []

    async def make(
        url: str | None = None, *, robust: bool = False, **kwargs: Any
    ) -> AbstractConnection:
        opener = aio_pika.connect_robust if robust else aio_pika.connect
        async with asyncio.timeout(WAIT):
            connection = await opener(url or broker_url, **kwargs)
        opened.append(connection)
        return connection

    yield make

    for connection in reversed(opened):
        if not connection.is_closed:
            await connection.close()


@pytest_asyncio.fixture
async def channel(connect: Connect) -> AbstractChannel:
    """A channel (with publisher confirms) on a fresh connection."""
    connection = await connect()
    return await connection.channel()


# --- raw AMQP, for what clients never send --------------------------------------


class RawClient:
    """A bare AMQP 0-9-1 client on a socket: just enough to misbehave."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.opened: Any = None

    @classmethod
    async def open(
        cls, url: str, *, handshake: bool = True, heartbeat: int = 0, vhost: str = "/"
    ) -> Any:
        parts = urlsplit(url)
        async with asyncio.timeout(WAIT):
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        client = cls(reader, writer)
        if handshake:
            client.opened = await client.handshake(heartbeat, vhost)
        return client

    async def handshake(self, heartbeat: int, vhost: str) -> Any:
        """Open the connection; return the broker's answer to connection.open."""
        self.writer.write(b"AMQP\x00\x00\x09\x01")
        assert isinstance(await self.read_frame(), commands.Connection.Start)
        self.send(
            commands.Connection.StartOk(
                client_properties={
                    "capabilities": {"authentication_failure_close": True}
                },
                mechanism="PLAIN",
                response="\x00guest\x00guest",
                locale="en_US",
            )
        )
        tune = await self.read_frame()
        assert isinstance(tune, commands.Connection.Tune)
        self.send(commands.Connection.TuneOk(tune.channel_max, 131072, heartbeat))
        self.send(commands.Connection.Open(vhost))
        return await self.read_frame()

    def send(self, method: Any, channel: int = 0) -> None:
        self.writer.write(frame.marshal(method, channel))

    async def read_frame(self) -> Any:
        async with asyncio.timeout(WAIT):
            head = await self.reader.readexactly(7)
            size = struct.unpack(">I", head[3:])[0]
            rest = await self.reader.readexactly(size + 1)
        _, _, value = frame.unmarshal(head + rest)
        return value

    async def read_to_end(self) -> bytes:
        """Read until the broker closes or resets the socket."""
        data = b""
        async with asyncio.timeout(WAIT):
            try:
                while chunk := await self.reader.read(4096):
                    data += chunk
            except ConnectionResetError:
                pass
        return data

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


@pytest_asyncio.fixture
async def raw_client(broker_url: str) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """A factory of RawClients, all closed at teardown."""
    opened: list[RawClient] = []

    async def make(**kwargs: Any) -> RawClient:
        client: RawClient = await RawClient.open(broker_url, **kwargs)
        opened.append(client)
        return client

    yield make

    for client in opened:
        await client.close()


# --- connection handshake --------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("credentials", ["guest:wrong", "nobody:guest"])
async def test_wrong_credentials_are_refused(
    broker_url: str, connect: Connect, credentials: str
) -> None:
    url = broker_url.replace("guest:guest", credentials)

    with pytest.raises(
        aiormq.exceptions.ProbableAuthenticationError,
        match=r"ACCESS_REFUSED - Login was refused using authentication mechanism "
        r"PLAIN",
    ):
        await connect(url)


@pytest.mark.asyncio
async def test_unknown_vhost_is_refused(raw_client: Callable[..., Any]) -> None:
    client = await raw_client(vhost="nope")

    assert isinstance(client.opened, commands.Connection.Close)
    assert client.opened.reply_code == 530
    assert client.opened.reply_text == "NOT_ALLOWED - vhost nope not found"


@pytest.mark.asyncio
async def test_connection_opens_on_the_default_vhost(
    raw_client: Callable[..., Any],
) -> None:
    client = await raw_client()

    assert isinstance(client.opened, commands.Connection.OpenOk)


@pytest.mark.asyncio
async def test_tuning_and_capabilities(connect: Connect) -> None:
    connection = await connect(heartbeat=7)
    amqp = connection.transport.connection  # type: ignore[union-attr]

    assert amqp.connection_tune.heartbeat == 7
    assert amqp.connection_tune.frame_max >= 4096
    capabilities = amqp.server_properties["capabilities"]
    for name in ("publisher_confirms", "basic.nack", "consumer_cancel_notify"):
        assert capabilities[name] is True, name


@pytest.mark.asyncio
async def test_broker_sends_heartbeats(raw_client: Callable[..., Any]) -> None:
    client = await raw_client(heartbeat=1)

    method = await client.read_frame()

    assert method.name == "Heartbeat"


@pytest.mark.asyncio
async def test_orderly_close(connect: Connect) -> None:
    connection = await connect()
    channel = await connection.channel()

    await channel.close()
    await connection.close()

    assert channel.is_closed
    assert connection.is_closed


# --- exchanges and routing -------------------------------------------------------


async def bound_queues(
    channel: AbstractChannel, exchange: aio_pika.abc.AbstractExchange, keys: list[str]
) -> dict[str, AbstractQueue]:
    queues = {}
    for key in keys:
        queue = await channel.declare_queue(unique("q"), exclusive=True)
        await queue.bind(exchange, routing_key=key)
        queues[key] = queue
    return queues


async def routes(
    channel: AbstractChannel,
    exchange: aio_pika.abc.AbstractExchange,
    queues: dict[str, AbstractQueue],
    routing_keys: list[str],
) -> dict[str, list[str]]:
    """Publish one message per routing key; return binding key -> keys received."""
    for key in routing_keys:
        await exchange.publish(aio_pika.Message(key.encode()), routing_key=key)
    return {
        binding: [body.decode() for body in await drain(queue)]
        for binding, queue in queues.items()
    }


@pytest.mark.asyncio
async def test_topic_exchange_wildcards(channel: AbstractChannel) -> None:
    exchange = await channel.declare_exchange(
        unique("topic"), aio_pika.ExchangeType.TOPIC, auto_delete=True
    )
    bindings = ["a.*", "a.#", "#", "*.b", "a.*.c", "#.c", "a"]
    queues = await bound_queues(channel, exchange, bindings)

    received = await routes(channel, exchange, queues, ["a", "a.b", "a.b.c", "x.b"])

    # As the AMQP topic rules have it: * is one word, # zero or more.
    assert received == {
        "a.*": ["a.b"],
        "a.#": ["a", "a.b", "a.b.c"],
        "#": ["a", "a.b", "a.b.c", "x.b"],
        "*.b": ["a.b", "x.b"],
        "a.*.c": ["a.b.c"],
        "#.c": ["a.b.c"],
        "a": ["a"],
    }


@pytest.mark.asyncio
async def test_direct_and_fanout_exchanges(channel: AbstractChannel) -> None:
    direct = await channel.declare_exchange(unique("direct"), auto_delete=True)
    fanout = await channel.declare_exchange(
        unique("fanout"), aio_pika.ExchangeType.FANOUT, auto_delete=True
    )
    direct_queues = await bound_queues(channel, direct, ["a", "b", "a.*"])
    fanout_queues = await bound_queues(channel, fanout, ["x", "y"])

    direct_got = await routes(channel, direct, direct_queues, ["a", "a.b"])
    fanout_got = await routes(channel, fanout, fanout_queues, ["anything"])

    assert direct_got == {"a": ["a"], "b": [], "a.*": []}
    assert fanout_got == {"x": ["anything"], "y": ["anything"]}


@pytest.mark.asyncio
async def test_default_exchange_routes_by_queue_name(channel: AbstractChannel) -> None:
    queue = await channel.declare_queue(unique("q"), exclusive=True)

    await channel.default_exchange.publish(aio_pika.Message(b"hi"), queue.name)

    assert await drain(queue) == [b"hi"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("first", "second", "arg", "received", "current"),
    [
        ({"type": "topic"}, {"type": "direct"}, "type", "'direct'", "'topic'"),
        ({"durable": True}, {"durable": False}, "durable", "'false'", "'true'"),
        (
            {"auto_delete": False},
            {"auto_delete": True},
            "auto_delete",
            "'true'",
            "'false'",
        ),
    ],
)
async def test_exchange_redeclared_differently_fails(
    channel: AbstractChannel,
    first: dict[str, Any],
    second: dict[str, Any],
    arg: str,
    received: str,
    current: str,
) -> None:
    name = unique("x")
    await channel.declare_exchange(name, **first)

    with pytest.raises(
        aiormq.exceptions.ChannelPreconditionFailed,
        match=f"PRECONDITION_FAILED - inequivalent arg '{arg}' for exchange "
        f"'{name}' in vhost '/': received {received} but current is {current}",
    ):
        await channel.declare_exchange(name, **second)

    cleanup = await (await channel.get_underlay_channel()).connection.channel()
    await cleanup.exchange_delete(name)


@pytest.mark.asyncio
async def test_missing_exchange_and_queue_are_not_found(
    connect: Connect,
) -> None:
    connection = await connect()
    name = unique("gone")

    with pytest.raises(
        aiormq.exceptions.ChannelNotFoundEntity,
        match=f"NOT_FOUND - no exchange '{name}' in vhost '/'",
    ):
        await (await connection.channel()).declare_exchange(name, passive=True)
    with pytest.raises(
        aiormq.exceptions.ChannelNotFoundEntity,
        match=f"NOT_FOUND - no queue '{name}' in vhost '/'",
    ):
        await (await connection.channel()).declare_queue(name, passive=True)


@pytest.mark.asyncio
async def test_reserved_names_are_refused(connect: Connect) -> None:
    connection = await connect()

    with pytest.raises(
        aiormq.exceptions.ChannelAccessRefused,
        match=r"ACCESS_REFUSED - exchange name 'amq.mine' contains reserved prefix "
        r"'amq.\*'",
    ):
        await (await connection.channel()).declare_exchange("amq.mine")
    channel = await connection.channel()
    queue = await channel.declare_queue(unique("q"), exclusive=True)
    with pytest.raises(
        aiormq.exceptions.ChannelAccessRefused,
        match="ACCESS_REFUSED - operation not permitted on the default exchange",
    ):
        await queue.bind("", routing_key="key")


@pytest.mark.asyncio
async def test_unknown_exchange_type_closes_the_connection(connect: Connect) -> None:
    connection = await connect()
    channel = await connection.channel()
    closing = connection.transport.connection.closing  # type: ignore[union-attr]

    with pytest.raises(
        aiormq.exceptions.ConnectionCommandInvalid,
        match="COMMAND_INVALID - unknown exchange type 'weird'",
    ):
        await channel.declare_exchange(unique("x"), "weird")  # type: ignore[arg-type]

    assert isinstance(
        await closed_with(closing), aiormq.exceptions.ConnectionCommandInvalid
    )


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "name", ["", "amq.mine", "plain"], ids=["default", "amq", "plain"]
)
async def test_exchange_type_is_checked_before_the_name(
    connect: Connect, name: str
) -> None:
    connection = await connect()
    channel = await (await connection.channel()).get_underlay_channel()

    with pytest.raises(
        aiormq.exceptions.ConnectionCommandInvalid,
        match="COMMAND_INVALID - unknown exchange type 'bogus'",
    ):
        await channel.exchange_declare(name, exchange_type="bogus")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("", "operation not permitted on the default exchange"),
        (
            "amq.direct",
            "deletion of system exchange 'amq.direct' in vhost '/' not allowed",
        ),
    ],
    ids=["default", "amq.direct"],
)
async def test_system_exchanges_cannot_be_deleted(
    channel: AbstractChannel, name: str, text: str
) -> None:
    underlay = await channel.get_underlay_channel()

    with pytest.raises(
        aiormq.exceptions.ChannelAccessRefused, match=f"ACCESS_REFUSED - {text}"
    ):
        await underlay.exchange_delete(name)


@pytest.mark.asyncio
@pytest.mark.parametrize("method", ["bind", "unbind", "consume", "purge", "get"])
async def test_empty_queue_name_needs_a_declared_queue(
    connect: Connect, method: str
) -> None:
    connection = await connect()
    channel = await (await connection.channel()).get_underlay_channel()
    calls = {
        "bind": lambda: channel.queue_bind("", "amq.topic", routing_key="k"),
        "unbind": lambda: channel.queue_unbind("", "amq.topic", routing_key="k"),
        "consume": lambda: channel.basic_consume("", lambda message: None),
        "purge": lambda: channel.queue_purge(""),
        "get": lambda: channel.basic_get(""),
    }

    with pytest.raises(
        aiormq.exceptions.ChannelNotFoundEntity,
        match="NOT_FOUND - no previously declared queue",
    ):
        await calls[method]()


@pytest.mark.asyncio
async def test_auto_delete_exchange_goes_with_its_last_binding(
    connect: Connect,
) -> None:
    connection = await connect()
    channel = await connection.channel()
    exchange = await channel.declare_exchange(unique("x"), auto_delete=True)
    queue = await channel.declare_queue(unique("q"), exclusive=True)
    await queue.bind(exchange, "one")
    await queue.bind(exchange, "two")

    await queue.unbind(exchange, "one")
    still_there = await channel.declare_exchange(exchange.name, passive=True)
    await queue.unbind(exchange, "two")

    assert still_there.name == exchange.name
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity, match="NOT_FOUND"):
        await (await connection.channel()).declare_exchange(exchange.name, passive=True)


@pytest.mark.asyncio
async def test_unbind_stops_routing(channel: AbstractChannel) -> None:
    exchange = await channel.declare_exchange(
        unique("x"), aio_pika.ExchangeType.TOPIC, auto_delete=True
    )
    queue = await channel.declare_queue(unique("q"), exclusive=True)
    await queue.bind(exchange, "a.#")
    await queue.bind(exchange, "b.#")

    await exchange.publish(aio_pika.Message(b"1"), "a.x")
    await queue.unbind(exchange, "a.#")
    await exchange.publish(aio_pika.Message(b"2"), "a.x")
    await exchange.publish(aio_pika.Message(b"3"), "b.x")

    assert await drain(queue) == [b"1", b"3"]


@pytest.mark.asyncio
@pytest.mark.parametrize("missing", ["queue", "exchange", "binding"])
async def test_unbind_of_what_does_not_exist_succeeds(
    channel: AbstractChannel, missing: str
) -> None:
    exchange = await channel.declare_exchange(unique("x"), auto_delete=True)
    queue = await channel.declare_queue(unique("q"), exclusive=True)
    await queue.bind(exchange, "kept")
    names = {
        "queue": (unique("gone"), exchange.name),
        "exchange": (queue.name, unique("gone")),
        "binding": (queue.name, exchange.name),
    }
    queue_name, exchange_name = names[missing]
    underlay = await channel.get_underlay_channel()

    unbound = await underlay.queue_unbind(queue_name, exchange_name, "never-bound")
    await exchange.publish(aio_pika.Message(b"still"), "kept")

    assert isinstance(unbound, commands.Queue.UnbindOk)
    assert await drain(queue) == [b"still"]


# --- queues ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_server_named_queue(channel: AbstractChannel) -> None:
    first = await channel.declare_queue(exclusive=True)
    second = await channel.declare_queue(exclusive=True)

    assert first.name.startswith("amq.gen-")
    assert second.name.startswith("amq.gen-")
    assert first.name != second.name


@pytest.mark.asyncio
async def test_exclusive_queue_is_locked_to_its_connection(connect: Connect) -> None:
    owner = await connect()
    other = await connect()
    name = unique("q")
    await (await owner.channel()).declare_queue(name, exclusive=True)
    locked = (
        f"RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{name}' "
        "in vhost '/'"
    )

    with pytest.raises(aiormq.exceptions.ChannelLockedResource, match=locked):
        await (await other.channel()).declare_queue(name, exclusive=True)
    with pytest.raises(aiormq.exceptions.ChannelLockedResource, match=locked):
        await (await other.channel()).declare_queue(name, passive=True)

    await owner.close()
    channel = await other.channel()
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity, match="NOT_FOUND"):
        await channel.declare_queue(name, passive=True)
    queue = await (await other.channel()).declare_queue(name, exclusive=True)
    assert queue.name == name


@pytest.mark.asyncio
@pytest.mark.parametrize("exclusive", [True, False], ids=["exclusive", "shared"])
async def test_exclusive_flag_cannot_change_on_redeclare(
    connect: Connect, exclusive: bool
) -> None:
    connection = await connect()
    name = unique("q")
    first = await (await connection.channel()).declare_queue(name, exclusive=exclusive)

    with pytest.raises(
        aiormq.exceptions.ChannelLockedResource,
        match=f"RESOURCE_LOCKED - cannot obtain exclusive access to locked queue "
        f"'{name}' in vhost '/'",
    ):
        await (await connection.channel()).declare_queue(name, exclusive=not exclusive)

    if not exclusive:
        await (await connection.channel()).queue_delete(first.name)


@pytest.mark.asyncio
@pytest.mark.parametrize("length", [16, 60], ids=["short-name", "long-name"])
async def test_second_copy_of_an_actor_is_refused(broker_url: str, length: int) -> None:
    # From 40 characters on, the RESOURCE_LOCKED text passes 255 bytes.
    name = unique("actor").ljust(length, "x")
    first = AMQPClient(name=name, url=broker_url)
    second = AMQPClient(name=name, url=broker_url)
    await first.start()
    try:
        with pytest.raises(CluError, match="another instance of the same actor"):
            await second.start()
    finally:
        await second.stop()
        await first.stop()


@pytest.mark.asyncio
async def test_long_reply_text_is_cut_to_255_bytes(connect: Connect) -> None:
    owner = await connect()
    other = await connect()
    name = unique("q").ljust(120, "x")
    await (await owner.channel()).declare_queue(name, exclusive=True)
    channel = await other.channel()
    closing = (await channel.get_underlay_channel()).closing

    with pytest.raises(
        aiormq.exceptions.ChannelLockedResource, match="RESOURCE_LOCKED"
    ):
        await channel.declare_queue(name, exclusive=True)
    reason = await closed_with(closing)
    (text,) = reason.args

    full = (
        f"RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{name}' "
        "in vhost '/'. It could be originally declared on another connection or "
        "the exclusive property value does not match that of the original "
        "declaration."
    )
    assert text == full[:252] + "..."
    assert not other.is_closed


@pytest.mark.asyncio
async def test_auto_delete_queue_goes_with_its_last_consumer(
    connect: Connect,
) -> None:
    connection = await connect()
    channel = await connection.channel()
    queue = await channel.declare_queue(unique("q"), auto_delete=True)

    async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        return None

    tag = await queue.consume(ignore, no_ack=True)
    await queue.cancel(tag)

    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity, match="NOT_FOUND"):
        await (await connection.channel()).declare_queue(queue.name, passive=True)


@pytest.mark.asyncio
async def test_queue_counts_and_purge(channel: AbstractChannel) -> None:
    queue = await channel.declare_queue(unique("q"), exclusive=True)
    for body in (b"1", b"2", b"3"):
        await channel.default_exchange.publish(aio_pika.Message(body), queue.name)

    declared = await channel.declare_queue(queue.name, passive=True)
    purged = await queue.purge()

    assert declared.declaration_result.message_count == 3
    assert purged.message_count == 3
    assert await drain(queue) == []


@pytest.mark.asyncio
async def test_queue_redeclared_differently_fails(connect: Connect) -> None:
    connection = await connect()
    name = unique("q")
    await (await connection.channel()).declare_queue(name, durable=True)

    with pytest.raises(
        aiormq.exceptions.ChannelPreconditionFailed,
        match=f"PRECONDITION_FAILED - inequivalent arg 'durable' for queue '{name}' "
        "in vhost '/': received 'false' but current is 'true'",
    ):
        await (await connection.channel()).declare_queue(name, durable=False)

    deleted = await (await connection.channel()).declare_queue(name, passive=True)
    await deleted.delete()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("first", "second", "arg", "received", "current"),
    [
        (
            {"x-queue-mode": "lazy"},
            {"x-queue-mode": "default"},
            "x-queue-mode",
            "'default'",
            "'lazy'",
        ),
        (
            {"x-queue-mode": "lazy"},
            {},
            "x-queue-mode",
            "none",
            "the value 'lazy' of type 'longstr'",
        ),
        (
            {},
            {"x-queue-version": 2},
            "x-queue-version",
            "the value '2' of type 'byte'",
            "none",
        ),
    ],
    ids=["changed", "dropped", "added"],
)
async def test_queue_redeclared_with_other_arguments_fails(
    connect: Connect,
    first: dict[str, Any],
    second: dict[str, Any],
    arg: str,
    received: str,
    current: str,
) -> None:
    connection = await connect()
    name = unique("q")
    await (await connection.channel()).declare_queue(
        name, exclusive=True, arguments=first
    )

    with pytest.raises(
        aiormq.exceptions.ChannelPreconditionFailed,
        match=f"PRECONDITION_FAILED - inequivalent arg '{arg}' for queue '{name}' "
        f"in vhost '/': received {received} but current is {current}$",
    ):
        await (await connection.channel()).declare_queue(
            name, exclusive=True, arguments=second
        )


@pytest.mark.asyncio
async def test_queue_arguments_that_change_nothing_are_accepted(
    connect: Connect,
) -> None:
    connection = await connect()
    name = unique("q")
    channel = await connection.channel()
    first = {"x-queue-type": "classic", "x-queue-mode": "lazy", "custom": 1}

    await channel.declare_queue(name, exclusive=True, arguments=first)
    again = await channel.declare_queue(
        name, exclusive=True, arguments={"x-queue-mode": "lazy", "custom": 2}
    )

    assert again.name == name


@pytest.mark.asyncio
@pytest.mark.parametrize("arg", ["x-queue-type", "x-queue-mode"])
async def test_unknown_queue_type_or_mode_is_refused(
    connect: Connect, arg: str
) -> None:
    connection = await connect()
    name = unique("q")
    what = arg.removeprefix("x-queue-")

    with pytest.raises(
        aiormq.exceptions.ChannelPreconditionFailed,
        match=f"PRECONDITION_FAILED - invalid arg '{arg}' for queue '{name}' in "
        f"vhost '/': \"unsupported queue {what} 'bogus'\"",
    ):
        await (await connection.channel()).declare_queue(
            name, exclusive=True, arguments={arg: "bogus"}
        )


@pytest.mark.asyncio
async def test_conditional_deletes(connect: Connect) -> None:
    connection = await connect()
    channel = await connection.channel()
    exchange = await channel.declare_exchange(unique("x"), auto_delete=True)
    queue = await channel.declare_queue(unique("q"), exclusive=True)
    await queue.bind(exchange, "k")
    await channel.default_exchange.publish(aio_pika.Message(b"m"), queue.name)
    where = f"'{queue.name}' in vhost '/'"

    with pytest.raises(
        aiormq.exceptions.ChannelPreconditionFailed,
        match=f"PRECONDITION_FAILED - queue {where} not empty",
    ):
        await queue.delete(if_empty=True, if_unused=False)
    channel = await connection.channel()
    with pytest.raises(
        aiormq.exceptions.ChannelPreconditionFailed,
        match=f"PRECONDITION_FAILED - exchange '{exchange.name}' in vhost '/' in use",
    ):
        await (await channel.get_underlay_channel()).exchange_delete(
            exchange.name, if_unused=True
        )
    channel = await connection.channel()
    queue = await channel.get_queue(queue.name)

    async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        return None

    await queue.consume(ignore)
    with pytest.raises(
        aiormq.exceptions.ChannelPreconditionFailed,
        match=f"PRECONDITION_FAILED - queue {where} in use",
    ):
        await queue.delete(if_unused=True, if_empty=False)
    channel = await connection.channel()
    deleted = await (await channel.get_underlay_channel()).queue_delete(queue.name)

    # The failed delete closed the consuming channel, which gave back the
    # message it held unacknowledged.
    assert deleted.message_count == 1


# --- consumers and acknowledgements -----------------------------------------------


@pytest.mark.asyncio
async def test_consume_then_cancel(channel: AbstractChannel) -> None:
    queue = await channel.declare_queue(unique("q"), exclusive=True)
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await message.ack()
        await received.put(message.body)

    tag = await queue.consume(on_message)
    await channel.default_exchange.publish(aio_pika.Message(b"live"), queue.name)
    async with asyncio.timeout(WAIT):
        first = await received.get()
    await queue.cancel(tag)
    await channel.default_exchange.publish(aio_pika.Message(b"later"), queue.name)

    assert first == b"live"
    assert await drain(queue) == [b"later"]
    assert received.empty()


@pytest.mark.asyncio
async def test_prefetch_limits_unacknowledged_deliveries(
    channel: AbstractChannel,
) -> None:
    await channel.set_qos(prefetch_count=2)
    queue = await channel.declare_queue(unique("q"), exclusive=True)
    for number in range(5):
        await channel.default_exchange.publish(
            aio_pika.Message(str(number).encode()), queue.name
        )
    delivered: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
    await queue.consume(delivered.put)

    async with asyncio.timeout(WAIT):
        first = [await delivered.get(), await delivered.get()]
    ready = (await channel.declare_queue(queue.name, passive=True)).declaration_result
    await first[0].ack()
    async with asyncio.timeout(WAIT):
        third = await delivered.get()

    assert [m.body for m in first] == [b"0", b"1"]
    assert ready.message_count == 3
    assert third.body == b"2"


@pytest.mark.asyncio
async def test_raising_the_channel_prefetch_releases_waiting_messages(
    channel: AbstractChannel,
) -> None:
    await channel.set_qos(prefetch_count=1, global_=True)
    queue = await channel.declare_queue(unique("q"), exclusive=True)
    for number in range(3):
        await channel.default_exchange.publish(
            aio_pika.Message(str(number).encode()), queue.name
        )
    delivered: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
    await queue.consume(delivered.put)

    async with asyncio.timeout(WAIT):
        first = await delivered.get()
    ready = (await channel.declare_queue(queue.name, passive=True)).declaration_result
    await channel.set_qos(prefetch_count=3, global_=True)
    async with asyncio.timeout(WAIT):
        rest = [await delivered.get(), await delivered.get()]

    assert ready.message_count == 2
    assert [m.body for m in [first, *rest]] == [b"0", b"1", b"2"]


@pytest.mark.asyncio
async def test_basic_get_and_get_empty(channel: AbstractChannel) -> None:
    queue = await channel.declare_queue(unique("q"), exclusive=True)
    await channel.default_exchange.publish(aio_pika.Message(b"one"), queue.name)

    message = await queue.get(no_ack=True)

    assert message.body == b"one"
    assert await queue.get(fail=False) is None
    with pytest.raises(aio_pika.exceptions.QueueEmpty):
        await queue.get()


@pytest.mark.asyncio
async def test_nack_and_reject_with_and_without_requeue(
    channel: AbstractChannel,
) -> None:
    queue = await channel.declare_queue(unique("q"), exclusive=True)
    for body in (b"a", b"b"):
        await channel.default_exchange.publish(aio_pika.Message(body), queue.name)

    first = await queue.get()
    await first.nack(requeue=True)
    again = await queue.get()
    await again.reject(requeue=False)
    second = await queue.get()
    await second.reject(requeue=True)
    third = await queue.get()
    await third.ack()

    assert (first.body, first.redelivered) == (b"a", False)
    assert (again.body, again.redelivered) == (b"a", True)
    assert (second.body, third.body, third.redelivered) == (b"b", b"b", True)
    assert await queue.get(fail=False) is None


@pytest.mark.asyncio
async def test_ack_multiple_settles_earlier_deliveries(connect: Connect) -> None:
    connection = await connect()
    channel = await connection.channel()
    queue = await channel.declare_queue(unique("q"), exclusive=True)
    for body in (b"1", b"2", b"3"):
        await channel.default_exchange.publish(aio_pika.Message(body), queue.name)
    taken = [await queue.get(), await queue.get(), await queue.get()]

    await taken[1].ack(multiple=True)
    await channel.close()
    after = await (await connection.channel()).get_queue(queue.name)

    assert [m.body for m in taken] == [b"1", b"2", b"3"]
    assert await drain(after) == [b"3"]  # only the one not settled came back


@pytest.mark.asyncio
async def test_unacknowledged_messages_return_when_the_channel_closes(
    connect: Connect,
) -> None:
    connection = await connect()
    first = await connection.channel()
    queue = await first.declare_queue(unique("q"), exclusive=True)
    await first.default_exchange.publish(aio_pika.Message(b"m"), queue.name)
    taken = await queue.get()

    await first.close()
    second = await connection.channel()
    again = await (await second.get_queue(queue.name)).get()

    assert (taken.redelivered, again.body, again.redelivered) == (False, b"m", True)


@pytest.mark.asyncio
async def test_unknown_delivery_tag_closes_the_channel(
    channel: AbstractChannel,
) -> None:
    underlay = await channel.get_underlay_channel()
    closing = underlay.closing

    await underlay.basic_ack(99)

    reason = await closed_with(closing)
    assert isinstance(reason, aiormq.exceptions.ChannelPreconditionFailed)
    assert "PRECONDITION_FAILED - unknown delivery tag 99" in str(reason)


# --- publishing ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_publisher_confirms(channel: AbstractChannel) -> None:
    queue = await channel.declare_queue(unique("q"), exclusive=True)

    confirmations = [
        await channel.default_exchange.publish(aio_pika.Message(b"x"), queue.name)
        for _ in range(3)
    ]

    assert all(isinstance(c, commands.Basic.Ack) for c in confirmations)
    assert [c.delivery_tag for c in confirmations] == [1, 2, 3]


@pytest.mark.asyncio
async def test_mandatory_unroutable_message_is_returned(connect: Connect) -> None:
    connection = await connect()
    channel = await connection.channel(on_return_raises=True)
    exchange = await channel.declare_exchange(unique("x"), auto_delete=True)

    with pytest.raises(aiormq.exceptions.PublishError, match="NO_ROUTE") as info:
        await exchange.publish(aio_pika.Message(b"lost"), "no.one", mandatory=True)
    dropped = await exchange.publish(
        aio_pika.Message(b"fine"), "no.one", mandatory=False
    )

    assert info.value.message.body == b"lost"
    assert isinstance(dropped, commands.Basic.Ack)


@pytest.mark.asyncio
async def test_publish_to_a_missing_exchange_closes_the_channel(
    channel: AbstractChannel,
) -> None:
    name = unique("gone")

    with pytest.raises(
        aiormq.exceptions.ChannelNotFoundEntity,
        match=f"NOT_FOUND - no exchange '{name}' in vhost '/'",
    ):
        await (await channel.get_underlay_channel()).basic_publish(
            b"x", exchange=name, routing_key="k"
        )


@pytest.mark.asyncio
async def test_headers_and_properties_reach_the_consumer(
    channel: AbstractChannel,
) -> None:
    queue = await channel.declare_queue(unique("q"), exclusive=True)
    sent = aio_pika.Message(
        b"{}",
        headers={"message_code": ":", "command_id": 7},
        content_type="application/json",
        correlation_id="abc",
        reply_to="someone",
    )

    await channel.default_exchange.publish(sent, queue.name)
    got = await queue.get(no_ack=True)

    assert got.headers == {"message_code": ":", "command_id": 7}
    assert (got.content_type, got.correlation_id, got.reply_to) == (
        "application/json",
        "abc",
        "someone",
    )


@pytest.mark.asyncio
async def test_large_bodies_are_split_and_joined(channel: AbstractChannel) -> None:
    queue = await channel.declare_queue(unique("q"), exclusive=True)
    body = bytes(range(256)) * 2000  # 512 kB: several frames each way

    await channel.default_exchange.publish(aio_pika.Message(body), queue.name)

    assert await drain(queue) == [body]


# --- bad input -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_bad_protocol_header_is_answered_with_ours(
    raw_client: Callable[..., Any],
) -> None:
    client = await raw_client(handshake=False)

    client.writer.write(b"GET / HTTP/1.1\r\n\r\n")

    assert await client.read_to_end() == b"AMQP\x00\x00\x09\x01"


def pipelined_opening(queue: str) -> bytes:
    """The client's side of a handshake, channel.open and queue.declare, in bytes."""
    methods = [
        (
            0,
            commands.Connection.StartOk(
                client_properties={},
                mechanism="PLAIN",
                response="\x00guest\x00guest",
                locale="en_US",
            ),
        ),
        (0, commands.Connection.TuneOk(2047, 131072, 0)),
        (0, commands.Connection.Open("/")),
        (1, commands.Channel.Open()),
        (1, commands.Queue.Declare(queue=queue, exclusive=True)),
    ]
    return b"AMQP\x00\x00\x09\x01" + b"".join(
        frame.marshal(method, number) for number, method in methods
    )


@pytest.mark.asyncio
async def test_pipelined_frames_in_one_write_are_all_answered(
    raw_client: Callable[..., Any],
) -> None:
    client = await raw_client(handshake=False)
    name = unique("q")

    client.writer.write(pipelined_opening(name))
    answers = [await client.read_frame() for _ in range(5)]

    assert [type(a) for a in answers] == [
        commands.Connection.Start,
        commands.Connection.Tune,
        commands.Connection.OpenOk,
        commands.Channel.OpenOk,
        commands.Queue.DeclareOk,
    ]
    assert answers[-1].queue == name


FRAME_END = b"\xce"
BAD_STREAMS = {
    "bad frame end": struct.pack(">BHI", 1, 0, 4) + b"abcd" + b"X",
    "unknown frame type": struct.pack(">BHI", 9, 0, 0) + FRAME_END,
    "oversized frame": struct.pack(">BHI", 1, 0, 1_000_000) + b"x" * 64,
    "garbage": bytes(range(256)) * 4,
}


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", list(BAD_STREAMS), ids=list(BAD_STREAMS))
async def test_bad_frames_close_only_that_connection(
    raw_client: Callable[..., Any], connect: Connect, stream: str
) -> None:
    bystander = await (await connect()).channel()
    queue = await bystander.declare_queue(unique("q"), exclusive=True)
    client = await raw_client()

    client.writer.write(BAD_STREAMS[stream])
    close = await client.read_frame()
    await bystander.default_exchange.publish(aio_pika.Message(b"alive"), queue.name)

    assert isinstance(close, commands.Connection.Close)
    assert close.reply_code == 501
    assert close.reply_text.startswith("FRAME_ERROR - ")
    assert await drain(queue) == [b"alive"]


# --- clu on the broker -----------------------------------------------------------


@pytest.mark.asyncio
async def test_lvm_actor_answers_a_client(broker_url: str) -> None:
    actor = QuietActor(name=unique("actor"), url=broker_url, check_interval=3600)
    client = AMQPClient(name=unique("client"), url=broker_url)
    await actor.start()
    await client.start()
    try:
        async with asyncio.timeout(WAIT):
            command = await client.send_command(actor.name, "actor-state")
            await command
            bad = await (await client.send_command(actor.name, "no-such-command"))
    finally:
        await client.stop()
        await actor.stop()

    assert command.status.did_succeed
    states = [r.body["state"] for r in command.replies if "state" in r.body]
    assert states
    assert "RUNNING" in states[-1]["flags"]
    assert bad.status.did_fail
