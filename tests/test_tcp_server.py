"""Tests for lvmopstools.testing.tcp.FlakyServer and the faults it applies.

Clients are the real ones: lvmopstools.socket.AsyncSocketHandler, retried by
lvmopstools.retrier.Retrier, on loopback, in virtual time.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import random
import re
import socket
from collections.abc import AsyncIterator, Callable
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
    EveryKth,
    FakeReply,
    Fault,
    FirstN,
    FlakyServer,
    GarbageReply,
    Latency,
    Matches,
    PartialReply,
    PortTakenError,
    Probability,
    RefuseConnections,
    Request,
    Slice,
    SlowClose,
    StopAnswering,
    TimeWindow,
    Trigger,
    WrongReply,
)

pytestmark = pytest.mark.asyncio

SCRIPT = {b"ping": b"pong\n", b"a": b"A\n", b"b": b"B\n"}


def handler(server: FlakyServer, **kwargs: Any) -> AsyncSocketHandler:
    return AsyncSocketHandler(server.host, server.port, **kwargs)


def connection_refused(port: int) -> bool:
    """Tell whether connecting to 127.0.0.1:port is refused right now."""
    with socket.socket() as sock:
        try:
            sock.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
    return False


# --- answering ----------------------------------------------------------------------


async def test_script_answers_bytes_and_patterns() -> None:
    script = {b"ping": b"pong\n", re.compile(rb"move (\d+)"): b"moving\n"}
    async with FlakyServer(script) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        async with asyncio.timeout(LIMIT):
            assert await ask(reader, writer, b"ping") == b"pong\n"
            assert await ask(reader, writer, b"move 12") == b"moving\n"
            writer.write(b"move x\nping\n")
            assert await reader.readline() == b"pong\n"
        writer.close()
        await writer.wait_closed()

    requests = [e.details["data"] for e in server.events("request")]
    assert requests == [b"ping", b"move 12", b"move x", b"ping"]
    assert [e.details["data"] for e in server.events("unmatched")] == [b"move x"]
    assert server.count("reply") == 3
    assert server.events("reply")[0].clock_time is None  # No clock was active.


async def test_reply_function_sees_the_match_and_a_seeded_faker() -> None:
    def echo_axis(request: Request) -> bytes:
        assert request.match is not None
        return b"axis " + request.match[1] + b"\n"

    script = [
        (re.compile(rb"where (\w)"), echo_axis),
        (b"temp", FakeReply("T={{pyint}}\n")),
        (b"junk", GarbageReply(8)),
    ]
    replies = []
    for _ in range(2):
        async with FlakyServer(script, seed=42) as server:
            reader, writer = await asyncio.open_connection(server.host, server.port)
            async with asyncio.timeout(LIMIT):
                got = [await ask(reader, writer, r) for r in (b"where x", b"temp")]
                writer.write(b"junk\n")
                got.append(await reader.readexactly(9))
            writer.close()
            await writer.wait_closed()
        replies.append(got)

    assert replies[0] == replies[1]  # Same seed, same made-up payloads.
    assert replies[0][0] == b"axis x\n"
    assert re.fullmatch(rb"T=\d+\n", replies[0][1])
    assert replies[0][2].endswith(b"\n")
    assert b"\n" not in replies[0][2][:-1]


async def test_fixed_length_and_raw_framing() -> None:
    def upper(request: Request) -> bytes:
        return request.data.upper()

    async with (
        FlakyServer(handler=upper, framing=3) as fixed,
        FlakyServer(handler=upper, framing="raw") as raw,
    ):
        reader, writer = await asyncio.open_connection(fixed.host, fixed.port)
        async with asyncio.timeout(LIMIT):
            writer.write(b"abcde")
            assert await reader.readexactly(3) == b"ABC"
            writer.write(b"f")
            assert await reader.readexactly(3) == b"DEF"
        writer.close()
        await writer.wait_closed()

        reader, writer = await asyncio.open_connection(raw.host, raw.port)
        async with asyncio.timeout(LIMIT):
            writer.write(b"x\ny")
            assert await reader.readexactly(3) == b"X\nY"
        writer.close()
        await writer.wait_closed()

    assert [e.details["data"] for e in fixed.events("request")] == [b"abc", b"def"]


async def test_async_handler_answers_in_request_order() -> None:
    async def slow_first(request: Request) -> bytes:
        await asyncio.sleep(5 if request.data == b"slow" else 1)
        return request.data + b"\n"

    async with VirtualClock() as clock, FlakyServer(handler=slow_first) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        async with asyncio.timeout(LIMIT):
            writer.write(b"slow\nfast\n")
            assert await reader.readline() == b"slow\n"
            assert clock.time() == 5
            assert await reader.readline() == b"fast\n"
            assert clock.time() == 6
        writer.close()
        await writer.wait_closed()


async def _one_request_closes(server: FlakyServer) -> None:
    """Open ``server``, send one request, see the connection closed, close it."""
    async with server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"x\n")
        async with asyncio.timeout(LIMIT):
            assert await reader.read() == b""  # The server hung up.
        writer.close()
        await writer.wait_closed()


async def test_failing_reply_function_is_raised_when_the_server_closes() -> None:
    def broken(request: Request) -> bytes:
        raise ZeroDivisionError("bad device model")

    server = FlakyServer(handler=broken)
    with pytest.raises(ZeroDivisionError, match="bad device model"):
        await _one_request_closes(server)
    assert server.count("handler_failed") == 1


async def test_reply_of_the_wrong_type_is_reported() -> None:
    server = FlakyServer(handler=lambda request: "text")  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match=r"the reply to b'x' must be bytes or None"):
        await _one_request_closes(server)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"script": {"ping": b"x"}}, TypeError, "must be bytes or a compiled bytes"),
        ({"script": {b"ping": "x"}}, TypeError, r"the reply to b'ping' must be"),
        ({"script": [b"ping"]}, TypeError, r"must be a \(request, reply\) pair"),
        ({"framing": 0}, ValueError, r"framing must be 'line', 'raw' or .* got 0"),
        ({"terminator": b""}, ValueError, "terminator must be non-empty bytes"),
        ({"handler": b"x"}, TypeError, "handler must be a function"),
        ({"port": 70000}, ValueError, r"port must be an integer .* got 70000"),
        ({"host": ""}, TypeError, "host must be a non-empty string"),
        ({"seed": "1"}, TypeError, r"seed must be an integer, got '1'"),
    ],
)
async def test_bad_arguments_are_refused(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        FlakyServer(**kwargs)


async def test_port_is_unknown_before_opening() -> None:
    server = FlakyServer()
    with pytest.raises(RuntimeError, match="is not open yet, so it has no port"):
        server.port  # noqa: B018


# --- refusing connections ---------------------------------------------------------


async def test_two_refused_connections_then_success_at_the_backoff_time() -> None:
    params = {"max_attempts": 3, "delay": 0.5, "seed": 7}
    expected = Retrier(**params)
    first_wait = expected.calculate_delay(1)
    second_wait = expected.calculate_delay(2)
    failures: list[Exception] = []
    params["on_retry"] = lambda error, attempt: failures.append(error)
    refuse = RefuseConnections(trigger=TimeWindow(0, first_wait + 1))

    async with VirtualClock() as clock, FlakyServer(SCRIPT, faults=[refuse]) as server:
        async with asyncio.timeout(LIMIT):
            reply = await handler(server, retrier_params=params)(pinger())

    assert reply == b"pong\n"
    assert clock.time() == pytest.approx(first_wait + second_wait, abs=1e-9)
    assert [type(error) for error in failures] == [ConnectionRefusedError] * 2
    assert server.count("accepted") == 1
    assert server.count("listener_reopened") == 1


async def test_refused_port_is_really_closed_and_reopens_on_removal() -> None:
    async with VirtualClock(), FlakyServer(SCRIPT) as server:
        port = server.port
        refuse = server.add_fault(RefuseConnections())
        assert connection_refused(port)
        with pytest.raises(ConnectionRefusedError):
            await handler(server, retry=False)(pinger())

        server.remove_fault(refuse)
        async with asyncio.timeout(LIMIT):
            assert await handler(server, retry=False)(pinger()) == b"pong\n"
        assert server.port == port


def _take(port: int) -> socket.socket:
    """Listen on ``port`` with another socket, as a stray program could."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


