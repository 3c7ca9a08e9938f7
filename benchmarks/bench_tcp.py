"""FaultProxy pass-through cost, next to a direct connection and aiomisc's TCPProxy.

Two cases, each measured for every path in the same process and the same
event loop (as in a test, where the client, the proxy and the device share
the test's loop):

- round trip: a client writes a 64-byte message and reads the 64-byte echo,
  one message at a time, on one connection kept open; microseconds per
  round trip.
- bulk throughput: a client writes 32 MiB in 64 KiB writes (with ``drain``)
  to a sink that counts the bytes; megabytes per second until the sink has
  them all.

The paths are a direct connection to the server; the same connection through
:class:`~lvmopstools.testing.tcp.FaultProxy` with no fault; through a minimal
forwarder (two asyncio protocols writing each chunk to the other side, with
flow control and nothing else: the floor for any proxy in the same loop); and
through aiomisc's ``aiomisc.pytest.TCPProxy`` (buffered, its default). The
client uses asyncio streams, as :class:`~lvmopstools.socket.AsyncSocketHandler`
does; the echo and sink servers are plain asyncio protocols. The paths take
turns in each round, so that the machine's changing load hits them alike. No
virtual clock is active.

Run on its own with ``python benchmarks/bench_tcp.py [--quick]``, or through
``python benchmarks/run.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from _table import Row, format_table

from lvmopstools.testing.tcp import FaultProxy

__all__ = ["run"]

HOST = "127.0.0.1"
MESSAGE = bytes(range(64))
CHUNK = 64 * 1024
RTT_CASE = "round trip, 64 B"
BULK_CASE = "bulk throughput"

Opener = Callable[[int], contextlib.AbstractAsyncContextManager[int]]


# --- the servers ----------------------------------------------------------------


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class _Sink(asyncio.Protocol):
    """Counts bytes; resolves ``done`` once ``expected`` bytes have arrived."""

    expected = 0
    done: asyncio.Future[None] | None = None

    def __init__(self) -> None:
        self.received = 0

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        done = _Sink.done
        if done is not None and self.received >= _Sink.expected and not done.done():
            done.set_result(None)


@contextlib.asynccontextmanager
async def _server(factory: Callable[[], asyncio.Protocol]) -> AsyncIterator[int]:
    server = await asyncio.get_running_loop().create_server(factory, HOST, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


# --- the paths --------------------------------------------------------------------


@contextlib.asynccontextmanager
async def direct(port: int) -> AsyncIterator[int]:
    yield port


class _Forward(asyncio.Protocol):
    """One side of the minimal forwarder: writes what it reads to its peer.

    The client side keeps what arrives before the target side is connected.
    """

    def __init__(self, peer: _Forward | None = None) -> None:
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.peer is not None:
            for data in self.peer.early:
                transport.write(data)
            self.peer.early.clear()

    def _peer_transport(self) -> asyncio.Transport | None:
        return None if self.peer is None else self.peer.transport

    def data_received(self, data: bytes) -> None:
        peer = self._peer_transport()
        if peer is None:
            self.early.append(data)
        else:
            peer.write(data)

    def pause_writing(self) -> None:
        peer = self._peer_transport()
        if peer is not None:
            peer.pause_reading()

    def resume_writing(self) -> None:
        peer = self._peer_transport()
        if peer is not None:
            peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self._peer_transport()
        if peer is not None:
            peer.close()


@contextlib.asynccontextmanager
async def through_minimal_forwarder(port: int) -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[Any]] = set()

    def accepted() -> _Forward:
        client_side = _Forward()
        target_side = _Forward(client_side)
        client_side.peer = target_side
        task = loop.create_task(loop.create_connection(lambda: target_side, HOST, port))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return client_side

    server = await loop.create_server(accepted, HOST, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def through_fault_proxy(port: int) -> AsyncIterator[int]:
    async with FaultProxy(HOST, port) as proxy:
        yield proxy.port


@contextlib.asynccontextmanager
async def through_aiomisc(port: int) -> AsyncIterator[int]:
    from aiomisc.pytest import TCPProxy

    async with TCPProxy(HOST, port) as proxy:
        yield proxy.proxy_port


# --- the workloads ----------------------------------------------------------------


async def _time_round_trips(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int
) -> float:
    """Return the seconds ``number`` 64-byte round trips take."""
    start = time.perf_counter()
    for _ in range(number):
        writer.write(MESSAGE)
        await reader.readexactly(len(MESSAGE))
    return time.perf_counter() - start


async def _time_bulk(port: int, total: int) -> float:
    """Return the seconds writing ``total`` bytes to the sink takes."""
    chunk = bytes(CHUNK)
    _Sink.expected = total
    _Sink.done = asyncio.get_running_loop().create_future()
    _, writer = await asyncio.open_connection(HOST, port)
    try:
        start = time.perf_counter()
        for _ in range(total // CHUNK):
            writer.write(chunk)
            await writer.drain()
        await _Sink.done
        return time.perf_counter() - start
    finally:
        writer.close()
        await writer.wait_closed()


def _time_hops(number: int) -> float:
    """Return the seconds ``number`` one-way 64-byte loopback TCP hops take.

    A hop is one ``send`` on a connected socket and the ``recv`` that reads it
    on the other end, in this thread with blocking sockets: the kernel's part
    of a forwarded message, with no event loop and no Python protocol code.
    """
    with socket.create_server((HOST, 0)) as listener:
        sender = socket.create_connection(listener.getsockname())
        receiver, _ = listener.accept()
    with sender, receiver:
        sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.perf_counter()
        for _ in range(number):
            sender.sendall(MESSAGE)
            got = 0
            while got < len(MESSAGE):
                got += len(receiver.recv(len(MESSAGE) - got))
        return time.perf_counter() - start


async def _measure_all(
    paths: dict[str, Opener], number: int, total: int, repeat: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Return the best us/rtt and MB/s of every path, and of one TCP hop.

    The paths take turns within each of the ``repeat`` rounds, so that a
    change in the machine's load hits all of them alike. The hop's figure is
    under the key ``"hop"`` of the latencies.
    """
    latency = dict.fromkeys([*paths, "hop"], float("inf"))
    rate = dict.fromkeys(paths, 0.0)
    async with contextlib.AsyncExitStack() as stack:
        echo = await stack.enter_async_context(_server(_Echo))
        sink = await stack.enter_async_context(_server(_Sink))
        echo_ports, sink_ports = {}, {}
        for name, path in paths.items():
            echo_ports[name] = await stack.enter_async_context(path(echo))
            sink_ports[name] = await stack.enter_async_context(path(sink))

        streams = {}
        for name, port in echo_ports.items():
            reader, writer = await asyncio.open_connection(HOST, port)
            stack.push_async_callback(writer.wait_closed)
            stack.callback(writer.close)
            await _time_round_trips(reader, writer, 200)  # warm up
            streams[name] = (reader, writer)

        for _ in range(repeat):
            for name, (reader, writer) in streams.items():
                elapsed = await _time_round_trips(reader, writer, number)
                latency[name] = min(latency[name], elapsed / number * 1e6)
            hop = _time_hops(number) / number * 1e6
            latency["hop"] = min(latency["hop"], hop)
            for name, port in sink_ports.items():
                elapsed = await _time_bulk(port, total)
                rate[name] = max(rate[name], total / elapsed / 1e6)
    return latency, rate


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def run(quick: bool = False) -> list[Row]:
    """Measure both cases for the three paths; return the table rows.

    Parameters
    ----------
    quick
        Few iterations, for a smoke run in CI; the figures are then rough.
    """
    number, repeat = (500, 3) if quick else (5_000, 9)
    total = (8 if quick else 32) * 1024 * 1024
    paths: dict[str, Opener] = {
        "direct": direct,
        "FaultProxy": through_fault_proxy,
        "minimal": through_minimal_forwarder,
    }
    if _installed("aiomisc"):
        paths["aiomisc"] = through_aiomisc

    latency, rate = asyncio.run(_measure_all(paths, number, total, repeat))
    rows = [
        _row(RTT_CASE, latency, "us/rtt", "ours/direct <= 1.5", lambda r: r <= 1.5),
        _row(BULK_CASE, rate, "MB/s", "ours/direct >= 0.7", lambda r: r >= 0.7),
    ]
    for name, label in (
        ("minimal", "minimal forwarder"),
        ("aiomisc", "aiomisc TCPProxy"),
    ):
        for case, values, unit in (
            (RTT_CASE, latency, "us/rtt"),
            (BULK_CASE, rate, "MB/s"),
        ):
            rows.append(_info_row(case, values, unit, name, label))
    rows.append(_floor_row(latency))
    return rows


