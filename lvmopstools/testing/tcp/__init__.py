"""Fake devices and fault proxies on loopback TCP.

- :class:`FlakyServer`: a real TCP server on 127.0.0.1 that stands in for a
  device, answering from a script or a handler.
- :class:`FaultProxy`: a TCP proxy on 127.0.0.1 in front of any real server.

Both take the faults of :mod:`lvmopstools.testing.tcp.faults` (which say what
goes wrong) with the triggers of :mod:`lvmopstools.testing.tcp.triggers` (which
say when), record what happens in an event log
(:mod:`lvmopstools.testing.tcp.records`), run their delays on the virtual
clock when one is active, and close every socket, timer and task they opened
on exit.
"""

from __future__ import annotations

from lvmopstools.testing.tcp._listener import PortTakenError
from lvmopstools.testing.tcp.faults import (
    AfterN,
    Always,
    Bandwidth,
    Blackhole,
    CloseAfterBytes,
    CloseOnAccept,
    CorruptReply,
    EveryKth,
    Fault,
    FirstN,
    Latency,
    Matches,
    PartialReply,
    Probability,
    RefuseConnections,
    Slice,
    SlowClose,
    StopAnswering,
    TimeWindow,
    Trigger,
    WrongReply,
)
from lvmopstools.testing.tcp.proxy import FaultProxy
from lvmopstools.testing.tcp.records import Event, EventLog
from lvmopstools.testing.tcp.server import (
    FakeReply,
    FlakyServer,
    GarbageReply,
    Request,
)

__all__ = [
    "AfterN",
    "Always",
    "Bandwidth",
    "Blackhole",
    "CloseAfterBytes",
    "CloseOnAccept",
    "CorruptReply",
    "Event",
    "EventLog",
    "EveryKth",
    "FakeReply",
    "Fault",
    "FaultProxy",
    "FirstN",
    "FlakyServer",
    "GarbageReply",
    "Latency",
    "Matches",
    "PartialReply",
    "PortTakenError",
    "Probability",
    "RefuseConnections",
    "Request",
    "Slice",
    "SlowClose",
    "StopAnswering",
    "TimeWindow",
    "Trigger",
    "WrongReply",
]
