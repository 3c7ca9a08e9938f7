"""Tests for lvmopstools.actor: states, error codes and the LVMActor loop.

The check-loop tests run an LVMActor on a real broker: the ``rabbitmq_url``
session fixture starts a throwaway RabbitMQ node (or uses ``--lvm-amqp-url``).
The command-level tests also run with clu's own ``setup_test_actor``, which is
how downstream repositories test their actors today.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from clu import AMQPClient
from clu.client import AMQPReply
from clu.testing import setup_test_actor

from lvmopstools.actor import (
    ActorState,
    CheckError,
    ErrorCodes,
    ErrorCodesBase,
    ErrorData,
    LVMActor,
    create_error_codes,
)

WAIT = 20.0  # Upper bound, in real seconds, on any single wait in this module.

DeviceErrors = create_error_codes(
    {"no_power": (100, True, "The device has no power"), "busy": [101]}
)


class ProbeActor(LVMActor):
    """An LVMActor whose check and troubleshoot outcomes the test controls."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)

        self.check_error: Exception | None = None
        self.troubleshoot_result: bool | Exception = False
        self.checks = 0
        self.starts = 0
        self.changed = asyncio.Condition()

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def start(self) -> ProbeActor:
        await super().start()
        self.starts += 1
        await self._notify()
        return self

    async def _check_internal(self) -> None:
        self.checks += 1
        await self._notify()
        if self.check_error is not None:
            raise self.check_error

    async def _troubleshoot_internal(
        self, error_code: ErrorCodesBase, exception: Exception | None = None
    ) -> bool:
        if isinstance(self.troubleshoot_result, Exception):
            raise self.troubleshoot_result
        return self.troubleshoot_result

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT), self.changed:
            await self.changed.wait_for(predicate)


class StateRecorder:
    """Collects the ``state`` flags one actor broadcasts, as a client sees them."""

    def __init__(self, client: AMQPClient, actor: str) -> None:
        self.actor = actor
        self.states: list[list[str]] = []
        self.changed = asyncio.Condition()
        client.add_reply_callback(self._collect)

    async def _collect(self, reply: AMQPReply) -> None:
        if reply.sender == self.actor and "state" in reply.body:
            async with self.changed:
                self.states.append(reply.body["state"]["flags"])
                self.changed.notify_all()

    async def wait_for(self, flags: list[str]) -> None:
        async with asyncio.timeout(WAIT), self.changed:
            await self.changed.wait_for(lambda: flags in self.states)


def check_loops(actor: LVMActor) -> list[asyncio.Task[Any]]:
    name = f"{actor.name}-check-loop"
    return [t for t in asyncio.all_tasks() if t.get_name() == name and not t.done()]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest_asyncio.fixture
async def make_actor(rabbitmq_url: str) -> AsyncIterator[Callable[..., ProbeActor]]:
    """Factory of ProbeActors on the real broker; all are stopped at teardown."""
    actors: list[ProbeActor] = []

    def make(**kwargs: Any) -> ProbeActor:
        kwargs.setdefault("check_interval", 0.01)
        actor = ProbeActor(name=unique("probe"), url=rabbitmq_url, **kwargs)
        actors.append(actor)
        return actor

    yield make

    for actor in reversed(actors):
        await actor.stop()


@pytest_asyncio.fixture
async def client(rabbitmq_url: str) -> AsyncIterator[AMQPClient]:
    """A clu AMQPClient on the real broker."""
    amqp_client = AMQPClient(name=unique("client"), url=rabbitmq_url)
    await amqp_client.start()
    yield amqp_client
    await amqp_client.stop()


async def send(client: AMQPClient, actor: str, command: str) -> Any:
    async with asyncio.timeout(WAIT):
        return await (await client.send_command(actor, command))


# States and error codes.


def test_actor_state_values() -> None:
    assert [(s.name, s.value) for s in ActorState] == [
        ("RUNNING", 1),
        ("READY", 2),
        ("TROUBLESHOOTING", 4),
        ("TROUBLESHOOT_FAILED", 8),
        ("RESTARTING", 16),
        ("CHECKING", 32),
    ]
    assert ActorState.NOT_READY == (
        ActorState.TROUBLESHOOTING
        | ActorState.TROUBLESHOOT_FAILED
        | ActorState.RESTARTING
    )
    assert ActorState.SKIP_CHECK == (
        ActorState.CHECKING | ActorState.TROUBLESHOOTING | ActorState.RESTARTING
    )


def test_get_state_names_lists_single_flags_in_order() -> None:
    state = ActorState.RESTARTING | ActorState.RUNNING | ActorState.TROUBLESHOOTING
    assert state.get_state_names() == ["RUNNING", "TROUBLESHOOTING", "RESTARTING"]
    assert ActorState(0).get_state_names() == []