async def test_port_taken_while_refusing_is_reported() -> None:
    async with FlakyServer(SCRIPT, faults=[RefuseConnections()]) as server:
        with _take(server.port):
            with pytest.raises(
                PortTakenError, match=r"cannot listen on 127\.0\.0\.1:\d+ again"
            ):
                server.clear_faults()
        assert not server.listening


async def test_port_taken_when_a_window_ends_is_raised_on_close() -> None:
    fault = RefuseConnections(trigger=TimeWindow(0, 5))
    server = FlakyServer(SCRIPT, faults=[fault])

    async def run() -> None:
        async with VirtualClock(), server:
            with _take(server.port):
                await asyncio.sleep(6)
            assert server.count("error") == 1

    with pytest.raises(PortTakenError, match="another socket took the port"):
        await run()


async def test_refusing_cannot_count_connections() -> None:
    with pytest.raises(NotImplementedError, match="supports only these triggers"):
        RefuseConnections(trigger=FirstN(2))


# --- closing --------------------------------------------------------------------------


async def test_first_two_connections_closed_on_accept_then_success() -> None:
    params = {"max_attempts": 3, "delay": 0.25, "seed": 3}
    expected = Retrier(**params)
    total = expected.calculate_delay(1) + expected.calculate_delay(2)
    fault = CloseOnAccept(trigger=FirstN(2))

    async with VirtualClock() as clock, FlakyServer(SCRIPT, faults=[fault]) as server:
        async with asyncio.timeout(LIMIT):
            reply = await handler(server, retrier_params=params)(pinger())

    assert reply == b"pong\n"
    assert server.count("accepted") == 3
    assert clock.time() == pytest.approx(total, abs=1e-9)


