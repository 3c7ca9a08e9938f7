"""Field faults of an LVM actor, reproduced with the toolkit in virtual time.

These are ordinary pytest tests, run with ``pytest -p lvmopstools examples``.
Each drives an unmodified :class:`~lvmopstools.actor.LVMActor` subclass that
talks to its device over TCP through
:class:`~lvmopstools.socket.AsyncSocketHandler` and to its clients over AMQP,
on the toolkit's embedded defaults: the in-process mock broker
(``mock_amqp_broker``), a fake device (``flaky_server``) and the virtual clock
(``@pytest.mark.virtual_clock``), so that minutes of telescope time pass in
milliseconds of real time.

The faults:

- a vacuum gauge that hangs (accepts, reads, never answers): the actor
  troubleshoots every check and restarts itself five minutes later;
- a controller rebooting, which drops its first two connections with a TCP
  reset: the check's retries ride it out and the actor never leaves READY;
- the broker restarted for 30 s: the actor and its client reconnect by
  themselves and the actor answers commands again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from clu import AMQPClient

from lvmopstools.actor import ActorState, CheckError, ErrorCodesBase, LVMActor
from lvmopstools.socket import AsyncSocketHandler
from lvmopstools.testing.amqp import MockBroker, RestartBroker
from lvmopstools.testing.clock import VirtualClock
from lvmopstools.testing.tcp import CloseOnAccept, FirstN, FlakyServer, StopAnswering

GAUGE_SCRIPT = {b"pressure?": b"1.2e-6\n"}

StartDevice = Callable[..., Awaitable[FlakyServer]]


class VacuumActor(LVMActor):
    """An actor that checks its gauge over TCP, as a downstream actor would."""

    def __init__(self, *args: Any, gauge: FlakyServer, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gauge = AsyncSocketHandler(
            gauge.host,
            gauge.port,
            timeout=2,
            retrier_params={
                "max_attempts": 3,
                "delay": 1,
                "use_exponential_backoff": False,
            },
        )
        self.readings: list[float] = []

    async def _check_internal(self) -> None:
        async def read(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> float:
            writer.write(b"pressure?\n")
            await writer.drain()
            return float(await reader.readline())

        try:
            self.readings.append(await self.gauge(read))
        except TimeoutError as err:
            raise CheckError(f"gauge timed out: {err}") from err

    async def _troubleshoot_internal(
        self, error_code: ErrorCodesBase, exception: Exception | None = None
    ) -> bool:
        return False  # Nothing to power-cycle in this example: escalate.


class StateRecorder:
    """The ``state`` flags an actor broadcasts, in order, as a client sees them."""

    def __init__(self, client: AMQPClient, actor: str) -> None:
        self.actor = actor
        self.flags: list[list[str]] = []
        client.add_reply_callback(self._collect)

    async def _collect(self, reply: Any) -> None:
        if reply.sender == self.actor and "state" in reply.body:
            self.flags.append(reply.body["state"]["flags"])


async def actor_state(client: AMQPClient, actor: str) -> list[str]:
    """Ask ``actor`` for its state; return the flags of the answer."""
    command = await client.send_command(actor, "actor-state")
    await asyncio.wait_for(command, 30)
    assert command.status.did_succeed
    flags: list[str] = command.replies[-1].body["state"]["flags"]
    return flags


@pytest.mark.asyncio
@pytest.mark.virtual_clock(quiet_period=0)
async def test_a_hung_gauge_leads_to_a_restart_five_minutes_later(
    virtual_clock: VirtualClock, mock_amqp_broker: MockBroker, flaky_server: StartDevice
) -> None:
    gauge = await flaky_server(GAUGE_SCRIPT, name="gauge")
    actor = VacuumActor(
        name="vacuum",
        url=mock_amqp_broker.url,
        gauge=gauge,
        check_interval=30,
        restart_after=300,
    )
    restarts: list[float] = []
    real_restart = actor.restart

    async def timed_restart(mode: str | None = None) -> None:
        restarts.append(virtual_clock.time())
        await real_restart(mode)

    actor.restart = timed_restart  # type: ignore[method-assign]
    client = AMQPClient(name="vacuum-client", url=mock_amqp_broker.url)
    await client.start()
    recorder = StateRecorder(client, "vacuum")
    await actor.start()
    try:
        await virtual_clock.advance_until(actor.is_ready, timeout=5)
        await virtual_clock.advance(45)  # Two good readings, at t=0 and t=30.
        gauge.add_fault(StopAnswering())

        # The check at t=60 fails at t=68: three attempts of timeout=2 s with
        # 1 s between them. The loop then wakes every 38 s (30 s of sleep and
        # 8 s of failing check); the first wake-up more than 300 s after
        # t=68 is t=402 (t=364 is only 296 s after), and it restarts the actor.
        await virtual_clock.advance_until(lambda: restarts, timeout=600)
        await virtual_clock.advance_until(
            lambda: ActorState.TROUBLESHOOT_FAILED in actor.state, timeout=60
        )
        flags = await actor_state(client, "vacuum")
    finally:
        await client.stop()
        await actor.stop()

    assert actor.readings == [1.2e-6, 1.2e-6]
    assert restarts == [402.0]
    # Nine failed checks (t=60, 98, ..., 364), each broadcast as
    # troubleshooting then failed, and then the restart.
    failed_check = [["RUNNING", "TROUBLESHOOTING"], ["RUNNING", "TROUBLESHOOT_FAILED"]]
    assert recorder.flags[:21] == [
        ["RUNNING"],
        ["RUNNING", "READY"],
        *failed_check * 9,
        ["RUNNING", "RESTARTING"],
    ]
    assert "RUNNING" in flags
    assert "READY" not in flags  # The gauge still hangs after the restart.


@pytest.mark.asyncio
@pytest.mark.virtual_clock(quiet_period=0)
async def test_a_rebooting_controller_is_ridden_out_by_the_retries(
    virtual_clock: VirtualClock, mock_amqp_broker: MockBroker, flaky_server: StartDevice
) -> None:
    gauge = await flaky_server(
        GAUGE_SCRIPT,
        name="gauge",
        faults=[CloseOnAccept(reset=True, trigger=FirstN(2))],
    )
    actor = VacuumActor(
        name="vacuum-reboot", url=mock_amqp_broker.url, gauge=gauge, check_interval=30
    )
    client = AMQPClient(name="reboot-client", url=mock_amqp_broker.url)
    await client.start()
    recorder = StateRecorder(client, actor.name)
    await actor.start()
    try:
        # Two resets, 1 s apart, then the third connection answers.
        await virtual_clock.advance_until(actor.is_ready, timeout=10)
        ready_at = virtual_clock.time()
        await virtual_clock.advance(60)
        broadcast = list(recorder.flags)
        flags = await actor_state(client, actor.name)
    finally:
        await client.stop()
        await actor.stop()

    assert ready_at == 2.0
    assert gauge.count("accepted") == 5  # 3 for the first check, then t=32, 62.
    assert actor.readings == [1.2e-6] * 3
    assert broadcast == [["RUNNING"], ["RUNNING", "READY"]]  # Never troubleshot.
    assert flags == ["RUNNING", "READY"]


@pytest.mark.asyncio
@pytest.mark.virtual_clock(quiet_period=0)
async def test_the_actor_answers_again_after_a_broker_restart(
    virtual_clock: VirtualClock, mock_amqp_broker: MockBroker, flaky_server: StartDevice
) -> None:
    gauge = await flaky_server(GAUGE_SCRIPT, name="gauge")
    actor = VacuumActor(
        name="vacuum-restart", url=mock_amqp_broker.url, gauge=gauge, check_interval=30
    )
    client = AMQPClient(name="restart-client", url=mock_amqp_broker.url)
    await actor.start()
    await client.start()
    reconnected_at: list[float] = []
    for robust in (actor.connection.connection, client.connection.connection):
        robust.reconnect_callbacks.add(
            lambda *_: reconnected_at.append(virtual_clock.time())
        )
    try:
        await virtual_clock.advance_until(actor.is_ready, timeout=5)
        await mock_amqp_broker.inject(RestartBroker(downtime=30))
        await virtual_clock.advance_until(lambda: len(reconnected_at) == 2, timeout=120)
        flags = await actor_state(client, actor.name)
    finally:
        await client.stop()
        await actor.stop()

    assert flags == ["RUNNING", "READY"]
    assert all(30 <= moment <= 60 for moment in reconnected_at), reconnected_at
