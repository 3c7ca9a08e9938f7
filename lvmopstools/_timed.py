"""A timed-command list that does not poll while it holds no command.

clu's :class:`clu.command.TimedCommandList` wakes every ``resolution`` seconds
(half a second by default) for the whole life of an actor, whether or not it
holds any timed command. An idle actor therefore wakes twice a second for
nothing, and under a virtual clock those wake-ups are most of an actor's
simulated hour. :class:`LazyTimedCommandList` keeps clu's schedule for the
commands it holds and sleeps on an event while it holds none.

This module is not for running commands on a schedule of its own: what runs
and when is clu's logic, kept as it is.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable
from typing import Any, Self, SupportsIndex

from clu.command import TimedCommandList

__all__ = ["LazyTimedCommandList"]


class LazyTimedCommandList(TimedCommandList):  # type: ignore[misc]  # clu is untyped
    """A :class:`clu.command.TimedCommandList` that waits while it is empty.

    While the list holds commands, the poller runs clu's schedule: every
    ``resolution`` seconds it starts each command whose ``delay`` has passed
    since it last finished; its first round after start, empty or not,
    starts every command it holds regardless of ``delay``. While the list is
    empty the poller waits until a command is added, through ``add_command``,
    ``append``, ``extend``, ``insert``, ``+=`` or item assignment, and then
    polls at once instead of at the next half-second.

    Parameters
    ----------
    actor
        The actor the commands run on.
    resolution
        Seconds between polls while the list holds commands; positive.
    loop
        The event loop the commands' tasks are created on; by default the
        current one, as clu does.

    Raises
    ------
    TypeError
        If ``resolution`` is not a number.
    ValueError
        If ``resolution`` is not positive and finite.

    .. note::
        Like clu's list, this one is not thread-safe: add commands from the
        thread that runs the actor's event loop.
    """

    def __init__(
        self,
        actor: Any,
        resolution: float = 0.5,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if isinstance(resolution, bool) or not isinstance(resolution, int | float):
            msg = f"resolution must be a number of seconds, got {resolution!r}"
            raise TypeError(msg)

        if not 0 < resolution < math.inf:
            msg = (
                f"resolution must be a positive, finite number of seconds, got "
                f"{resolution!r} (clu's default is 0.5)"
            )
            raise ValueError(msg)

        super().__init__(actor, resolution=resolution, loop=loop)

        self._added = asyncio.Event()

        #: Poll rounds run so far, each one over a list that held commands.
        self.polls = 0

    # Every way of adding an item wakes a waiting poller; removals need not,
    # since the poller checks for an empty list before each round.

    def append(self, item: Any) -> None:
        """Appends a timed command and wakes the poller."""
        super().append(item)
        self._added.set()

    def extend(self, items: Iterable[Any]) -> None:
        """Appends timed commands and wakes the poller."""
        super().extend(items)
        self._added.set()

    def insert(self, index: SupportsIndex, item: Any) -> None:
        """Inserts a timed command and wakes the poller."""
        super().insert(index, item)
        self._added.set()

    def __iadd__(self, items: Iterable[Any]) -> Self:
        super().__iadd__(items)
        self._added.set()
        return self

    def __setitem__(self, index: Any, item: Any) -> None:
        super().__setitem__(index, item)
        self._added.set()

    async def poller(self) -> None:
        """Runs the timed commands on clu's schedule; waits while there are none."""
        current_time = time.time()
        first_time = True

        while True:
            if self:
                self.polls += 1
                self._start_due(current_time, first_time)
            first_time = False

            if self:
                await asyncio.sleep(self.resolution)
                current_time += self.resolution
            else:
                self._added.clear()
                await self._added.wait()
                current_time = time.time()

    def _start_due(self, current_time: float, first_time: bool) -> None:
        # clu's rule: on the first round start every command, then each one
        # whose delay has passed since it last finished.
        for timed_command in list(self):
            elapsed = current_time - timed_command.last_run
            if first_time or elapsed > timed_command.delay:
                task = self.loop.create_task(timed_command.run(self.actor))
                task.add_done_callback(timed_command.done)