async def test_close_on_accept_with_reset() -> None:
    fault = CloseOnAccept(reset=True)
    async with VirtualClock(), FlakyServer(SCRIPT, faults=[fault]) as server:
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(LIMIT):
                await handler(server, retry=False)(pinger())
    assert server.events("closing")[0].details["reset"] is True


async def test_close_on_accept_after_a_delay() -> None:
    fault = CloseOnAccept(delay=1.5)
    async with VirtualClock() as clock, FlakyServer(SCRIPT, faults=[fault]) as server:
        with pytest.raises(ConnectionError, match="server hung up, got b''"):
            async with asyncio.timeout(LIMIT):
                await handler(server, retry=False)(pinger())
        assert clock.time() == 1.5
    assert server.count("dropped") == 1  # The request was read, not answered.


async def test_after_its_fin_the_server_drops_what_the_client_sends() -> None:
    async with VirtualClock(), FlakyServer(SCRIPT, faults=[CloseOnAccept()]) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        async with asyncio.timeout(LIMIT):
            assert await reader.read() == b""  # The server's FIN.
            writer.write(b"ping\n")
            await writer.drain()
            await asyncio.sleep(1)
        assert server.connections == 1  # Half-closed, still reading.
        assert server.count("dropped") == 1
        assert server.events("closing")[0].details["reset"] is False
        writer.close()
        await writer.wait_closed()
        async with asyncio.timeout(LIMIT):
            await asyncio.sleep(1)
        assert server.connections == 0  # Closed once the client closed too.


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (CloseAfterBytes(3), ConnectionError),
        (CloseAfterBytes(3, reset=True), ConnectionResetError),
    ],
)
async def test_close_after_bytes_downstream(
    fault: CloseAfterBytes, error: type[Exception]
) -> None:
    async with VirtualClock(), FlakyServer(SCRIPT, faults=[fault]) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"ping\n")
        async with asyncio.timeout(LIMIT):
            if error is ConnectionResetError:
                with pytest.raises(ConnectionResetError):
                    await reader.readline()
            else:
                assert await reader.read() == b"pon"
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_close_after_bytes_upstream() -> None:
    fault = CloseAfterBytes(2, direction="upstream")
    async with VirtualClock(), FlakyServer(SCRIPT, faults=[fault]) as server:
        with pytest.raises(ConnectionError, match="server hung up, got b''"):
            async with asyncio.timeout(LIMIT):
                await handler(server, retry=False)(pinger())
    assert server.count("request") == 0  # "pi" never made a whole line


async def test_slow_close_delays_the_servers_close() -> None:
    faults = [CloseOnAccept(), SlowClose(2.0)]
    async with VirtualClock() as clock, FlakyServer(SCRIPT, faults=faults) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        async with asyncio.timeout(LIMIT):
            assert await reader.read() == b""
        assert clock.time() == 2.0
        writer.close()
        await writer.wait_closed()


async def test_slow_close_after_the_client_closed() -> None:
    async with VirtualClock(), FlakyServer(SCRIPT, faults=[SlowClose(3.0)]) as server:
        async with asyncio.timeout(LIMIT):
            assert await handler(server, retry=False)(pinger()) == b"pong\n"
            await asyncio.sleep(10)
    closing = server.events("closing")[0]
    closed = server.events("closed", connection=1)[0]
    assert closed.elapsed - closing.elapsed == 0  # The close itself is at once...
    assert closing.elapsed == 3.0  # ...three seconds after the client's FIN.


