"""Exchanges, queues, bindings and routing for the mock AMQP broker.

This module holds the broker's state for its one virtual host: the exchanges,
the queues and the bindings between them, and the routing rules of the
``direct``, ``fanout`` and ``topic`` exchange types. It knows nothing about
sockets or frames; :mod:`lvmopstools.testing.amqp.channel` drives it.

What it does not simulate: the ``headers`` exchange type, exchange-to-exchange
bindings, the queue arguments that change behaviour (TTL, length limits,
dead-lettering, priorities: refused with 540, see
:mod:`lvmopstools.testing.amqp.arguments`), persistence (``durable`` is
recorded and checked on redeclare, but everything lives in memory and goes
away with the broker process).
"""

from __future__ import annotations

import base64
import functools
import os
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .arguments import check_arguments, check_equivalent_arguments
from .errors import AMQPError

if TYPE_CHECKING:
    from .channel import Consumer

__all__ = [
    "AMQPError",
    "BrokerState",
    "Envelope",
    "Exchange",
    "Message",
    "Queue",
    "topic_matches",
]

#: The exchanges every RabbitMQ virtual host has from the start.
PREDECLARED = {
    "": "direct",
    "amq.direct": "direct",
    "amq.fanout": "fanout",
    "amq.topic": "topic",
}

EXCHANGE_TYPES = ("direct", "fanout", "topic")


@dataclass(eq=False)
class Message:
    """A published message as it sits in queues.

    ``header`` is the encoded content-header payload exactly as the publisher
    sent it, so deliveries forward the properties byte for byte.
    """

    exchange: str
    routing_key: str
    header: bytes
    body: bytes
    properties: Any
    #: ``exchange`` and ``routing_key`` encoded once, for every delivery.
    exchange_bytes: bytes = field(init=False, repr=False)
    routing_key_bytes: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.exchange_bytes = self.exchange.encode()
        self.routing_key_bytes = self.routing_key.encode()


@dataclass(eq=False, slots=True)
class Envelope:
    """One queue's copy of a message, with its own redelivered flag."""

    message: Message
    redelivered: bool = False


@dataclass(eq=False)
class Exchange:
    """An exchange and the queues bound to it."""

    name: str
    type: str
    durable: bool = False
    auto_delete: bool = False
    internal: bool = False
    #: (queue name, binding key) pairs, in binding order.
    bindings: list[tuple[str, str]] = field(default_factory=list)

    def route(self, routing_key: str) -> list[str]:
        """Return the names of the queues a routing key reaches, without repeats.

        The default exchange (``""``) is not handled here: it routes to the
        queue named by the routing key, which only the broker state knows.
        """
        if self.type == "fanout":
            names = [queue for queue, _ in self.bindings]
        elif self.type == "direct":
            names = [queue for queue, key in self.bindings if key == routing_key]
        else:
            names = [
                queue for queue, key in self.bindings if topic_matches(key, routing_key)
            ]

        return list(dict.fromkeys(names))


@dataclass(eq=False)
class Queue:
    """A queue, its ready messages and its consumers."""

    name: str
    durable: bool = False
    auto_delete: bool = False
    #: The connection that owns an exclusive queue (None for shared queues).
    owner: object | None = None
    #: The ``arguments`` table it was declared with.
    arguments: dict[str, Any] = field(default_factory=dict)
    messages: deque[Envelope] = field(default_factory=deque)
    consumers: list[Consumer] = field(default_factory=list)
    had_consumer: bool = False
    deleted: bool = False
    _next: int = 0

    def dispatch(self) -> None:
        """Hand ready messages to consumers with room, round robin."""
        while self.messages and self.consumers:
            count = len(self.consumers)
            for step in range(count):
                consumer = self.consumers[(self._next + step) % count]
                if consumer.has_room():
                    self._next = (self._next + step + 1) % count
                    consumer.deliver(self, self.messages.popleft())
                    break
            else:
                return

    def requeue(self, envelopes: list[Envelope]) -> None:
        """Put unacknowledged messages back at the head, marked redelivered."""
        for envelope in reversed(envelopes):
            envelope.redelivered = True
            self.messages.appendleft(envelope)


def topic_matches(binding_key: str, routing_key: str) -> bool:
    """Return whether a topic binding key matches a routing key.

    Words are separated by dots; ``*`` matches exactly one word and ``#``
    matches zero or more words, as in RabbitMQ.

    Parameters
    ----------
    binding_key
        The pattern, for example ``"reply.#"`` or ``"command.*.status"``.
    routing_key
        The routing key of a message.
    """
    return _topic_match(binding_key, routing_key)


