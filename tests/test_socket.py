"""Tests for lvmopstools.socket.AsyncSocketHandler against real loopback servers."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio

from lvmopstools.socket import AsyncSocketHandler

pytestmark = pytest.mark.asyncio

NO_WAIT = {"delay": 0, "use_exponential_backoff": False}

ServerBehaviour = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]
]


class LoopbackServer:
    """A real asyncio server on 127.0.0.1 that counts its connections.

    ``accepted`` counts connections, ``open`` those not yet finished, and
    ``eof_seen`` those whose client closed its side before the server did.
    """

    def __init__(self, behaviour: ServerBehaviour) -> None:
        self.behaviour = behaviour
        self.accepted = 0
        self.open = 0
        self.eof_seen = 0
        self.all_closed = asyncio.Event()
        self.all_closed.set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.accepted += 1
        self.open += 1
        self.all_closed.clear()
        try:
            await self.behaviour(reader, writer)
            if not reader.at_eof():
                await reader.read()  # wait for the client to close its side
            if reader.at_eof():
                self.eof_seen += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            self.eof_seen += 1
        finally:
            writer.close()
            self.open -= 1
            if self.open == 0:
                self.all_closed.set()

    async def wait_all_closed(self) -> None:
        async with asyncio.timeout(5):
            await self.all_closed.wait()


async def echo_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.readline())
    await writer.drain()


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def stay_silent(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await reader.read()


@pytest_asyncio.fixture
async def start_server() -> AsyncIterator[Callable[..., Awaitable[LoopbackServer]]]:
    """Start loopback servers on demand; close them all after the test."""
    servers: list[LoopbackServer] = []

    async def start(behaviour: ServerBehaviour) -> LoopbackServer:
        server = LoopbackServer(behaviour)
        await server.start()
        servers.append(server)
        return server

    yield start

    for server in reversed(servers):
        assert server.server is not None
        server.server.close()
        async with asyncio.timeout(5):
            await server.server.wait_closed()


@pytest.fixture
def closed_port() -> int:
    """A loopback port that was just free: connecting to it is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"status\n")
    await writer.drain()
    return await reader.readexactly(7)


