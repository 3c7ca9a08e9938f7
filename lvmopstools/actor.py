"""LVMActor: a clu AMQP actor that checks itself, troubleshoots and restarts.

An :class:`LVMActor` runs a check loop: every ``check_interval`` seconds it calls
the subclass's ``_check_internal``; a failed check is handed to
``_troubleshoot_internal``; and an actor that has not been ready for more than
``restart_after`` seconds restarts itself. Its state is a set of
:class:`ActorState` flags, broadcast as the ``state`` keyword whenever it changes
and returned by the ``actor-state`` command.

Error codes are data: :func:`create_error_codes` builds an enumeration of
:class:`ErrorData` values that checks raise through :class:`CheckError`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, ClassVar

import click
from clu.actor import AMQPActor
from clu.command import TimedCommandList
from clu.model import Property
from clu.parsers.click import CluCommand

from lvmopstools._state import (
    STATE_SCHEMA,
    ActorState,
    CheckError,
    ErrorCodes,
    ErrorCodesBase,
    ErrorData,
    create_error_codes,
    exception_data,
)
from lvmopstools._timed import LazyTimedCommandList

if TYPE_CHECKING:
    from clu.command import Command

__all__ = [
    "ActorState",
    "CheckError",
    "ErrorCodes",
    "ErrorCodesBase",
    "ErrorData",
    "LVMActor",
    "create_error_codes",
]

log = logging.getLogger(__name__)

RESTART_MODES = ("exit", "reload")


@click.command(cls=CluCommand, name="actor-state")
async def actor_state(command: Command[LVMActor], *args: Any, **kwargs: Any) -> None:
    """Returns the actor state."""
    command.finish(state=command.actor.state_payload())


@click.command(cls=CluCommand, name="actor-restart")
@click.option(
    "--mode",
    "-m",
    type=click.Choice(RESTART_MODES),
    default=None,
    help="How to restart the actor. Defaults to the actor's restart_mode.",
)
async def actor_restart(command: Command[LVMActor], mode: str | None = None) -> None:
    """Restarts the actor."""
    await command.actor.restart(mode=mode)
    command.finish()


class LVMActor(AMQPActor):  # type: ignore[misc]
    """Base class for LVM actors.

    Subclasses implement ``_check_internal`` (raise :class:`CheckError`, or any
    exception, when the check fails) and ``_troubleshoot_internal`` (return True
    when the problem is fixed). Positional and other keyword arguments go to
    :class:`clu.actor.AMQPActor`.

    Parameters
    ----------
    check_interval
        Seconds between the end of one check and the start of the next.
    restart_after
        Restart when the actor has not been ready for more than this many
        seconds, measured with a monotonic clock at the start of each check.
        None never restarts.
    restart_mode
        The default restart mode, ``"reload"`` or ``"exit"``; see
        :meth:`restart`.

    Raises
    ------
    ValueError
        If ``check_interval`` or ``restart_after`` is not positive, or
        ``restart_mode`` is not one of the modes.

    .. note::
        A check that calls :meth:`troubleshoot` itself and returns normally
        keeps the state troubleshooting left; only a check that neither raised
        nor troubleshot marks the actor ready.

    .. note::
        ``timed_commands`` is a
        :class:`~lvmopstools._timed.LazyTimedCommandList`: it runs the timed
        commands it holds on clu's schedule, but does not wake every half
        second while it holds none, as clu's own list does.
    """

    RESTART_MODES: ClassVar[tuple[str, ...]] = RESTART_MODES

    #: Seconds :meth:`stop` waits for replies still being published.
    DRAIN_TIMEOUT: ClassVar[float] = 5.0

    #: The actor's timed commands (see the note above).
    timed_commands: LazyTimedCommandList

    def __init__(
        self,
        *args: Any,
        check_interval: float = 30.0,
        restart_after: float | None = 300.0,
        restart_mode: str = "reload",
        **kwargs: Any,
    ) -> None:
        if not check_interval > 0:
            msg = f"check_interval must be positive, got {check_interval!r}"
            raise ValueError(msg)
        if restart_after is not None and not restart_after > 0:
            msg = f"restart_after must be positive or None, got {restart_after!r}"
            raise ValueError(msg)
        _check_mode(restart_mode)

        super().__init__(*args, **kwargs)

        # clu's own list polls twice a second even when it is empty. A class
        # below this one in the MRO may have added commands to it already.
        clus: TimedCommandList = self.timed_commands
        self.timed_commands = LazyTimedCommandList(
            self, resolution=clus.resolution, loop=clus.loop
        )
        self.timed_commands.extend(clus)
        self.state = ActorState(0)
        self.check_interval = check_interval
        self.restart_after = restart_after
        self.restart_mode = restart_mode

        self._error: dict[str, Any] | None = None
        self._not_ready_since: float | None = None
        self._troubleshoots = 0
        self._check_task: asyncio.Task[None] | None = None
        self._restart_task: asyncio.Task[None] | None = None
        self._pending_writes: set[asyncio.Task[Any]] = set()

        self.parser.add_command(actor_state)
        self.parser.add_command(actor_restart)

        if self.model is None or self.model.schema is None:
            msg = "LVMActor needs a model schema; do not pass schema=False"
            raise RuntimeError(msg)
        self.model.schema["properties"]["state"] = STATE_SCHEMA
        if "state" not in self.model:
            self.model["state"] = Property("state", model=self.model)

    # Lifecycle.

    async def start(self) -> LVMActor:
        """Starts the actor.

        Connects to the broker, marks the actor RUNNING and starts the check
        loop.

        Returns
        -------
        actor
            This actor.
        """
        await super().start()
        self.update_state(ActorState.RUNNING)

        self._check_task = asyncio.create_task(
            self._check_loop(), name=f"{self.name}-check-loop"
        )
        return self

    async def stop(self) -> None:
        """Stops the actor.

        Ends the check loop and the timed commands and closes the broker
        connection. Stopping a stopped actor does nothing.
        """
        task, self._check_task = self._check_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        await self.timed_commands.stop()
        await self._drain_writes()
        await super().stop()

    async def _write_internal(self, reply: Any, write_to_log: bool = True) -> None:
        # clu publishes each reply from a task of its own; keeping hold of those
        # tasks lets stop() deliver the last replies before closing.
        task = asyncio.current_task()
        if task is not None:
            self._pending_writes.add(task)

        try:
            await super()._write_internal(reply, write_to_log=write_to_log)
        finally:
            if task is not None:
                self._pending_writes.discard(task)

    async def _drain_writes(self) -> None:
        current = asyncio.current_task()
        pending = {task for task in self._pending_writes if task is not current}
        if not pending or not self.is_connected():
            return

        _, late = await asyncio.wait(pending, timeout=self.DRAIN_TIMEOUT)
        if late:
            log.warning("%s stopped with %d replies unsent", self.name, len(late))

    def is_ready(self) -> bool:
        """Returns True if the actor is ready."""
        return ActorState.READY in self.state

    # State.

    def state_payload(self) -> dict[str, Any]:
        """Return the ``state`` keyword: code, flag names and current error.

        Returns
        -------
        payload
            ``{"code": int, "flags": [names], "error": dict | None}``.
        """
        return {
            "code": self.state.value,
            "flags": self.state.get_state_names(),
            "error": self._error,
        }

    def update_state(
        self,
        state: ActorState,
        error_data: dict[str, Any] | None = None,
        command: Command | None = None,
        internal: bool = True,
    ) -> ActorState:
        """Updates the state and broadcasts the change.

        Parameters
        ----------
        state
            The new flags. ``RUNNING`` is added while the broker connection is
            open, and ``READY`` is dropped if any ``NOT_READY`` flag is set.
        error_data
            The error to report with the state, or None.
        command
            The command to reply to; None broadcasts.
        internal
            Whether the reply is marked internal.

        Returns
        -------
        state
            The state now in force.
        """
        old_state, old_error = self.state, self._error

        new_state = state
        if new_state & ActorState.NOT_READY:
            new_state &= ~ActorState.READY
        if self.is_connected():
            new_state |= ActorState.RUNNING

        if new_state & ActorState.NOT_READY:
            if self._not_ready_since is None:
                self._not_ready_since = time.monotonic()
        else:
            self._not_ready_since = None

        self.state = new_state
        self._error = error_data

        # CHECKING comes and goes with every check; it alone is not news.
        transient = ActorState.CHECKING
        if (old_state & ~transient) != (new_state & ~transient) or old_error != (
            error_data
        ):
            log.info("%s state is now %s", self.name, new_state.get_state_names())
            self.write(
                "d",
                state=self.state_payload(),
                command=command,
                internal=internal,
            )

        return self.state

    # Troubleshooting and restarts.

    async def troubleshoot(
        self,
        error_code: ErrorCodesBase = ErrorCodes.UNKNOWN,
        exception: Exception | None = None,
        traceback_frame: int = 0,
    ) -> None:
        """Handles troubleshooting.

        Marks the actor TROUBLESHOOTING, calls ``_troubleshoot_internal`` and
        then marks it READY if that returned True, TROUBLESHOOT_FAILED if it
        returned False or raised. An exception from ``_troubleshoot_internal``
        is logged and never leaves this method.

        Parameters
        ----------
        error_code
            The error being handled.
        exception
            The exception that revealed it, if any.
        traceback_frame
            Which frame of the exception's traceback to report (0 is the
            outermost).
        """
        self._troubleshoots += 1
        error = error_code.value
        error_data = {
            "code": error.code,
            "critical": error.critical,
            "description": error.description,
            "exception": exception_data(exception, traceback_frame),
        }

        log.warning("%s troubleshooting %s: %r", self.name, error_code.name, exception)
        self.update_state(ActorState.TROUBLESHOOTING, error_data=error_data)

        try:
            fixed = await self._troubleshoot_internal(error_code, exception=exception)
        except Exception:
            log.exception("%s troubleshooting %s raised", self.name, error_code.name)
            fixed = False

        if fixed:
            self.update_state(ActorState.READY)
        else:
            self.update_state(ActorState.TROUBLESHOOT_FAILED, error_data=error_data)

    async def restart(self, mode: str | None = None) -> None:
        """Restarts the actor by killing the process.

        Parameters
        ----------
        mode
            How to restart the actor. Possible values are ``"exit"``, which stops
            the actor cleanly (final state written, broker connection closed)
            and then exits the process with status 1, so that a supervisor
            restarts it; and ``"reload"``, which stops and starts the actor
            without leaving the process. If None, defaults to ``restart_mode``.

        Raises
        ------
        ValueError
            If ``mode`` is not one of the restart modes.
        SystemExit
            With status 1, in ``"exit"`` mode.

        .. note::
            A reload runs in a task of its own, so it completes even when it
            stops the task that asked for it (the check loop, or a command).
            Concurrent reload requests share one reload.
        """
        mode = mode or self.restart_mode
        _check_mode(mode)

        log.error("%s restarting with mode=%r", self.name, mode)
        self.write("w", text=f"Restarting {self.name} with mode={mode!r}.")
        self.update_state(ActorState.RESTARTING)

        if mode == "exit":
            await self.stop()
            raise SystemExit(1)

        if self._restart_task is None or self._restart_task.done():
            self._restart_task = asyncio.create_task(
                self._reload(), name=f"{self.name}-reload"
            )

        await asyncio.shield(self._restart_task)

    async def _reload(self) -> None:
        try:
            await self.stop()
        finally:
            await self.start()

    def _restart_due(self) -> bool:
        if self.restart_after is None or self._not_ready_since is None:
            return False

        return time.monotonic() - self._not_ready_since > self.restart_after

    async def _check_loop(self) -> None:
        while True:
            if self._restart_due():
                assert self._not_ready_since is not None
                not_ready = time.monotonic() - self._not_ready_since
                self.write(
                    "w",
                    text=f"It has been {not_ready:.0f} seconds since the actor "
                    "was last ready. Restarting.",
                )
                # A reload cancels this task and starts a new loop; an exit
                # raises SystemExit. Either way this loop ends here.
                await self.restart()
                return

            if not self.state & ActorState.SKIP_CHECK:
                await self._check_once()

            await asyncio.sleep(self.check_interval)

    async def _check_once(self) -> None:
        troubleshoots = self._troubleshoots
        self.state |= ActorState.CHECKING

        try:
            await self._check_internal()
        except CheckError as err:
            await self.troubleshoot(err.error_code, exception=err, traceback_frame=1)
        except Exception as err:
            await self.troubleshoot(exception=err, traceback_frame=1)
        else:
            if self._troubleshoots == troubleshoots:
                self.update_state(ActorState.READY)
        finally:
            self.state &= ~ActorState.CHECKING

    @abc.abstractmethod
    async def _check_internal(self) -> None:
        """Check the actor; raise :class:`CheckError` (or any exception) on failure."""

    @abc.abstractmethod
    async def _troubleshoot_internal(
        self,
        error_code: ErrorCodesBase,
        exception: Exception | None = None,
    ) -> bool:
        """Try to fix ``error_code``; return True if the actor is ready again."""


def _check_mode(mode: str) -> None:
    if mode not in RESTART_MODES:
        msg = f"unknown restart mode {mode!r}; use one of {RESTART_MODES}"
        raise ValueError(msg)