@functools.lru_cache(maxsize=4096)
def _topic_match(binding_key: str, routing_key: str) -> bool:
    # RabbitMQ splits an empty key into zero words, not one empty word.
    pattern = binding_key.split(".") if binding_key else []
    words = routing_key.split(".") if routing_key else []

    # reachable[j]: the pattern words seen so far can consume words[:j].
    reachable = [True] + [False] * len(words)
    for piece in pattern:
        if piece == "#":
            for j in range(1, len(reachable)):
                reachable[j] = reachable[j] or reachable[j - 1]
            continue
        step = [False] * len(reachable)
        for j in range(1, len(reachable)):
            word_ok = piece == "*" or piece == words[j - 1]
            step[j] = reachable[j - 1] and word_ok
        reachable = step
    return reachable[-1]


def _server_name(prefix: str) -> str:
    token = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
    return f"{prefix}{token}"


class BrokerState:
    """The exchanges, queues and bindings of the broker's virtual host.

    Parameters
    ----------
    vhost
        The virtual host name, used in error texts as RabbitMQ does.
    """

    def __init__(self, vhost: str = "/") -> None:
        self.vhost = vhost
        self.exchanges: dict[str, Exchange] = {
            name: Exchange(name, kind, durable=True)
            for name, kind in PREDECLARED.items()
        }
        self.queues: dict[str, Queue] = {}

    # --- exchanges ---

    def declare_exchange(
        self,
        name: str,
        kind: str,
        *,
        passive: bool,
        durable: bool,
        auto_delete: bool,
        internal: bool,
    ) -> Exchange:
        """Declare an exchange, or check an existing one, as RabbitMQ does."""
        existing = self.exchanges.get(name)
        if passive:
            if existing is None:
                raise AMQPError(404, f"no exchange {name!r} in vhost {self.vhost!r}")
            return existing

        # RabbitMQ checks the type before the name.
        if kind not in EXCHANGE_TYPES:
            if kind == "headers":
                raise AMQPError(
                    540,
                    "exchange type 'headers' is not implemented by the mock broker",
                )
            raise AMQPError(503, f"unknown exchange type {kind!r}")

        if name == "" or name.startswith("amq."):
            if existing is not None and name == "":
                raise AMQPError(403, "operation not permitted on the default exchange")
            if existing is None:
                raise AMQPError(
                    403,
                    f"exchange name {name!r} contains reserved prefix 'amq.*'",
                )

        if existing is None:
            exchange = Exchange(name, kind, durable, auto_delete, internal)
            self.exchanges[name] = exchange
            return exchange

        for arg, received, current in (
            ("type", kind, existing.type),
            ("durable", durable, existing.durable),
            ("auto_delete", auto_delete, existing.auto_delete),
            ("internal", internal, existing.internal),
        ):
            if received != current:
                raise AMQPError(
                    406,
                    f"inequivalent arg {arg!r} for exchange {name!r} in vhost "
                    f"{self.vhost!r}: received {_show(received)} but current is "
                    f"{_show(current)}",
                )
        return existing

    def exchange(self, name: str) -> Exchange:
        """Return an exchange, or raise NOT_FOUND."""
        try:
            return self.exchanges[name]
        except KeyError:
            msg = f"no exchange {name!r} in vhost {self.vhost!r}"
            raise AMQPError(404, msg) from None

    def delete_exchange(self, name: str, *, if_unused: bool) -> None:
        """Delete an exchange and its bindings."""
        if name == "":
            raise AMQPError(403, "operation not permitted on the default exchange")
        if name in PREDECLARED:
            raise AMQPError(
                403,
                f"deletion of system exchange {name!r} in vhost {self.vhost!r} "
                "not allowed",
            )

        exchange = self.exchanges.get(name)
        if exchange is None:
            # RabbitMQ 3.x treats deleting a missing exchange as success.
            return
        if if_unused and exchange.bindings:
            raise AMQPError(406, f"exchange {name!r} in vhost {self.vhost!r} in use")

        del self.exchanges[name]

    # --- queues ---

    def declare_queue(
        self,
        name: str,
        owner: object,
        *,
        passive: bool,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
        arguments: dict[str, Any] | None = None,
    ) -> Queue:
        """Declare a queue, or check an existing one, as RabbitMQ does."""
        if passive:
            return self.queue(name, owner)
        arguments = dict(arguments or {})
        check_arguments(name, self.vhost, arguments)

        if name.startswith("amq."):
            raise AMQPError(
                403, f"queue name {name!r} contains reserved prefix 'amq.*'"
            )
        if name == "":
            name = _server_name("amq.gen-")

        existing = self.queues.get(name)
        if existing is None:
            queue = Queue(
                name,
                durable=durable,
                auto_delete=auto_delete,
                owner=owner if exclusive else None,
                arguments=arguments,
            )
            self.queues[name] = queue
            return queue

        self._check_access(existing, owner)
        if exclusive != (existing.owner is not None):
            # Even the owner cannot change the exclusive flag of its queue.
            raise self._locked(name)
        for arg, received, current in (
            ("durable", durable, existing.durable),
            ("auto_delete", auto_delete, existing.auto_delete),
        ):
            if received != current:
                raise AMQPError(
                    406,
                    f"inequivalent arg {arg!r} for queue {name!r} in vhost "
                    f"{self.vhost!r}: received {_show(received)} but current is "
                    f"{_show(current)}",
                )
        check_equivalent_arguments(name, self.vhost, arguments, existing.arguments)
        return existing

    def queue(self, name: str, owner: object) -> Queue:
        """Return a queue the caller may use, or raise NOT_FOUND / RESOURCE_LOCKED."""
        queue = self.queues.get(name)
        if queue is None:
            raise AMQPError(404, f"no queue {name!r} in vhost {self.vhost!r}")
        self._check_access(queue, owner)
        return queue

    def delete_queue(self, queue: Queue) -> int:
        """Delete a queue, its bindings and its consumers; return its message count."""
        count = len(queue.messages)
        queue.deleted = True
        queue.messages.clear()
        self.queues.pop(queue.name, None)

        for exchange in list(self.exchanges.values()):
            before = len(exchange.bindings)
            exchange.bindings = [b for b in exchange.bindings if b[0] != queue.name]
            if before != len(exchange.bindings):
                self._maybe_auto_delete(exchange)

        for consumer in list(queue.consumers):
            consumer.cancelled_by_broker()
        queue.consumers.clear()
        return count

    # --- bindings ---

    def bind(self, queue: Queue, exchange_name: str, key: str) -> None:
        """Bind a queue to an exchange with a binding key (idempotent)."""
        exchange = self.exchange(exchange_name)
        if (queue.name, key) not in exchange.bindings:
            exchange.bindings.append((queue.name, key))

    def unbind(self, queue: Queue, exchange_name: str, key: str) -> None:
        """Remove a binding; a missing binding is not an error, as in RabbitMQ."""
        exchange = self.exchange(exchange_name)
        if (queue.name, key) in exchange.bindings:
            exchange.bindings.remove((queue.name, key))
            self._maybe_auto_delete(exchange)

    def route(self, exchange_name: str, routing_key: str) -> list[Queue]:
        """Return the queues a message reaches (empty if the exchange is gone)."""
        if exchange_name == "":
            queue = self.queues.get(routing_key)
            return [queue] if queue is not None else []

        exchange = self.exchanges.get(exchange_name)
        if exchange is None:
            return []
        return [self.queues[name] for name in exchange.route(routing_key)]

    def _maybe_auto_delete(self, exchange: Exchange) -> None:
        if exchange.auto_delete and not exchange.bindings:
            self.exchanges.pop(exchange.name, None)

    # --- helpers ---

    def _check_access(self, queue: Queue, owner: object) -> None:
        if queue.owner is not None and queue.owner is not owner:
            raise self._locked(queue.name)

    def _locked(self, name: str) -> AMQPError:
        return AMQPError(
            405,
            f"cannot obtain exclusive access to locked queue {name!r} in vhost "
            f"{self.vhost!r}. It could be originally declared on another "
            "connection or the exclusive property value does not match that "
            "of the original declaration.",
        )

    def drop_owner(self, owner: object) -> None:
        """Delete the exclusive queues of a connection that went away."""
        for queue in list(self.queues.values()):
            if queue.owner is owner:
                self.delete_queue(queue)


def _show(value: object) -> str:
    if isinstance(value, bool):
        return f"'{str(value).lower()}'"
    return repr(value)