# --- never answering --------------------------------------------------------------


async def test_blackhole_ends_in_a_timeout_not_a_hang() -> None:
    async with (
        VirtualClock() as clock,
        FlakyServer(SCRIPT, faults=[Blackhole()]) as server,
    ):
        with pytest.raises(
            TimeoutError, match=r"could not run the request on .* within timeout=3 s"
        ):
            async with asyncio.timeout(LIMIT):
                await handler(server, timeout=3, retry=False)(pinger())
        assert clock.time() == 3
    assert server.count("dropped") == 1


async def test_blackhole_retried_takes_every_timeout_and_backoff() -> None:
    params = {"max_attempts": 2, "delay": 0, "seed": 1}
    wait = Retrier(**params).calculate_delay(1)
    async with (
        VirtualClock() as clock,
        FlakyServer(SCRIPT, faults=[Blackhole()]) as server,
    ):
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(LIMIT):
                await handler(server, timeout=2, retrier_params=params)(pinger())
        assert clock.time() == pytest.approx(2 + wait + 2, abs=1e-9)
    assert server.count("accepted") == 2


async def test_blackhole_closing_after_a_while() -> None:
    fault = Blackhole(close_after=1.0)
    async with VirtualClock() as clock, FlakyServer(SCRIPT, faults=[fault]) as server:
        with pytest.raises(ConnectionError, match="server hung up"):
            async with asyncio.timeout(LIMIT):
                await handler(server, timeout=3, retry=False)(pinger())
        assert clock.time() == 1.0


async def test_stop_answering_mid_session() -> None:
    fault = StopAnswering(trigger=AfterN(2))
    async with VirtualClock() as clock, FlakyServer(SCRIPT, faults=[fault]) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        async with asyncio.timeout(LIMIT):
            assert await ask(reader, writer, b"a") == b"A\n"
            assert await ask(reader, writer, b"b") == b"B\n"
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(4):
                    await ask(reader, writer, b"ping")
            assert clock.time() == 4
            writer.write(b"a\n")
            await asyncio.sleep(1)
        writer.close()
        await writer.wait_closed()
    assert server.count("silenced") == 1
    assert [e.details["data"] for e in server.events("ignored")] == [b"a"]


# --- bad replies ------------------------------------------------------------------


async def test_partial_reply_then_close() -> None:
    async with VirtualClock(), FlakyServer(SCRIPT, faults=[PartialReply(2)]) as server:
        with pytest.raises(ConnectionError, match=r"server hung up, got b'po'"):
            async with asyncio.timeout(LIMIT):
                await handler(server, retry=False)(pinger())


async def test_partial_reply_with_reset() -> None:
    fault = PartialReply(reset=True)
    async with VirtualClock(), FlakyServer(SCRIPT, faults=[fault]) as server:
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(LIMIT):
                await handler(server, retry=False)(pinger())


async def test_garbage_reply_is_seeded_and_keeps_the_terminator() -> None:
    replies = []
    for _ in range(2):
        fault = CorruptReply()
        async with (
            VirtualClock(),
            FlakyServer(SCRIPT, faults=[fault], seed=5) as server,
        ):
            async with asyncio.timeout(LIMIT):
                replies.append(await handler(server, retry=False)(pinger()))
    assert replies[0] == replies[1]
    assert replies[0] != b"pong\n"
    assert len(replies[0]) == 5
    assert replies[0].endswith(b"\n")


async def test_flipped_reply_differs_in_one_byte() -> None:
    fault = CorruptReply(mode="flip", trigger=FirstN(1))
    async with VirtualClock(), FlakyServer(SCRIPT, faults=[fault]) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"a\n")
        async with asyncio.timeout(LIMIT):
            first = await reader.readexactly(2)
            assert await ask(reader, writer, b"b") == b"B\n"
        writer.close()
        await writer.wait_closed()
    changed = [i for i in range(2) if first[i] != b"A\n"[i]]
    assert len(changed) == 1
    assert first[changed[0]] == b"A\n"[changed[0]] ^ 0xFF


async def test_reply_to_the_wrong_request() -> None:
    faults = [
        WrongReply(trigger=Matches(rb"^b$")),
        WrongReply(b"?\n", trigger=Matches(b"ping")),
    ]
    async with VirtualClock(), FlakyServer(SCRIPT, faults=faults) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        async with asyncio.timeout(LIMIT):
            assert await ask(reader, writer, b"a") == b"A\n"
            assert await ask(reader, writer, b"b") == b"A\n"  # The previous reply.
            assert await ask(reader, writer, b"ping") == b"?\n"
        writer.close()
        await writer.wait_closed()


