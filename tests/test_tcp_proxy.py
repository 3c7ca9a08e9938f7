"""Tests for lvmopstools.testing.tcp.FaultProxy in front of real loopback servers.

The targets are a FlakyServer (owned by the toolkit) and plain asyncio
servers (foreign to the clock); the clients are AsyncSocketHandler and
Retrier, in virtual time unless a test says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from _tcp_support import (
    LIMIT,
    OUTCOMES,
    ask,
    bound_every_test,
    check_fault_outcome,
    nothing_left_open,
    pinger,
)

from lvmopstools.retrier import Retrier
from lvmopstools.socket import AsyncSocketHandler
from lvmopstools.testing.clock import VirtualClock
from lvmopstools.testing.tcp import (
    AfterN,
    Bandwidth,
    Blackhole,
    CloseAfterBytes,
    CloseOnAccept,
    CorruptReply,
    Fault,
    FaultProxy,
    FirstN,
    FlakyServer,
    Latency,
    Matches,
    PartialReply,
    RefuseConnections,
    Slice,
    SlowClose,
    StopAnswering,
    TimeWindow,
    WrongReply,
)

pytestmark = pytest.mark.asyncio

SCRIPT = {b"ping": b"pong\n", b"a": b"A\n", b"b": b"B\n"}


@contextlib.asynccontextmanager
async def device_behind_proxy(
    *faults: Fault, **proxy_options: Any
) -> AsyncIterator[tuple[FlakyServer, FaultProxy]]:
    async with (
        FlakyServer(SCRIPT) as device,
        FaultProxy(device.host, device.port, faults=faults, **proxy_options) as proxy,
    ):
        yield device, proxy


def handler(proxy: FaultProxy, **kwargs: Any) -> AsyncSocketHandler:
    return AsyncSocketHandler(proxy.host, proxy.port, **kwargs)


def free_port() -> int:
    """Return a port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- passing traffic through ------------------------------------------------------


async def test_bytes_pass_both_ways_and_are_counted() -> None:
    async with VirtualClock(), device_behind_proxy(record_data=True) as (device, proxy):
        async with asyncio.timeout(LIMIT):
            reply = await handler(proxy, retry=False)(pinger())
            assert reply == b"pong\n"
            await asyncio.sleep(1)  # Let the proxy see both sides close.

        assert proxy.bytes_upstream == 5
        assert proxy.bytes_downstream == 5
        assert proxy.connections == 0
    assert device.count("accepted") == 1
    data = [(e.details["direction"], e.details["nbytes"]) for e in proxy.events("data")]
    assert data == [("upstream", 5), ("downstream", 5)]
    closing = proxy.events("closing")[0].details
    assert (closing["bytes_in"], closing["bytes_out"]) == (5, 5)


async def test_unfaulted_proxy_records_no_data_events_by_default() -> None:
    async with VirtualClock(), device_behind_proxy() as (_, proxy):
        async with asyncio.timeout(LIMIT):
            assert await handler(proxy, retry=False)(pinger()) == b"pong\n"
    assert proxy.count("data") == 0
    assert proxy.count("target_connected") == 1


async def test_bulk_data_passes_with_flow_control() -> None:
    received = bytearray()
    done = asyncio.Event()
    total = 8 * 1024 * 1024

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(1 << 16):
            received.extend(chunk)
        writer.write(len(received).to_bytes(8, "big"))
        await writer.drain()
        writer.close()
        done.set()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with FaultProxy("127.0.0.1", port) as proxy:
            reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            payload = bytes(range(256)) * (total // 256)
            async with asyncio.timeout(LIMIT):
                for offset in range(0, total, 1 << 20):
                    writer.write(payload[offset : offset + (1 << 20)])
                    await writer.drain()
                writer.write_eof()  # Half-close: the sink answers after EOF.
                count = int.from_bytes(await reader.readexactly(8), "big")
                await done.wait()
            writer.close()
            await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()

    assert count == total
    assert bytes(received) == payload


async def test_foreign_target_in_virtual_time() -> None:
    async def echo_later(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        line = await reader.readline()
        await asyncio.sleep(2)
        writer.write(line.upper())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo_later, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with VirtualClock() as clock, FaultProxy("127.0.0.1", port) as proxy:
            proxy.add_fault(Latency(1, direction="upstream"))
            async with asyncio.timeout(LIMIT):
                reply = await handler(proxy, retry=False)(pinger(b"hello"))
            assert reply == b"HELLO\n"
            assert clock.time() == 3
    finally:
        server.close()
        await server.wait_closed()


async def test_unreachable_target_closes_the_client() -> None:
    async with VirtualClock(), FaultProxy("127.0.0.1", free_port()) as proxy:
        with pytest.raises(ConnectionError, match="server hung up, got b''"):
            async with asyncio.timeout(LIMIT):
                await handler(proxy, retry=False)(pinger())
    assert (
        "ConnectionRefusedError"
        in proxy.events("target_unreachable")[0].details["error"]
    )


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (("", 1), TypeError, "target_host must be a non-empty string"),
        (("127.0.0.1", 0), ValueError, r"target_port must be .* got 0"),
        (("127.0.0.1", True), ValueError, r"target_port must be .* got True"),
        (("127.0.0.1", 1, b""), ValueError, r"terminator must be non-empty bytes"),
    ],
)
async def test_bad_arguments_are_refused(
    args: tuple[Any, ...], error: type[Exception], match: str
) -> None:
    host, port, *terminator = args
    with pytest.raises(error, match=match):
        FaultProxy(host, port, terminator=terminator[0] if terminator else None)


