"""FlakyServer: a real TCP server on loopback that stands in for a device.

The server cuts what a client sends into requests (lines, fixed-length
records, or whatever each read returns), answers each request from a script
or a Python handler, and applies the faults of
:mod:`lvmopstools.testing.tcp.faults` on the way in and out. Everything it
does lands in its event log (:mod:`lvmopstools.testing.tcp.records`).

What it does not simulate: a device's own timing (it answers at once unless a
fault delays the reply), several replies to one request (use a handler that
returns them joined), unsolicited messages, TLS, UDP, IPv6 listeners.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeAlias

from lvmopstools.testing.tcp._endpoint import Endpoint
from lvmopstools.testing.tcp._link import Link
from lvmopstools.testing.tcp._shaping import plan_delivery, rewrite_reply

if TYPE_CHECKING:
    from faker import Faker

    from lvmopstools.testing.tcp.faults import Fault

__all__ = [
    "FakeReply",
    "FlakyServer",
    "Framing",
    "GarbageReply",
    "Reply",
    "ReplyFunction",
    "Request",
    "Script",
]

log = logging.getLogger(__name__)

Framing: TypeAlias = Literal["line", "raw"] | int
"""How requests are cut: by terminator, per read, or every N bytes."""


@dataclass(frozen=True)
class Request:
    """One request as the server's script or handler sees it.

    Parameters
    ----------
    data
        The request bytes (for line framing, without the terminator).
    connection
        The connection number (from 1, in accept order).
    number
        The request number on the server (from 1).
    match
        The match object when a regular expression of the script matched.
    faker
        The server's seeded :class:`faker.Faker`, to make up payloads.
    """

    data: bytes
    connection: int
    number: int
    match: re.Match[bytes] | None
    faker: Faker


ReplyResult: TypeAlias = bytes | None
ReplyFunction: TypeAlias = Callable[[Request], ReplyResult | Awaitable[ReplyResult]]
Reply: TypeAlias = bytes | ReplyFunction
"""A reply: the bytes to send, or a function of the request returning them
(or None for no reply), possibly a coroutine function."""

ScriptKey: TypeAlias = bytes | re.Pattern[bytes]
Script: TypeAlias = Mapping[ScriptKey, Reply] | Iterable[tuple[ScriptKey, Reply]]
"""Request bytes (exact match) or compiled bytes patterns (full match), each
mapped to a reply; the first entry that matches answers."""


class FakeReply:
    """A reply made up by Faker from a template, e.g. ``"T={{pyfloat}}\\n"``.

    Each ``{{formatter}}`` is replaced by the server's seeded Faker (see
    :meth:`faker.Generator.parse`), so the sequence of replies is the same on
    every run with the same seed.

    Parameters
    ----------
    template
        The template text.
    encoding
        How the text becomes bytes.
    """

    def __init__(self, template: str, *, encoding: str = "ascii") -> None:
        if not isinstance(template, str):
            msg = f"FakeReply: template must be a str, got {template!r}"
            raise TypeError(msg)
        self.template = template
        self.encoding = encoding

    def __repr__(self) -> str:
        return f"FakeReply({self.template!r})"

    def __call__(self, request: Request) -> bytes:
        text: str = request.faker.parse(self.template)
        return text.encode(self.encoding, errors="replace")


class GarbageReply:
    """A reply of ``nbytes`` random bytes from the server's seeded Faker.

    Parameters
    ----------
    nbytes
        How many random bytes.
    terminator
        Appended after the random bytes (and kept out of them), so that a
        line-reading client reads exactly one bad reply; empty for none.
    """

    def __init__(self, nbytes: int, *, terminator: bytes = b"\n") -> None:
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            msg = f"GarbageReply: nbytes must be an integer >= 0, got {nbytes!r}"
            raise ValueError(msg)
        self.nbytes = nbytes
        self.terminator = terminator

    def __repr__(self) -> str:
        return f"GarbageReply({self.nbytes!r}, terminator={self.terminator!r})"

    def __call__(self, request: Request) -> bytes:
        garbage: bytes = request.faker.binary(length=self.nbytes)
        if self.terminator:
            garbage = garbage.replace(self.terminator[:1], b"?")
        return garbage + self.terminator


def _check_script(script: Script | None) -> list[tuple[ScriptKey, Reply]]:
    """Return the script as a list of entries, or raise naming the bad entry."""
    if script is None:
        return []

    items = list(script.items()) if isinstance(script, Mapping) else list(script)
    entries: list[tuple[ScriptKey, Reply]] = []
    for item in items:
        if not isinstance(item, tuple) or len(item) != 2:
            msg = (
                f"FlakyServer: a script entry must be a (request, reply) pair, "
                f"got {item!r}"
            )
            raise TypeError(msg)

        key, reply = item
        key_ok = isinstance(key, bytes) or (
            isinstance(key, re.Pattern) and isinstance(key.pattern, bytes)
        )
        if not key_ok:
            msg = (
                f"FlakyServer: a script request must be bytes or a compiled bytes "
                f"pattern (re.compile(rb'...')), got {key!r}"
            )
            raise TypeError(msg)
        if not isinstance(reply, bytes) and not callable(reply):
            msg = (
                f"FlakyServer: the reply to {key!r} must be bytes or a function of "
                f"the Request, got {reply!r}"
            )
            raise TypeError(msg)
        entries.append((key, reply))
    return entries


def _check_framing(framing: object, terminator: object) -> None:
    if framing not in ("line", "raw") and (
        isinstance(framing, bool) or not isinstance(framing, int) or framing < 1
    ):
        msg = (
            f"FlakyServer: framing must be 'line', 'raw' or a record length in "
            f"bytes (an int >= 1), got {framing!r}"
        )
        raise ValueError(msg)

    if not isinstance(terminator, bytes) or not terminator:
        msg = f"FlakyServer: terminator must be non-empty bytes, got {terminator!r}"
        raise ValueError(msg)


class FlakyServer(Endpoint):
    """A fake device: a real TCP server on 127.0.0.1 answering from a script.

    Use it as an async context manager; ``host`` and ``port`` say where to
    connect::

        script = {b"status": b"idle\\n", re.compile(rb"move (\\d+)"): b"ok\\n"}
        async with FlakyServer(script) as device:
            handler = AsyncSocketHandler(device.host, device.port)
            with device.fault(Latency(2.0)):
                ...

    Each request is answered in order on its connection: the first script
    entry that matches answers (bytes match the whole request, a compiled
    pattern must match all of it, with :meth:`re.Pattern.fullmatch`);
    otherwise ``handler`` answers; otherwise the request is recorded as
    ``"unmatched"`` and gets no reply. A reply function that raises ends that
    connection and the error is raised again when the server closes.

    Parameters
    ----------
    script
        Request bytes or compiled bytes patterns, mapped to replies (bytes,
        or a function of the :class:`Request`, sync or async, returning the
        bytes or None for no reply). Replies are sent as given: include the
        terminator of a line protocol.
    handler
        Keyword only. Answers the requests that no script entry matches.
    framing
        Keyword only. ``"line"`` (the default) cuts requests after each
        ``terminator`` and strips it; an int cuts records of that many bytes;
        ``"raw"`` takes each read as one request.
    terminator
        Keyword only. The line terminator, ``b"\\n"`` by default.
    faults
        Keyword only. Faults active from the start (see :meth:`add_fault`).
    host
        Keyword only. The address to listen on, ``"127.0.0.1"`` by default
        (IPv4 only).
    port
        Keyword only. The port, 0 (the default) for a free one.
    name
        Keyword only. The name in the event log.
    seed
        Keyword only. Seed of :attr:`faker`, which makes up
        :class:`FakeReply` payloads and corrupt replies.

    Raises
    ------
    TypeError, ValueError
        If an argument has the wrong type or value; the message names it.

    .. note::
        A connection the server closes with a FIN (a fault such as
        :class:`~lvmopstools.testing.tcp.faults.CloseOnAccept` or
        :class:`~lvmopstools.testing.tcp.faults.PartialReply`) is half-closed
        as TCP does it: the server keeps reading and
        dropping what the client sends until the client closes its side, so
        that unread bytes do not turn the FIN into a reset. A client that
        half-closes its side (``write_eof()``) still gets the replies to
        everything it sent before, delayed or computed by an async reply
        function: the server closes once the last of them has left.

    .. note::
        On exit every connection, timer and task of the server is closed, and
        its address is unregistered from the virtual clock, also when the
        block raised.

    .. note::
        The server takes no :func:`~lvmopstools.testing.clock.in_flight`
        hold: a script answers in the callback that read the request, every
        delay is a loop timer (virtual under a clock), and an async reply
        function runs as a task, which keeps the clock from jumping while it
        is runnable. A reply function that waits for real I/O the clock does
        not see (a thread, another process) must hold ``in_flight()`` itself.
    """

    def __init__(
        self,
        script: Script | None = None,
        *,
        handler: ReplyFunction | None = None,
        framing: Framing = "line",
        terminator: bytes = b"\n",
        faults: Iterable[Fault] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        name: str = "FlakyServer",
        seed: int = 0,
    ) -> None:
        super().__init__(host=host, port=port, name=name, seed=seed)
        if handler is not None and not callable(handler):
            msg = (
                f"FlakyServer: handler must be a function of the Request, got "
                f"{handler!r}"
            )
            raise TypeError(msg)
        _check_framing(framing, terminator)

        self.script = _check_script(script)
        self.handler = handler
        self.framing = framing
        self.terminator = terminator
        self.requests = 0
        for fault in faults:
            self.add_fault(fault)

    def __repr__(self) -> str:
        where = f"{self.host}:{self.port}" if self.listening else "not listening"
        return f"<FlakyServer {self.name!r} {where}>"

    def make_link(self, number: int, fired: list[Fault]) -> Link:
        """Return the protocol of a connection."""
        return _ServerLink(self, number, fired)

    def answer(
        self, data: bytes, connection: int
    ) -> ReplyResult | Awaitable[ReplyResult]:
        """Return the reply to one request, following the script.

        Parameters
        ----------
        data
            The request.
        connection
            The connection it came on.

        Returns
        -------
        bytes or None or awaitable
            The reply, None for no reply, or an awaitable of either (from an
            async reply function).
        """
        self.requests += 1
        for key, reply in self.script:
            match: re.Match[bytes] | None = None
            if isinstance(key, bytes):
                if key != data:
                    continue
            else:
                match = key.fullmatch(data)
                if match is None:
                    continue
            if isinstance(reply, bytes):
                return reply
            return reply(self._request(data, connection, match))

        if self.handler is not None:
            return self.handler(self._request(data, connection, None))

        self.record("unmatched", connection, data=data)
        log.debug("%s: no script entry matches %r", self.name, data)
        return None

    def _request(
        self, data: bytes, connection: int, match: re.Match[bytes] | None
    ) -> Request:
        return Request(data, connection, self.requests, match, self.faker)


class _ServerLink(Link):
    """A connection of a FlakyServer: frames requests and answers them."""

    endpoint: FlakyServer

    def __init__(self, endpoint: FlakyServer, number: int, fired: list[Fault]) -> None:
        super().__init__(endpoint, number, fired)
        self.buffer = b""
        self.previous: bytes | None = None
        self.silenced = False
        self.backlog: deque[bytes] = deque()
        self.busy = False
        self.requests_done = False

    def received(self, data: bytes) -> None:
        """Take bytes read from the client through the upstream data faults."""
        self.bytes_in += len(data)
        if self.closing or self.blackhole or self.close_on_accept:
            self.record("dropped", nbytes=len(data))
            return

        server = self.endpoint
        if not server.has_faults:
            self.up.send(data, 0.0, [(0.0, data)])  # After what is still queued.
            return

        fired = server.select(
            "data", direction="upstream", request=data, connection=self.number
        )
        latency, steps = plan_delivery(data, fired)
        self.up.send(data, latency, steps)

    def upstream_sink(self, data: bytes) -> None:
        framing = self.endpoint.framing
        if framing == "raw":
            self.request(data)
            return

        buffer = self.buffer + data
        if framing == "line":
            terminator = self.endpoint.terminator
            *requests, buffer = buffer.split(terminator)
        else:
            assert isinstance(framing, int)
            cut = len(buffer) - len(buffer) % framing
            requests = [buffer[i : i + framing] for i in range(0, cut, framing)]
            buffer = buffer[cut:]
        self.buffer = buffer
        for request in requests:
            self.request(request)

    def request(self, data: bytes) -> None:
        """Answer one request, after those still being answered."""
        if self.closing:
            return
        self.record("request", data=data)
        if self.silenced:
            self.record("ignored", data=data)
            return
        if self.busy:
            self.backlog.append(data)
            return

        try:
            reply = self.endpoint.answer(data, self.number)
        except Exception as exc:
            self._failed(data, exc)
            return

        if inspect.isawaitable(reply):
            self.busy = True
            self.endpoint.spawn(self._await_reply(data, reply))
            return
        self.reply(data, reply)

    async def _await_reply(self, data: bytes, pending: Awaitable[ReplyResult]) -> None:
        try:
            reply = await pending
        except Exception as exc:
            self.busy = False
            self._failed(data, exc)
            return

        self.busy = False
        self.reply(data, reply)
        while self.backlog and not self.busy and not self.closing:
            self.request(self.backlog.popleft())
        self._close_when_answered()

    def client_eof(self) -> bool | None:
        """Answer what the client sent before its FIN, then close."""
        self.up.send_last(self._requests_done)
        return True  # Keep the transport open for the replies.

    def _requests_done(self) -> None:
        self.requests_done = True
        self._close_when_answered()

    def _close_when_answered(self) -> None:
        # After the client's FIN, the link closes once the last request is
        # read, its handler is done, the backlog is empty and the replies
        # have left: nothing can queue a reply after that.
        if self.requests_done and not self.busy and not self.backlog:
            self.down.send_last(self.close)

    def _failed(self, data: bytes, exc: Exception) -> None:
        self.endpoint.fail(exc)
        self.record("handler_failed", data=data, error=repr(exc))
        self.close()

    def reply(self, request: bytes, reply: ReplyResult) -> None:
        """Send ``reply`` to ``request`` through the reply and data faults."""
        if reply is None or self.closing:
            return
        if not isinstance(reply, bytes):
            msg = (
                f"{self.endpoint.name}: the reply to {request!r} must be bytes or "
                f"None, got {reply!r}; return bytes from the reply function"
            )
            self._failed(request, TypeError(msg))
            return

        server = self.endpoint
        if not server.has_faults:
            self.previous = reply
            self.record("reply", data=reply)
            self.down.send(reply, 0.0, [(0.0, reply)])
            return

        number = self.number
        fired = server.select("reply", request=request, connection=number)
        rewrite = rewrite_reply(
            reply,
            self.previous,
            fired,
            server.faker,
            server.terminator if server.framing == "line" else None,
        )
        self.previous = reply
        if rewrite.silence:
            self.silenced = True
            self.record("silenced", data=request)
            return

        sent = rewrite.reply
        self.record("reply", data=sent)
        fired = server.select(
            "data", direction="downstream", request=request, connection=number
        )
        latency, steps = plan_delivery(sent, fired)
        self.down.send(sent, latency, steps)
        if rewrite.close:
            self.down.send_close(reset=rewrite.reset)
