"""The fault-injection toolkit: fakes and faults for testing LVM actors.

Everything here works without pytest; :mod:`lvmopstools.pytest_plugin` only
adds fixtures around it. One concept per module:

- :mod:`lvmopstools.testing.clock`: :class:`VirtualClock`, one virtual time for
  the event loop, the wall clock and blocking sleeps.
- :mod:`lvmopstools.testing.tcp`: :class:`FlakyServer` (a fake device) and
  :class:`FaultProxy` (faults in front of a real server).
- :mod:`lvmopstools.testing.amqp`: :class:`MockBroker`, an in-process AMQP
  0-9-1 broker, and :class:`RabbitMQNode`, a throwaway real RabbitMQ.

The names below are imported on first use, so that importing one part of the
toolkit does not import all of it.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "FaultProxy",
    "FlakyServer",
    "MockBroker",
    "RabbitMQNode",
    "VirtualClock",
]

_WHERE = {
    "VirtualClock": "lvmopstools.testing.clock",
    "FlakyServer": "lvmopstools.testing.tcp",
    "FaultProxy": "lvmopstools.testing.tcp",
    "MockBroker": "lvmopstools.testing.amqp",
    "RabbitMQNode": "lvmopstools.testing.amqp.rabbitmq",
}


def __getattr__(name: str) -> Any:
    try:
        module = _WHERE[name]
    except KeyError:
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg) from None

    return getattr(importlib.import_module(module), name)
