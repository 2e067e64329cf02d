"""The disk runbook on central, against a real nats-server (the device's side is played by the test)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import msgpack
import pytest

from nerve.agents import disk_runbook
from nerve.runtime.central.runner import Central
from nerve.runtime.config.settings import load_settings
from nerve.runtime.envelope.codec import decode
from nerve.runtime.envelope.model import Command, CommandResult, Event, Fact
from nerve.runtime.jetstream.client import publish_envelope
from nerve.runtime.jetstream.streams import ensure_streams
from nerve.runtime.testing import provision_device, stream_messages, wait_for_count
from nerve.runtime.trust.signing import Signer, Verifier, generate_keypair

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext

    from nerve.runtime.config.settings import Settings
    from nerve.runtime.stack.brokers import NatsServer

pytestmark = pytest.mark.broker


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Signer, Verifier]:
    private, _ = generate_keypair(tmp_path / "keys", "central")
    return Signer.from_file(private), Verifier.from_config({}, tmp_path / "keys")


@pytest.fixture
def device(tmp_path: Path) -> Callable[[str], Signer]:
    """Registers a device in central's registry (`<data_dir>/devices`); returns the signer of its results."""
    return lambda name: provision_device(tmp_path / "devices", name)


@pytest.fixture
def central_settings(nats_server: NatsServer, tmp_path: Path) -> Settings:
    return load_settings(
        overrides={
            "nats": {"url": nats_server.url},
            "data_dir": str(tmp_path),
            "central": {"disk": {"result_timeout_s": 1.0, "cooldown_s": 60}},
        }
    )


@contextlib.asynccontextmanager
async def central(settings: Settings, signer: Signer) -> AsyncIterator[Central]:
    runner = Central(
        settings=settings, signer=signer, agents=[], durable=[disk_runbook(settings.central.disk)]
    )
    task = asyncio.create_task(runner.run())
    try:
        async with asyncio.timeout(10):
            await runner.ready.wait()
        yield runner
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def reading(device: str, value: float) -> Event:
    return Event(
        source="test", type="nerve.telemetry.disk", subject=device, data={"value": value, "mount": "/"}
    )


async def facts_of(js: JetStreamContext) -> list[Fact]:
    return [decode(m.data, Fact) for m in await stream_messages(js, "NERVE_FACTS")]


async def commands_of(js: JetStreamContext) -> list[Command]:
    return [decode(m.data, Command) for m in await stream_messages(js, "NERVE_COMMANDS")]


async def test_spike_sends_signed_command_and_result_resolves(
    central_settings: Settings,
    nc: NatsClient,
    keys: tuple[Signer, Verifier],
    device: Callable[[str], Signer],
) -> None:
    signer, verifier = keys
    pi01 = device("pi-01")
    js = nc.jetstream()
    async with central(central_settings, signer):
        spike = reading("pi-01", 97)
        await publish_envelope(js, "nerve.pi-01.telemetry.disk", reading("pi-01", 50))  # below: nothing
        await publish_envelope(js, "nerve.pi-01.telemetry.disk", spike)
        await wait_for_count(js, "NERVE_COMMANDS", 1)
        (command,) = await commands_of(js)
        verifier.verify(command)  # raises if the signature is bad
        assert command.action == "clear_temp"
        assert command.subject == "pi-01"
        assert command.causationid == spike.id
        assert command.hops == 1
        assert command.data == {"older_than_s": central_settings.central.disk.older_than_s}
        result = pi01.sign(
            CommandResult.for_command(
                command, source="test", status="ok", data={"files_deleted": 3, "bytes_freed": 3 * 1048576}
            )
        )
        await publish_envelope(js, "nerve.pi-01.results.clear_temp", result)
        await wait_for_count(js, "NERVE_FACTS", 3)
        # Resolved once a reading after the result shows the disk below the clear level.
        await publish_envelope(js, "nerve.pi-01.telemetry.disk", reading("pi-01", 85))  # not yet
        await publish_envelope(js, "nerve.pi-01.telemetry.disk", reading("pi-01", 40))
        await wait_for_count(js, "NERVE_FACTS", 4)
    kinds = [fact.kind for fact in await facts_of(js)]
    assert kinds == ["incident_opened", "command_issued", "command_result", "incident_resolved"]
    summary = (await facts_of(js))[-1].summary
    assert "resolved" in summary
    assert "97.0%" in summary
    assert "3 files" in summary


