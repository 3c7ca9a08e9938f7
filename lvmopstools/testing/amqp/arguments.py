"""Queue arguments (``x-...``) for the mock AMQP broker: checked, never ignored.

RabbitMQ reads a queue's ``arguments`` table for features such as message
TTL, length limits and dead-lettering. The mock broker simulates none of
them, so rather than accept such an argument and do nothing (a TTL test would
pass without any message expiring), it closes the connection with 540
NOT_IMPLEMENTED naming the argument. What it accepts are the arguments that
change nothing a client can observe on one node (``x-queue-type`` set to
``"classic"``, ``x-queue-mode``, ``x-queue-version``, the locators) and
arguments RabbitMQ itself ignores (names it does not know). Those are stored
with the queue and checked on redeclaration as RabbitMQ checks them:
406 PRECONDITION_FAILED ``inequivalent arg 'x-...'`` with RabbitMQ's wording.

What it does not simulate: every behaviour-changing argument listed in
:data:`NOT_SIMULATED`, and quorum or stream queues.
"""

from __future__ import annotations

from typing import Any

from .errors import AMQPError

__all__ = ["NOT_SIMULATED", "check_arguments", "check_equivalent_arguments"]

#: Arguments that change a queue's behaviour and that the mock does not
#: simulate; declaring a queue with one closes the connection with 540.
NOT_SIMULATED = frozenset(
    {
        "x-dead-letter-exchange",
        "x-dead-letter-routing-key",
        "x-dead-letter-strategy",
        "x-delivery-limit",
        "x-expires",
        "x-initial-cluster-size",
        "x-max-age",
        "x-max-in-memory-bytes",
        "x-max-in-memory-length",
        "x-max-length",
        "x-max-length-bytes",
        "x-max-priority",
        "x-message-ttl",
        "x-overflow",
        "x-quorum-initial-group-size",
        "x-single-active-consumer",
        "x-stream-max-segment-size-bytes",
    }
)

#: The arguments RabbitMQ 3.10 compares when a queue is declared again (among
#: those the mock accepts), with the value a missing argument stands for.
_CHECKED: dict[str, object] = {
    "x-queue-mode": None,
    "x-queue-version": None,
    "x-queue-type": "classic",
}

_QUEUE_TYPES = ("classic", "quorum", "stream")
_QUEUE_MODES = ("default", "lazy")

#: RabbitMQ's names for the field-table types pamqp encodes integers as.
_INTEGER_TYPES = (
    (-(2**7), 2**7 - 1, "byte"),
    (-(2**15), 2**15 - 1, "short"),
    (0, 2**16 - 1, "unsignedshort"),
    (-(2**31), 2**31 - 1, "signedint"),
    (0, 2**32 - 1, "unsignedint"),
)


def check_arguments(name: str, vhost: str, arguments: dict[str, Any]) -> None:
    """Refuse the queue arguments the mock broker cannot honour.

    Parameters
    ----------
    name
        The queue name, for the error text.
    vhost
        The virtual host, for the error text.
    arguments
        The ``arguments`` table of ``queue.declare``.

    Raises
    ------
    AMQPError
        540 NOT_IMPLEMENTED for an argument in :data:`NOT_SIMULATED` or a
        quorum or stream queue; 406 PRECONDITION_FAILED, in RabbitMQ's
        wording, for an unknown queue type or mode.
    """
    where = f"for queue {name!r} in vhost {vhost!r}"
    for key in sorted(arguments):
        if key in NOT_SIMULATED:
            raise AMQPError(
                540,
                f"queue argument {key!r} (value {arguments[key]!r}) is not "
                "implemented by the mock broker; run this test against RabbitMQ",
            )

    kind = _text(arguments.get("x-queue-type", "classic"))
    if kind not in _QUEUE_TYPES:
        raise AMQPError(
            406,
            f"invalid arg 'x-queue-type' {where}: \"unsupported queue type {kind!r}\"",
        )
    if kind != "classic":
        raise AMQPError(
            540,
            f"queue argument 'x-queue-type' (value {kind!r}) is not implemented "
            "by the mock broker; only classic queues are",
        )

    mode = _text(arguments.get("x-queue-mode", "default"))
    if mode not in _QUEUE_MODES:
        raise AMQPError(
            406,
            f"invalid arg 'x-queue-mode' {where}: \"unsupported queue mode {mode!r}\"",
        )


def check_equivalent_arguments(
    name: str, vhost: str, received: dict[str, Any], current: dict[str, Any]
) -> None:
    """Check a redeclaration's arguments against the queue's, as RabbitMQ does.

    Raises
    ------
    AMQPError
        406 PRECONDITION_FAILED ``inequivalent arg`` for the first argument
        that differs.
    """
    for key, default in _CHECKED.items():
        new, old = received.get(key, default), current.get(key, default)
        if _text(new) == _text(old):
            continue
        raise AMQPError(
            406,
            f"inequivalent arg {key!r} for queue {name!r} in vhost {vhost!r}: "
            f"received {_value(new, old)} but current is {_value(old, new)}",
        )


def _text(value: object) -> object:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _value(value: object, other: object) -> str:
    # RabbitMQ names the type only when the other side has no value at all.
    if value is None:
        return "none"
    shown = str(value).lower() if isinstance(value, bool) else str(_text(value))
    if other is not None:
        return f"'{shown}'"
    return f"the value '{shown}' of type '{_type_name(value)}'"


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        for low, high, name in _INTEGER_TYPES:
            if low <= value <= high:
                return name
        return "long"
    if isinstance(value, float):
        return "double"
    return "longstr"
