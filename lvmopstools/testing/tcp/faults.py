"""Faults for :class:`FlakyServer` and :class:`FaultProxy`, as data.

Every fault is a small frozen dataclass with a stable ``kind`` name and
plain-typed fields, so that a scenario file can describe it; the same goes for
the trigger that says when it applies, defined in
:mod:`lvmopstools.testing.tcp.triggers` and re-exported here. Nothing here
does any I/O: the server and the proxy read these records and act on them.

A fault has a *scope*, which says when its trigger is consulted:

``listener``
    While the trigger holds, the listening port is closed
    (:class:`RefuseConnections`).
``connection``
    Once per accepted connection; when the trigger fires, the fault applies to
    that connection for its whole life (:class:`CloseOnAccept`,
    :class:`Blackhole`, :class:`CloseAfterBytes`, :class:`SlowClose`).
``data``
    Once per chunk read from the client (upstream) and once per reply
    (downstream), in the fault's direction (:class:`Latency`,
    :class:`Bandwidth`, :class:`Slice`). A fault with ``direction="both"``
    is consulted on each of the two, as two occasions; for that reason it
    takes no count trigger (:class:`FirstN`, :class:`AfterN`,
    :class:`EveryKth` raise NotImplementedError there).
``reply``
    Once per reply (:class:`PartialReply`, :class:`CorruptReply`,
    :class:`WrongReply`, :class:`StopAnswering`).

For :class:`FaultProxy`, which does not know the protocol it carries, each
chunk of bytes read from one side counts as one request (client side) or one
reply (server side).

What this does not model: faults below TCP (packet loss, reordering,
duplicated segments, MTU effects), TLS, and UDP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from lvmopstools.testing.tcp._checks import check_count, check_number
from lvmopstools.testing.tcp.triggers import (
    AfterN,
    Always,
    EveryKth,
    FirstN,
    Matches,
    Probability,
    TimeWindow,
    Trigger,
)

__all__ = [
    "AfterN",
    "Always",
    "Bandwidth",
    "Blackhole",
    "CloseAfterBytes",
    "CloseOnAccept",
    "CorruptReply",
    "Direction",
    "EveryKth",
    "Fault",
    "FirstN",
    "Latency",
    "Matches",
    "PartialReply",
    "Probability",
    "RefuseConnections",
    "Scope",
    "Slice",
    "SlowClose",
    "StopAnswering",
    "TimeWindow",
    "Trigger",
    "WrongReply",
]

Direction = Literal["upstream", "downstream", "both"]
Scope = Literal["listener", "connection", "data", "reply"]

_DIRECTIONS = ("upstream", "downstream", "both")


def _check_direction(owner: str, value: object) -> None:
    """Raise if ``value`` is not one of the three directions."""
    if value not in _DIRECTIONS:
        msg = (
            f"{owner}: direction must be one of {', '.join(map(repr, _DIRECTIONS))}, "
            f"got {value!r}"
        )
        raise ValueError(msg)


# --- faults ---------------------------------------------------------------------


def _check_counted_both(owner: str, direction: str, trigger: Trigger) -> None:
    """Raise NotImplementedError for a count trigger on both directions."""
    # Limitation: the request leg and the reply leg of a "both" data fault are
    # separate occasions (a read chunk is not a request, a proxied chunk not a
    # reply), so a count would not be a count of requests.
    if direction == "both" and isinstance(trigger, FirstN | AfterN | EveryKth):
        msg = (
            f"{owner}: direction='both' with a {type(trigger).__name__} trigger "
            "is not supported: the way in and the way out are counted as "
            f"separate occasions, so {trigger!r} would not count requests. Add "
            "one fault with direction='upstream' and one with "
            "direction='downstream', each with its own trigger"
        )
        raise NotImplementedError(msg)


@dataclass(frozen=True)
class Fault:
    """Base class of all faults.

    Parameters
    ----------
    trigger
        When the fault applies (keyword only); :class:`Always` by default.
    """

    kind: ClassVar[str] = "fault"
    scope: ClassVar[Scope] = "reply"
    allowed_triggers: ClassVar[tuple[type[Trigger], ...] | None] = None

    trigger: Trigger = field(default_factory=Always, kw_only=True)

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not isinstance(self.trigger, Trigger):
            msg = (
                f"{name}: trigger must be a Trigger (Always(), FirstN(2), ...), "
                f"got {self.trigger!r}"
            )
            raise TypeError(msg)

        allowed = self.allowed_triggers
        if allowed is not None and not isinstance(self.trigger, allowed):
            names = ", ".join(t.__name__ for t in allowed)
            msg = f"{name} supports only these triggers: {names}; got {self.trigger!r}"
            raise NotImplementedError(msg)

        if isinstance(self.trigger, Matches) and self.scope not in ("data", "reply"):
            msg = (
                f"{name}: a Matches trigger needs a request to look at, but this "
                f"fault applies per {self.scope}; use a count, time or "
                "probability trigger instead"
            )
            raise ValueError(msg)


@dataclass(frozen=True)
class RefuseConnections(Fault):
    """Close the listening port, so that connecting fails with ECONNREFUSED.

    The same port is opened again when the fault is removed or its time
    window ends. Connections already established are left alone.

    .. note::
        Refused attempts never reach the server, so they cannot be counted:
        only :class:`Always` and :class:`TimeWindow` triggers are supported
        (other triggers raise NotImplementedError).
    """

    kind: ClassVar[str] = "refuse"
    scope: ClassVar[Scope] = "listener"
    allowed_triggers: ClassVar[tuple[type[Trigger], ...] | None] = (Always, TimeWindow)


@dataclass(frozen=True)
class CloseOnAccept(Fault):
    """Accept a connection and close it at once.

    Parameters
    ----------
    reset
        Close with a TCP reset (RST, via ``SO_LINGER`` 0) instead of a FIN.
    delay
        Seconds to wait after accepting before closing.
    """

    kind: ClassVar[str] = "close_on_accept"
    scope: ClassVar[Scope] = "connection"
    reset: bool = False
    delay: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("CloseOnAccept", "delay", self.delay, positive=False)


@dataclass(frozen=True)
class Blackhole(Fault):
    """Accept a connection, read everything, never answer.

    Parameters
    ----------
    close_after
        Seconds after which to close the connection, or None to keep it open
        until the client gives up.
    """

    kind: ClassVar[str] = "blackhole"
    scope: ClassVar[Scope] = "connection"
    close_after: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.close_after is not None:
            check_number(
                "Blackhole",
                "close_after",
                self.close_after,
                positive=False,
                infinite="use close_after=None to keep the connection open",
            )


@dataclass(frozen=True)
class CloseAfterBytes(Fault):
    """Close a connection once ``nbytes`` have passed in ``direction``.

    Parameters
    ----------
    nbytes
        Bytes let through before the connection is closed.
    direction
        Which bytes count: ``"upstream"`` (client to server),
        ``"downstream"`` (server to client) or ``"both"``.
    reset
        Close with a TCP reset instead of a FIN.
    """

    kind: ClassVar[str] = "close_after_bytes"
    scope: ClassVar[Scope] = "connection"
    nbytes: int
    direction: Direction = "downstream"
    reset: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("CloseAfterBytes", "nbytes", self.nbytes, minimum=0)
        _check_direction("CloseAfterBytes", self.direction)


@dataclass(frozen=True)
class SlowClose(Fault):
    """Wait ``delay`` seconds before closing a connection that should close.

    Parameters
    ----------
    delay
        Seconds between the moment the connection would close and the close.
    """

    kind: ClassVar[str] = "slow_close"
    scope: ClassVar[Scope] = "connection"
    delay: float

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("SlowClose", "delay", self.delay, positive=False)


@dataclass(frozen=True)
class Latency(Fault):
    """Delay data by ``delay`` seconds, plus or minus ``jitter``.

    Parameters
    ----------
    delay
        Base delay in seconds.
    jitter
        Each delay is drawn uniformly from ``delay - jitter`` to
        ``delay + jitter`` (never below 0) with a generator seeded by ``seed``.
    direction
        ``"upstream"``, ``"downstream"`` (the default) or ``"both"``.
    seed
        Seed of the jitter generator.
    """

    kind: ClassVar[str] = "latency"
    scope: ClassVar[Scope] = "data"
    delay: float
    jitter: float = 0.0
    direction: Direction = "downstream"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("Latency", "delay", self.delay, positive=False)
        check_number("Latency", "jitter", self.jitter, positive=False)
        _check_direction("Latency", self.direction)
        _check_counted_both("Latency", self.direction, self.trigger)


@dataclass(frozen=True)
class Bandwidth(Fault):
    """Limit the data rate to ``rate`` bytes per second.

    Parameters
    ----------
    rate
        Bytes per second.
    direction
        ``"upstream"``, ``"downstream"`` (the default) or ``"both"``.
    """

    kind: ClassVar[str] = "bandwidth"
    scope: ClassVar[Scope] = "data"
    rate: float
    direction: Direction = "downstream"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(
            "Bandwidth",
            "rate",
            self.rate,
            positive=True,
            infinite="remove the fault for an unlimited rate",
        )
        _check_direction("Bandwidth", self.direction)
        _check_counted_both("Bandwidth", self.direction, self.trigger)


@dataclass(frozen=True)
class Slice(Fault):
    """Send data in small chunks with a delay between them.

    Parameters
    ----------
    size
        Average chunk size in bytes.
    delay
        Seconds between two chunks.
    size_variation
        Each chunk size is drawn uniformly from ``size - size_variation`` to
        ``size + size_variation`` (at least 1 byte), seeded by ``seed``.
    direction
        ``"upstream"``, ``"downstream"`` (the default) or ``"both"``.
    seed
        Seed of the size generator.
    """

    kind: ClassVar[str] = "slice"
    scope: ClassVar[Scope] = "data"
    size: int
    delay: float = 0.0
    size_variation: int = 0
    direction: Direction = "downstream"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("Slice", "size", self.size, minimum=1)
        check_number("Slice", "delay", self.delay, positive=False)
        check_count("Slice", "size_variation", self.size_variation, minimum=0)
        _check_direction("Slice", self.direction)
        _check_counted_both("Slice", self.direction, self.trigger)


@dataclass(frozen=True)
class PartialReply(Fault):
    """Send only the start of a reply, then close the connection.

    Parameters
    ----------
    nbytes
        Bytes of the reply to send; None sends half of it (rounded down).
    reset
        Close with a TCP reset instead of a FIN.
    """

    kind: ClassVar[str] = "partial_reply"
    scope: ClassVar[Scope] = "reply"
    nbytes: int | None = None
    reset: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nbytes is not None:
            check_count("PartialReply", "nbytes", self.nbytes, minimum=0)


@dataclass(frozen=True)
class CorruptReply(Fault):
    """Replace a reply by garbage, or flip some of its bits.

    The bytes come from the server's (or proxy's) seeded Faker, so a run is
    reproducible.

    Parameters
    ----------
    mode
        ``"garbage"``: random bytes of the same length (the framing
        terminator, if the reply ends with one, is kept so the client still
        reads one reply); ``"flip"``: ``nbytes`` distinct, randomly chosen
        bytes are inverted (XOR 0xFF), never those of the terminator the
        reply ends with; when no terminator is known (raw or fixed-length
        framing, a proxy without ``terminator``) the last byte is kept
        instead, unless the reply has only one byte. No flipped byte becomes
        the terminator's first byte.
    nbytes
        How many bytes to flip in ``"flip"`` mode; a reply with fewer bytes
        that may be flipped has all of them flipped.

    .. note::
        A reply that is nothing but the terminator has no byte to corrupt
        and is sent unchanged, in either mode.
    """

    kind: ClassVar[str] = "corrupt_reply"
    scope: ClassVar[Scope] = "reply"
    mode: Literal["garbage", "flip"] = "garbage"
    nbytes: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in ("garbage", "flip"):
            msg = f"CorruptReply: mode must be 'garbage' or 'flip', got {self.mode!r}"
            raise ValueError(msg)
        check_count("CorruptReply", "nbytes", self.nbytes, minimum=1)


@dataclass(frozen=True)
class WrongReply(Fault):
    """Answer with the reply to another request.

    Parameters
    ----------
    reply
        The bytes to send instead; None (the default) sends the reply that
        the previous request on the same connection got from the script (or,
        through the proxy, the previous chunk from the target): nothing, if
        there was none.
    """

    kind: ClassVar[str] = "wrong_reply"
    scope: ClassVar[Scope] = "reply"
    reply: bytes | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reply is not None and not isinstance(self.reply, bytes):
            msg = f"WrongReply: reply must be bytes or None, got {self.reply!r}"
            raise TypeError(msg)


@dataclass(frozen=True)
class StopAnswering(Fault):
    """From the triggering reply on, the connection answers nothing more.

    The connection stays open. :class:`FlakyServer` reads and drops
    everything the client sends from then on; :class:`FaultProxy` still
    forwards it to the target, and drops what the target sends back. Combine
    with :class:`AfterN` for "answers three requests, then goes silent".
    """

    kind: ClassVar[str] = "stop_answering"
    scope: ClassVar[Scope] = "reply"


FAULT_TYPES: dict[str, type[Fault]] = {
    cls.kind: cls
    for cls in (
        RefuseConnections,
        CloseOnAccept,
        Blackhole,
        CloseAfterBytes,
        SlowClose,
        Latency,
        Bandwidth,
        Slice,
        PartialReply,
        CorruptReply,
        WrongReply,
        StopAnswering,
    )
}
"""Fault classes by their ``kind`` name (for scenario loaders)."""

TRIGGER_TYPES: dict[str, type[Trigger]] = {
    cls.kind: cls
    for cls in (Always, FirstN, AfterN, EveryKth, TimeWindow, Probability, Matches)
}
"""Trigger classes by their ``kind`` name (for scenario loaders)."""
