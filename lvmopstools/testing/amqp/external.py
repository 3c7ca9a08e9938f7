"""A stand-in for :class:`MockBroker` that points at a real AMQP broker.

When a test run is pointed at a real RabbitMQ (``--lvm-amqp-url``), the
``amqp_broker`` fixture yields an :class:`ExternalBroker` instead of a
:class:`~lvmopstools.testing.amqp.MockBroker`: it has the same ``url`` and
``is_mock`` attributes, so connection code runs unchanged, and every
mock-only feature (faults, the message log) raises :class:`NotImplementedError`
naming the feature, so a test that needs the mock says so instead of passing
vacuously.

It does not manage the real broker: it neither starts nor stops it, and does
not clean up the exchanges and queues that tests declare there.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

__all__ = ["ExternalBroker"]

#: The MockBroker features that only the mock can provide.
MOCK_ONLY = frozenset(
    {
        "inject",
        "clear_faults",
        "restart",
        "messages",
        "replies",
        "clear_records",
        "wait_for_message",
        "wait_for_reply",
        "connections",
        "wait_connections",
        "wait_running",
        "leftovers",
    }
)


class ExternalBroker:
    """A real AMQP broker, seen through the :class:`MockBroker` interface.

    Parameters
    ----------
    url
        The ``amqp://`` URL of the broker.

    Raises
    ------
    ValueError
        If ``url`` is not an ``amqp://`` or ``amqps://`` URL.
    """

    is_mock = False

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            msg = (
                f"the real broker URL must look like amqp://user:password@host:port/, "
                f"got {url!r}; fix --lvm-amqp-url, $LVM_AMQP_URL or lvm_amqp_url"
            )
            raise ValueError(msg)
        self.url = url

    def __repr__(self) -> str:
        return f"ExternalBroker({urlsplit(self.url).hostname!r})"

    def __getattr__(self, name: str) -> Any:
        if name in MOCK_ONLY:
            msg = (
                f"amqp_broker.{name} needs the in-process MockBroker, but this run "
                f"uses the real broker at {self.url!r} (--lvm-amqp-url); mark the "
                "test to run only on the mock, or use the mock_amqp_broker fixture"
            )
            raise NotImplementedError(msg)
        msg = f"{type(self).__name__!r} object has no attribute {name!r}"
        raise AttributeError(msg)
