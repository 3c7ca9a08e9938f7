"""The mock broker's log of published messages, and clu reply decoding.

Every message a client publishes to a :class:`~lvmopstools.testing.amqp.MockBroker`
is kept as a :class:`PublishedMessage` in the broker's :class:`MessageLog`, so a
test can ask what was sent, or wait for it, instead of consuming it.
:class:`CluReply` reads the conventions clu actors follow when they reply
(exchange ``sdss_exchange``, routing key ``reply.<commander>`` or
``reply.broadcast``, headers ``message_code``, ``commander_id``, ``command_id``,
``sender``, a JSON body of keywords), so a test can assert "actor X broadcast
state Y" without decoding frames.

What it does not do: it keeps no record of deliveries or acknowledgements, and
it decodes only clu's AMQP replies (not the legacy opscore protocol).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pamqp import commands

from ..clock import current_clock
from .model import Message, topic_matches

__all__ = ["CluReply", "MessageLog", "PublishedMessage", "record_of"]

_PROPERTY_NAMES = tuple(commands.Basic.Properties.__slots__)

#: clu's message codes, from the least to the most final.
CLU_CODES = {
    ">": "running",
    "i": "info",
    "d": "debug",
    "w": "warning",
    ":": "done",
    "f": "failed",
    "e": "error",
}


@dataclass(frozen=True)
class CluReply:
    """A clu actor's reply, decoded from a published message.

    Parameters
    ----------
    sender
        The name of the actor that replied.
    message_code
        clu's one-character code: ``>``, ``i``, ``d``, ``w``, ``:``, ``f``, ``e``.
    commander_id
        Who sent the command the reply belongs to (None for unsolicited replies).
    command_id
        The command's id (None for unsolicited replies).
    keywords
        The decoded JSON body: keyword name to value.
    broadcast
        Whether the reply went to everyone (routing key ``reply.broadcast``).
    internal
        clu's ``internal`` header.
    """

    sender: str | None
    message_code: str | None
    commander_id: str | None
    command_id: int | str | None
    keywords: dict[str, Any]
    broadcast: bool
    internal: bool = False

    @property
    def is_done(self) -> bool:
        """Whether the reply finishes its command (``:``, ``f`` or ``e``)."""
        return self.message_code in (":", "f", "e")


@dataclass(frozen=True)
class PublishedMessage:
    """One message as a client published it to the mock broker.

    Parameters
    ----------
    exchange
        The exchange name (``""`` for the default exchange).
    routing_key
        The routing key.
    body
        The raw body.
    headers
        The ``headers`` property (an empty dict when absent).
    properties
        The other message properties that were set (content type, correlation
        id, reply-to...), by their AMQP names.
    loop_time
        ``loop.time()`` when the broker received it (virtual under a clock).
    virtual_time
        The active clock's ``time()`` (virtual seconds since the clock
        started), or None without a virtual clock.
    connection
        The publishing connection, as ``"host:port"`` of the client socket.
    channel
        The publishing channel number.
    routed_to
        The queues the message reached when it was published: empty when it
        was unroutable or dropped, and for a delayed message, which the
        broker routes later.
    fault
        The kind of the fault that acted on the message, if any.
    """

    exchange: str
    routing_key: str
    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    properties: dict[str, Any] = field(default_factory=dict)
    loop_time: float = 0.0
    virtual_time: float | None = None
    connection: str = ""
    channel: int = 0
    routed_to: tuple[str, ...] = ()
    fault: str | None = None

    def json(self) -> Any:
        """Return the body decoded as JSON.

        Raises
        ------
        ValueError
            If the body is not valid UTF-8 JSON.
        """
        try:
            return json.loads(self.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            msg = (
                f"the body of the message to {self.routing_key!r} is not JSON: "
                f"{self.body[:60]!r}; read .body for the raw bytes"
            )
            raise ValueError(msg) from err

    def clu_reply(self) -> CluReply | None:
        """Decode the message as a clu reply, or return None if it is not one.

        A clu reply has a routing key starting with ``reply.``, a ``sender``
        and a ``message_code`` header, and a JSON object as body.
        """
        if not self.routing_key.startswith("reply."):
            return None
        if "sender" not in self.headers or "message_code" not in self.headers:
            return None

        try:
            keywords = json.loads(self.body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(keywords, dict):
            return None

        return CluReply(
            sender=_text(self.headers.get("sender")),
            message_code=_text(self.headers.get("message_code")),
            commander_id=_text(self.headers.get("commander_id")),
            command_id=self.headers.get("command_id"),
            keywords=keywords,
            broadcast=self.routing_key == "reply.broadcast",
            internal=bool(self.headers.get("internal", False)),
        )


class MessageLog:
    """The messages published to a broker, oldest first, with queries and waits.

    The log grows for as long as the broker lives (restarts included); call
    :meth:`clear` to forget what came before.
    """

    def __init__(self) -> None:
        self._records: list[PublishedMessage] = []
        self._waiters: list[
            tuple[Callable[[PublishedMessage], bool], asyncio.Future[PublishedMessage]]
        ] = []

    def __len__(self) -> int:
        return len(self._records)

    def messages(
        self,
        routing_key: str | None = None,
        *,
        exchange: str | None = None,
    ) -> list[PublishedMessage]:
        """Return the recorded messages, oldest first.

        Parameters
        ----------
        routing_key
            A topic pattern (``*`` one word, ``#`` any number) the routing key
            must match; None for all.
        exchange
            Only messages published to this exchange; None for all.
        """
        return [
            record
            for record in self._records
            if (exchange is None or record.exchange == exchange)
            and (routing_key is None or topic_matches(routing_key, record.routing_key))
        ]

    def replies(
        self,
        sender: str | None = None,
        *,
        message_code: str | None = None,
        keyword: str | None = None,
    ) -> list[CluReply]:
        """Return the clu replies published so far, oldest first.

        Parameters
        ----------
        sender
            Only replies from this actor.
        message_code
            Only replies with this clu message code (``":"``, ``"i"``...).
        keyword
            Only replies that carry this keyword.
        """
        found = []
        for record in self._records:
            reply = record.clu_reply()
            if reply is None:
                continue
            if sender is not None and reply.sender != sender:
                continue
            if message_code is not None and reply.message_code != message_code:
                continue
            if keyword is not None and keyword not in reply.keywords:
                continue
            found.append(reply)
        return found

    def clear(self) -> None:
        """Forget the recorded messages."""
        self._records.clear()

    async def wait_for_message(
        self,
        predicate: Callable[[PublishedMessage], bool] | None = None,
        *,
        timeout: float = 5.0,  # noqa: ASYNC109 - a per-call bound reads best here
        past: bool = True,
    ) -> PublishedMessage:
        """Wait until a published message satisfies ``predicate`` and return it.

        Parameters
        ----------
        predicate
            A test on each :class:`PublishedMessage`; None accepts any.
        timeout
            Seconds (loop time) to wait.
        past
            Whether a message recorded before the call counts.

        Raises
        ------
        TimeoutError
            If no such message arrives within ``timeout``.
        Exception
            Whatever ``predicate`` raises, unchanged.
        """
        test = predicate or (lambda _: True)
        if past:
            for record in self._records:
                if test(record):
                    return record

        future: asyncio.Future[PublishedMessage] = (
            asyncio.get_running_loop().create_future()
        )
        waiter = (test, future)
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            msg = (
                f"no published message matched {predicate!r} within {timeout} s; "
                f"{len(self._records)} messages were recorded (see .messages())"
            )
            raise TimeoutError(msg) from None
        finally:
            self._waiters.remove(waiter)

    async def wait_for_reply(
        self,
        predicate: Callable[[CluReply], bool],
        *,
        timeout: float = 5.0,  # noqa: ASYNC109 - a per-call bound reads best here
        past: bool = True,
    ) -> CluReply:
        """Wait until a clu reply satisfies ``predicate`` and return it.

        Raises
        ------
        TimeoutError
            If no such reply arrives within ``timeout``.
        """

        def test(record: PublishedMessage) -> bool:
            reply = record.clu_reply()
            return reply is not None and predicate(reply)

        record = await self.wait_for_message(test, timeout=timeout, past=past)
        reply = record.clu_reply()
        assert reply is not None
        return reply

    def add(self, record: PublishedMessage) -> None:
        """Record a message and wake the waiters it satisfies.

        A waiter whose predicate raises gets that exception (the waiting test
        sees it); the publisher and the other waiters are not affected.
        """
        self._records.append(record)
        for test, future in list(self._waiters):
            if future.done():
                continue
            try:
                matched = test(record)
            except Exception as err:
                future.set_exception(err)
                continue
            if matched:
                future.set_result(record)


def record_of(
    message: Message,
    *,
    connection: str,
    channel: int,
    routed: tuple[str, ...],
    fault: str | None,
) -> PublishedMessage:
    """Return the record of a message as the broker received it, timed now.

    Parameters
    ----------
    message
        The message, assembled from its publish, header and body frames.
    connection
        The publishing connection, as ``"host:port"`` of the client socket.
    channel
        The publishing channel number.
    routed
        The names of the queues it reached.
    fault
        The kind of the fault that acted on it, if any.
    """
    props = message.properties
    properties = {}
    for name in _PROPERTY_NAMES:
        value = getattr(props, name, None)
        if value not in (None, "") and name != "headers":
            properties[name] = value

    clock = current_clock()
    return PublishedMessage(
        exchange=message.exchange,
        routing_key=message.routing_key,
        body=message.body,
        headers=dict(props.headers or {}),
        properties=properties,
        loop_time=asyncio.get_running_loop().time(),
        virtual_time=clock.time() if clock is not None else None,
        connection=connection,
        channel=channel,
        routed_to=routed,
        fault=fault,
    )


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)