# --- timing -----------------------------------------------------------------------


async def test_latency_with_seeded_jitter() -> None:
    fault = Latency(1.5, jitter=0.5, seed=3)
    rng = random.Random(3)
    expected = [1.5 + rng.uniform(-0.5, 0.5) for _ in range(2)]
    async with VirtualClock() as clock, FlakyServer(SCRIPT, faults=[fault]) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        async with asyncio.timeout(LIMIT):
            assert await ask(reader, writer, b"a") == b"A\n"
            assert clock.time() == pytest.approx(expected[0])
            start = clock.time()
            assert await ask(reader, writer, b"b") == b"B\n"
            assert clock.time() - start == pytest.approx(expected[1])
        writer.close()
        await writer.wait_closed()


async def test_latency_in_real_time_without_a_clock() -> None:
    loop = asyncio.get_running_loop()
    async with FlakyServer(SCRIPT, faults=[Latency(0.02)]) as server:
        start = loop.time()
        async with asyncio.timeout(LIMIT):
            assert await handler(server, retry=False)(pinger()) == b"pong\n"
        # A lower bound only: a timer never fires early, whatever the load.
        assert loop.time() - start >= 0.02


async def test_latency_per_direction_adds_up() -> None:
    faults = [Latency(1, direction="upstream"), Latency(2, direction="downstream")]
    async with VirtualClock() as clock, FlakyServer(SCRIPT, faults=faults) as server:
        async with asyncio.timeout(LIMIT):
            assert await handler(server, retry=False)(pinger()) == b"pong\n"
        assert clock.time() == 3
    request = server.events("request")[0]
    assert request.elapsed == 1
    assert request.clock_time == 1  # Stamped with the virtual clock's time.


async def test_latency_makes_a_short_timeout_expire() -> None:
    async with (
        VirtualClock() as clock,
        FlakyServer(SCRIPT, faults=[Latency(5)]) as server,
    ):
        with pytest.raises(TimeoutError, match="within timeout=2 s"):
            async with asyncio.timeout(LIMIT):
                await handler(server, timeout=2, retry=False)(pinger())
        assert clock.time() == 2


async def test_bandwidth_limit() -> None:
    script = {b"dump": bytes(999) + b"\n"}
    async with (
        VirtualClock() as clock,
        FlakyServer(script, faults=[Bandwidth(100)]) as server,
    ):
        async with asyncio.timeout(LIMIT):
            reply = await handler(server, timeout=20, retry=False)(pinger(b"dump"))
        assert len(reply) == 1000
        assert clock.time() == pytest.approx(10.0)


async def test_slices_arrive_apart() -> None:
    script = {b"x": b"abcdef\n"}
    async with (
        VirtualClock() as clock,
        FlakyServer(script, faults=[Slice(2, delay=0.5)]) as server,
    ):
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"x\n")
        chunks = []
        async with asyncio.timeout(LIMIT):
            while sum(len(chunk) for chunk, _ in chunks) < 7:
                chunks.append((await reader.read(100), clock.time()))
        writer.close()
        await writer.wait_closed()
    assert chunks == [(b"ab", 0), (b"cd", 0.5), (b"ef", 1.0), (b"\n", 1.5)]


async def test_latencies_add_up_and_the_lowest_bandwidth_wins() -> None:
    script = {b"dump": bytes(99) + b"\n"}
    faults = [Latency(1), Latency(2), Bandwidth(100), Bandwidth(50)]
    async with VirtualClock() as clock, FlakyServer(script, faults=faults) as server:
        async with asyncio.timeout(LIMIT):
            reply = await handler(server, timeout=20, retry=False)(pinger(b"dump"))
        assert len(reply) == 100
        assert clock.time() == pytest.approx(1 + 2 + 100 / 50)


async def test_removing_a_latency_keeps_replies_in_order() -> None:
    async with VirtualClock() as clock, FlakyServer(SCRIPT) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        async with asyncio.timeout(LIMIT):
            with server.fault(Latency(2)):
                writer.write(b"a\n")
                await asyncio.sleep(1)  # The server has read "a"; "A" is queued.
            writer.write(b"b\n")
            assert await reader.readline() == b"A\n"
            assert clock.time() == 2
            assert await reader.readline() == b"B\n"
        writer.close()
        await writer.wait_closed()


