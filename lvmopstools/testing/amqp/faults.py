"""Faults the mock AMQP broker can inject, described as plain data.

Each fault is a frozen dataclass with a stable ``kind`` name and plain-typed
fields, so a scenario file can describe it (:func:`fault_from_dict` builds one
from a mapping such as ``{"kind": "drop_messages", "pattern": "reply.#"}``).
:meth:`MockBroker.inject <lvmopstools.testing.amqp.MockBroker.inject>` applies
it.

Two families:

- actions happen once, when injected: :class:`RestartBroker`,
  :class:`DropConnections`, :class:`CloseChannel`, :class:`RefuseConnections`
  (which ends by itself after its duration);
- rules stay in force until removed or until they have acted ``count``
  times: :class:`DelayMessages`, :class:`DropMessages`,
  :class:`DuplicateMessages`, :class:`WithholdConfirms`, :class:`NackConfirms`.

Message rules match a message by its routing key with a topic pattern
(``*`` one word, ``#`` any number of words) and, optionally, by exchange.
At most one rule acts on a message; when several match, the winner is the
first in this order: :class:`NackConfirms`, :class:`DropMessages`,
:class:`DelayMessages`, :class:`WithholdConfirms`, :class:`DuplicateMessages`,
and among rules of the same kind the one added first. Only the winner counts
the message against its ``count`` and is named in the message's record; the
others keep their counts for the next message.

What they do not simulate: network partitions that leave both ends believing
the connection is up (the broker's sockets are closed or reset, never frozen),
flow control (``connection.blocked``), and disk or memory alarms.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import MAX_REPLY_TEXT
from .model import topic_matches

__all__ = [
    "CloseChannel",
    "DelayMessages",
    "DropConnections",
    "DropMessages",
    "DuplicateMessages",
    "Fault",
    "FaultHandle",
    "MessageRule",
    "MessageRules",
    "NackConfirms",
    "RefuseConnections",
    "RestartBroker",
    "WithholdConfirms",
    "fault_from_dict",
]


def _check_count(count: int | None) -> None:
    if count is not None and (
        not isinstance(count, int) or isinstance(count, bool) or count < 1
    ):
        msg = f"count must be a positive integer or None (no limit), got {count!r}"
        raise ValueError(msg)


def _check_seconds(name: str, value: float) -> None:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        msg = f"{name} must be a finite number of seconds >= 0, got {value!r}"
        raise ValueError(msg)


@dataclass(frozen=True)
class Fault:
    """Base class of every broker fault."""

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """Return the fault as a plain mapping, ``kind`` included."""
        return {"kind": self.kind, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class RestartBroker(Fault):
    """Stop the broker, wait, and start it again on the same port.

    Every connection is dropped and all queues and non-predeclared exchanges
    are lost, as with a RabbitMQ node restarted without persistence; clients
    using ``connect_robust`` reconnect and declare their topology again.

    Parameters
    ----------
    downtime
        Seconds (loop time: virtual under a clock) during which the port
        refuses connections.
    """

    kind: ClassVar[str] = "restart"
    downtime: float = 0.0

    def __post_init__(self) -> None:
        _check_seconds("downtime", self.downtime)


@dataclass(frozen=True)
class DropConnections(Fault):
    """Drop client connections.

    Parameters
    ----------
    count
        How many connections to drop, oldest first; None drops all.
    mode
        ``"reset"`` aborts the socket (the client sees a reset, as when a
        node dies); ``"close"`` sends ``connection.close`` 320
        CONNECTION_FORCED first, as RabbitMQ does when an operator closes a
        connection.
    """

    kind: ClassVar[str] = "drop_connections"
    count: int | None = None
    mode: str = "reset"

    def __post_init__(self) -> None:
        _check_count(self.count)
        if self.mode not in ("reset", "close"):
            msg = f"mode must be 'reset' or 'close', got {self.mode!r}"
            raise ValueError(msg)


@dataclass(frozen=True)
class RefuseConnections(Fault):
    """Stop accepting connections for a while; open connections carry on.

    Parameters
    ----------
    duration
        Seconds (loop time) during which new connections are refused.
    """

    kind: ClassVar[str] = "refuse_connections"
    duration: float = 1.0

    def __post_init__(self) -> None:
        _check_seconds("duration", self.duration)


@dataclass(frozen=True)
class CloseChannel(Fault):
    """Close channels with an error, as the broker does on a channel exception.

    Parameters
    ----------
    code
        The reply code sent in ``channel.close`` (for example 406 or 404).
    text
        The reply text: a string of at most 255 bytes in UTF-8, the limit of
        an AMQP short string.
    queue
        Close only the channels consuming from this queue; None closes every
        open channel.
    """

    kind: ClassVar[str] = "close_channel"
    code: int = 406
    text: str = "PRECONDITION_FAILED - closed by a fault"
    queue: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.code, int) or not 200 <= self.code <= 599:
            msg = f"code must be an AMQP reply code (200-599), got {self.code!r}"
            raise ValueError(msg)
        if not isinstance(self.text, str):
            msg = f"text must be a string, got {self.text!r}"
            raise ValueError(msg)
        size = len(self.text.encode())
        if size > MAX_REPLY_TEXT:
            msg = (
                f"text must fit an AMQP reply text ({MAX_REPLY_TEXT} bytes in "
                f"UTF-8), got {size} bytes: {self.text[:40]!r}...; shorten it"
            )
            raise ValueError(msg)


@dataclass(frozen=True)
class MessageRule(Fault):
    """Base of the faults that act on published messages.

    Parameters
    ----------
    pattern
        A topic pattern matched against the routing key (``#`` matches all).
    exchange
        Only messages published to this exchange; None matches any.
    count
        Act on this many messages, then stop; None acts until removed.
    """

    pattern: str = "#"
    exchange: str | None = None
    count: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str):
            msg = f"pattern must be a topic pattern string, got {self.pattern!r}"
            raise ValueError(msg)
        _check_count(self.count)


@dataclass(frozen=True)
class DelayMessages(MessageRule):
    """Route matching messages only after a delay (loop time).

    Publisher confirms follow the routing, so they are delayed too.
    """

    kind: ClassVar[str] = "delay_messages"
    delay: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_seconds("delay", self.delay)


@dataclass(frozen=True)
class DropMessages(MessageRule):
    """Accept matching messages (and confirm them) but route them nowhere."""

    kind: ClassVar[str] = "drop_messages"


@dataclass(frozen=True)
class DuplicateMessages(MessageRule):
    """Route matching messages ``1 + copies`` times."""

    kind: ClassVar[str] = "duplicate_messages"
    copies: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if (
            not isinstance(self.copies, int)
            or isinstance(self.copies, bool)
            or self.copies < 1
        ):
            msg = f"copies must be a positive integer, got {self.copies!r}"
            raise ValueError(msg)


@dataclass(frozen=True)
class WithholdConfirms(MessageRule):
    """Route matching messages but never confirm them (publisher confirms)."""

    kind: ClassVar[str] = "withhold_confirms"


@dataclass(frozen=True)
class NackConfirms(MessageRule):
    """Answer matching messages with ``basic.nack`` instead of ``basic.ack``.

    The message is not routed, as when RabbitMQ fails to enqueue it.
    """

    kind: ClassVar[str] = "nack_confirms"


@dataclass(eq=False)
class FaultHandle:
    """A message rule in force on a broker.

    Parameters
    ----------
    fault
        The rule.
    hits
        How many messages it has acted on.
    """

    fault: MessageRule
    hits: int = 0
    active: bool = True
    _rules: list[FaultHandle] = field(default_factory=list, repr=False)

    def remove(self) -> None:
        """Stop the rule (idempotent)."""
        self.active = False
        if self in self._rules:
            self._rules.remove(self)


class MessageRules:
    """The message rules in force on a broker, in the order they were added.

    One rule acts on each message; :meth:`winner` picks it (see
    :data:`PRECEDENCE`).
    """

    def __init__(self) -> None:
        self._handles: list[FaultHandle] = []

    def __bool__(self) -> bool:
        return bool(self._handles)

    def add(self, rule: MessageRule) -> FaultHandle:
        """Put a rule in force; return its handle."""
        handle = FaultHandle(rule, _rules=self._handles)
        self._handles.append(handle)
        return handle

    def clear(self) -> None:
        """Remove every rule."""
        for handle in list(self._handles):
            handle.remove()

    def winner(self, exchange: str, routing_key: str) -> MessageRule | None:
        """Return the rule that acts on a message, counting the hit on it alone.

        When several rules match, the winner is the first by kind (see
        :data:`PRECEDENCE`), then the one added first. A rule whose ``count``
        is used up by this hit is removed.
        """
        best: FaultHandle | None = None
        for handle in self._handles:
            rule = handle.fault
            if rule.exchange is not None and rule.exchange != exchange:
                continue
            if not topic_matches(rule.pattern, routing_key):
                continue
            if best is None or _rank(rule) < _rank(best.fault):
                best = handle

        if best is None:
            return None
        best.hits += 1
        if best.fault.count is not None and best.hits >= best.fault.count:
            best.remove()
        return best.fault


#: The order in which message rules win when several match one message: the
#: ones that keep a message from its queues first.
PRECEDENCE: tuple[type[MessageRule], ...] = (
    NackConfirms,
    DropMessages,
    DelayMessages,
    WithholdConfirms,
    DuplicateMessages,
)


def _rank(rule: MessageRule) -> int:
    kind = type(rule)
    for index, cls in enumerate(PRECEDENCE):
        if issubclass(kind, cls):
            return index
    return len(PRECEDENCE)


_KINDS: dict[str, type[Fault]] = {
    cls.kind: cls
    for cls in (
        RestartBroker,
        DropConnections,
        RefuseConnections,
        CloseChannel,
        DelayMessages,
        DropMessages,
        DuplicateMessages,
        WithholdConfirms,
        NackConfirms,
    )
}


def fault_from_dict(data: dict[str, Any]) -> Fault:
    """Build a fault from a mapping with a ``kind`` key and the fault's fields.

    Parameters
    ----------
    data
        For example ``{"kind": "delay_messages", "pattern": "reply.#",
        "delay": 2.0}``.

    Raises
    ------
    ValueError
        If the kind is unknown, a field is unknown, or a value is invalid.
    """
    fields = dict(data)
    kind = fields.pop("kind", None)
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        msg = f"unknown broker fault kind {kind!r}; use one of {sorted(_KINDS)}"
        raise ValueError(msg)

    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        msg = (
            f"unknown field(s) {unknown} for broker fault {kind!r}; "
            f"it takes {sorted(known)}"
        )
        raise ValueError(msg)

    return cls(**fields)