async def read_reply(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bytes:
    return await reader.readexactly(7)


# --- success -----------------------------------------------------------------


async def test_callback_result_is_returned_and_connection_closed(
    start_server: Callable[..., Awaitable[LoopbackServer]],
) -> None:
    server = await start_server(echo_line)
    handler = AsyncSocketHandler("127.0.0.1", server.port)

    async with asyncio.timeout(5):
        reply = await handler(ask)

    assert reply == b"status\n"
    await server.wait_all_closed()
    assert (server.accepted, server.open, server.eof_seen) == (1, 0, 1)


async def test_subclass_request_is_used_without_a_callback(
    start_server: Callable[..., Awaitable[LoopbackServer]],
) -> None:
    class StatusHandler(AsyncSocketHandler):
        async def request(
            self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> Any:
            return (await ask(reader, writer)).strip()

    server = await start_server(echo_line)

    async with asyncio.timeout(5):
        assert await StatusHandler("127.0.0.1", server.port)() == b"status"

    await server.wait_all_closed()
    assert server.eof_seen == 1


async def test_every_call_opens_a_new_connection(
    start_server: Callable[..., Awaitable[LoopbackServer]],
) -> None:
    server = await start_server(echo_line)
    handler = AsyncSocketHandler("127.0.0.1", server.port)

    async with asyncio.timeout(5):
        replies = [await handler(ask) for _ in range(3)]

    assert replies == [b"status\n"] * 3
    await server.wait_all_closed()
    assert (server.accepted, server.eof_seen) == (3, 3)


# --- request not implemented -------------------------------------------------


async def test_missing_request_raises_before_connecting(
    start_server: Callable[..., Awaitable[LoopbackServer]],
) -> None:
    server = await start_server(echo_line)
    handler = AsyncSocketHandler("127.0.0.1", server.port)

    with pytest.raises(
        NotImplementedError,
        match=r"AsyncSocketHandler was called without a callback and does not "
        r"override request\(\); pass a callback",
    ):
        await handler()

    assert server.accepted == 0


async def test_base_request_itself_says_what_to_do() -> None:
    handler = AsyncSocketHandler("127.0.0.1", 9)

    with pytest.raises(NotImplementedError, match=r"pass a callback or override"):
        await handler.request(asyncio.StreamReader(), None)  # type: ignore[arg-type]


async def test_non_callable_callback_is_rejected() -> None:
    handler = AsyncSocketHandler("127.0.0.1", 9)

    with pytest.raises(TypeError, match=r"callback must be a coroutine .* got 'ask'"):
        await handler("ask")  # type: ignore[call-overload]


# --- connection failures -----------------------------------------------------


async def test_refused_connection_without_retry_raises_once(closed_port: int) -> None:
    retries: list[int] = []
    handler = AsyncSocketHandler(
        "127.0.0.1",
        closed_port,
        retry=False,
        retrier_params={"on_retry": lambda e, n: retries.append(n)},
    )

    async with asyncio.timeout(5):
        with pytest.raises(ConnectionRefusedError):
            await handler(ask)

    assert retries == []


async def test_refused_connection_is_retried(closed_port: int) -> None:
    retries: list[tuple[type[Exception], int]] = []
    handler = AsyncSocketHandler(
        "127.0.0.1",
        closed_port,
        retrier_params={
            "max_attempts": 3,
            "on_retry": lambda e, n: retries.append((type(e), n)),
            **NO_WAIT,
        },
    )

    async with asyncio.timeout(5):
        with pytest.raises(ConnectionRefusedError):
            await handler(ask)

    assert retries == [(ConnectionRefusedError, 1), (ConnectionRefusedError, 2)]


async def test_connect_timeout_names_the_phase(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def never_connects(*args: Any, **kwargs: Any) -> Any:
        await asyncio.Event().wait()

    monkeypatch.setattr(asyncio, "open_connection", never_connects)
    handler = AsyncSocketHandler("127.0.0.1", 9, timeout=0.01, retry=False)

    async with asyncio.timeout(5):
        with pytest.raises(
            TimeoutError,
            match=r"could not connect to 127\.0\.0\.1:9 within timeout=0\.01 s",
        ):
            await handler(ask)


# --- callback failures -------------------------------------------------------


async def test_server_hanging_up_is_retried_on_fresh_connections(
    start_server: Callable[..., Awaitable[LoopbackServer]],
) -> None:
    server = await start_server(hang_up)
    handler = AsyncSocketHandler(
        "127.0.0.1", server.port, retrier_params={"max_attempts": 3, **NO_WAIT}
    )

    async with asyncio.timeout(5):
        with pytest.raises(asyncio.IncompleteReadError):
            await handler(read_reply)

    await server.wait_all_closed()
    assert (server.accepted, server.open) == (3, 0)


async def test_callback_error_propagates_unchanged_after_closing(
    start_server: Callable[..., Awaitable[LoopbackServer]],
) -> None:
    server = await start_server(stay_silent)
    raised: list[Exception] = []

    async def fail(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raised.append(ValueError(f"bad reply {len(raised)}"))
        raise raised[-1]

    handler = AsyncSocketHandler(
        "127.0.0.1", server.port, retrier_params={"max_attempts": 2, **NO_WAIT}
    )

    async with asyncio.timeout(5):
        with pytest.raises(ValueError, match=r"bad reply 1") as excinfo:
            await handler(fail)

    assert excinfo.value is raised[-1]
    await server.wait_all_closed()
    assert (server.accepted, server.eof_seen) == (2, 2)


async def test_callback_succeeding_on_a_later_attempt(
    start_server: Callable[..., Awaitable[LoopbackServer]],
) -> None:
    server = await start_server(echo_line)
    attempts = 0

    async def flaky_ask(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bytes:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise OSError("garbled")
        return await ask(reader, writer)

    handler = AsyncSocketHandler("127.0.0.1", server.port, retrier_params=NO_WAIT)

    async with asyncio.timeout(5):
        assert await handler(flaky_ask) == b"status\n"

    await server.wait_all_closed()
    assert (server.accepted, server.open, server.eof_seen) == (2, 0, 2)


async def test_silent_server_times_out_and_connection_is_closed(
    start_server: Callable[..., Awaitable[LoopbackServer]],
) -> None:
    server = await start_server(stay_silent)
    handler = AsyncSocketHandler("127.0.0.1", server.port, timeout=0.05, retry=False)

    async with asyncio.timeout(5):
        with pytest.raises(
            TimeoutError,
            match=rf"could not run the request on 127\.0\.0\.1:{server.port} "
            r"within timeout=0\.05 s",
        ):
            await handler(ask)

    await server.wait_all_closed()
    assert (server.accepted, server.open, server.eof_seen) == (1, 0, 1)
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_callback_timeout_error_of_its_own_is_not_rewritten(
    start_server: Callable[..., Awaitable[LoopbackServer]],
) -> None:
    server = await start_server(stay_silent)
    own = TimeoutError("device reported a timeout")

    async def fail(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise own

    handler = AsyncSocketHandler("127.0.0.1", server.port, retry=False)

    async with asyncio.timeout(5):
        with pytest.raises(TimeoutError, match="device reported") as excinfo:
            await handler(fail)

    assert excinfo.value is own


async def test_all_attempts_failing_returns_none_when_told_not_to_raise(
    start_server: Callable[..., Awaitable[LoopbackServer]],
) -> None:
    server = await start_server(hang_up)
    params = {"max_attempts": 2, "raise_on_max_attempts": False, **NO_WAIT}
    handler = AsyncSocketHandler("127.0.0.1", server.port, retrier_params=params)

    async with asyncio.timeout(5):
        assert await handler(read_reply) is None

    await server.wait_all_closed()
    assert server.accepted == 2


# --- closing failures --------------------------------------------------------


async def failing_wait_closed() -> None:
    raise RuntimeError("close blew up")


@pytest.mark.parametrize("callback_fails", [False, True])
async def test_close_failure_is_logged_and_never_raised(
    start_server: Callable[..., Awaitable[LoopbackServer]],
    caplog: pytest.LogCaptureFixture,
    callback_fails: bool,
) -> None:
    server = await start_server(echo_line)

    async def sabotage(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bytes:
        writer.wait_closed = failing_wait_closed  # type: ignore[method-assign]
        reply = await ask(reader, writer)
        if callback_fails:
            raise LookupError("the real error")
        return reply

    handler = AsyncSocketHandler("127.0.0.1", server.port, retry=False)

    with caplog.at_level(logging.DEBUG, logger="lvmopstools.socket"):
        async with asyncio.timeout(5):
            if callback_fails:
                with pytest.raises(LookupError, match="the real error"):
                    await handler(sabotage)
            else:
                assert await handler(sabotage) == b"status\n"

    records = [r for r in caplog.records if r.name == "lvmopstools.socket"]
    assert [r.levelname for r in records] == ["DEBUG"]
    assert "closing the connection to 127.0.0.1" in records[0].getMessage()
    assert records[0].exc_info is not None
    assert str(records[0].exc_info[1]) == "close blew up"
    await server.wait_all_closed()
    assert server.eof_seen == 1


# --- validation --------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"host": ""}, r"host must be a non-empty string, got ''"),
        ({"host": None}, r"host must be a non-empty string, got None"),
        ({"port": 0}, r"port must be an integer from 1 to 65535, got 0"),
        ({"port": 65536}, r"port .* got 65536"),
        ({"port": "80"}, r"port .* got '80'"),
        ({"timeout": 0}, r"timeout must be a finite number of seconds > 0, got 0"),
        ({"timeout": -1.0}, r"timeout .* got -1\.0"),
        ({"timeout": float("inf")}, r"timeout .* got inf"),
        ({"retrier_params": []}, r"retrier_params must be a dict, got \[\]"),
        (
            {"retrier_params": {"attempts": 3}},
            r"retrier_params has unknown keys \['attempts'\]; accepted keys are",
        ),
        (
            {"retrier_params": {"max_attempts": 0}},
            r"retrier_params \{'max_attempts': 0\} are invalid: max_attempts must",
        ),
    ],
)
async def test_bad_parameters_raise_value_error(
    kwargs: dict[str, Any], match: str
) -> None:
    arguments: dict[str, Any] = {"host": "127.0.0.1", "port": 9, **kwargs}

    with pytest.raises(ValueError, match=match):
        AsyncSocketHandler(**arguments)


async def test_defaults_match_the_reference() -> None:
    first = AsyncSocketHandler("127.0.0.1", 9)
    second = AsyncSocketHandler("127.0.0.1", 9)

    assert (first.timeout, first.retry, first.retrier_params) == (5, True, {})
    assert first.retrier_params is not second.retrier_params
