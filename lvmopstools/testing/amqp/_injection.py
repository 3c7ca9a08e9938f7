"""The fault-injection controls of the mock AMQP broker.

:class:`FaultInjection` is the part of
:class:`~lvmopstools.testing.amqp.MockBroker` that makes it fail on demand:
:meth:`~FaultInjection.inject` applies a fault from
:mod:`lvmopstools.testing.amqp.faults`, and the actions behind it live here
too: a restart with downtime (:meth:`~FaultInjection.restart`), refusing
connections for a while, dropping connections and closing channels. It owns
the state those actions leave behind between calls: the pending end of a
restart's downtime and the timer that ends a refusal.

It is not for describing faults (that is :mod:`.faults`, plain data), nor for
how a message rule acts on a publish (the broker's publish path, in
:mod:`.server`, asks :class:`~.faults.MessageRules` for the winning rule), nor
for listening and connection bookkeeping (:mod:`.server`). It is a base class
of :class:`~lvmopstools.testing.amqp.MockBroker` only and does not work on its
own.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .faults import (
    CloseChannel,
    DropConnections,
    Fault,
    FaultHandle,
    MessageRule,
    RefuseConnections,
    RestartBroker,
)
from .model import AMQPError

if TYPE_CHECKING:
    from .connection import BrokerConnection
    from .faults import MessageRules

__all__ = ["FaultInjection"]

log = logging.getLogger(__name__)


class FaultInjection:
    """The fault-injection controls of the mock broker, as its base class.

    Its methods are :class:`~lvmopstools.testing.amqp.MockBroker` methods:
    :meth:`inject`, :meth:`clear_faults` and :meth:`restart`, and the private
    actions behind them. They use the broker's connections, listener, timers
    and tasks, which :class:`~lvmopstools.testing.amqp.MockBroker` provides.
    """

    if TYPE_CHECKING:
        # Provided by MockBroker, the only class built on this one.
        rules: MessageRules
        _port: int
        _started: bool
        _connections: list[BrokerConnection]
        _timers: set[asyncio.TimerHandle]
        _tasks: set[asyncio.Task[None]]

        async def start(self) -> None: ...
        async def _stop(self) -> None: ...
        async def _listen(self) -> None: ...
        def _close_listener(self) -> None: ...

    def __init__(self) -> None:
        #: Resolved when a restart's downtime ends: True to start again, False
        #: when stop() or start() was called meanwhile.
        self._downtime: asyncio.Future[bool] | None = None
        self._downtime_timer: asyncio.TimerHandle | None = None
        #: The timer that ends a RefuseConnections refusal.
        self._refusal: asyncio.TimerHandle | None = None

    async def restart(self, downtime: float = 0.0) -> None:
        """Stop, wait ``downtime`` seconds (loop time), and start on the same port.

        Calling :meth:`stop` while the restart is stopping the broker or
        waiting out the downtime, or :meth:`start` during the downtime,
        cancels the restart: this returns without starting the broker.
        """
        self._end_downtime(resume=False)
        loop = asyncio.get_running_loop()
        self._downtime = ending = loop.create_future()
        try:
            await self._stop()
            if not ending.done():
                self._downtime_timer = loop.call_later(
                    downtime, self._end_downtime, True
                )
                self._timers.add(self._downtime_timer)
            resume = await ending
        finally:
            if self._downtime is ending:
                self._end_downtime(resume=False)

        if resume:
            await self.start()
        else:
            log.info("mock broker restart on port %d cancelled", self._port)

    def _end_downtime(self, resume: bool) -> None:
        if self._downtime_timer is not None:
            self._downtime_timer.cancel()
            self._timers.discard(self._downtime_timer)
            self._downtime_timer = None
        if self._downtime is not None and not self._downtime.done():
            self._downtime.set_result(resume)
        self._downtime = None

    async def inject(self, fault: Fault) -> FaultHandle | None:
        """Apply a fault; return a handle for message rules, None for actions.

        Actions (:class:`RestartBroker`, :class:`DropConnections`,
        :class:`RefuseConnections`, :class:`CloseChannel`) act at once;
        ``RestartBroker`` returns when the broker is back (or when a
        :meth:`stop` during the downtime cancelled the restart). Message rules stay
        in force until their ``count`` is used up or the handle is removed.

        A ``RefuseConnections`` during a refusal extends it to the later of
        the two ends.

        Raises
        ------
        TypeError
            If ``fault`` is not one of the broker faults.
        RuntimeError
            For ``RefuseConnections`` while the broker is stopped or
            restarting.
        """
        if isinstance(fault, MessageRule):
            return self.rules.add(fault)

        if isinstance(fault, RestartBroker):
            await self.restart(fault.downtime)
        elif isinstance(fault, DropConnections):
            self._drop(fault.count, fault.mode, "closed by a DropConnections fault")
        elif isinstance(fault, RefuseConnections):
            await self._refuse(fault.duration)
        elif isinstance(fault, CloseChannel):
            self._close_channels(fault)
        else:
            msg = (
                f"{fault!r} is not a broker fault; use one from "
                "lvmopstools.testing.amqp.faults"
            )
            raise TypeError(msg)
        return None

    def clear_faults(self) -> None:
        """Remove every message rule."""
        self.rules.clear()

    def _drop(self, count: int | None, mode: str, reason: str) -> None:
        victims = self._connections[:count] if count is not None else self._connections
        for connection in list(victims):
            if mode == "reset":
                connection.reset()
            else:
                connection.fail(AMQPError(320, reason))
                connection.close_transport()

    async def _refuse(self, duration: float) -> None:
        if not self._started:
            state = "restarting" if self._downtime is not None else "stopped"
            msg = (
                f"cannot refuse connections: the broker is {state}; inject "
                "RefuseConnections while it is running"
            )
            raise RuntimeError(msg)
        for task in list(self._tasks):
            # A refusal that is ending: let it listen again, then refuse anew.
            await asyncio.gather(task, return_exceptions=True)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + duration
        if self._refusal is not None:
            if self._refusal.when() >= deadline:
                return
            # A second refusal while refusing: the later deadline wins.
            self._refusal.cancel()
            self._timers.discard(self._refusal)
        self._close_listener()

        def reopen() -> None:
            self._timers.discard(timer)
            self._refusal = None
            task = loop.create_task(self._listen())
            self._tasks.add(task)
            task.add_done_callback(self._reopened)

        timer = loop.call_at(deadline, reopen)
        self._refusal = timer
        self._timers.add(timer)

    def _reopened(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "mock broker could not listen on port %d again after refusing "
                "connections: %s",
                self._port,
                task.exception(),
            )

    def _close_channels(self, fault: CloseChannel) -> None:
        for connection in list(self._connections):
            for number, channel in list(connection.channels.items()):
                if fault.queue is not None and not any(
                    c.queue.name == fault.queue for c in channel.consumers.values()
                ):
                    continue
                err = AMQPError(fault.code, "closed by a CloseChannel fault")
                err.text = fault.text
                connection.close_channel(number, err, None)
