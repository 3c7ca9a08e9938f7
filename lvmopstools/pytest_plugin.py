"""pytest glue for the lvmopstools fault-injection toolkit.

Registered under the ``pytest11`` entry point ``lvmopstools``, so a downstream
repository enables it with ``pytest -p lvmopstools`` (or gets it automatically
when plugin auto-loading is on).

The plugin is inert until a test asks for something: it adds options, markers
and fixtures, and patches nothing and starts nothing for a test that uses none
of them. The toolkit itself is imported inside the fixtures, so loading the
plugin costs one small import.
"""

from __future__ import annotations

import inspect
import os
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__: list[str] = []

AMQP_URL_ENV = "LVM_AMQP_URL"
#: When set (CI sets it), a missing RabbitMQ fails the real-broker tests
#: instead of skipping them.
REQUIRE_RABBITMQ_ENV = "LVM_REQUIRE_RABBITMQ"


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    """Load pytest-asyncio, which the fixtures need, if nobody loaded it.

    Under ``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1``, ``pytest -p lvmopstools`` would
    otherwise run without it. An explicit ``-p no:asyncio`` is respected.
    """
    if pluginmanager.is_blocked("asyncio") or pluginmanager.has_plugin("asyncio"):
        return

    import pytest_asyncio.plugin

    if not pluginmanager.is_registered(pytest_asyncio.plugin):
        pluginmanager.register(pytest_asyncio.plugin, "asyncio")


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add the ``--lvm-*`` options and ini settings."""
    group = parser.getgroup("lvmopstools", "lvmopstools fault-injection toolkit")
    group.addoption(
        "--lvm-amqp-url",
        dest="lvm_amqp_url",
        default=None,
        help=(
            "Run broker-facing tests against this AMQP URL (a real RabbitMQ) "
            f"instead of the in-process mock broker. Also read from ${AMQP_URL_ENV} "
            "and the lvm_amqp_url ini setting."
        ),
    )
    parser.addini(
        "lvm_amqp_url",
        "AMQP URL of a real broker for broker-facing tests (see --lvm-amqp-url).",
        default="",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers."""
    config.addinivalue_line(
        "markers",
        "virtual_clock(**kwargs): run the test and its fixtures in virtual time "
        "(keyword arguments go to lvmopstools.testing.VirtualClock)",
    )


def lvm_amqp_url(config: pytest.Config) -> str | None:
    """Return the real broker URL configured for this run, or None for the mock.

    The command-line option wins over the environment variable, which wins over
    the ini setting.
    """
    url: str | None = config.getoption("lvm_amqp_url")
    if url:
        return url

    url = os.environ.get(AMQP_URL_ENV) or str(config.getini("lvm_amqp_url"))
    return url or None


# --- virtual clock -------------------------------------------------------------

import pytest_asyncio  # noqa: E402 (kept in this section, which owns it)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from lvmopstools.testing.clock import VirtualClock