def test_default_error_codes() -> None:
    assert [m.name for m in ErrorCodes] == ["UNKNOWN"]
    assert ErrorCodes.UNKNOWN.value == ErrorData(9999, True, "Unknown error")
    assert issubclass(ErrorCodes, ErrorCodesBase)
    assert ErrorCodes.get_error_code(9999) is ErrorCodes.UNKNOWN


def test_error_data_defaults() -> None:
    assert ErrorData(5) == ErrorData(code=5, critical=False, description="")


def test_create_error_codes_accepts_tuples_lists_and_error_data() -> None:
    codes = create_error_codes(
        {"low": ErrorData(1), "Mixed_Case": (2, True), "listed": [3, False, "three"]},
        name="DeviceCodes",
    )

    assert codes.__name__ == "DeviceCodes"
    assert [m.name for m in codes] == ["LOW", "MIXED_CASE", "LISTED", "UNKNOWN"]
    assert codes.MIXED_CASE.value == ErrorData(2, True, "")
    assert codes.get_error_code(3) is codes.LISTED
    assert codes.UNKNOWN.value == ErrorData(9999, True, "Unknown error")


def test_create_error_codes_keeps_a_given_unknown() -> None:
    codes = create_error_codes({"unknown": (1, False, "mine")})
    assert [m.name for m in codes] == ["UNKNOWN"]
    assert codes.UNKNOWN.value.code == 1


def test_create_error_codes_without_unknown() -> None:
    codes = create_error_codes({"a": (1,)}, include_unknown=False)
    assert [m.name for m in codes] == ["A"]


def test_get_error_code_names_missing_code() -> None:
    with pytest.raises(ValueError, match=r"error code 42 is not in ErrorCodes"):
        ErrorCodes.get_error_code(42)


def test_create_error_codes_rejects_bad_entries() -> None:
    with pytest.raises(TypeError, match=r"error code 'bad' must be an ErrorData"):
        create_error_codes({"bad": 5})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"error code 7 is used by both 'A' and 'B'"):
        create_error_codes({"a": (7,), "b": (7,)})
    with pytest.raises(ValueError, match=r"error name 'A' is given twice"):
        create_error_codes({"a": (1,), "A": (2,)})


def test_check_error() -> None:
    assert CheckError().error_code is ErrorCodes.UNKNOWN
    assert CheckError("x", 9999).error_code is ErrorCodes.UNKNOWN
    err = CheckError("no power", DeviceErrors.NO_POWER)
    assert (err.message, err.error_code, str(err)) == (
        "no power",
        DeviceErrors.NO_POWER,
        "no power",
    )
    with pytest.raises(ValueError, match=r"error code 100 is not in ErrorCodes"):
        CheckError("x", 100)


# Construction.


def test_lvm_actor_signature_matches_the_reference() -> None:
    params = inspect.signature(LVMActor.__init__).parameters
    assert params["check_interval"].default == 30.0
    assert params["restart_after"].default == 300.0
    assert params["restart_mode"].default == "reload"
    assert all(
        params[name].kind is inspect.Parameter.KEYWORD_ONLY
        for name in ("check_interval", "restart_after", "restart_mode")
    )


