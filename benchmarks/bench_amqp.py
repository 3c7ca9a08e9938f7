"""MockBroker next to a real RabbitMQ: start-up time and round trips.

Both brokers run on this machine in one run: the mock inside this process,
RabbitMQ as a throwaway node (:class:`~lvmopstools.testing.amqp.RabbitMQNode`,
Debian's ``rabbitmq-server``) in a temporary folder. The cases:

- broker start-up: ``MockBroker.start()`` until it accepts connections, and
  RabbitMQNode from launch until its port accepts connections.
- ``actor-state`` round trip: a clu ``AMQPClient`` sends ``actor-state`` to
  an ``LVMActor`` and waits for the command to finish (the issue's target).
- aio_pika round trip: a plain aio_pika request and echo through two queues,
  no clu (informative).
- raw AMQP round trip: a bare pamqp client publishes to its own queue and
  reads the delivery; this is the broker's own latency, with almost no
  client code (informative).
- client CPU per ``actor-state`` round trip: the CPU time this process spends
  per round trip on RabbitMQ (client and actor, no broker), next to the same
  on the mock (client, actor and broker). Informative: it is the floor under
  any broker that runs inside the test process.

Run on its own with ``python benchmarks/bench_amqp.py [--quick]``, or through
``python benchmarks/run.py --only amqp``.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from _table import Row, format_table

__all__ = ["run"]

RIVAL = "RabbitMQ"
START_TARGET_MS = 20.0
ROUND_TRIP_TARGET = 0.25


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --- the workloads --------------------------------------------------------------


async def _best_mean(
    once: Callable[[], Awaitable[object]], number: int, repeat: int
) -> float:
    """Return the best, over ``repeat`` runs, of the mean time of ``once``, in ms."""
    for _ in range(max(number // 10, 5)):  # warm up caches and connections
        await once()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            await once()
        best = min(best, (time.perf_counter() - start) / number)
    return best * 1e3


def _quiet_actor_class() -> type[Any]:
    from lvmopstools.actor import ErrorCodesBase, LVMActor

    class QuietActor(LVMActor):
        """An LVMActor whose health check always passes."""

        async def _check_internal(self) -> None:
            return None

        async def _troubleshoot_internal(
            self, error_code: ErrorCodesBase, exception: Exception | None = None
        ) -> bool:
            return True

    return QuietActor


async def clu_round_trip(url: str, number: int, repeat: int) -> tuple[float, float]:
    """Return (ms per actor-state round trip, ms of process CPU per round trip)."""
    from clu import AMQPClient

    actor = _quiet_actor_class()(name=_unique("bench"), url=url, check_interval=3600)
    client = AMQPClient(name=_unique("bench-client"), url=url)
    await actor.start()
    await client.start()

    async def once() -> None:
        command = await client.send_command(actor.name, "actor-state")
        await command
        if not command.status.did_succeed:
            msg = f"actor-state failed on {url!r}: {command.replies!r}"
            raise RuntimeError(msg)

    try:
        cpu = time.process_time()
        wall = time.perf_counter()
        best = await _best_mean(once, number, repeat)
        cpu_share = (time.process_time() - cpu) / (time.perf_counter() - wall)
    finally:
        await client.stop()
        await actor.stop()
    return best, best * cpu_share


async def aio_pika_round_trip(url: str, number: int, repeat: int) -> float:
    """Return ms per request-and-echo through two queues with plain aio_pika."""
    import aio_pika

    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=False)
        requests = await channel.declare_queue(exclusive=True)
        answers = await channel.declare_queue(exclusive=True)
        exchange = channel.default_exchange
        waiting: list[asyncio.Future[bytes]] = []

        async def echo(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await exchange.publish(aio_pika.Message(message.body), answers.name)

        async def answered(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            waiting.pop().set_result(message.body)

        await requests.consume(echo, no_ack=True)
        await answers.consume(answered, no_ack=True)
        loop = asyncio.get_running_loop()

        async def once() -> None:
            future: asyncio.Future[bytes] = loop.create_future()
            waiting.append(future)
            await exchange.publish(aio_pika.Message(b"ping"), requests.name)
            await future

        return await _best_mean(once, number, repeat)
    finally:
        await connection.close()


class _RawClient:
    """A bare AMQP client: handshake, one channel, one queue, publish and read."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    async def read(self) -> Any:
        from pamqp import frame

        head = await self.reader.readexactly(7)
        rest = await self.reader.readexactly(struct.unpack(">I", head[3:])[0] + 1)
        return frame.unmarshal(head + rest)[2]

    def send(self, channel: int, *methods: Any) -> None:
        from pamqp import frame

        self.writer.write(b"".join(frame.marshal(m, channel) for m in methods))


