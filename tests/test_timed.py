"""Tests of lvmopstools._timed: the timed-command list that waits while empty."""

from __future__ import annotations

import asyncio
import datetime
import re
from collections.abc import Callable
from typing import Any

import click
import pytest
from _actor_support import QuietActor
from clu.actor import AMQPActor
from clu.command import TimedCommand, TimedCommandList
from clu.parsers.click import CluCommand

from lvmopstools._timed import LazyTimedCommandList
from lvmopstools.testing.amqp import MockBroker
from lvmopstools.testing.clock import VirtualClock, current_clock

# Whole seconds since the epoch, so that clu's sums of 0.5 s steps stay exact.
START = datetime.datetime(2001, 2, 3, 4, 5, 6, tzinfo=datetime.UTC)


@click.command(cls=CluCommand, name="tick")
async def tick(command: Any, *args: Any, **kwargs: Any) -> None:
    """Records the virtual second it ran at."""
    clock = current_clock()
    assert clock is not None, "tick must run under the virtual clock"
    command.actor.ticks.append(clock.time())
    command.finish()


class _TickingActor(QuietActor):
    """A healthy LVMActor with a ``tick`` command that records when it ran."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, check_interval=3600, restart_after=None, **kwargs)
        self.ticks: list[float] = []
        self.parser.add_command(tick)


async def _tick_schedule(list_class: type[Any], seconds: float) -> list[float]:
    """Run one ``tick`` timed command (delay 10 s) on ``list_class``; its ticks."""
    async with VirtualClock(start=START, quiet_period=0) as clock:
        async with MockBroker() as broker:
            actor = _TickingActor(name="ticking", url=broker.url)
            actor.timed_commands = list_class(actor)
            actor.timed_commands.add_command("tick", delay=10)
            await actor.start()
            try:
                await clock.advance(seconds)
            finally:
                await actor.stop()
    return actor.ticks


def test_lvmactor_polls_with_the_lazy_list() -> None:
    actor = _TickingActor(name="lazy-list", url="amqp://guest:guest@127.0.0.1:1/")

    assert type(actor.timed_commands) is LazyTimedCommandList
    assert actor.timed_commands.actor is actor
    assert actor.timed_commands.resolution == 0.5


class _StatusPolling(AMQPActor):  # type: ignore[misc]  # clu is untyped
    """A downstream actor mixin that adds a timed command in its __init__."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timed_commands.add_command("status", delay=60)


class _PollingActor(QuietActor, _StatusPolling):
    """An LVMActor whose MRO runs _StatusPolling.__init__ before LVMActor's."""


def test_commands_added_below_lvmactor_in_the_mro_are_kept() -> None:
    actor = _PollingActor(name="polling", url="amqp://guest:guest@127.0.0.1:1/")

    assert type(actor.timed_commands) is LazyTimedCommandList
    assert [c.command_string for c in actor.timed_commands] == ["status"]
    assert actor.timed_commands[0].delay == 60


@pytest.mark.parametrize("resolution", [0, -0.5, float("nan"), float("inf")])
def test_a_resolution_that_is_not_positive_is_refused(resolution: float) -> None:
    actor = _TickingActor(name="bad-list", url="amqp://guest:guest@127.0.0.1:1/")

    message = (
        rf"^resolution must be a positive, finite number of seconds, got "
        rf"{re.escape(repr(resolution))} \(clu's default is 0\.5\)$"
    )
    with pytest.raises(ValueError, match=message):
        LazyTimedCommandList(actor, resolution=resolution)


@pytest.mark.parametrize("resolution", ["0.5", True, None])
def test_a_resolution_that_is_not_a_number_is_refused(resolution: object) -> None:
    actor = _TickingActor(name="bad-list", url="amqp://guest:guest@127.0.0.1:1/")

    shown = re.escape(repr(resolution))
    message = rf"^resolution must be a number of seconds, got {shown}$"
    with pytest.raises(TypeError, match=message):
        LazyTimedCommandList(actor, resolution=resolution)  # type: ignore[arg-type]


class _RecordedCommand(TimedCommand):  # type: ignore[misc]  # clu is untyped
    """A timed command that records the virtual second it ran at, no actor."""

    def __init__(self, runs: list[float], delay: float) -> None:
        super().__init__("recorded", delay=delay)
        self.runs = runs

    async def run(self, actor: Any) -> None:
        clock = current_clock()
        assert clock is not None, "the command must run under the virtual clock"
        self.runs.append(clock.time())