# --- faults on live traffic -------------------------------------------------------


async def test_refused_twice_then_success_at_the_backoff_time() -> None:
    params = {"max_attempts": 3, "delay": 0, "seed": 21}
    expected = Retrier(**params)
    first, second = expected.calculate_delay(1), expected.calculate_delay(2)
    refuse = RefuseConnections(trigger=TimeWindow(0, first + 1))
    async with VirtualClock() as clock, device_behind_proxy(refuse) as (device, proxy):
        async with asyncio.timeout(LIMIT):
            reply = await handler(proxy, retrier_params=params)(pinger())
        assert reply == b"pong\n"
        assert clock.time() == pytest.approx(first + second, abs=1e-9)
    assert proxy.count("accepted") == device.count("accepted") == 1


async def test_blackhole_never_reaches_the_target() -> None:
    async with (
        VirtualClock() as clock,
        device_behind_proxy(Blackhole()) as (device, proxy),
    ):
        with pytest.raises(TimeoutError, match="within timeout=4 s"):
            async with asyncio.timeout(LIMIT):
                await handler(proxy, timeout=4, retry=False)(pinger())
        assert clock.time() == 4
    assert device.count("accepted") == 0
    assert proxy.count("dropped") == 1


async def test_close_on_accept_with_reset_then_success() -> None:
    params = {"max_attempts": 2, "delay": 0, "seed": 2}
    wait = Retrier(**params).calculate_delay(1)
    errors: list[Exception] = []
    params["on_retry"] = lambda error, attempt: errors.append(error)
    fault = CloseOnAccept(reset=True, trigger=FirstN(1))
    async with VirtualClock() as clock, device_behind_proxy(fault) as (_, proxy):
        async with asyncio.timeout(LIMIT):
            reply = await handler(proxy, retrier_params=params)(pinger())
        assert reply == b"pong\n"
        assert clock.time() == pytest.approx(wait, abs=1e-9)
    assert [type(error) for error in errors] == [ConnectionResetError]


@pytest.mark.parametrize(
    ("fault", "outcome"),
    [
        (CloseAfterBytes(3), b"pon"),
        (PartialReply(1), b"p"),
        (CloseAfterBytes(3, direction="upstream"), b""),
    ],
)
async def test_cut_replies(fault: Fault, outcome: bytes) -> None:
    async with VirtualClock(), device_behind_proxy(fault) as (_, proxy):
        with pytest.raises(ConnectionError, match=f"server hung up, got {outcome!r}"):
            async with asyncio.timeout(LIMIT):
                await handler(proxy, retry=False)(pinger())


async def test_partial_reply_with_reset() -> None:
    async with (
        VirtualClock(),
        device_behind_proxy(PartialReply(reset=True)) as (_, proxy),
    ):
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(LIMIT):
                await handler(proxy, retry=False)(pinger())


async def test_latency_both_ways_and_bandwidth() -> None:
    faults = [Latency(0.5, direction="both"), Bandwidth(1, direction="upstream")]
    async with VirtualClock() as clock, device_behind_proxy(*faults) as (device, proxy):
        async with asyncio.timeout(LIMIT):
            reply = await handler(proxy, timeout=20, retry=False)(pinger())
        assert reply == b"pong\n"
        # 0.5 s each way, plus 5 bytes at 1 byte/s on the way up.
        assert clock.time() == pytest.approx(6.0)
    assert device.events("request")[0].elapsed == pytest.approx(5.5)