async def raw_round_trip(url: str, number: int, repeat: int) -> float:
    """Return ms per publish-and-deliver for a bare pamqp client."""
    from pamqp import body, commands, header

    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    client = _RawClient(reader, writer)
    try:
        writer.write(b"AMQP\x00\x00\x09\x01")
        await client.read()
        plain = f"\x00{parts.username}\x00{parts.password}"
        client.send(0, commands.Connection.StartOk(mechanism="PLAIN", response=plain))
        tune = await client.read()
        client.send(
            0,
            commands.Connection.TuneOk(tune.channel_max, tune.frame_max, 0),
            commands.Connection.Open("/"),
        )
        await client.read()
        client.send(1, commands.Channel.Open())
        await client.read()
        client.send(1, commands.Queue.Declare(exclusive=True))
        queue = (await client.read()).queue
        client.send(1, commands.Basic.Consume(queue=queue, no_ack=True))
        await client.read()

        payload = b"ping"
        message = (
            commands.Basic.Publish(routing_key=queue),
            header.ContentHeader(body_size=len(payload)),
            body.ContentBody(payload),
        )

        async def once() -> None:
            client.send(1, *message)
            for _ in range(3):  # deliver, content header, body
                await client.read()

        return await _best_mean(once, number, repeat)
    finally:
        writer.close()
        await writer.wait_closed()


# --- measurement ----------------------------------------------------------------


def mock_start_ms(repeat: int) -> float:
    """Return the best MockBroker start-up time, in ms."""
    from lvmopstools.testing.amqp import MockBroker

    async def measure() -> float:
        best = float("inf")
        for _ in range(repeat):
            broker = MockBroker()
            start = time.perf_counter()
            await broker.start()
            best = min(best, time.perf_counter() - start)
            await broker.stop()
        return best * 1e3

    return asyncio.run(measure())


async def _round_trips(url: str, number: int, repeat: int) -> dict[str, float]:
    clu_ms, clu_cpu_ms = await clu_round_trip(url, number, repeat)
    return {
        "clu": clu_ms,
        "clu_cpu": clu_cpu_ms,
        "aio_pika": await aio_pika_round_trip(url, number * 2, repeat),
        "raw": await raw_round_trip(url, number * 5, repeat),
    }


def mock_round_trips(number: int, repeat: int) -> dict[str, float]:
    from lvmopstools.testing.amqp import MockBroker

    async def measure() -> dict[str, float]:
        async with MockBroker() as broker:
            return await _round_trips(broker.url, number, repeat)

    return asyncio.run(measure())


def rabbitmq_figures(number: int, repeat: int) -> dict[str, float] | None:
    """Start a RabbitMQ node; return its start-up (ms) and round trips, or None."""
    from lvmopstools.testing.amqp.rabbitmq import RabbitMQNode, find_rabbitmq_server

    if find_rabbitmq_server() is None:
        return None

    node = RabbitMQNode()
    start = time.perf_counter()
    node.start()
    try:
        started = (time.perf_counter() - start) * 1e3
        figures = asyncio.run(_round_trips(node.url, number, repeat))
    finally:
        node.stop()
    return {"start": started, **figures}


def _rows(mock: dict[str, float], real: dict[str, float] | None) -> list[Row]:
    start_target = f"ours < {START_TARGET_MS:.0f} ms"
    trip_target = f"ours/{RIVAL} <= {ROUND_TRIP_TARGET}"
    if real is None:
        return [
            Row.rival_missing("broker start-up", mock["start"], RIVAL, "ms"),
            Row.rival_missing("actor-state round trip", mock["clu"], RIVAL, "ms"),
        ]

    def informative(case: str, key: str, note: str) -> Row:
        ratio = mock[key] / real[key]
        return Row(case, mock[key], RIVAL, real[key], "ms", ratio, note=note)

    return [
        Row(
            "broker start-up",
            mock["start"],
            RIVAL,
            real["start"],
            "ms",
            mock["start"] / real["start"],
            start_target,
            mock["start"] < START_TARGET_MS,
            "ratio is ours/rival",
        ),
        Row(
            "actor-state round trip",
            mock["clu"],
            RIVAL,
            real["clu"],
            "ms",
            mock["clu"] / real["clu"],
            trip_target,
            mock["clu"] / real["clu"] <= ROUND_TRIP_TARGET,
        ),
        informative(
            "client CPU per actor-state trip",
            "clu_cpu",
            "this process's CPU; on RabbitMQ: clu alone",
        ),
        informative("aio_pika echo round trip", "aio_pika", "no clu; ours/rival"),
        informative("raw AMQP round trip", "raw", "bare pamqp client; ours/rival"),
    ]


def run(quick: bool = False) -> list[Row]:
    """Measure both brokers; return the table rows.

    Parameters
    ----------
    quick
        Few iterations, for a smoke run in CI; the figures are then rough.
    """
    number, repeat = (20, 2) if quick else (300, 5)
    logging.getLogger("clu").setLevel(logging.WARNING)

    mock = {"start": mock_start_ms(20 if quick else 200)}
    mock.update(mock_round_trips(number, repeat))
    real = rabbitmq_figures(number, repeat)
    return _rows(mock, real)


if __name__ == "__main__":
    print(format_table([("amqp", row) for row in run("--quick" in sys.argv)]))