# --- triggers and run-time changes ------------------------------------------------


async def _connections_closed_at_once(server: FlakyServer, count: int) -> list[bool]:
    """Connect ``count`` times; tell for each whether the server hung up."""
    outcome = []
    for _ in range(count):
        try:
            await handler(server, retry=False)(pinger())
        except ConnectionError:
            outcome.append(True)
        else:
            outcome.append(False)
    return outcome


async def test_every_kth_connection() -> None:
    fault = CloseOnAccept(trigger=EveryKth(2))
    async with VirtualClock(), FlakyServer(SCRIPT, faults=[fault]) as server:
        async with asyncio.timeout(LIMIT):
            outcome = await _connections_closed_at_once(server, 4)
    assert outcome == [False, True, False, True]


async def test_seeded_probability() -> None:
    rng = random.Random(11)
    expected = [rng.random() < 0.5 for _ in range(8)]
    fault = CloseOnAccept(trigger=Probability(0.5, seed=11))
    async with VirtualClock(), FlakyServer(SCRIPT, faults=[fault]) as server:
        async with asyncio.timeout(LIMIT):
            outcome = await _connections_closed_at_once(server, 8)
    assert outcome == expected
    assert sorted(set(outcome)) == [False, True]


async def test_time_window_trigger() -> None:
    fault = Latency(1.0, trigger=TimeWindow(2.0, 4.0))
    async with VirtualClock() as clock, FlakyServer(SCRIPT, faults=[fault]) as server:
        delays = []
        async with asyncio.timeout(LIMIT):
            for start in (0.0, 2.0, 3.0, 4.5):
                await asyncio.sleep(start - clock.time())
                await handler(server, retry=False)(pinger())
                delays.append(clock.time() - start)
    assert delays == [0.0, 1.0, 1.0, 0.0]


async def test_first_n_requests_and_pattern_trigger() -> None:
    faults = [Latency(1.0, trigger=FirstN(1)), Latency(10.0, trigger=Matches(b"^b"))]
    async with VirtualClock() as clock, FlakyServer(SCRIPT, faults=faults) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        times = []
        async with asyncio.timeout(LIMIT):
            for request in (b"a", b"a", b"b", b"a"):
                start = clock.time()
                await ask(reader, writer, request)
                times.append(clock.time() - start)
        writer.close()
        await writer.wait_closed()
    assert times == [1.0, 0.0, 10.0, 0.0]


