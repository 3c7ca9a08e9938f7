"""How data faults turn one write into timed pieces (private helpers).

Shared by FlakyServer and FaultProxy: given the data faults that fired for
one request or reply, work out the delay before the first byte and the
pieces to write with the pause before each; and the reply faults' rewriting
of a reply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lvmopstools.testing.tcp.faults import (
    Bandwidth,
    CorruptReply,
    Fault,
    Latency,
    PartialReply,
    Slice,
    StopAnswering,
    WrongReply,
)

if TYPE_CHECKING:
    from faker import Faker

    from lvmopstools.testing.tcp._triggers import FaultState

__all__ = ["Rewrite", "plan_delivery", "rewrite_reply"]

# A bandwidth limit is applied in pieces worth this many seconds of data, so
# that a large write trickles out instead of arriving late in one block.
_BANDWIDTH_TICK = 0.05


def plan_delivery(
    data: bytes, fired: list[tuple[Fault, FaultState]]
) -> tuple[float, list[tuple[float, bytes]]]:
    """Return the latency and the ``(pause, piece)`` steps to deliver ``data``.

    Several latencies add up; the first :class:`Slice` and the lowest
    :class:`Bandwidth` apply.
    """
    latency = 0.0
    slicer: tuple[Slice, FaultState] | None = None
    rate: float | None = None

    for fault, state in fired:
        if isinstance(fault, Latency):
            jitter = (
                state.rng.uniform(-fault.jitter, fault.jitter) if fault.jitter else 0
            )
            latency += max(0.0, fault.delay + jitter)
        elif isinstance(fault, Slice) and slicer is None:
            slicer = (fault, state)
        elif isinstance(fault, Bandwidth):
            rate = fault.rate if rate is None else min(rate, fault.rate)

    pieces = _cut(data, slicer, rate)
    steps: list[tuple[float, bytes]] = []
    for index, piece in enumerate(pieces):
        pause = 0.0
        if slicer is not None and index > 0:
            pause += slicer[0].delay
        if rate is not None:
            pause += len(piece) / rate
        steps.append((pause, piece))
    return latency, steps


def _cut(
    data: bytes, slicer: tuple[Slice, FaultState] | None, rate: float | None
) -> list[bytes]:
    if slicer is not None:
        fault, state = slicer
        pieces = []
        offset = 0
        while offset < len(data):
            size = fault.size
            if fault.size_variation:
                size += state.rng.randint(-fault.size_variation, fault.size_variation)
            size = max(1, size)
            pieces.append(data[offset : offset + size])
            offset += size
        return pieces or [data]

    if rate is not None:
        size = max(1, int(rate * _BANDWIDTH_TICK))
        return [data[i : i + size] for i in range(0, len(data), size)] or [data]

    return [data]


class Rewrite:
    """What the reply faults did to one reply."""

    __slots__ = ("close", "reply", "reset", "silence")

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.close = False
        self.reset = False
        self.silence = False


def rewrite_reply(
    reply: bytes,
    previous: bytes | None,
    fired: list[tuple[Fault, FaultState]],
    faker: Faker,
    terminator: bytes | None,
) -> Rewrite:
    """Apply the reply faults that fired to ``reply``.

    ``previous`` is the reply sent before on the same connection (for
    :class:`WrongReply`); ``terminator`` is kept at the end of garbage.
    """
    result = Rewrite(reply)

    for fault, _ in fired:
        if isinstance(fault, StopAnswering):
            result.silence = True
        elif isinstance(fault, WrongReply):
            result.reply = fault.reply if fault.reply is not None else previous or b""
        elif isinstance(fault, CorruptReply):
            result.reply = _corrupt(result.reply, fault, faker, terminator)
        elif isinstance(fault, PartialReply):
            keep = len(result.reply) // 2 if fault.nbytes is None else fault.nbytes
            result.reply = result.reply[:keep]
            result.close = True
            result.reset = result.reset or fault.reset

    return result


def _flip(data: bytes, nbytes: int, faker: Faker, terminator: bytes | None) -> bytes:
    """Invert ``nbytes`` distinct bytes of ``data``, never its terminator.

    With no terminator known, the last byte is kept instead (it may end a
    frame), unless it is the only one.
    """
    if terminator and data.endswith(terminator):
        eligible = len(data) - len(terminator)
    elif terminator is None and len(data) > 1:
        eligible = len(data) - 1
    else:
        eligible = len(data)

    out = bytearray(data)
    for index in faker.random.sample(range(eligible), min(nbytes, eligible)):
        flipped = out[index] ^ 0xFF
        if terminator and flipped == terminator[0]:
            flipped ^= 0x80  # Keep a second terminator out of the reply.
        out[index] = flipped
    return bytes(out)


def _corrupt(
    data: bytes, fault: CorruptReply, faker: Faker, terminator: bytes | None
) -> bytes:
    if not data:
        return data

    if fault.mode == "flip":
        return _flip(data, fault.nbytes, faker, terminator)

    tail = b""
    if terminator and data.endswith(terminator):
        tail = terminator
    body_length = len(data) - len(tail)
    garbage: bytes = faker.binary(length=body_length) if body_length else b""
    if tail:
        # Keep the garbage from containing the terminator, so the client reads
        # exactly one (bad) reply.
        garbage = garbage.replace(tail[:1], b"?")
    return garbage + tail
