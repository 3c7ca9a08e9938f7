"""The event log kept by :class:`FlakyServer` and :class:`FaultProxy`.

Each thing that happens (a connection accepted, a request, a reply, a fault
applied, the port closed or opened again) is appended as a frozen
:class:`Event`, stamped with the event loop's time (virtual when a
:class:`~lvmopstools.testing.clock.VirtualClock` is active). The log is meant
for assertions in tests and for the timeline printed when a scenario fails; it
is not a packet capture: the proxy records byte counts per connection, not the
bytes themselves.

The kinds of event: ``opened``, ``closed`` (the endpoint, or a connection
when it has a number), ``accepted``, ``closing`` (the endpoint starts to close
a connection; with its byte counts), ``fault_added``, ``fault_removed``,
``fault`` (a trigger fired), ``listener_closed`` and ``listener_reopened``
(refused connections never reach the endpoint, so they are seen as the
port's closing and opening), ``request``, ``reply``, ``unmatched``,
``ignored``, ``silenced``, ``dropped``, ``handler_failed``, ``error``; for
the proxy also ``data`` (with ``record_data=True``), ``target_connected``,
``target_unreachable`` and ``target_closed``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Event", "EventLog"]


@dataclass(frozen=True)
class Event:
    """One thing that happened on a server or proxy.

    Parameters
    ----------
    time
        ``loop.time()`` when it happened (virtual under a clock).
    elapsed
        Seconds since the server or proxy opened.
    clock_time
        ``current_clock().time()`` when a virtual clock was active, else None.
    source
        Name of the server or proxy.
    kind
        What happened, e.g. ``"accepted"``, ``"request"``, ``"reply"``,
        ``"fault"``, ``"listener_closed"``.
    connection
        Number of the connection (from 1, in accept order), or None.
    details
        Anything else worth knowing (bytes, fault kind, ...).
    """

    time: float
    elapsed: float
    clock_time: float | None
    source: str
    kind: str
    connection: int | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def format(self) -> str:
        """Return the event as one line of a timeline."""
        conn = "-" if self.connection is None else f"#{self.connection}"
        extra = " ".join(f"{key}={value!r}" for key, value in self.details.items())
        return (
            f"{self.elapsed:10.4f}s {self.source} {conn} {self.kind} {extra}".rstrip()
        )


class EventLog:
    """An append-only list of :class:`Event` with small query helpers."""

    def __init__(self) -> None:
        self._events: list[Event] = []

    def append(self, event: Event) -> None:
        """Add an event at the end of the log."""
        self._events.append(event)

    def __iter__(self) -> Iterator[Event]:
        return iter(self._events)

    def __len__(self) -> int:
        return len(self._events)

    def select(
        self, kind: str | None = None, connection: int | None = None
    ) -> list[Event]:
        """Return the events of one kind and/or one connection, in order.

        Parameters
        ----------
        kind
            Keep only events of this kind (all kinds if None).
        connection
            Keep only events of this connection (all if None).
        """
        return [
            event
            for event in self._events
            if (kind is None or event.kind == kind)
            and (connection is None or event.connection == connection)
        ]

    def count(self, kind: str) -> int:
        """Return how many events of ``kind`` were recorded."""
        return sum(1 for event in self._events if event.kind == kind)

    def format(self) -> str:
        """Return the whole log as a timeline, one event per line."""
        return "\n".join(event.format() for event in self._events)
