"""Open a TCP connection, run one request on it, close it; retry on failure.

:class:`AsyncSocketHandler` is the reference helper that lvmopstools actors use
to talk to a device over TCP: each call opens a fresh connection, hands the
stream pair to a callback (or to :meth:`AsyncSocketHandler.request` in a
subclass), closes the connection, and returns the callback's result. Failures
to connect and failures inside the callback are retried with a
:class:`~lvmopstools.retrier.Retrier`.

What it does not do: it keeps no connection open between calls (no pooling,
no keep-alive), it does not use TLS, and it does not parse any protocol; the
callback owns the bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from lvmopstools.retrier import Retrier

__all__ = ["AsyncSocketHandler", "RequestCallback"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: A request callback: receives the connected stream pair, returns a result.
RequestCallback = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[T]]

_RETRIER_PARAMETERS = frozenset(f.name for f in dataclasses.fields(Retrier))


@dataclass
class AsyncSocketHandler:
    """Connect to a TCP server, run a request on the connection, and close it.

    There are two ways to use this class. The first is to create an instance
    and call it with a callback that receives the
    :class:`~asyncio.StreamReader` and :class:`~asyncio.StreamWriter`::

        async def callback(reader, writer):
            writer.write(b"status\\n")
            return await reader.readline()

        handler = AsyncSocketHandler(host, port)
        reply = await handler(callback)

    The second is to subclass ``AsyncSocketHandler`` and override
    :meth:`request`::

        class StatusHandler(AsyncSocketHandler):
            async def request(self, reader, writer):
                ...

        reply = await StatusHandler(host, port)()

    Each attempt opens a new connection, runs the callback, and closes the
    connection whether the callback succeeded or not. A failure while closing
    is logged at DEBUG and never raised, so it cannot hide the callback's
    result or error.

    Parameters
    ----------
    host
        The host that is running the server.
    port
        The port on which the server is listening (1 to 65535).
    timeout
        The timeout, in seconds, of each attempt: connecting and running the
        callback together must finish within it, or the attempt fails with
        :class:`TimeoutError`. Closing the connection afterwards is bounded by
        the same value separately.
    retry
        Whether to retry the attempt when connecting or the callback fails.
        With :obj:`False`, one attempt is made and its error propagates.
    retrier_params
        Keyword arguments for the :class:`~lvmopstools.retrier.Retrier` used
        when ``retry`` is :obj:`True` (a new ``Retrier`` is built on each call).

    Raises
    ------
    ValueError
        If ``host``, ``port``, ``timeout`` or ``retrier_params`` is invalid;
        the message names the parameter and the value.
    """

    host: str
    port: int
    timeout: float = 5
    retry: bool = True
    retrier_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            msg = f"host must be a non-empty string, got {self.host!r}."
            raise ValueError(msg)

        port = self.port
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            msg = f"port must be an integer from 1 to 65535, got {port!r}."
            raise ValueError(msg)

        timeout = self.timeout
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 < timeout < math.inf
        ):
            msg = f"timeout must be a finite number of seconds > 0, got {timeout!r}."
            raise ValueError(msg)

        self._check_retrier_params()

    def _check_retrier_params(self) -> None:
        """Raise ValueError if ``retrier_params`` cannot build a Retrier."""
        params = self.retrier_params
        if not isinstance(params, dict):
            msg = f"retrier_params must be a dict, got {params!r}."
            raise ValueError(msg)

        unknown = sorted(set(params) - _RETRIER_PARAMETERS)
        if unknown:
            msg = (
                f"retrier_params has unknown keys {unknown!r}; "
                f"accepted keys are {sorted(_RETRIER_PARAMETERS)!r}."
            )
            raise ValueError(msg)

        try:
            Retrier(**params)
        except (TypeError, ValueError) as exc:
            msg = f"retrier_params {params!r} are invalid: {exc}"
            raise ValueError(msg) from exc

    @overload
    async def __call__(self, callback: RequestCallback[T]) -> T: ...

    @overload
    async def __call__(self, callback: None = None) -> Any: ...

    async def __call__(self, callback: RequestCallback[Any] | None = None) -> Any:
        """Connect, run ``callback`` (or :meth:`request`), close, return its result.

        Parameters
        ----------
        callback
            A coroutine function receiving ``(reader, writer)``. If
            :obj:`None`, :meth:`request` is used, which a subclass must
            override.

        Returns
        -------
        object
            What the callback returned, or :obj:`None` if every attempt failed
            and ``retrier_params`` sets ``raise_on_max_attempts=False``.

        Raises
        ------
        NotImplementedError
            If no callback is given and :meth:`request` is not overridden;
            raised before any connection is made.
        TypeError
            If ``callback`` is not callable.
        """
        if callback is None:
            if getattr(self.request, "__func__", None) is AsyncSocketHandler.request:
                msg = (
                    f"{type(self).__name__} was called without a callback and does "
                    "not override request(); pass a callback receiving "
                    "(reader, writer) or subclass AsyncSocketHandler and override "
                    "request()."
                )
                raise NotImplementedError(msg)
            callback = self.request
        elif not callable(callback):
            msg = (
                f"callback must be a coroutine function receiving (reader, writer), "
                f"got {callback!r}."
            )
            raise TypeError(msg)

        if not self.retry:
            return await self._attempt(callback)

        retrier = Retrier(**self.retrier_params)
        return await retrier(self._attempt)(callback)

    async def request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Any:
        """Send a request on a connected socket; override in a subclass.

        Used when the handler is called without a callback. It receives the
        :class:`~asyncio.StreamReader` and :class:`~asyncio.StreamWriter` of a
        freshly opened connection, which is closed after it returns.

        Raises
        ------
        NotImplementedError
            Always, in this base class.
        """
        msg = (
            "AsyncSocketHandler.request() is not implemented; pass a callback or "
            "override request() in a subclass."
        )
        raise NotImplementedError(msg)

    async def _attempt(self, callback: RequestCallback[T]) -> T:
        """Make one attempt: connect and run the callback in time, then close."""
        writer: asyncio.StreamWriter | None = None
        deadline = asyncio.timeout(self.timeout)
        try:
            async with deadline:
                reader, writer = await asyncio.open_connection(self.host, self.port)
                return await callback(reader, writer)
        except TimeoutError as exc:
            if not deadline.expired():
                raise

            phase = "connect to" if writer is None else "run the request on"
            msg = (
                f"could not {phase} {self.host}:{self.port} within "
                f"timeout={self.timeout!r} s."
            )
            raise TimeoutError(msg) from exc
        finally:
            if writer is not None:
                await self._close(writer)

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        """Close ``writer`` and wait for it; log a failure at DEBUG, never raise."""
        try:
            writer.close()
            async with asyncio.timeout(self.timeout):
                await writer.wait_closed()
        except Exception:
            log.debug(
                "closing the connection to %s:%s failed",
                self.host,
                self.port,
                exc_info=True,
            )
