"""Tests of the flaky_server and fault_proxy fixtures of lvmopstools.pytest_plugin."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

# Rival plugins stay out; the toolkit's plugin and pytest-asyncio are loaded.
ARGS = (
    "-p",
    "no:cacheprovider",
    "-p",
    "no:hypothesispytest",
    "-p",
    "no:faker",
    "-p",
    "no:benchmark",
    "-p",
    "no:randomly",
    "-p",
    "lvmopstools",
    "-p",
    "asyncio",
    "-o",
    "asyncio_mode=strict",
    "-o",
    "asyncio_default_fixture_loop_scope=function",
)

TESTS = """
import asyncio
import socket

import pytest

from lvmopstools.socket import AsyncSocketHandler
from lvmopstools.testing.tcp import Blackhole, Latency

started = []


def refused(port):
    with socket.socket() as sock:
        try:
            sock.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
    return False


async def ping(reader, writer):
    writer.write(b"ping\\n")
    return await reader.readline()


@pytest.mark.asyncio
@pytest.mark.virtual_clock()
async def test_several_servers_and_a_proxy(flaky_server, fault_proxy, virtual_clock):
    first = await flaky_server({b"ping": b"one\\n"})
    second = await flaky_server({b"ping": b"two\\n"}, faults=[Latency(3)])
    proxy = await fault_proxy(first.host, first.port)
    started.extend([first, second, proxy])
    assert first.port != second.port

    assert await AsyncSocketHandler(proxy.host, proxy.port)(ping) == b"one\\n"
    assert await AsyncSocketHandler(second.host, second.port)(ping) == b"two\\n"
    assert virtual_clock.time() == 3


@pytest.mark.asyncio
async def test_failing_test_with_open_connections(flaky_server, fault_proxy):
    device = await flaky_server(faults=[Blackhole()])
    proxy = await fault_proxy(device.host, device.port)
    started.extend([device, proxy])
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"anything\\n")
    await asyncio.sleep(0)
    raise AssertionError("failing on purpose")


def test_everything_was_closed():
    assert len(started) == 5
    for endpoint in started:
        assert endpoint.connections == 0
        assert not endpoint.listening
        assert refused(endpoint.port)
    # Closed in reverse order of starting, within each test.
    closed = [endpoint.events("closed")[-1].time for endpoint in started[3:]]
    assert closed[0] > closed[1]
"""


def test_factories_close_what_they_started(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_devices=TESTS)

    result = pytester.runpytest(*ARGS, "-q")

    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["E * AssertionError: failing on purpose"])


def test_background_error_fails_the_teardown(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import asyncio

        import pytest

        def broken(request):
            raise ZeroDivisionError("bad device model")

        @pytest.mark.asyncio
        async def test_device(flaky_server):
            device = await flaky_server(handler=broken)
            reader, writer = await asyncio.open_connection(device.host, device.port)
            writer.write(b"x\\n")
            assert await reader.read() == b""
            writer.close()
        """
    )

    result = pytester.runpytest(*ARGS, "-q")

    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*ZeroDivisionError: bad device model*"])


def test_several_background_errors_are_grouped(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import asyncio

        import pytest

        def broken(request):
            raise ZeroDivisionError(f"bad model {request.data!r}")

        @pytest.mark.asyncio
        async def test_devices(flaky_server):
            for name in (b"one", b"two"):
                device = await flaky_server(handler=broken)
                reader, writer = await asyncio.open_connection(device.host, device.port)
                writer.write(name + b"\\n")
                assert await reader.read() == b""
                writer.close()
        """
    )

    result = pytester.runpytest(*ARGS, "-q")

    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ExceptionGroup: closing 2 of 2 endpoints failed (2 sub-exceptions)",
            "*ZeroDivisionError: bad model b'two'",
            "*ZeroDivisionError: bad model b'one'",
        ],
        consecutive=False,
    )


def test_fixtures_are_documented(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing(): pass")

    result = pytester.runpytest(*ARGS, "--fixtures")

    result.stdout.fnmatch_lines(
        [
            "flaky_server*",
            "*Start fake devices: ``device = await flaky_server(script, *",
            "fault_proxy*",
            "*Start fault proxies: ``proxy = await fault_proxy(host, port, *",
        ],
        consecutive=False,
    )
