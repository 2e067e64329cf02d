"""Forged results on a real broker (mosquitto -> bridge -> JetStream -> central) change nothing.

What an attacker on the broker did (issue 9): a result on `nerve/dev2/results/clear_temp` closed dev2's
open incident as resolved, and its data overwrote the fact's `incident_id`. Here the attacker publishes
over MQTT, as any client can; central acts only on results its devices signed, keeps every other as a
sampled `result_refused` fact, and the genuine result still closes the incident.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from typing import TYPE_CHECKING, Any

import msgspec
import pytest

from nerve.agents import CommandAudit, disk_runbook
from nerve.bridge import Bridge
from nerve.runtime.central.runner import UNREGISTERED, Central
from nerve.runtime.config.settings import load_settings
from nerve.runtime.envelope.codec import decode, to_json
from nerve.runtime.envelope.model import Command, CommandResult, Fact, new_id
from nerve.runtime.testing import provision_device, stream_messages, wait_for_count
from nerve.runtime.trust.chain import verify_records
from nerve.runtime.trust.devices import REVOKED_DIR
from nerve.runtime.trust.signing import Signer, Verifier, generate_keypair
from nerve.runtime.wire.client import MqttClient

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext

    from nerve.runtime.config.settings import Settings
    from nerve.runtime.envelope.model import ResultStatus
    from nerve.runtime.stack.brokers import Mosquitto, NatsServer

pytestmark = pytest.mark.broker

WAIT = 20.0


@pytest.fixture
def central_key(tmp_path: Path) -> Signer:
    private, _ = generate_keypair(tmp_path / "keys", "central")
    return Signer.from_file(private)


def stack_settings(
    mosquitto: Mosquitto, nats_server: NatsServer, tmp_path: Path, window_s: float
) -> Settings:
    return load_settings(
        overrides={
            "mqtt": {"url": mosquitto.url},
            "nats": {"url": nats_server.url},
            "data_dir": str(tmp_path / "data"),
            "central": {"disk": {"result_timeout_s": 300, "cooldown_s": 300}},
            "streams": {"sample_window_s": window_s},
        }
    )


@contextlib.asynccontextmanager
async def site(settings: Settings, central_key: Signer) -> AsyncIterator[tuple[Central, MqttClient]]:
    """Central (disk runbook + audit) and the bridge running, and an MQTT client anyone could be."""
    runner = Central(
        settings=settings,
        signer=central_key,
        agents=[CommandAudit(settings.streams)],
        durable=[disk_runbook(settings.central.disk)],
    )
    bridge = Bridge(settings=settings)
    async with asyncio.TaskGroup() as tasks:
        central_task = tasks.create_task(runner.run())
        async with asyncio.timeout(WAIT):
            await runner.ready.wait()
        bridge_task = tasks.create_task(bridge.run())
        async with asyncio.timeout(WAIT):
            await bridge.ready.wait()
        try:
            async with MqttClient(settings.mqtt, client_id=f"attacker-{new_id()[:8]}") as client:
                yield runner, client
        finally:
            bridge_task.cancel()
            central_task.cancel()


async def facts_of(js: JetStreamContext) -> list[Fact]:
    return [decode(m.data, Fact) for m in await stream_messages(js, "NERVE_FACTS")]


async def spike(client: MqttClient, js: JetStreamContext, device: str, commands: int) -> Command:
    """A disk reading of 97 % from `device`; returns the signed command central sent for it."""
    await client.publish(f"nerve/{device}/telemetry/disk", b'{"value": 97}', qos=1)
    await wait_for_count(js, "NERVE_COMMANDS", commands, timeout=WAIT)
    sent = [decode(m.data, Command) for m in await stream_messages(js, "NERVE_COMMANDS")]
    (command,) = [c for c in sent if c.subject == device]
    return command


def result(
    command: Command, *, status: ResultStatus = "ok", data: dict[str, Any] | None = None, subject: str = ""
) -> CommandResult:
    return CommandResult.for_command(
        command,
        source=f"nerve://edge/{subject or command.subject}",
        status=status,
        data=data if data is not None else {"files_deleted": 4242, "incident_id": "pwned", "status": "ok"},
        subject=subject or None,
    )


async def until(condition: Any, what: str) -> None:
    try:
        async with asyncio.timeout(WAIT):
            while not condition():
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"not within {WAIT:g}s: {what}")


async def test_forged_results_close_nothing_are_sampled_facts_and_the_genuine_one_closes(
    mosquitto: Mosquitto, nats_server: NatsServer, nc: NatsClient, tmp_path: Path, central_key: Signer
) -> None:
    settings = stack_settings(mosquitto, nats_server, tmp_path, window_s=60)
    registry = settings.data_dir / "devices"
    dev2 = provision_device(registry, "dev2")
    dev3 = provision_device(registry, "dev3")
    dev4 = provision_device(registry, "dev4")
    (registry / REVOKED_DIR).mkdir()
    shutil.move(registry / "dev4.pub", registry / REVOKED_DIR / "dev4.pub")  # `nerve devices revoke dev4`
    js = nc.jetstream()
    async with site(settings, central_key) as (runner, attacker):
        command = await spike(attacker, js, "dev2", 1)
        revoked_command = await spike(attacker, js, "dev4", 2)
        # A genuine result of dev2 for another command, captured earlier by the attacker.
        old = Command.create(
            device="dev2", action="clear_temp", args={}, source="s", ttl=command.expires - command.time
        )
        captured = dev2.sign(result(old, data={"files_deleted": 1}))
        rogue = Signer.from_file(generate_keypair(tmp_path / "rogue", "dev2")[0])
        forgeries = {
            "unsigned": result(command),
            "signed by another device": dev3.sign(result(command)),
            "another device's key under this device's id": msgspec.structs.replace(
                dev3.sign(result(command)), keyid="dev2"
            ),
            "a key the registry does not hold": rogue.sign(result(command)),
            "a genuine result re-pointed at this command": msgspec.structs.replace(
                captured, causationid=command.id
            ),
            "a revoked device": dev4.sign(result(revoked_command)),
        }
        for forged in forgeries.values():
            await attacker.publish(f"nerve/{forged.subject}/results/clear_temp", to_json(forged), qos=1)
        # And the captured result replayed as it is: it verifies, but is for no open incident.
        await attacker.publish("nerve/dev2/results/clear_temp", to_json(captured), qos=1)
        await until(lambda: runner.refused_results == len(forgeries), "every forgery refused")
        facts = await facts_of(js)
        assert not any(f.kind in {"incident_resolved", "incident_failed", "command_result"} for f in facts)
        refused = [f for f in facts if f.kind == "result_refused"]
        # One fact at once per device and kind of refusal; the rest are counted for the window's fact.
        by_key = {(f.subject, f.data["reason"]) for f in refused}
        assert by_key == {
            ("dev2", "unsigned"),
            ("dev2", "wrong_keyid"),
            ("dev2", "bad_signature"),
            ("dev4", "revoked"),
        }
        assert len(refused) == len(by_key)
        for fact in refused:
            assert fact.data["count"] == 1
            assert fact.keyid == "central"  # a signed, chained fact like any other
            assert "4242" not in json.dumps(fact.data)  # the forged data is not kept
        revoked_fact = next(f for f in refused if f.subject == "dev4")
        assert "device dev4 is revoked; not acted on" in revoked_fact.summary

        # The genuine, signed result closes the incident.
        genuine = dev2.sign(result(command, data={"files_deleted": 3, "incident_id": "pwned", "status": "x"}))
        await attacker.publish("nerve/dev2/results/clear_temp", to_json(genuine), qos=1)
        await until(lambda: runner.handled >= 1, "the genuine result handled")
        await wait_for_count(js, "NERVE_FACTS", len(facts) + 1, timeout=WAIT)  # command_result
        # The runbook verifies by the device's next reading that the disk went below the clear level.
        await attacker.publish("nerve/dev2/telemetry/disk", b'{"value": 40}', qos=1)
        await wait_for_count(js, "NERVE_FACTS", len(facts) + 2, timeout=WAIT)
    facts = await facts_of(js)
    opened = next(f for f in facts if f.kind == "incident_opened" and f.subject == "dev2")
    (closing,) = [f for f in facts if f.kind == "command_result"]
    (resolved,) = [f for f in facts if f.kind == "incident_resolved"]
    assert resolved.subject == "dev2"
    assert "deleted 3 files" in resolved.summary
    # The device's data cannot overwrite nerve's own fields: it is kept under its own key.
    assert closing.data["incident_id"] == opened.data["incident_id"]
    assert closing.data["status"] == "ok"
    assert closing.data["result"] == {"files_deleted": 3, "incident_id": "pwned", "status": "x"}
    assert not any(f.kind == "incident_resolved" and f.subject == "dev4" for f in facts)
    records = [(m.seq, m.data) for m in await stream_messages(js, "NERVE_FACTS")]
    assert verify_records(records, Verifier.from_config({}, tmp_path / "keys")) == []


async def test_a_flood_of_forged_results_adds_a_handful_of_facts_and_counts_them_all(
    mosquitto: Mosquitto, nats_server: NatsServer, nc: NatsClient, tmp_path: Path, central_key: Signer
) -> None:
    settings = stack_settings(mosquitto, nats_server, tmp_path, window_s=2)
    provision_device(settings.data_dir / "devices", "dev2")
    js = nc.jetstream()
    async with site(settings, central_key) as (runner, attacker):
        command = await spike(attacker, js, "dev2", 1)
        for i in range(1000):
            # Half on the real device, half on made-up device ids (which share one sampling key).
            device = "dev2" if i % 2 else f"bogus-{i}"
            forged = result(command, subject=device)
            await attacker.publish(f"nerve/{device}/results/clear_temp", to_json(forged), qos=1)
        await until(lambda: runner.refused_results == 1000, "1,000 forgeries refused")

        async def counted() -> int:
            return sum(int(f.data["count"]) for f in await facts_of(js) if f.kind == "result_refused")

        async with asyncio.timeout(WAIT):
            while await counted() < 1000:  # the windows' facts come when each window ends
                await asyncio.sleep(0.2)
    facts = await facts_of(js)
    refused = [f for f in facts if f.kind == "result_refused"]
    assert await counted() == 1000  # every refusal counted once, none twice (2 agents get each one)
    assert {f.subject for f in refused} <= {"dev2", UNREGISTERED, "bogus-2", "bogus-0"}
    # Two keys (dev2, and every made-up id together), one fact at once each, then one per 2 s window.
    assert len(refused) <= 2 * 6, [f.summary for f in refused]
    assert not any(f.kind == "incident_resolved" for f in facts)
    assert sum(len(m.data) for m in await stream_messages(js, "NERVE_FACTS")) < 64 * 1024