async def test_redelivered_spike_and_second_spike_send_one_command(
    central_settings: Settings, nc: NatsClient, keys: tuple[Signer, Verifier]
) -> None:
    js = nc.jetstream()
    signer, _ = keys
    spike = reading("pi-02", 95)
    async with central(central_settings, signer):
        await publish_envelope(js, "nerve.pi-02.telemetry.disk", spike)
        await wait_for_count(js, "NERVE_COMMANDS", 1)
        # The same reading stored again (past JetStream's dedup, e.g. a raw re-publish) and a new spike.
        await js.publish("nerve.pi-02.telemetry.disk", (await stream_messages(js, "NERVE_TELEMETRY"))[0].data)
        await publish_envelope(js, "nerve.pi-02.telemetry.disk", reading("pi-02", 99))
        await publish_envelope(js, "nerve.pi-03.telemetry.disk", reading("pi-03", 99))
        await wait_for_count(js, "NERVE_COMMANDS", 2)
        await asyncio.sleep(0.5)
    devices = [command.subject for command in await commands_of(js)]
    assert devices == ["pi-02", "pi-03"]


async def test_no_result_fails_the_incident_after_timeout(
    central_settings: Settings, nc: NatsClient, keys: tuple[Signer, Verifier]
) -> None:
    js = nc.jetstream()
    signer, _ = keys
    async with central(central_settings, signer):
        await publish_envelope(js, "nerve.pi-04.telemetry.disk", reading("pi-04", 93))
        await wait_for_count(js, "NERVE_FACTS", 3, timeout=10)
    facts = await facts_of(js)
    assert [fact.kind for fact in facts] == ["incident_opened", "command_issued", "incident_failed"]
    assert "no result" in facts[-1].summary


async def test_failed_result_fails_the_incident(
    central_settings: Settings,
    nc: NatsClient,
    keys: tuple[Signer, Verifier],
    device: Callable[[str], Signer],
) -> None:
    js = nc.jetstream()
    signer, _ = keys
    async with central(central_settings, signer):
        await publish_envelope(js, "nerve.pi-05.telemetry.disk", reading("pi-05", 93))
        await wait_for_count(js, "NERVE_COMMANDS", 1)
        (command,) = await commands_of(js)
        rejected = device("pi-05").sign(
            CommandResult.for_command(command, source="t", status="rejected", reason="bad signature")
        )
        await publish_envelope(js, "nerve.pi-05.results.clear_temp", rejected)
        await wait_for_count(js, "NERVE_FACTS", 4)
    facts = await facts_of(js)
    assert facts[-1].kind == "incident_failed"
    assert "bad signature" in facts[-1].summary


async def test_open_incident_survives_a_central_restart(
    central_settings: Settings,
    nc: NatsClient,
    keys: tuple[Signer, Verifier],
    device: Callable[[str], Signer],
) -> None:
    js = nc.jetstream()
    signer, _ = keys
    async with central(central_settings, signer):
        await publish_envelope(js, "nerve.pi-06.telemetry.disk", reading("pi-06", 96))
        await wait_for_count(js, "NERVE_COMMANDS", 1)
    (command,) = await commands_of(js)
    async with central(central_settings, signer):
        # The incident is open: this spike starts no run, and a fact says it was dropped.
        await publish_envelope(js, "nerve.pi-06.telemetry.disk", reading("pi-06", 98))
        await wait_for_count(js, "NERVE_FACTS", 3)
        result = CommandResult.for_command(command, source="t", status="ok", data={"files_deleted": 0})
        await publish_envelope(js, "nerve.pi-06.results.clear_temp", device("pi-06").sign(result))
        await wait_for_count(js, "NERVE_FACTS", 4)
        await publish_envelope(js, "nerve.pi-06.telemetry.disk", reading("pi-06", 40))
        await wait_for_count(js, "NERVE_FACTS", 5)
    assert len(await commands_of(js)) == 1
    kinds = [fact.kind for fact in await facts_of(js)]
    assert kinds == [
        "incident_opened",
        "command_issued",
        "trigger_dropped",
        "command_result",
        "incident_resolved",
    ]