def test_lvm_actor_is_abstract() -> None:
    with pytest.raises(TypeError, match=r"abstract"):
        LVMActor(name="abstract")  # type: ignore[abstract]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"check_interval": 0}, r"check_interval must be positive, got 0"),
        ({"restart_after": -1.0}, r"restart_after must be positive or None, got -1.0"),
        ({"restart_mode": "kill"}, r"unknown restart mode 'kill'; use one of"),
    ],
)
def test_lvm_actor_rejects_bad_parameters(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ProbeActor(name="bad", **kwargs)


def test_state_keyword_is_in_the_schema() -> None:
    actor = ProbeActor(name=unique("schema"))
    assert actor.model is not None

    good = {"state": {"code": 3, "flags": ["RUNNING", "READY"], "error": None}}
    assert actor.model.validate(good, update_model=False)[0] is True

    bad = {"state": {"code": "three", "flags": [], "error": None}}
    assert actor.model.validate(bad, update_model=False)[0] is False


# With clu's setup_test_actor (no broker).


@pytest_asyncio.fixture
async def mocked_actor() -> ProbeActor:
    actor = ProbeActor(name=unique("mocked"))
    return await setup_test_actor(actor)


@pytest.fixture
def state_writes(mocked_actor: Any, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The ``state`` keywords the actor writes, recorded as write() is called."""
    written: list[Any] = []
    write = mocked_actor.write

    def spy(*args: Any, **kwargs: Any) -> Any:
        if "state" in kwargs:
            written.append(kwargs["state"])
        return write(*args, **kwargs)

    monkeypatch.setattr(mocked_actor, "write", spy)
    return written


@pytest.mark.asyncio
async def test_actor_state_command_with_setup_test_actor(mocked_actor: Any) -> None:
    mocked_actor.update_state(ActorState.READY)

    command = await mocked_actor.invoke_mock_command("actor-state")
    async with asyncio.timeout(WAIT):
        await command

    assert command.status.did_succeed
    assert command.replies[-1].message["state"] == {
        "code": ActorState.READY.value,
        "flags": ["READY"],
        "error": None,
    }


@pytest.mark.asyncio
async def test_update_state_broadcasts_only_changes(
    mocked_actor: Any, state_writes: list[Any]
) -> None:
    mocked_actor.update_state(ActorState.READY)
    mocked_actor.update_state(ActorState.READY)
    mocked_actor.state |= ActorState.CHECKING
    mocked_actor.update_state(ActorState.READY)

    assert [state["flags"] for state in state_writes] == [["READY"]]

    error = {"code": 1, "critical": False, "description": "x", "exception": None}
    mocked_actor.update_state(ActorState.TROUBLESHOOTING, error_data=error)
    mocked_actor.update_state(ActorState.READY)

    assert [state["error"] for state in state_writes] == [None, error, None]


@pytest.mark.asyncio
async def test_not_ready_drops_ready(mocked_actor: Any) -> None:
    state = mocked_actor.update_state(ActorState.READY | ActorState.RESTARTING)
    assert state == ActorState.RESTARTING
    assert not mocked_actor.is_ready()


@pytest.mark.asyncio
async def test_restart_command_rejects_unknown_mode(mocked_actor: Any) -> None:
    command = await mocked_actor.invoke_mock_command("actor-restart --mode kill")
    async with asyncio.timeout(WAIT):
        await command
    assert command.status.did_fail
    assert mocked_actor.state == ActorState(0)


@pytest.mark.asyncio
async def test_restart_rejects_unknown_mode_before_acting(mocked_actor: Any) -> None:
    with pytest.raises(ValueError, match=r"unknown restart mode 'kill'; use one of"):
        await mocked_actor.restart("kill")
    assert mocked_actor.state == ActorState(0)


@pytest.mark.asyncio
async def test_troubleshoot_exception_is_logged_and_recorded(
    mocked_actor: Any, caplog: pytest.LogCaptureFixture
) -> None:
    mocked_actor.troubleshoot_result = RuntimeError("fix failed")

    with caplog.at_level(logging.ERROR, logger="lvmopstools.actor"):
        await mocked_actor.troubleshoot(DeviceErrors.NO_POWER, RuntimeError("dark"))

    assert mocked_actor.state == ActorState.TROUBLESHOOT_FAILED
    assert mocked_actor.state_payload()["error"]["code"] == 100
    assert "troubleshooting NO_POWER raised" in caplog.text
    assert "fix failed" in caplog.text


@pytest.mark.asyncio
async def test_troubleshoot_success_marks_ready(
    mocked_actor: Any, state_writes: list[Any]
) -> None:
    mocked_actor.troubleshoot_result = True
    await mocked_actor.troubleshoot(DeviceErrors.BUSY)

    assert [state["flags"] for state in state_writes] == [
        ["TROUBLESHOOTING"],
        ["READY"],
    ]
    assert state_writes[0]["error"]["code"] == 101
    assert mocked_actor.state_payload()["error"] is None


@pytest.mark.asyncio
async def test_stop_before_start_is_a_no_op() -> None:
    actor = ProbeActor(name=unique("idle"))
    await actor.stop()
    await actor.stop()
    assert actor.state == ActorState(0)


# On a real broker.


@pytest.mark.asyncio
async def test_actor_answers_actor_state(
    make_actor: Callable[..., ProbeActor], client: AMQPClient
) -> None:
    actor = await make_actor().start()
    await actor.wait_until(actor.is_ready)

    command = await send(client, actor.name, "actor-state")

    assert command.status.did_succeed
    assert command.replies[-1].message["state"] == {
        "code": (ActorState.RUNNING | ActorState.READY).value,
        "flags": ["RUNNING", "READY"],
        "error": None,
    }


@pytest.mark.asyncio
async def test_checking_is_not_broadcast_on_every_check(
    make_actor: Callable[..., ProbeActor], client: AMQPClient
) -> None:
    actor = make_actor()
    recorder = StateRecorder(client, actor.name)
    await actor.start()
    await actor.wait_until(lambda: actor.checks >= 10)

    # The actor publishes in order on one channel: once the ping's reply is in,
    # every state it broadcast before is in too.
    await send(client, actor.name, "ping")
    assert recorder.states == [["RUNNING"], ["RUNNING", "READY"]]


@pytest.mark.asyncio
async def test_troubleshoot_exception_does_not_end_the_check_loop(
    make_actor: Callable[..., ProbeActor],
) -> None:
    actor = make_actor()
    actor.check_error = CheckError("no power", DeviceErrors.NO_POWER)
    actor.troubleshoot_result = RuntimeError("troubleshooter crashed")
    await actor.start()

    await actor.wait_until(lambda: actor.checks >= 5)

    assert len(check_loops(actor)) == 1
    assert ActorState.TROUBLESHOOT_FAILED in actor.state
    actor.check_error = None
    await actor.wait_until(actor.is_ready)


@pytest.mark.asyncio
async def test_check_exception_is_troubleshot_with_unknown_code(
    make_actor: Callable[..., ProbeActor],
) -> None:
    actor = make_actor()
    actor.check_error = OSError("device unplugged")
    await actor.start()

    await actor.wait_until(lambda: actor.checks >= 2)

    error = actor.state_payload()["error"]
    assert error["code"] == 9999
    assert error["exception"]["type"] == "OSError"
    assert error["exception"]["message"] == "device unplugged"
    assert error["exception"]["filename"] == __file__


@pytest.mark.asyncio
async def test_repeated_reload_restarts_leave_one_check_loop(
    make_actor: Callable[..., ProbeActor], client: AMQPClient
) -> None:
    actor = make_actor(restart_after=0.03)
    actor.check_error = CheckError("stuck")
    await actor.start()

    await actor.wait_until(lambda: actor.starts >= 4)
    actor.check_error = None
    await actor.wait_until(actor.is_ready)

    assert len(check_loops(actor)) == 1
    command = await send(client, actor.name, "actor-state")
    assert command.replies[-1].message["state"]["flags"] == ["RUNNING", "READY"]


@pytest.mark.asyncio
async def test_restart_command_reloads(
    make_actor: Callable[..., ProbeActor], client: AMQPClient
) -> None:
    actor = await make_actor().start()

    command = await send(client, actor.name, "actor-restart --mode reload")

    assert command.status.did_succeed
    assert actor.starts == 2
    assert len(check_loops(actor)) == 1


@pytest.mark.asyncio
async def test_not_ready_time_uses_a_monotonic_clock(
    make_actor: Callable[..., ProbeActor], monkeypatch: pytest.MonkeyPatch
) -> None:
    actor = make_actor(restart_after=60.0)
    actor.check_error = CheckError("stuck")
    await actor.start()
    await actor.wait_until(lambda: actor.checks >= 2)

    # An NTP step of an hour on the wall clock must not count as not-ready time.
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600.0)
    checks = actor.checks
    await actor.wait_until(lambda: actor.checks >= checks + 5)

    assert actor.starts == 1


@pytest.mark.asyncio
async def test_restart_exit_stops_cleanly_and_exits_1(
    make_actor: Callable[..., ProbeActor], client: AMQPClient
) -> None:
    actor = make_actor()
    recorder = StateRecorder(client, actor.name)
    await actor.start()

    with pytest.raises(SystemExit) as exit_info:
        await actor.restart(mode="exit")

    assert exit_info.value.code == 1
    assert not actor.is_connected()
    assert check_loops(actor) == []
    await recorder.wait_for(["RUNNING", "RESTARTING"])


EXIT_ACTOR = """
import asyncio
import sys

from lvmopstools.actor import CheckError, LVMActor


class StuckActor(LVMActor):
    async def _check_internal(self):
        raise CheckError("stuck")

    async def _troubleshoot_internal(self, error_code, exception=None):
        return False


async def main():
    actor = StuckActor(
        name=sys.argv[2],
        url=sys.argv[1],
        check_interval=0.01,
        restart_after=0.05,
        restart_mode="exit",
    )
    await actor.start()
    await actor.run_forever()


asyncio.run(main())
"""


@pytest.mark.asyncio
async def test_exit_restart_from_the_check_loop_ends_the_process(
    rabbitmq_url: str, client: AMQPClient, tmp_path: Any
) -> None:
    script = tmp_path / "stuck_actor.py"
    script.write_text(EXIT_ACTOR)
    name = unique("stuck")
    recorder = StateRecorder(client, name)

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        rabbitmq_url,
        name,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(WAIT):
            returncode = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert returncode == 1
    await recorder.wait_for(["RUNNING", "RESTARTING"])