async def test_slices_through_the_proxy() -> None:
    async with (
        VirtualClock() as clock,
        device_behind_proxy(Slice(2, delay=1)) as (_, proxy),
    ):
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"ping\n")
        chunks = []
        async with asyncio.timeout(LIMIT):
            while sum(len(chunk) for chunk, _ in chunks) < 5:
                chunks.append((await reader.read(100), clock.time()))
        writer.close()
        await writer.wait_closed()
    assert chunks == [(b"po", 0), (b"ng", 1), (b"\n", 2)]


async def test_reply_faults_with_pattern_triggers() -> None:
    faults = [
        WrongReply(trigger=Matches(b"^b")),
        CorruptReply(mode="flip", trigger=Matches(b"^ping")),
    ]
    async with VirtualClock(), device_behind_proxy(*faults) as (_, proxy):
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        async with asyncio.timeout(LIMIT):
            assert await ask(reader, writer, b"a") == b"A\n"
            assert await ask(reader, writer, b"b") == b"A\n"
            writer.write(b"ping\n")
            flipped = await reader.readexactly(5)
        writer.close()
        await writer.wait_closed()
    assert sum(x != y for x, y in zip(flipped, b"pong\n", strict=True)) == 1


async def test_stop_answering_then_timeout() -> None:
    fault = StopAnswering(trigger=AfterN(1))
    async with VirtualClock() as clock, device_behind_proxy(fault) as (device, proxy):
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        async with asyncio.timeout(LIMIT):
            assert await ask(reader, writer, b"a") == b"A\n"
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(2):
                    await ask(reader, writer, b"b")
        assert clock.time() == 2
        writer.close()
        await writer.wait_closed()
    assert device.count("reply") == 2  # The device answered; the proxy dropped it.


async def test_slow_close_delays_passing_on_the_targets_close() -> None:
    fault = SlowClose(3)
    async with VirtualClock() as clock, device_behind_proxy(fault) as (device, proxy):
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        async with asyncio.timeout(LIMIT):
            assert await ask(reader, writer, b"a") == b"A\n"
            device.add_fault(CloseOnAccept())  # Only for new connections.
            assert device.connections == 1
            await device.close()  # The device goes away...
            assert await reader.read() == b""  # ...the client hears of it later.
        assert clock.time() == 3
        writer.close()
        await writer.wait_closed()


async def test_temporary_fault_on_a_live_connection() -> None:
    async with VirtualClock() as clock, device_behind_proxy() as (_, proxy):
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        async with asyncio.timeout(LIMIT):
            assert await ask(reader, writer, b"a") == b"A\n"
            with proxy.fault(Latency(2)):
                assert await ask(reader, writer, b"b") == b"B\n"
                assert clock.time() == 2
            assert await ask(reader, writer, b"a") == b"A\n"
            assert clock.time() == 2
        writer.close()
        await writer.wait_closed()


@contextlib.asynccontextmanager
async def _proxied(fault: Fault) -> AsyncIterator[tuple[FaultProxy, int]]:
    async with device_behind_proxy(fault, terminator=b"\n") as (_, proxy):
        yield proxy, proxy.port


# --- every fault through AsyncSocketHandler and Retrier -----------------------------


@pytest.mark.parametrize(
    ("fault", "outcome", "attempts", "elapsed"),
    OUTCOMES,
    ids=[repr(case[0]) for case in OUTCOMES],
)
async def test_every_fault_through_handler_and_retrier(
    fault: Fault, outcome: object, attempts: int, elapsed: float
) -> None:
    await check_fault_outcome(_proxied, fault, outcome, attempts, elapsed)


# --- nothing left open --------------------------------------------------------------

EVERY_FAULT: list[Fault] = [
    RefuseConnections(trigger=TimeWindow(0, 1)),
    CloseOnAccept(),
    CloseOnAccept(reset=True),
    Blackhole(),
    Blackhole(close_after=1),
    CloseAfterBytes(2),
    CloseAfterBytes(2, direction="upstream", reset=True),
    SlowClose(2),
    Latency(1, jitter=0.5, direction="both"),
    Bandwidth(10, direction="both"),
    Slice(1, delay=0.1),
    PartialReply(),
    PartialReply(reset=True),
    CorruptReply(),
    WrongReply(),
    StopAnswering(),
]