async def test_faults_change_at_run_time() -> None:
    async with VirtualClock() as clock, FlakyServer(SCRIPT) as server:
        ping = handler(server, retry=False)
        async with asyncio.timeout(LIMIT):
            with server.fault(Latency(2.0)) as latency:
                assert server.faults == (latency,)
                await ping(pinger())
                assert clock.time() == 2.0
            assert server.faults == ()
            await ping(pinger())
            assert clock.time() == 2.0

            server.add_fault(Latency(1.0))
            server.add_fault(Blackhole())
            server.clear_faults()
            await ping(pinger())
            assert clock.time() == 2.0

    with pytest.raises(ValueError, match="is not active; pass the object that"):
        server.remove_fault(Latency(1.0))
    with pytest.raises(TypeError, match=r"add_fault\(\) takes a Fault"):
        server.add_fault("latency")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: Latency(-1), ValueError, r"Latency: delay must be 0 or more, got -1"),
        (lambda: Bandwidth(0), ValueError, "Bandwidth: rate must be greater than 0"),
        (lambda: Slice(0), ValueError, "Slice: size must be at least 1, got 0"),
        (lambda: FirstN(0), ValueError, "FirstN: count must be at least 1, got 0"),
        (lambda: Probability(2), ValueError, "p must be between 0 and 1, got 2"),
        (lambda: Matches("x"), TypeError, "write it as b'...'"),  # type: ignore[arg-type]
        (lambda: Matches(b"("), ValueError, "is not a valid regular expression"),
        (lambda: TimeWindow(3, 1), ValueError, r"end \(1\) must be after start \(3\)"),
        (lambda: Latency(1, direction="up"), ValueError, "direction must be one of"),  # type: ignore[arg-type]
        (lambda: CorruptReply(mode="x"), ValueError, "mode must be 'garbage' or"),  # type: ignore[arg-type]
        (lambda: Blackhole(trigger=Matches(b"x")), ValueError, "needs a request"),
        (lambda: Latency(1, trigger=3), TypeError, "trigger must be a Trigger"),  # type: ignore[arg-type]
    ],
)
async def test_bad_faults_are_refused(
    make: Callable[[], object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        make()


@contextlib.asynccontextmanager
async def _device(fault: Fault) -> AsyncIterator[tuple[FlakyServer, int]]:
    async with FlakyServer(SCRIPT, faults=[fault]) as device:
        yield device, device.port


# --- every fault through AsyncSocketHandler and Retrier -----------------------------


@pytest.mark.parametrize(
    ("fault", "outcome", "attempts", "elapsed"),
    OUTCOMES,
    ids=[repr(case[0]) for case in OUTCOMES],
)
async def test_every_fault_through_handler_and_retrier(
    fault: Fault, outcome: object, attempts: int, elapsed: float
) -> None:
    await check_fault_outcome(_device, fault, outcome, attempts, elapsed)


# --- nothing left open --------------------------------------------------------------

EVERY_FAULT: list[Fault] = [
    RefuseConnections(trigger=TimeWindow(0, 1)),
    CloseOnAccept(),
    CloseOnAccept(reset=True),
    CloseOnAccept(delay=1),
    Blackhole(),
    Blackhole(close_after=1),
    CloseAfterBytes(2),
    CloseAfterBytes(2, direction="upstream", reset=True),
    SlowClose(2),
    Latency(1, jitter=0.5, direction="both"),
    Bandwidth(10),
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
        async with FlakyServer(SCRIPT, faults=[fault]) as server:
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(LIMIT):
                    await handler(server, timeout=2, retrier_params=params)(pinger())
            # A connection left open by the fault is the server's to close.
            _, writer = await asyncio.open_connection(server.host, server.port)
            writer.write(b"ping\n")
            await asyncio.sleep(0.5)
        assert connection_refused(server.port)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_nothing_left_open_when_the_block_raises() -> None:
    server = FlakyServer(SCRIPT, faults=[Latency(5)])
    clients: list[asyncio.StreamWriter] = []

    async def failing_test() -> None:
        async with server:
            _, writer = await asyncio.open_connection(server.host, server.port)
            clients.append(writer)
            writer.write(b"ping\n")
            await asyncio.sleep(1)  # The reply is still on its way.
            raise RuntimeError("test failed here")

    async with nothing_left_open(), VirtualClock():
        with pytest.raises(RuntimeError, match="test failed here"):
            await failing_test()
        assert server.connections == 0
        assert connection_refused(server.port)
        clients[0].close()
        with contextlib.suppress(ConnectionError):
            await clients[0].wait_closed()


# --- regressions ---------------------------------------------------------------------


async def _slow_pong(request: Request) -> bytes:
    await asyncio.sleep(1)  # Virtual: the device takes a second to answer.
    return b"pong\n"


@pytest.mark.parametrize(
    "options",
    [
        {"script": SCRIPT, "faults": [Latency(1.0)]},
        {"script": SCRIPT, "faults": [Slice(2, delay=0.5)]},
        {"script": SCRIPT, "faults": [Bandwidth(2)]},
        {"script": SCRIPT, "faults": [Latency(1.0, direction="upstream")]},
        {"handler": _slow_pong},
    ],
    ids=["latency", "slice", "bandwidth", "upstream-latency", "async-handler"],
)
async def test_half_closing_client_gets_every_reply(options: dict[str, Any]) -> None:
    async with nothing_left_open(), VirtualClock():
        async with FlakyServer(**options) as server:
            reader, writer = await asyncio.open_connection(server.host, server.port)
            writer.write(b"ping\nping\n")
            writer.write_eof()
            async with asyncio.timeout(LIMIT):
                assert await reader.read() == b"pong\npong\n"
            writer.close()
            await writer.wait_closed()
        assert server.count("reply") == 2


async def _accepted_not_adopted(server: FlakyServer) -> socket.socket:
    """Connect, then return once the accept ran but its adopting task did not."""
    client = socket.create_connection(server.address)
    for _ in range(100):
        if server.count("accepted"):
            return client
        await asyncio.sleep(0)
    client.close()
    pytest.fail("the server did not accept the connection")


async def test_close_right_after_an_accept_neither_hangs_nor_leaks() -> None:
    async with nothing_left_open():
        server = FlakyServer(SCRIPT)
        await server.open()
        client = await _accepted_not_adopted(server)
        await server.close()
        assert server.connections == 0
        client.close()


@pytest.mark.parametrize("steps", range(8))
async def test_close_at_any_step_of_a_connection_leaves_nothing(steps: int) -> None:
    async with nothing_left_open():
        server = FlakyServer(SCRIPT)
        await server.open()
        client = socket.create_connection(server.address)
        for _ in range(steps):
            await asyncio.sleep(0)
        await server.close()
        client.close()


@pytest.mark.parametrize(("reply", "nbytes"), [(b"A\n", 2), (b"x", 2), (b"pong\n", 1)])
@pytest.mark.parametrize("seed", range(20))
async def test_flip_changes_distinct_bytes_and_keeps_the_terminator(
    reply: bytes, nbytes: int, seed: int
) -> None:
    fault = CorruptReply(mode="flip", nbytes=nbytes)
    async with FlakyServer({b"a": reply}, faults=[fault], seed=seed) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"a\n")
        async with asyncio.timeout(LIMIT):
            got = await reader.readexactly(len(reply))
        writer.close()
        await writer.wait_closed()

    changed = [i for i in range(len(reply)) if got[i] != reply[i]]
    body = len(reply) - 1 if reply.endswith(b"\n") else len(reply)
    assert len(changed) == min(nbytes, body)
    assert all(got[i] == reply[i] ^ 0xFF for i in changed)
    assert got.endswith(b"\n") == reply.endswith(b"\n")


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Bandwidth(float("inf")), r"Bandwidth: rate must be a finite number"),
        (lambda: Latency(float("inf")), r"Latency: delay must be a finite number"),
        (lambda: Latency(1, jitter=float("nan")), r"jitter must be a finite number"),
        (lambda: Slice(1, delay=float("inf")), r"Slice: delay must be a finite"),
        (lambda: SlowClose(float("inf")), r"SlowClose: delay must be a finite"),
        (lambda: Blackhole(close_after=math.inf), r"use close_after=None"),
        (lambda: TimeWindow(0, math.inf), r"use end=None"),
    ],
)
async def test_non_finite_values_are_refused(
    make: Callable[[], object], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    ("patched", "fault"),
    [
        ("plan_delivery", Latency(1.0)),  # Raises in data_received.
        ("rewrite_reply", Latency(1.0, direction="upstream")),  # In a pipe timer.
    ],
)
async def test_crash_in_a_protocol_callback_is_raised_on_close(
    monkeypatch: pytest.MonkeyPatch, patched: str, fault: Fault
) -> None:
    def broken(*args: object) -> None:
        raise OverflowError("shaping broke")

    server = FlakyServer(SCRIPT, faults=[fault])

    async def session() -> None:
        async with server:
            reader, writer = await asyncio.open_connection(server.host, server.port)
            writer.write(b"ping\n")
            with contextlib.suppress(ConnectionError):
                async with asyncio.timeout(LIMIT):
                    assert await reader.read() == b""
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    monkeypatch.setattr(f"lvmopstools.testing.tcp.server.{patched}", broken)
    async with nothing_left_open(), VirtualClock():
        with pytest.raises(OverflowError, match="shaping broke"):
            await session()
    assert server.count("error") == 1


