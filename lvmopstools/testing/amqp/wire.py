"""Frame codecs for the mock broker, hand-written for its busiest frames.

pamqp encodes and decodes every AMQP method generically, which was most of
the broker's own cost per message. The frames that every message passes
through (``basic.publish`` and ``basic.ack`` from clients, ``basic.deliver``
to them) are packed and unpacked here directly, with the layouts of the AMQP
0-9-1 specification; :func:`decode_method` hands every other method to
pamqp. Decoded methods are pamqp objects either way, so the rest of the
broker sees no difference.

It is not a general codec: only ``basic.deliver`` is encoded here, and only
the two methods above are decoded without pamqp.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from pamqp import commands

from .model import AMQPError

__all__ = ["FRAME_HEAD", "decode_method", "deliver_frame"]

#: Frame type, channel number, payload size.
FRAME_HEAD = struct.Struct(">BHI")

_DELIVER_INDEX = struct.pack(">HH", 60, 60)


def _short(value: bytes) -> bytes:
    return bytes((len(value),)) + value


def _decode_publish(payload: bytes) -> commands.Basic.Publish:
    # ticket (short), exchange and routing key (short strings), flag bits.
    offset = 6
    exchange_end = offset + 1 + payload[offset]
    exchange = payload[offset + 1 : exchange_end].decode()
    key_end = exchange_end + 1 + payload[exchange_end]
    routing_key = payload[exchange_end + 1 : key_end].decode()
    if len(payload) <= key_end:
        raise ValueError("the flag bits are missing")
    bits = payload[key_end]
    return commands.Basic.Publish(
        0, exchange, routing_key, bool(bits & 1), bool(bits & 2)
    )


def _decode_ack(payload: bytes) -> commands.Basic.Ack:
    delivery_tag, bits = struct.unpack_from(">QB", payload, 4)
    return commands.Basic.Ack(delivery_tag, bool(bits & 1))


# The methods clients send most, decoded without pamqp's generic decoder.
_FAST_DECODERS: dict[int, tuple[str, Callable[[bytes], Any]]] = {
    commands.Basic.Publish.index: ("Basic.Publish", _decode_publish),
    commands.Basic.Ack.index: ("Basic.Ack", _decode_ack),
}


def deliver_frame(
    channel: int,
    consumer_tag: bytes,
    delivery_tag: int,
    redelivered: bool,
    exchange: bytes,
    routing_key: bytes,
) -> bytes:
    """Encode a whole ``basic.deliver`` method frame.

    Deliveries are the broker's busiest frames; packing them here costs a
    fraction of pamqp's generic marshalling. The strings come encoded.
    """
    payload = b"".join(
        (
            _DELIVER_INDEX,
            _short(consumer_tag),
            struct.pack(">QB", delivery_tag, redelivered),
            _short(exchange),
            _short(routing_key),
        )
    )
    return FRAME_HEAD.pack(1, channel, len(payload)) + payload + b"\xce"


def decode_method(payload: bytes) -> Any:
    """Decode a method frame's payload into a pamqp method object.

    Raises
    ------
    AMQPError
        502 SYNTAX_ERROR for a malformed payload; 540 NOT_IMPLEMENTED for a
        method that AMQP 0-9-1 does not define.
    """
    if len(payload) < 4:
        raise AMQPError(502, f"method frame too short ({len(payload)} bytes)")
    (index,) = struct.unpack_from(">I", payload)
    fast = _FAST_DECODERS.get(index)
    if fast is not None:
        name, decode = fast
        try:
            return decode(payload)
        except (IndexError, struct.error, ValueError, UnicodeDecodeError) as err:
            raise AMQPError(502, f"malformed {name!r} frame: {err}") from err
    cls = commands.INDEX_MAPPING.get(index)
    if cls is None:
        class_id, method_id = index >> 16, index & 0xFFFF
        raise AMQPError(540, f"unknown method {class_id}.{method_id}")

    method = cls()
    try:
        method.unmarshal(payload[4:])
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise AMQPError(502, f"malformed {method.name!r} frame: {err}") from err
    return method