@pytest.mark.parametrize("fault", EVERY_FAULT, ids=lambda fault: repr(fault))
async def test_nothing_left_open_after_each_fault(fault: Fault) -> None:
    params = {"max_attempts": 2, "delay": 0, "seed": 0}
    async with nothing_left_open(), VirtualClock():
        async with device_behind_proxy(fault) as (_, proxy):
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(LIMIT):
                    await handler(proxy, timeout=2, retrier_params=params)(pinger())
            # A connection still open, with bytes on their way, is the proxy's.
            _, writer = await asyncio.open_connection(proxy.host, proxy.port)
            writer.write(b"ping\n")
            await asyncio.sleep(0.05)
        assert proxy.connections == 0
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_nothing_left_open_when_the_block_raises() -> None:
    clients: list[asyncio.StreamWriter] = []

    async def failing_test() -> None:
        async with device_behind_proxy(Latency(5)) as (_, proxy):
            _, writer = await asyncio.open_connection(proxy.host, proxy.port)
            clients.append(writer)
            writer.write(b"ping\n")
            await asyncio.sleep(1)
            raise RuntimeError("test failed here")

    async with nothing_left_open(), VirtualClock():
        with pytest.raises(RuntimeError, match="test failed here"):
            await failing_test()
        clients[0].close()
        with contextlib.suppress(ConnectionError):
            await clients[0].wait_closed()


# --- regressions ---------------------------------------------------------------------


async def test_closing_event_counts_bytes_on_the_fast_path() -> None:
    async with VirtualClock(), device_behind_proxy() as (_, proxy):
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        async with asyncio.timeout(LIMIT):
            assert await ask(reader, writer, b"ping") == b"pong\n"
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(1)
        closing = proxy.events("closing")[0].details
    assert (closing["bytes_in"], closing["bytes_out"]) == (5, 5)


async def test_blackholed_connection_closes_when_the_client_does() -> None:
    async with (
        nothing_left_open(),
        VirtualClock(),
        device_behind_proxy(Blackhole()) as (_, proxy),
    ):
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"ping\n")
        writer.write_eof()
        async with asyncio.timeout(LIMIT):
            assert await reader.read() == b""
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(1)
        assert proxy.connections == 0


async def test_bytes_sent_after_the_target_hung_up_are_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncio")
    async with (
        VirtualClock(),
        FlakyServer({}, faults=[CloseOnAccept()]) as device,
        FaultProxy(device.host, device.port) as proxy,
    ):
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        async with asyncio.timeout(LIMIT):
            assert await reader.read() == b""
        for _ in range(8):
            writer.write(b"x\n")
            await asyncio.sleep(0.1)
        assert proxy.count("dropped") == 8
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert "socket.send() raised exception" not in caplog.text


@pytest.mark.parametrize("steps", range(8))
async def test_close_at_any_step_of_a_connection_leaves_nothing(steps: int) -> None:
    async with nothing_left_open(), FlakyServer(SCRIPT, name="target") as device:
        proxy = FaultProxy(device.host, device.port)
        await proxy.open()
        client = socket.create_connection(proxy.address)
        for _ in range(steps):
            await asyncio.sleep(0)
        await proxy.close()
        accepted = device.count("accepted")
        for _ in range(20):
            await asyncio.sleep(0)
        assert device.count("accepted") == accepted
        client.close()


@pytest.mark.parametrize("seed", range(20))
async def test_flip_without_a_terminator_keeps_the_last_byte(seed: int) -> None:
    fault = CorruptReply(mode="flip")
    async with device_behind_proxy(fault, seed=seed) as (_, proxy):
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"ping\n")
        async with asyncio.timeout(LIMIT):
            got = await reader.readexactly(5)
        writer.close()
        await writer.wait_closed()
    assert got[-1:] == b"\n"
    assert sum(a != b for a, b in zip(got, b"pong\n", strict=True)) == 1


async def test_crash_on_the_target_side_is_raised_on_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: object) -> None:
        raise OverflowError("rewriting broke")

    proxies: list[FaultProxy] = []

    async def session() -> None:
        async with device_behind_proxy(Latency(0.1)) as (_, proxy):
            proxies.append(proxy)
            reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            writer.write(b"ping\n")
            with contextlib.suppress(ConnectionError):
                async with asyncio.timeout(LIMIT):
                    assert await reader.read() == b""
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    monkeypatch.setattr("lvmopstools.testing.tcp.proxy.rewrite_reply", broken)
    async with nothing_left_open(), VirtualClock():
        with pytest.raises(OverflowError, match="rewriting broke"):
            await session()
    assert proxies[0].count("error") == 1


bound_every_test(globals())
