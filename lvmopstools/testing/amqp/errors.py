"""The protocol errors of the mock AMQP broker and their reply texts.

:class:`AMQPError` is what the broker's model and channels raise; the
connection turns it into ``channel.close`` or ``connection.close`` with the
code and text RabbitMQ would send.
"""

from __future__ import annotations

__all__ = ["CONNECTION_CODES", "MAX_REPLY_TEXT", "REPLY_NAMES", "AMQPError"]

REPLY_NAMES = {
    200: "OK",
    312: "NO_ROUTE",
    320: "CONNECTION_FORCED",
    402: "INVALID_PATH",
    403: "ACCESS_REFUSED",
    404: "NOT_FOUND",
    405: "RESOURCE_LOCKED",
    406: "PRECONDITION_FAILED",
    501: "FRAME_ERROR",
    502: "SYNTAX_ERROR",
    503: "COMMAND_INVALID",
    504: "CHANNEL_ERROR",
    505: "UNEXPECTED_FRAME",
    506: "RESOURCE_ERROR",
    530: "NOT_ALLOWED",
    540: "NOT_IMPLEMENTED",
    541: "INTERNAL_ERROR",
}

#: Reply codes that close the whole connection rather than one channel.
CONNECTION_CODES = frozenset({320, 402, 501, 502, 503, 504, 505, 506, 530, 540, 541})

#: The longest reply text AMQP can carry (a short string), in bytes.
MAX_REPLY_TEXT = 255


class AMQPError(Exception):
    """A protocol error that closes a channel or the connection.

    Parameters
    ----------
    code
        The AMQP reply code (404, 406, 540...).
    detail
        What went wrong; the reply text is ``"<NAME> - <detail>"`` as RabbitMQ
        writes it.
    connection
        Whether the error closes the connection; by default, decided by the
        code as the AMQP specification classifies it.

    .. note::
        A reply text longer than 255 bytes is cut to its first 252 bytes and
        ``"..."``, as RabbitMQ does, so that it fits the frame.
    """

    def __init__(
        self,
        code: int,
        detail: str,
        *,
        connection: bool | None = None,
    ) -> None:
        self.code = code
        self.text = _fit_reply_text(f"{REPLY_NAMES.get(code, 'ERROR')} - {detail}")
        self.connection = code in CONNECTION_CODES if connection is None else connection
        super().__init__(self.text)


def _fit_reply_text(text: str) -> str:
    encoded = text.encode()
    if len(encoded) <= MAX_REPLY_TEXT:
        return text
    # Limitation: RabbitMQ cuts at byte 252 even inside a multi-byte character;
    # a str cannot hold half a character, so that character is dropped and
    # the text is a few bytes shorter than RabbitMQ's.
    head = encoded[: MAX_REPLY_TEXT - 3].decode(errors="ignore")
    return f"{head}..."