async def test_undecodable_and_too_deep_messages(
    central_settings: Settings, nc: NatsClient, keys: tuple[Signer, Verifier]
) -> None:
    """The engine dead-letters what it cannot decode; a reading past the hop limit opens nothing, and the
    engine's loop guard keeps a fact saying so (nothing refused vanishes unseen)."""
    js = nc.jetstream()
    await ensure_streams(js, "nerve")
    signer, _ = keys
    async with central(central_settings, signer):
        await js.publish("nerve.pi-07.telemetry.disk", b"\x81\xa1x\xc1")  # malformed msgpack
        looping = Event(source="t", type="nerve.telemetry.disk", subject="pi-07", data={"value": 99}, hops=9)
        await publish_envelope(js, "nerve.pi-07.telemetry.disk", looping)
        await publish_envelope(js, "nerve.pi-08.telemetry.disk", reading("pi-08", 99))  # after them
        await wait_for_count(js, "NERVE_DEADLETTER", 1)
        await wait_for_count(js, "NERVE_COMMANDS", 1)
        async with asyncio.timeout(10):
            while not any(fact.kind == "loop_guard" for fact in await facts_of(js)):
                await asyncio.sleep(0.1)
    (dead,) = await stream_messages(js, "NERVE_DEADLETTER")
    record = msgpack.unpackb(dead.data)
    assert dead.subject == "nerve.deadletter.central"
    assert "malformed msgpack" in record["reason"]
    assert record["payload"] == b"\x81\xa1x\xc1"
    assert [command.subject for command in await commands_of(js)] == ["pi-08"]
    facts = await facts_of(js)
    assert {fact.subject for fact in facts if fact.kind != "loop_guard"} == {"pi-08"}
    assert [fact.kind for fact in facts if fact.subject == "pi-07"] == ["loop_guard"]


async def test_a_forged_result_is_refused_as_central_refuses_one_and_changes_nothing(
    central_settings: Settings,
    nc: NatsClient,
    keys: tuple[Signer, Verifier],
    device: Callable[[str], Signer],
    tmp_path: Path,
) -> None:
    """The runbook alone (no runner agent reads results): its command step has central count the refusal."""
    js = nc.jetstream()
    signer, _ = keys
    pi09 = device("pi-09")
    impostor = provision_device(tmp_path / "elsewhere", "pi-09")  # a key central does not hold for pi-09
    async with central(central_settings, signer) as runner:
        await publish_envelope(js, "nerve.pi-09.telemetry.disk", reading("pi-09", 95))
        await wait_for_count(js, "NERVE_COMMANDS", 1)
        (command,) = await commands_of(js)
        forged = impostor.sign(CommandResult.for_command(command, source="t", status="ok"))
        await publish_envelope(js, "nerve.pi-09.results.clear_temp", forged)
        await wait_for_count(js, "NERVE_FACTS", 3)  # opened, issued, and the refusal
        assert runner.refused_results == 1
        genuine = pi09.sign(
            CommandResult.for_command(command, source="t", status="ok", data={"files_deleted": 2})
        )
        await publish_envelope(js, "nerve.pi-09.results.clear_temp", genuine)
        await wait_for_count(js, "NERVE_FACTS", 4)
        await publish_envelope(js, "nerve.pi-09.telemetry.disk", reading("pi-09", 30))
        await wait_for_count(js, "NERVE_FACTS", 5)
    facts = await facts_of(js)
    assert [fact.kind for fact in facts] == [
        "incident_opened",
        "command_issued",
        "result_refused",
        "command_result",
        "incident_resolved",
    ]
    assert facts[2].data["result_id"] == forged.id
    assert "deleted 2 files" in facts[-1].summary
