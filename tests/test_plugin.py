"""Tests for the pytest plugin's loading, options and broker selection.

Each test runs a small pytest session through ``pytester`` with the rival
plugins that auto-load here (hypothesis, pytest-benchmark, Faker) disabled.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

QUIET = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:benchmark")


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*QUIET, *args)


ASYNC_TEST = """
import pytest
import pytest_asyncio


@pytest_asyncio.fixture
async def value():
    return 42


@pytest.mark.asyncio
async def test_async_fixture(value, pytestconfig):
    assert value == 42
    plugin = pytestconfig.pluginmanager.get_plugin("lvmopstools")
    assert plugin.__name__ == "lvmopstools.pytest_plugin"
"""


def test_dash_p_loads_the_plugin_without_autoload(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(ASYNC_TEST)

    result = run(pytester, "-p", "lvmopstools")

    result.assert_outcomes(passed=1)


def test_plugin_loads_twice_without_complaint(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(ASYNC_TEST)

    result = run(pytester, "-p", "lvmopstools", "-p", "lvmopstools")

    result.assert_outcomes(passed=1)


def test_plugin_respects_a_blocked_pytest_asyncio(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(
        """
        def test_asyncio_is_absent(pytestconfig):
            assert not pytestconfig.pluginmanager.has_plugin("asyncio")
        """
    )

    result = run(pytester, "-p", "lvmopstools", "-p", "no:asyncio")

    result.assert_outcomes(passed=1)


def test_options_and_markers_are_registered(pytester: pytest.Pytester) -> None:
    result = run(pytester, "-p", "lvmopstools", "--help")
    result.stdout.fnmatch_lines(["*--lvm-amqp-url=LVM_AMQP_URL*"])

    result = run(pytester, "-p", "lvmopstools", "--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.virtual_clock(**kwargs)*"])


URL_TEST = """
from lvmopstools.pytest_plugin import lvm_amqp_url


def test_url(pytestconfig):
    assert lvm_amqp_url(pytestconfig) == {expected!r}
"""


@pytest.mark.parametrize(
    ("option", "env", "ini", "expected"),
    [
        (None, None, None, None),
        (None, None, "amqp://ini/", "amqp://ini/"),
        (None, "amqp://env/", "amqp://ini/", "amqp://env/"),
        ("amqp://opt/", "amqp://env/", "amqp://ini/", "amqp://opt/"),
    ],
)
def test_amqp_url_precedence(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    option: str | None,
    env: str | None,
    ini: str | None,
    expected: str | None,
) -> None:
    monkeypatch.delenv("LVM_AMQP_URL", raising=False)
    if env:
        monkeypatch.setenv("LVM_AMQP_URL", env)
    if ini:
        pytester.makeini(f"[pytest]\nlvm_amqp_url = {ini}\n")
    pytester.makepyfile(URL_TEST.format(expected=expected))

    args = ["-p", "lvmopstools"] + ([f"--lvm-amqp-url={option}"] if option else [])
    result = run(pytester, *args)

    result.assert_outcomes(passed=1)


def test_rabbitmq_url_uses_a_configured_broker(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_url(rabbitmq_url):
            assert rabbitmq_url == "amqp://guest:guest@127.0.0.1:1/"
        """
    )

    result = run(
        pytester, "-p", "lvmopstools", "--lvm-amqp-url=amqp://guest:guest@127.0.0.1:1/"
    )

    result.assert_outcomes(passed=1)


MISSING_RABBITMQ = """
import pytest

import lvmopstools.testing.amqp.rabbitmq as rabbitmq


@pytest.fixture(autouse=True, scope="session")
def no_rabbitmq():
    rabbitmq.SERVER_CANDIDATES = ("/nonexistent/rabbitmq-server",)


def test_needs_rabbitmq(rabbitmq_url):
    pass
"""


def test_missing_rabbitmq_skips_with_install_hint(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LVM_REQUIRE_RABBITMQ", raising=False)
    monkeypatch.delenv("LVM_AMQP_URL", raising=False)
    pytester.makepyfile(MISSING_RABBITMQ)

    result = run(pytester, "-p", "lvmopstools", "-rs")

    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*apt-get install -y rabbitmq-server*"])


def test_missing_rabbitmq_fails_when_required(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LVM_REQUIRE_RABBITMQ", "1")
    monkeypatch.delenv("LVM_AMQP_URL", raising=False)
    pytester.makepyfile(MISSING_RABBITMQ)

    result = run(pytester, "-p", "lvmopstools")

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*LVM_REQUIRE_RABBITMQ is set but*"])
