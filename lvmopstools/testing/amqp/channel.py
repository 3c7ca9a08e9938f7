"""Per-channel AMQP method handling for the mock broker.

A :class:`Channel` receives the decoded methods of one AMQP channel, applies
them to the broker's :class:`~lvmopstools.testing.amqp.model.BrokerState`, and
writes the replies. It tracks consumers, prefetch limits, unacknowledged
deliveries and publisher-confirm sequence numbers, as RabbitMQ does per
channel. Errors are raised as :class:`~lvmopstools.testing.amqp.model.AMQPError`
and turned into ``channel.close`` or ``connection.close`` by the connection.

What it does not simulate: transactions (``tx.*``), ``basic.recover``,
``prefetch_size``, ``immediate`` publishing, consumer priorities and
``no_local``; the first four close the connection with 540 NOT_IMPLEMENTED
naming the method, as RabbitMQ does for what it does not support.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pamqp import commands

from .model import AMQPError, Envelope, Queue
from .wire import deliver_frame

if TYPE_CHECKING:
    from .connection import BrokerConnection

__all__ = ["Channel", "Consumer"]


def _tag(prefix: str) -> str:
    return prefix + base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")


@dataclass(eq=False, slots=True)
class _Unacked:
    queue: Queue
    envelope: Envelope
    consumer: Consumer | None


class Consumer:
    """A ``basic.consume`` subscription of a channel to a queue."""

    def __init__(
        self,
        channel: Channel,
        queue: Queue,
        tag: str,
        *,
        no_ack: bool,
        exclusive: bool,
        prefetch: int,
    ) -> None:
        self.channel = channel
        self.queue = queue
        self.tag = tag
        self.tag_bytes = tag.encode()
        self.no_ack = no_ack
        self.exclusive = exclusive
        self.prefetch = prefetch
        self.unacked = 0

    def has_room(self) -> bool:
        """Whether the prefetch limits allow one more delivery."""
        if not self.channel.is_open:
            return False
        if self.no_ack:
            return True
        if self.prefetch and self.unacked >= self.prefetch:
            return False
        limit = self.channel.global_prefetch
        return not limit or len(self.channel.unacked) < limit

    def deliver(self, queue: Queue, envelope: Envelope) -> None:
        """Send one message to this consumer."""
        self.channel.deliver(self, queue, envelope)

    def cancelled_by_broker(self) -> None:
        """Forget the consumer because its queue went away, and tell the client."""
        self.channel.consumers.pop(self.tag, None)
        connection = self.channel.connection
        if self.channel.is_open and connection.capability("consumer_cancel_notify"):
            self.channel.send(commands.Basic.Cancel(self.tag, nowait=True))


class Channel:
    """One open AMQP channel of a client connection.

    Parameters
    ----------
    connection
        The connection the channel belongs to.
    number
        The channel number.
    """

    def __init__(self, connection: BrokerConnection, number: int) -> None:
        self.connection = connection
        self.number = number
        self.state = connection.broker.state
        self.is_open = True
        self.consumers: dict[str, Consumer] = {}
        self.unacked: dict[int, _Unacked] = {}
        self.prefetch = 0
        self.global_prefetch = 0
        self.confirm = False
        self.publish_seq = 0
        self.last_queue = ""
        self.next_tag = 1

        # The message being assembled from publish, header and body frames.
        self.publishing: commands.Basic.Publish | None = None
        self.header: Any = None
        self.header_raw = b""
        self.body_parts: list[bytes] = []
        self.body_left = 0

        self._handlers: dict[type[Any], Callable[[Any], None]] = {
            commands.Basic.Publish: self._publish,
            commands.Basic.Ack: self._ack,
            commands.Basic.Nack: self._nack,
            commands.Basic.Reject: self._reject,
            commands.Basic.Qos: self._qos,
            commands.Basic.Consume: self._consume,
            commands.Basic.Cancel: self._cancel,
            commands.Basic.Get: self._get,
            commands.Exchange.Declare: self._exchange_declare,
            commands.Exchange.Delete: self._exchange_delete,
            commands.Queue.Declare: self._queue_declare,
            commands.Queue.Bind: self._queue_bind,
            commands.Queue.Unbind: self._queue_unbind,
            commands.Queue.Purge: self._queue_purge,
            commands.Queue.Delete: self._queue_delete,
            commands.Confirm.Select: self._confirm_select,
            commands.Channel.Flow: self._flow,
        }

    # --- plumbing ---

    def send(self, method: Any) -> None:
        """Send a method frame on this channel."""
        self.connection.send_method(self.number, method)

    def handle(self, method: Any) -> None:
        """Apply one method received from the client.

        Raises
        ------
        AMQPError
            For every protocol error; the connection closes the channel or
            itself accordingly.
        """
        handler = self._handlers.get(type(method))
        if handler is None:
            name = method.name.lower()
            raise AMQPError(
                540, f"method {name!r} is not implemented by the mock broker"
            )
        handler(method)

    def _reply(self, method: Any, nowait: bool) -> None:
        if not nowait:
            self.send(method)

    def _queue(self, name: str) -> Queue:
        return self.state.queue(self._queue_name(name), self.connection)

    def _queue_name(self, name: str) -> str:
        # An empty name means the queue this channel declared last.
        if name == "" and self.last_queue == "":
            raise AMQPError(404, "no previously declared queue")
        return name or self.last_queue

    # --- exchanges and queues ---

    def _exchange_declare(self, method: commands.Exchange.Declare) -> None:
        self.state.declare_exchange(
            method.exchange,
            method.exchange_type,
            passive=method.passive,
            durable=method.durable,
            auto_delete=method.auto_delete,
            internal=method.internal,
        )
        self._reply(commands.Exchange.DeclareOk(), method.nowait)

    def _exchange_delete(self, method: commands.Exchange.Delete) -> None:
        self.state.delete_exchange(method.exchange, if_unused=method.if_unused)
        self._reply(commands.Exchange.DeleteOk(), method.nowait)

    def _queue_declare(self, method: commands.Queue.Declare) -> None:
        queue = self.state.declare_queue(
            method.queue,
            self.connection,
            passive=method.passive,
            durable=method.durable,
            exclusive=method.exclusive,
            auto_delete=method.auto_delete,
            arguments=method.arguments,
        )
        self.last_queue = queue.name
        ok = commands.Queue.DeclareOk(
            queue.name, len(queue.messages), len(queue.consumers)
        )
        self._reply(ok, method.nowait)

    def _queue_bind(self, method: commands.Queue.Bind) -> None:
        queue = self._queue(method.queue)
        if method.exchange == "":
            raise AMQPError(403, "operation not permitted on the default exchange")
        self.state.bind(queue, method.exchange, method.routing_key)
        self._reply(commands.Queue.BindOk(), method.nowait)

    def _queue_unbind(self, method: commands.Queue.Unbind) -> None:
        if method.exchange == "":
            raise AMQPError(403, "operation not permitted on the default exchange")
        name = self._queue_name(method.queue)
        # RabbitMQ 3.x answers unbind-ok when the queue, the exchange or the
        # binding does not exist.
        if name in self.state.queues and method.exchange in self.state.exchanges:
            queue = self._queue(name)
            self.state.unbind(queue, method.exchange, method.routing_key)
        self.send(commands.Queue.UnbindOk())

    def _queue_purge(self, method: commands.Queue.Purge) -> None:
        queue = self._queue(method.queue)
        count = len(queue.messages)
        queue.messages.clear()
        self._reply(commands.Queue.PurgeOk(count), method.nowait)

    def _queue_delete(self, method: commands.Queue.Delete) -> None:
        name = self._queue_name(method.queue)
        if name not in self.state.queues:
            # Deleting a missing queue succeeds in RabbitMQ 3.x.
            self._reply(commands.Queue.DeleteOk(0), method.nowait)
            return

        queue = self._queue(name)
        where = f"queue {name!r} in vhost {self.state.vhost!r}"
        if method.if_unused and queue.consumers:
            raise AMQPError(406, f"{where} in use")
        if method.if_empty and queue.messages:
            raise AMQPError(406, f"{where} not empty")

        count = self.state.delete_queue(queue)
        self._reply(commands.Queue.DeleteOk(count), method.nowait)

    # --- consumers ---

    def _qos(self, method: commands.Basic.Qos) -> None:
        if method.prefetch_size:
            raise AMQPError(540, f"prefetch_size!=0 ({method.prefetch_size})")
        if method.global_:
            self.global_prefetch = method.prefetch_count
        else:
            # As in RabbitMQ, only consumers started after this use the limit.
            self.prefetch = method.prefetch_count
        self.send(commands.Basic.QosOk())

        # A higher channel-wide limit makes room for messages already waiting.
        for queue in dict.fromkeys(c.queue for c in self.consumers.values()):
            if not queue.deleted:
                queue.dispatch()

    def _consume(self, method: commands.Basic.Consume) -> None:
        queue = self._queue(method.queue)
        tag = method.consumer_tag or _tag("amq.ctag-")
        if tag in self.consumers:
            raise AMQPError(530, f"attempt to reuse consumer tag {tag!r}")
        if queue.consumers and (method.exclusive or queue.consumers[0].exclusive):
            raise AMQPError(
                403,
                f"queue {queue.name!r} in vhost {self.state.vhost!r} in exclusive use",
            )

        consumer = Consumer(
            self,
            queue,
            tag,
            no_ack=method.no_ack,
            exclusive=method.exclusive,
            prefetch=self.prefetch,
        )
        self.consumers[tag] = consumer
        queue.consumers.append(consumer)
        queue.had_consumer = True
        self._reply(commands.Basic.ConsumeOk(tag), method.nowait)
        queue.dispatch()

    def _cancel(self, method: commands.Basic.Cancel) -> None:
        consumer = self.consumers.pop(method.consumer_tag or "", None)
        if consumer is not None:
            self._detach(consumer)
        self._reply(commands.Basic.CancelOk(method.consumer_tag), method.nowait)

    def _detach(self, consumer: Consumer) -> None:
        queue = consumer.queue
        if consumer in queue.consumers:
            queue.consumers.remove(consumer)
        if queue.auto_delete and queue.had_consumer and not queue.consumers:
            if not queue.deleted:
                self.state.delete_queue(queue)

    def deliver(self, consumer: Consumer, queue: Queue, envelope: Envelope) -> None:
        """Send a message to a consumer of this channel."""
        tag = self.next_tag
        self.next_tag += 1
        if not consumer.no_ack:
            self.unacked[tag] = _Unacked(queue, envelope, consumer)
            consumer.unacked += 1

        message = envelope.message
        method = deliver_frame(
            self.number,
            consumer.tag_bytes,
            tag,
            envelope.redelivered,
            message.exchange_bytes,
            message.routing_key_bytes,
        )
        self.connection.send_content(self.number, method, message, encoded=True)

    def _get(self, method: commands.Basic.Get) -> None:
        queue = self._queue(method.queue)
        if not queue.messages:
            self.send(commands.Basic.GetEmpty())
            return

        envelope = queue.messages.popleft()
        tag = self.next_tag
        self.next_tag += 1
        if not method.no_ack:
            self.unacked[tag] = _Unacked(queue, envelope, None)

        message = envelope.message
        ok = commands.Basic.GetOk(
            tag,
            envelope.redelivered,
            message.exchange,
            message.routing_key,
            len(queue.messages),
        )
        self.connection.send_content(self.number, ok, message)

    # --- acknowledgements ---

    def _settle(self, tag: int, multiple: bool) -> list[_Unacked]:
        if multiple:
            tags = [t for t in self.unacked if tag == 0 or t <= tag]
        elif tag in self.unacked:
            tags = [tag]
        else:
            raise AMQPError(406, f"unknown delivery tag {tag}")

        settled = [self.unacked.pop(t) for t in tags]
        for item in settled:
            if item.consumer is not None:
                item.consumer.unacked -= 1
        return settled

    def _ack(self, method: commands.Basic.Ack) -> None:
        settled = self._settle(method.delivery_tag, method.multiple)
        self._redispatch(settled)

    def _nack(self, method: commands.Basic.Nack) -> None:
        settled = self._settle(method.delivery_tag, method.multiple)
        self._give_back(settled, method.requeue)

    def _reject(self, method: commands.Basic.Reject) -> None:
        settled = self._settle(method.delivery_tag or 0, False)
        self._give_back(settled, method.requeue)

    def _give_back(self, settled: list[_Unacked], requeue: bool) -> None:
        if requeue:
            by_queue: dict[Queue, list[Envelope]] = {}
            for item in settled:
                by_queue.setdefault(item.queue, []).append(item.envelope)
            for queue, envelopes in by_queue.items():
                if not queue.deleted:
                    queue.requeue(envelopes)
        self._redispatch(settled)

    def _redispatch(self, settled: list[_Unacked]) -> None:
        for queue in dict.fromkeys(item.queue for item in settled):
            if not queue.deleted:
                queue.dispatch()

    # --- publishing and channel state ---

    def _publish(self, method: commands.Basic.Publish) -> None:
        if method.immediate:
            raise AMQPError(540, "immediate=true")
        exchange = self.state.exchange(method.exchange)
        if exchange.internal:
            raise AMQPError(
                403,
                f"cannot publish to internal exchange {method.exchange!r} in "
                f"vhost {self.state.vhost!r}",
            )
        self.publishing = method

    def next_confirm(self) -> int | None:
        """Return the publish sequence number in confirm mode, or None."""
        if not self.confirm:
            return None
        self.publish_seq += 1
        return self.publish_seq

    def _confirm_select(self, method: commands.Confirm.Select) -> None:
        self.confirm = True
        self._reply(commands.Confirm.SelectOk(), method.nowait)

    def _flow(self, method: commands.Channel.Flow) -> None:
        if not method.active:
            raise AMQPError(540, "active=false")
        self.send(commands.Channel.FlowOk(True))

    def shut(self) -> None:
        """Release the channel: cancel consumers and requeue unacked messages.

        Called when the channel closes in either direction or its connection
        goes away. Messages come back marked redelivered, as in RabbitMQ.
        """
        if not self.is_open:
            return
        self.is_open = False
        self.publishing = None

        for consumer in list(self.consumers.values()):
            self._detach(consumer)
        self.consumers.clear()

        settled = list(self.unacked.values())
        self.unacked.clear()
        self._give_back(settled, requeue=True)