@pytest.mark.parametrize("trigger", [FirstN(1), AfterN(1), EveryKth(2)], ids=repr)
@pytest.mark.parametrize(
    "make",
    [
        lambda trigger: Latency(1, direction="both", trigger=trigger),
        lambda trigger: Bandwidth(1, direction="both", trigger=trigger),
        lambda trigger: Slice(1, direction="both", trigger=trigger),
    ],
    ids=["latency", "bandwidth", "slice"],
)
async def test_count_triggers_on_both_directions_are_not_supported(
    make: Callable[[Trigger], Fault], trigger: Trigger
) -> None:
    with pytest.raises(
        NotImplementedError,
        match=r"direction='both' with a \w+ trigger is not supported: the way in",
    ):
        make(trigger)


async def test_a_failing_accept_stops_accepting_and_is_raised_on_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = 0

    def accept(self: socket.socket) -> tuple[socket.socket, Any]:
        nonlocal calls
        calls += 1
        raise OSError(errno.EMFILE, "Too many open files")

    server = FlakyServer(SCRIPT)

    async def session() -> None:
        async with server:
            monkeypatch.setattr(socket.socket, "accept", accept)
            client = socket.create_connection(server.address)
            for _ in range(50):  # Loop iterations, each one polling the port.
                await asyncio.sleep(0)
            monkeypatch.undo()
            client.close()

    with pytest.raises(OSError, match=r"accept\(\) failed .*Too many open files"):
        await session()
    assert calls == 1  # Not once per loop iteration.
    assert server.count("error") == 1


bound_every_test(globals())
