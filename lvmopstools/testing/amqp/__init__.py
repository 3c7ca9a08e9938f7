"""An in-process AMQP 0-9-1 broker for tests, and a throwaway real RabbitMQ.

- :class:`MockBroker` (:mod:`.server`): a real AMQP server on loopback that
  unmodified aio_pika, aiormq and clu clients use, records every publish, and
  fails on demand.
- :mod:`.faults`: the faults it can inject, as plain data.
- :mod:`.records`: the message log (:class:`MessageLog` of
  :class:`PublishedMessage`) and clu reply decoding (:class:`CluReply`).
- :class:`RabbitMQNode` (:mod:`.rabbitmq`, imported on first use): a real
  RabbitMQ node in a temporary folder, for checking the mock against it.
"""

from __future__ import annotations

import importlib
from typing import Any

from .faults import (
    CloseChannel,
    DelayMessages,
    DropConnections,
    DropMessages,
    DuplicateMessages,
    Fault,
    FaultHandle,
    NackConfirms,
    RefuseConnections,
    RestartBroker,
    WithholdConfirms,
    fault_from_dict,
)
from .records import CluReply, MessageLog, PublishedMessage
from .server import MockBroker

__all__ = [
    "CloseChannel",
    "CluReply",
    "DelayMessages",
    "DropConnections",
    "DropMessages",
    "DuplicateMessages",
    "Fault",
    "FaultHandle",
    "MessageLog",
    "MockBroker",
    "NackConfirms",
    "PublishedMessage",
    "RabbitMQNode",
    "RefuseConnections",
    "RestartBroker",
    "WithholdConfirms",
    "fault_from_dict",
]


def __getattr__(name: str) -> Any:
    if name == "RabbitMQNode":
        return importlib.import_module(".rabbitmq", __name__).RabbitMQNode
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