VIRTUAL_CLOCK_MARKER = "virtual_clock"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Make tests marked ``virtual_clock`` request the fixture first.

    The fixture then starts before every other function-scoped fixture of the
    test, so those run in virtual time too. Unmarked tests are not touched.
    """
    for item in items:
        if item.get_closest_marker(VIRTUAL_CLOCK_MARKER) is None:
            continue

        names = getattr(item, "fixturenames", None)
        if not isinstance(names, list):
            continue
        if VIRTUAL_CLOCK_MARKER in names:
            names.remove(VIRTUAL_CLOCK_MARKER)
        names.insert(0, VIRTUAL_CLOCK_MARKER)


def _check_the_clock_reaches_the_test(request: pytest.FixtureRequest) -> None:
    """Raise UsageError when the test would not run on the clock's loop.

    The clock runs on the function-scoped event loop of pytest-asyncio; a
    regular test function, or a test on a loop of a wider scope, would run
    in real time with the time functions patched.
    """
    node = request.node
    test = getattr(node, "obj", None)
    if test is not None and not inspect.iscoroutinefunction(test):
        msg = (
            f"{node.nodeid} uses the virtual clock but is a regular function, "
            "which runs in real time outside the clock's event loop; make it an "
            "'async def' test (with @pytest.mark.asyncio in strict mode)."
        )
        raise pytest.UsageError(msg)

    asyncio_marker = node.get_closest_marker("asyncio")
    scope = asyncio_marker.kwargs.get("loop_scope") if asyncio_marker else None
    if scope is None:
        try:
            scope = request.config.getini("asyncio_default_test_loop_scope")
        except ValueError:  # pytest-asyncio before 0.24 has no such setting.
            scope = None
    if scope not in (None, "", "function"):
        msg = (
            f"{node.nodeid} runs on a {scope!r}-scoped event loop, but the "
            "virtual clock runs on the function-scoped one; use "
            "@pytest.mark.asyncio(loop_scope='function') for tests in virtual "
            "time, or a VirtualClock of your own inside the test."
        )
        raise pytest.UsageError(msg)


@pytest_asyncio.fixture(loop_scope="function")
async def virtual_clock(request: pytest.FixtureRequest) -> AsyncIterator[VirtualClock]:
    """An active :class:`~lvmopstools.testing.VirtualClock` for the test.

    The clock runs on the test's event loop from this fixture's setup to its
    teardown, so the test body and the function-scoped async fixtures set up
    after it run in virtual time. The keyword arguments of a
    ``@pytest.mark.virtual_clock(...)`` marker go to the clock. The clock is
    stopped and every patched function restored at teardown, even when the
    test failed.
    """
    from lvmopstools.testing.clock import VirtualClock

    _check_the_clock_reaches_the_test(request)
    marker = request.node.get_closest_marker(VIRTUAL_CLOCK_MARKER)
    kwargs = dict(marker.kwargs) if marker is not None else {}
    if marker is not None and marker.args:
        msg = (
            f"@pytest.mark.virtual_clock takes keyword arguments only (those of "
            f"VirtualClock), got positional {marker.args!r}."
        )
        raise pytest.UsageError(msg)

    async with VirtualClock(**kwargs) as clock:
        yield clock


# --- fake devices and fault proxies ---------------------------------------------

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from typing import Any

    from lvmopstools.testing.tcp import FaultProxy, FlakyServer
    from lvmopstools.testing.tcp._endpoint import Endpoint


async def _close_all(started: list[Endpoint]) -> None:
    """Close every endpoint, last started first; raise their errors after.

    One error is raised as it is; several together in an ExceptionGroup.
    """
    errors: list[Exception] = []
    for endpoint in reversed(started):
        try:
            await endpoint.close()
        except Exception as exc:
            errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        msg = f"closing {len(errors)} of {len(started)} endpoints failed"
        raise ExceptionGroup(msg, errors)


@pytest_asyncio.fixture
async def flaky_server() -> AsyncIterator[Callable[..., Awaitable[FlakyServer]]]:
    """Start fake devices: ``device = await flaky_server(script, **options)``.

    A factory: each call starts a :class:`~lvmopstools.testing.tcp.FlakyServer`
    (a real TCP server on 127.0.0.1, on a free port) with the arguments given
    and returns it open; ``device.host`` and ``device.port`` say where to
    connect. A test may start several. At teardown, also when the test
    failed, every server started is closed, last first: its connections,
    timers and tasks, and its address registration with the virtual clock. An
    error raised in the background (a failing reply function) is raised then.
    Under ``@pytest.mark.virtual_clock`` the servers run in virtual time.
    """
    from lvmopstools.testing.tcp import FlakyServer

    started: list[Endpoint] = []

    async def start(*args: Any, **kwargs: Any) -> FlakyServer:
        server = FlakyServer(*args, **kwargs)
        await server.open()
        started.append(server)
        return server

    try:
        yield start
    finally:
        await _close_all(started)


@pytest_asyncio.fixture
async def fault_proxy() -> AsyncIterator[Callable[..., Awaitable[FaultProxy]]]:
    """Start fault proxies: ``proxy = await fault_proxy(host, port, **options)``.

    A factory: each call starts a :class:`~lvmopstools.testing.tcp.FaultProxy`
    on 127.0.0.1 (a free port) in front of the real server at ``host:port``
    and returns it open; point the client at ``proxy.host`` and
    ``proxy.port``, and add faults with ``proxy.add_fault(...)`` or
    ``with proxy.fault(...)``. A test may start several. At teardown, also
    when the test failed, every proxy started is closed, last first: client
    and target connections, timers, tasks and its clock registration. The
    target server is left alone.
    """
    from lvmopstools.testing.tcp import FaultProxy

    started: list[Endpoint] = []

    async def start(*args: Any, **kwargs: Any) -> FaultProxy:
        proxy = FaultProxy(*args, **kwargs)
        await proxy.open()
        started.append(proxy)
        return proxy

    try:
        yield start
    finally:
        await _close_all(started)


# --- AMQP brokers ---------------------------------------------------------------


@pytest.fixture(scope="session")
def rabbitmq_url(pytestconfig: pytest.Config) -> Iterator[str]:
    """The URL of a real RabbitMQ broker, for the real half of the contract tests.

    When ``--lvm-amqp-url`` (or ``$LVM_AMQP_URL``, or the ``lvm_amqp_url`` ini
    setting) names a broker, that broker is used as it is. Otherwise a
    throwaway node of Debian's ``rabbitmq-server`` is started once for the
    session (about ten seconds) on free loopback ports in a temporary folder,
    and stopped at the end of the session. Tests that use this fixture are
    skipped, with the command that installs RabbitMQ, when it is not installed.
    """
    configured = lvm_amqp_url(pytestconfig)
    if configured:
        yield configured
        return

    from lvmopstools.testing.amqp.rabbitmq import (
        INSTALL_HINT,
        RabbitMQNode,
        find_rabbitmq_server,
    )

    if find_rabbitmq_server() is None:
        if os.environ.get(REQUIRE_RABBITMQ_ENV):
            pytest.fail(f"${REQUIRE_RABBITMQ_ENV} is set but {INSTALL_HINT}")
        pytest.skip(INSTALL_HINT)

    with RabbitMQNode() as node:
        yield node.url


# The AMQP section's own imports (pytest_asyncio comes from the clock section).
if TYPE_CHECKING:
    from lvmopstools.testing.amqp import MockBroker
    from lvmopstools.testing.amqp.external import ExternalBroker


@pytest_asyncio.fixture
async def mock_amqp_broker() -> AsyncIterator[MockBroker]:
    """A started in-process :class:`~lvmopstools.testing.amqp.MockBroker`.

    Always the mock, even under ``--lvm-amqp-url``: use it for tests that
    inject faults or read the message log. It listens on 127.0.0.1 on a free
    port; on teardown (also when the test failed) it closes every client
    connection, its listening socket and its timers.
    """
    from lvmopstools.testing.amqp import MockBroker

    async with MockBroker() as broker:
        yield broker


@pytest_asyncio.fixture
async def amqp_broker(
    request: pytest.FixtureRequest,
) -> AsyncIterator[MockBroker | ExternalBroker]:
    """An AMQP broker for a test: the in-process mock, or a real RabbitMQ.

    By default this is a started :class:`~lvmopstools.testing.amqp.MockBroker`
    (see ``mock_amqp_broker``). When ``--lvm-amqp-url``, ``$LVM_AMQP_URL`` or
    the ``lvm_amqp_url`` ini setting names a real broker, it is an
    :class:`~lvmopstools.testing.amqp.external.ExternalBroker` with the same
    ``url`` and ``is_mock`` attributes, whose mock-only features (faults,
    message log) raise NotImplementedError naming the feature. The real
    broker is used as it is: it is not started, stopped or cleaned.
    """
    url = lvm_amqp_url(request.config)
    if url:
        from lvmopstools.testing.amqp.external import ExternalBroker

        yield ExternalBroker(url)
        return

    from lvmopstools.testing.amqp import MockBroker

    async with MockBroker() as broker:
        yield broker