@pytest.mark.asyncio
async def test_an_empty_list_schedules_no_timer() -> None:
    calls = 0

    async with VirtualClock(start=START, quiet_period=0) as clock:
        loop = asyncio.get_running_loop()
        real_call_at = loop.call_at

        def counting_call_at(*args: Any, **kwargs: Any) -> asyncio.TimerHandle:
            nonlocal calls
            calls += 1
            return real_call_at(*args, **kwargs)

        timed = LazyTimedCommandList(object())
        timed.start()
        await clock.advance(1)
        loop.call_at = counting_call_at  # type: ignore[method-assign]
        try:
            await clock.advance(3600)
        finally:
            del loop.call_at
            await timed.stop()

    # clu's list would have slept 7,200 times in that hour.
    assert calls == 0


async def _restart_schedule(list_class: type[Any]) -> list[float]:
    """Run a command (delay 10 s) for 2 s, stop and start: its run times."""
    runs: list[float] = []
    async with VirtualClock(start=START, quiet_period=0) as clock:
        timed = list_class(object())
        timed.append(_RecordedCommand(runs, delay=10))
        timed.start()
        await clock.advance(2)
        await timed.stop()

        timed.start()
        await clock.advance(2)
        await timed.stop()
    return runs


@pytest.mark.asyncio
async def test_the_first_round_after_a_start_ignores_delay() -> None:
    clus = await _restart_schedule(TimedCommandList)
    ours = await _restart_schedule(LazyTimedCommandList)

    # The command last ran at t=0; at t=2 its 10 s delay has not passed, but
    # the first round after the second start runs it anyway.
    assert ours == clus
    assert ours == [0.0, 2.0]


@pytest.mark.asyncio
async def test_a_held_command_runs_on_clus_schedule() -> None:
    clus = await _tick_schedule(TimedCommandList, 60)
    ours = await _tick_schedule(LazyTimedCommandList, 60)

    # First round at t=0; then a poll every 0.5 s starts the command once more
    # than 10 s have passed since it finished, which is at the 21st poll.
    assert ours == clus
    assert ours == [0.0, 10.5, 21.0, 31.5, 42.0, 52.5]


Add = Callable[[LazyTimedCommandList, TimedCommand], object]

ADDS: dict[str, Add] = {
    "add_command": lambda lst, cmd: lst.add_command(cmd.command_string, delay=10),
    "append": lambda lst, cmd: lst.append(cmd),
    "extend": lambda lst, cmd: lst.extend([cmd]),
    "insert": lambda lst, cmd: lst.insert(0, cmd),
    "iadd": lambda lst, cmd: lst.__iadd__([cmd]),
    "setitem": lambda lst, cmd: lst.__setitem__(slice(None), [cmd]),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("add", ADDS.values(), ids=ADDS.keys())
async def test_an_empty_list_waits_until_a_command_is_added(add: Add) -> None:
    async with VirtualClock(start=START, quiet_period=0) as clock:
        async with MockBroker() as broker:
            actor = _TickingActor(name="idle", url=broker.url)
            await actor.start()
            try:
                await clock.advance(3600)
                idle_polls = actor.timed_commands.polls
                running = actor.timed_commands.running

                add(actor.timed_commands, TimedCommand("tick", delay=10))
                await clock.advance(25)
                busy_polls = actor.timed_commands.polls

                actor.timed_commands.clear()
                await clock.advance(3600)
                polls_after_clear = actor.timed_commands.polls
            finally:
                await actor.stop()

    assert running
    assert idle_polls == 0
    # Added at t=3600, it runs at once, not at the next half-second; then every
    # 10.5 s, as on clu's schedule.
    assert actor.ticks == [3600.0, 3610.5, 3621.0]
    assert busy_polls == 51  # rounds at 3600, 3600.5, ..., 3625
    # The round after the clear finds the list empty and waits again.
    assert polls_after_clear == busy_polls


@pytest.mark.asyncio
async def test_stop_ends_a_waiting_poller_and_start_resumes_it() -> None:
    async with VirtualClock(start=START, quiet_period=0) as clock:
        async with MockBroker() as broker:
            actor = _TickingActor(name="restarted-list", url=broker.url)
            await actor.start()
            timed = actor.timed_commands
            try:
                await clock.advance(10)
                await timed.stop()
                stopped = not timed.running

                timed.start()
                timed.add_command("tick", delay=10)
                await clock.advance(5)
            finally:
                await actor.stop()

    assert stopped
    assert not timed.running
    assert actor.ticks == [10.0]
