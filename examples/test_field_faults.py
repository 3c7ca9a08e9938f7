"""Field faults of an LVM actor, reproduced with the toolkit in virtual time.

These are ordinary pytest tests, run with ``pytest -p lvmopstools examples``.
Each drives an unmodified :class:`~lvmopstools.actor.LVMActor` subclass that
talks to its device over TCP through
:class:`~lvmopstools.socket.AsyncSocketHandler` and to its clients over AMQP,
on the toolkit's embedded defaults: the in-process mock broker
(``mock_amqp_broker``) and the virtual clock (``@pytest.mark.virtual_clock``),
so that minutes of telescope time pass in milliseconds.

The device here is a small asyncio server on 127.0.0.1 that the toolkit's
clock is told it owns. Its ``answering`` switch stands for the field fault of
a controller that hangs: connections are accepted and requests read, but no
reply ever comes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from clu import AMQPClient

from lvmopstools.actor import ActorState, CheckError, ErrorCodesBase, LVMActor
from lvmopstools.socket import AsyncSocketHandler
from lvmopstools.testing.clock import VirtualClock, register_owned_address


class PressureGauge:
    """A fake vacuum gauge: answers ``pressure?`` with a reading, until it hangs."""

    def __init__(self) -> None:
        self.answering = True
        self.requests = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._unregister: Any = None

    async def __aenter__(self) -> PressureGauge:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._unregister = register_owned_address("127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._unregister()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while line := await reader.readline():
                self.requests += 1
                if self.answering and line == b"pressure?\n":
                    writer.write(b"1.2e-6\n")
                    await writer.drain()
        finally:
            writer.close()


DEVICE_ERRORS = {"gauge_timeout": (300, True, "The gauge did not answer in time")}


class VacuumActor(LVMActor):
    """An actor that checks its gauge over TCP, as a downstream actor would."""

    def __init__(self, *args: Any, gauge_port: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gauge = AsyncSocketHandler(
            "127.0.0.1",
            gauge_port,
            timeout=2,
            retrier_params={
                "max_attempts": 2,
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


@pytest_asyncio.fixture
async def gauge(virtual_clock: VirtualClock) -> AsyncIterator[PressureGauge]:
    async with PressureGauge() as device:
        yield device


@pytest.mark.asyncio
@pytest.mark.virtual_clock(quiet_period=0)
async def test_a_hung_gauge_leads_to_a_restart_five_minutes_later(
    virtual_clock: VirtualClock, mock_amqp_broker: Any, gauge: PressureGauge
) -> None:
    actor = VacuumActor(
        name="vacuum",
        url=mock_amqp_broker.url,
        gauge_port=gauge.port,
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
    broadcast: list[list[str]] = []

    async def collect(reply: Any) -> None:
        if reply.sender == "vacuum" and "state" in reply.body:
            broadcast.append(reply.body["state"]["flags"])

    client.add_reply_callback(collect)
    await actor.start()
    try:
        await virtual_clock.advance_until(actor.is_ready, timeout=5)
        await virtual_clock.advance(45)  # Two good readings, at t=0 and t=30.
        gauge.answering = False

        # The check at t=60 fails at t=65: two attempts of timeout=2 s with
        # 1 s between them. The loop then wakes every 35 s (30 s of sleep and
        # 5 s of failing check); the first wake-up more than 300 s after
        # t=65 is t=375, and it restarts the actor.
        await virtual_clock.advance_until(lambda: restarts, timeout=600)
        await virtual_clock.advance_until(
            lambda: ActorState.TROUBLESHOOT_FAILED in actor.state, timeout=60
        )
        command = await client.send_command("vacuum", "actor-state")
        await asyncio.wait_for(command, 10)
    finally:
        await client.stop()
        await actor.stop()

    assert actor.readings == [1.2e-6, 1.2e-6]
    assert restarts == [375.0]
    # Nine failed checks (t=60, 95, ..., 340), each broadcast as
    # troubleshooting then failed, and then the restart.
    failed_check = [["RUNNING", "TROUBLESHOOTING"], ["RUNNING", "TROUBLESHOOT_FAILED"]]
    assert broadcast[:21] == [
        ["RUNNING"],
        ["RUNNING", "READY"],
        *failed_check * 9,
        ["RUNNING", "RESTARTING"],
    ]
    flags = command.replies[-1].body["state"]["flags"]
    assert "RUNNING" in flags
    assert "READY" not in flags  # The gauge still hangs after the restart.