def _row(
    case: str,
    values: dict[str, float],
    unit: str,
    target: str,
    met: Callable[[float], bool],
) -> Row:
    """Return the row holding ours against direct to its target."""
    ratio = values["FaultProxy"] / values["direct"]
    return Row(
        case,
        values["FaultProxy"],
        "direct",
        values["direct"],
        unit,
        ratio,
        target,
        met(ratio),
    )


def _info_row(
    case: str, values: dict[str, float], unit: str, name: str, label: str
) -> Row:
    """Return an informative row: a rival's figure and its ratio to direct."""
    ours = values["FaultProxy"]
    if name not in values:
        return Row.rival_missing(case, ours, label, unit)
    ratio = values[name] / values["direct"]
    note = f"informative, ratio is {name}/direct"
    return Row(case, ours, label, values[name], unit, ratio, note=note)


def _floor_row(latency: dict[str, float]) -> Row:
    """Return the informative row of the least round trip any proxy can reach.

    A user-space proxy that ends the client's TCP connection and opens its own
    to the server adds two loopback hops to each round trip (one each way),
    whatever it does in between.
    """
    floor = latency["direct"] + 2 * latency["hop"]
    note = (
        f"informative: direct + 2 x one 64 B TCP hop ({latency['hop']:.1f} us);"
        " ratio is floor/direct"
    )
    return Row(
        RTT_CASE,
        latency["FaultProxy"],
        "floor, user-space proxy",
        floor,
        "us/rtt",
        floor / latency["direct"],
        note=note,
    )


if __name__ == "__main__":
    print(format_table([("tcp", row) for row in run("--quick" in sys.argv)]))
