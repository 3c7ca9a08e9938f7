"""Tests for the plugin's AMQP fixtures: ``amqp_broker`` and ``mock_amqp_broker``.

Each test runs a small pytest session through ``pytester`` (rival plugins
that auto-load here disabled), so the fixtures are seen as a downstream
repository sees them.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

QUIET = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:benchmark")

BROKER_TESTS = """
import aio_pika
import pytest

from lvmopstools.testing.amqp import MockBroker
from lvmopstools.testing.amqp.external import ExternalBroker

seen = {}


@pytest.mark.asyncio
async def test_amqp_broker_carries_messages(amqp_broker):
    seen["broker"] = amqp_broker
    connection = await aio_pika.connect(amqp_broker.url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await channel.default_exchange.publish(aio_pika.Message(b"x"), queue.name)
        message = await queue.get(no_ack=True)
    assert message.body == b"x"
    assert isinstance(amqp_broker, MockBroker if EXPECT_MOCK else ExternalBroker)
    assert amqp_broker.is_mock is EXPECT_MOCK


@pytest.mark.asyncio
async def test_mock_amqp_broker_is_always_the_mock(mock_amqp_broker):
    seen["mock"] = mock_amqp_broker
    assert isinstance(mock_amqp_broker, MockBroker)
    assert mock_amqp_broker.is_running


def test_brokers_were_stopped():
    for broker in seen.values():
        if isinstance(broker, MockBroker):
            assert not broker.is_running
            assert broker.leftovers() == []
    assert set(seen) == {"broker", "mock"}
"""


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*QUIET, "-p", "lvmopstools", *args)


def test_amqp_broker_is_the_mock_by_default(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LVM_AMQP_URL", raising=False)
    pytester.makepyfile("EXPECT_MOCK = True\n" + BROKER_TESTS)

    result = run(pytester)

    result.assert_outcomes(passed=3)


def test_amqp_broker_follows_lvm_amqp_url(
    pytester: pytest.Pytester, rabbitmq_url: str
) -> None:
    pytester.makepyfile("EXPECT_MOCK = False\n" + BROKER_TESTS)

    result = run(pytester, f"--lvm-amqp-url={rabbitmq_url}")

    result.assert_outcomes(passed=3)


def test_mock_only_features_fail_loudly_on_a_real_broker(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LVM_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/")
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.asyncio
        async def test_needs_the_log(amqp_broker):
            amqp_broker.messages()
        """
    )

    result = run(pytester)

    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*NotImplementedError: amqp_broker.messages needs the in-process MockBroker*"]
    )
