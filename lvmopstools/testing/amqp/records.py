"""The mock broker's log of published messages, and clu reply decoding.

Every message a client publishes to a :class:`~lvmopstools.testing.amqp.MockBroker`
is kept as a :class:`PublishedMessage`, so a test can ask what was sent instead
of consuming it. :class:`CluReply` reads the conventions clu actors follow when
they reply (exchange ``sdss_exchange``, routing key ``reply.<commander>`` or
``reply.broadcast``, headers ``message_code``, ``commander_id``, ``command_id``,
``sender``, a JSON body of keywords), so a test can assert "actor X broadcast
state Y" without decoding frames.

What it does not do: it keeps no record of deliveries or acknowledgements, and
it decodes only clu's AMQP replies (not the legacy opscore protocol).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CluReply", "PublishedMessage"]

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
        The active clock's ``time()``, or None without a virtual clock.
    connection
        The publishing connection, as ``"host:port"`` of the client socket.
    channel
        The publishing channel number.
    routed_to
        The queues the message reached (empty when unroutable or dropped).
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


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)
