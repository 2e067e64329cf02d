"""The edge daemon against a real mosquitto: presence, readings, signed commands, refusals, restarts.

A few fast tests without a broker come first (exports, imports, device id, the sensor loop's ticks).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import msgspec
import pytest

import nerve.edge
from nerve.edge import (
    DROPPED_EVENT,
    OFFLINE,
    ONLINE,
    CommandJournal,
    EdgeAgent,
    Executor,
    Outbox,
    OutboxKind,
    Reading,
    default_device_id,
    read_boot_id,
)
from nerve.runtime.config.settings import MqttSettings, Settings
from nerve.runtime.envelope.codec import decode, to_json, to_msgpack
from nerve.runtime.envelope.model import Command, CommandResult, Event
from nerve.runtime.errors import ConfigError
from nerve.runtime.trust.signing import Signer, Verifier, generate_keypair
from nerve.runtime.wire.client import MqttClient

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from tests.conftest import Running
    from tests.edge.conftest import Put

    from nerve.runtime.stack.brokers import Mosquitto
    from nerve.runtime.wire.mqtt import Incoming

DEVICE = "pi-01"
HOUR = 3600.0
# Generous for a loaded CI machine; locally every wait below ends in milliseconds.
WAIT = 5.0
RESULTS = f"nerve/{DEVICE}/results/+"
STATUS = f"nerve/{DEVICE}/status"


def command_topic(action: str = "clear_temp") -> str:
    return f"nerve/{DEVICE}/commands/{action}"


def make(
    action: str = "clear_temp",
    args: dict[str, Any] | None = None,
    *,
    device: str = DEVICE,
    ttl: timedelta = timedelta(minutes=1),
) -> Command:
    return Command.create(
        device=device,
        action=action,
        args={"older_than_s": HOUR} if args is None else args,
        source="nerve://central/test",
        ttl=ttl,
    )


# --- without a broker -----------------------------------------------------------------------------


def _isort_order(name: str) -> tuple[int, str]:
    # The order ruff (RUF022) keeps: CONSTANTS, then Classes, then functions.
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


def test_public_names_are_sorted_and_complete() -> None:
    assert nerve.edge.__all__ == sorted(nerve.edge.__all__, key=_isort_order)
    for name in nerve.edge.__all__:
        assert getattr(nerve.edge, name) is not None
    modules = (
        "actions",
        "agent",
        "allowlist",
        "diagnostics",
        "executor",
        "journal",
        "outbox",
        "processes",
        "sampling",
        "sensor_plugins",
        "sensors",
        "system_actions",
    )
    for module in modules:
        exported = getattr(nerve.edge, module).__all__
        assert set(exported) <= set(nerve.edge.__all__), module


def test_edge_imports_without_nats() -> None:
    # An edge-only install has no nats-py: make it unimportable and import the whole edge package.
    script = """
import sys
class NoNats:
    def find_spec(self, name, path=None, target=None):
        if name == "nats" or name.startswith("nats."):
            raise ImportError("nats-py is not installed on the edge")
sys.meta_path.insert(0, NoNats())
import nerve.edge
import nerve.edge.agent, nerve.edge.executor, nerve.edge.journal
assert not [m for m in sys.modules if m == "nats" or m.startswith("nats.")]
"""
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert completed.returncode == 0, completed.stderr


def test_default_device_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "pi-07.lan.example")
    assert default_device_id() == "pi-07"


def test_default_device_id_refuses_a_bad_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "my pi")
    with pytest.raises(ConfigError, match="pass --device") as caught:
        default_device_id()
    assert caught.value.key == "edge.device"


def edge_settings(url: str, tmp_path: Path, root: Path, keys: Path, *, interval_s: float = 0.05) -> Settings:
    return Settings.model_validate(
        {
            "data_dir": str(tmp_path / "data"),
            "mqtt": {"url": url},
            "edge": {
                "interval_s": interval_s,
                "mounts": [str(tmp_path)],
                "clear_temp_roots": [str(root)],
                "trusted_keys_dir": str(keys),
            },
        }
    )


def make_agent(settings: Settings, journal: CommandJournal, outbox: Outbox | None = None) -> EdgeAgent:
    executor = Executor.from_settings(settings, device=DEVICE, journal=journal)
    return EdgeAgent(settings=settings, device=DEVICE, executor=executor, outbox=outbox)


def test_agent_and_executor_must_agree_on_the_device(
    tmp_path: Path, root: Path, keys: Path, journal: CommandJournal
) -> None:
    settings = edge_settings("mqtt://127.0.0.1:1", tmp_path, root, keys)
    executor = Executor(
        device="pi-02",
        verifier=Verifier.from_config({}, keys),
        journal=journal,
        clear_temp_roots=[root],
        source="x",
        max_validity_s=300.0,
    )
    with pytest.raises(ConfigError, match="pi-02"):
        EdgeAgent(settings=settings, device=DEVICE, executor=executor)
    with pytest.raises(ConfigError, match="not a valid device id"):
        EdgeAgent(settings=settings, device="pi/02", executor=executor)


# --- against a real mosquitto ---------------------------------------------------------------------


@pytest.fixture
def settings(mosquitto: Mosquitto, tmp_path: Path, root: Path, keys: Path) -> Settings:
    return edge_settings(mosquitto.url, tmp_path, root, keys)


@pytest.fixture
def agent(settings: Settings, journal: CommandJournal, outbox: Outbox) -> EdgeAgent:
    return make_agent(settings, journal, outbox)


@contextlib.asynccontextmanager
async def central(url: str, *topics: str, name: str = "test-central") -> AsyncIterator[MqttClient]:
    """A plain MQTT client, subscribed to `topics`, that plays central."""
    async with MqttClient(MqttSettings(url=url), client_id=name) as client:
        for topic in topics:
            await client.subscribe(topic)
        yield client


async def receive(client: MqttClient, *, timeout: float = WAIT) -> Incoming:
    async with asyncio.timeout(timeout):
        return await anext(client.messages)


async def result_of(client: MqttClient, topic: str, payload: bytes) -> tuple[str, CommandResult]:
    await client.publish(topic, payload, qos=1)
    message = await receive(client)
    assert isinstance(message.payload, bytes)
    return message.topic, decode(message.payload, CommandResult)


@pytest.mark.broker
async def test_presence_online_then_offline(mosquitto: Mosquitto, agent: EdgeAgent, running: Running) -> None:
    async with running(agent, wait=WAIT) as task, central(mosquitto.url, STATUS) as observer:
        online = await receive(observer)
        assert (online.payload, online.retain) == (ONLINE, True)
        task.cancel()
        offline = await receive(observer)
        assert offline.payload == OFFLINE
    async with central(mosquitto.url, STATUS, name="late-observer") as late:
        retained = await receive(late)
        assert (retained.payload, retained.retain) == (OFFLINE, True)


_DYING_EDGE = """
import asyncio, json, sys
from pathlib import Path
from nerve.edge import CommandJournal, EdgeAgent, Executor
from nerve.runtime.config.settings import Settings

async def main():
    settings = Settings.model_validate(json.loads(sys.argv[1]))
    with CommandJournal(Path(sys.argv[2])) as journal:
        executor = Executor.from_settings(settings, device=sys.argv[3], journal=journal)
        agent = EdgeAgent(settings=settings, device=sys.argv[3], executor=executor)
        task = asyncio.create_task(agent.run())
        await agent.ready.wait()
        print("ready", flush=True)
        await task

asyncio.run(main())
"""


@pytest.mark.broker
async def test_offline_will_when_the_device_dies(
    mosquitto: Mosquitto, settings: Settings, tmp_path: Path
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _DYING_EDGE,
        settings.model_dump_json(),
        str(tmp_path / "dying.sqlite3"),
        DEVICE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):  # a fresh interpreter imports pydantic, paho, nacl
            assert await process.stdout.readline() == b"ready\n"
        async with central(mosquitto.url, STATUS) as observer:
            assert (await receive(observer)).payload == ONLINE
            process.send_signal(signal.SIGKILL)
            will = await receive(observer)
            assert will.payload == OFFLINE
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


@pytest.mark.broker
async def test_readings_arrive_as_events(
    mosquitto: Mosquitto, agent: EdgeAgent, tmp_path: Path, running: Running
) -> None:
    async with central(mosquitto.url, f"nerve/{DEVICE}/telemetry/+") as observer, running(agent, wait=WAIT):
        seen: dict[str, Event] = {}
        async with asyncio.timeout(WAIT):
            while not {"disk", "cpu", "memory", "load"} <= set(seen):
                message = await receive(observer)
                assert isinstance(message.payload, bytes)
                event = decode(message.payload, Event)
                metric = message.topic.rsplit("/", 1)[-1]
                assert message.topic == f"nerve/{DEVICE}/telemetry/{metric}"
                seen[metric] = event
    assert set(seen) <= {"disk", "cpu", "memory", "load", "temperature"}
    for metric, event in seen.items():
        assert event.type == f"nerve.telemetry.{metric}"
        assert event.source == f"nerve://edge/{DEVICE}"
        assert event.subject == DEVICE
        # The stable id from the outbox: device, boot id, sequence.
        assert event.id.startswith(f"{DEVICE}.{read_boot_id()}.")
    for metric in ("disk", "cpu", "memory"):
        assert seen[metric].data["unit"] == "%"
        assert 0 <= seen[metric].data["value"] <= 100
    assert seen["load"].data["unit"] == "tasks"
    assert seen["load"].data["value"] >= 0
    assert seen["disk"].data["mount"] == str(tmp_path)


@pytest.mark.broker
async def test_signed_clear_temp_runs_once(  # noqa: PLR0917 - fixtures
    mosquitto: Mosquitto, agent: EdgeAgent, signer: Signer, root: Path, put: Put, running: Running
) -> None:
    old = put(root / "old.log", age=2 * HOUR)
    new = put(root / "new.log", age=0)
    payload = to_msgpack(signer.sign(make()))
    async with running(agent, wait=WAIT), central(mosquitto.url, RESULTS) as client:
        topic, first = await result_of(client, command_topic(), payload)
        assert topic == f"nerve/{DEVICE}/results/clear_temp"
        assert first.status == "ok", first.reason
        assert (first.data["files_deleted"], first.data["bytes_freed"], first.data["skipped"]) == (1, 10, 0)
        assert not old.exists()
        assert new.exists()

        later = put(root / "later.log", age=2 * HOUR)
        _, again = await result_of(client, command_topic(), payload)
        assert again == first
        assert later.exists()


@pytest.fixture
def refusals(signer: Signer, tmp_path: Path) -> dict[str, tuple[str, bytes, str, str]]:
    """Case name -> (topic, payload, expected status, a part of the expected reason)."""
    genuine = signer.sign(make())
    generate_keypair(tmp_path / "other", "intruder")
    intruder = Signer.from_file(tmp_path / "other" / "intruder.key")
    return {
        "forged": (
            command_topic(),
            to_msgpack(msgspec.structs.replace(genuine, data={"older_than_s": 0})),
            "rejected",
            "bad signature",
        ),
        "unknown-key": (
            command_topic(),
            to_msgpack(intruder.sign(make())),
            "rejected",
            "unknown key id 'intruder'",
        ),
        "unsigned": (command_topic(), to_json(make()), "rejected", "not signed"),
        "expired": (
            command_topic(),
            to_msgpack(signer.sign(make(ttl=timedelta(minutes=-5)))),
            "rejected",
            "expired: command expired",
        ),
        "wrong-device": (
            command_topic(),
            to_msgpack(signer.sign(make(device="pi-02"))),
            "rejected",
            "command is for device 'pi-02'",
        ),
        "not-allow-listed": (
            command_topic("reboot"),
            to_msgpack(signer.sign(make("reboot", {}))),
            "rejected",
            "action 'reboot' is not allow-listed on this device",
        ),
        "bad-args": (
            command_topic(),
            to_msgpack(signer.sign(make(args={"path": "/etc"}))),
            "rejected",
            "argument 'path' is not a known argument",
        ),
    }


@pytest.mark.broker
@pytest.mark.parametrize(
    "case", ["forged", "unknown-key", "unsigned", "expired", "wrong-device", "not-allow-listed", "bad-args"]
)
async def test_refused_with_a_reason(  # noqa: PLR0917 - fixtures
    mosquitto: Mosquitto,
    agent: EdgeAgent,
    refusals: dict[str, tuple[str, bytes, str, str]],
    root: Path,
    case: str,
    put: Put,
    running: Running,
) -> None:
    victim = put(root / "victim.log", age=2 * HOUR)
    topic, payload, status, reason = refusals[case]
    async with running(agent, wait=WAIT), central(mosquitto.url, RESULTS) as client:
        result_topic, result = await result_of(client, topic, payload)
    assert result_topic == topic.replace("/commands/", "/results/")
    assert result.status == status
    assert reason in result.reason
    assert result.subject == DEVICE
    assert victim.exists()


@pytest.mark.broker
async def test_garbage_gets_no_answer_and_the_agent_goes_on(  # noqa: PLR0917 - fixtures
    mosquitto: Mosquitto, agent: EdgeAgent, signer: Signer, root: Path, put: Put, running: Running
) -> None:
    old = put(root / "old.log", age=2 * HOUR)
    command = signer.sign(make())
    async with running(agent, wait=WAIT), central(mosquitto.url, RESULTS) as client:
        await client.publish(command_topic(), b"\xc1\x00 certainly not a command", qos=1)
        await client.publish(command_topic(), b'{"no": "id"}', qos=1)
        _, result = await result_of(client, command_topic(), to_msgpack(command))
        assert result.causationid == command.id
        assert result.status == "ok"
        assert agent.dropped == 2
    assert not old.exists()


@pytest.mark.broker
async def test_interrupted_command_is_unknown_and_not_run(  # noqa: PLR0917 - fixtures
    mosquitto: Mosquitto,
    agent: EdgeAgent,
    journal: CommandJournal,
    signer: Signer,
    root: Path,
    put: Put,
    running: Running,
) -> None:
    victim = put(root / "victim.log", age=2 * HOUR)
    command = signer.sign(make())
    journal.start(command.id, expires=command.expires)  # as if the device died while running it
    async with running(agent, wait=WAIT), central(mosquitto.url, RESULTS) as client:
        _, result = await result_of(client, command_topic(), to_msgpack(command))
    assert result.status == "unknown"
    assert result.reason == "the device restarted while running this command; not run again"
    assert victim.exists()


@pytest.mark.broker
async def test_a_command_sent_while_the_device_is_away_runs_when_it_is_back(  # noqa: PLR0917 - fixtures
    mosquitto: Mosquitto, agent: EdgeAgent, signer: Signer, root: Path, put: Put, running: Running
) -> None:
    old = put(root / "old.log", age=2 * HOUR)
    async with running(agent, wait=WAIT):
        pass  # the persistent session and its subscription now exist at the broker
    command = signer.sign(make())
    async with central(mosquitto.url, RESULTS) as client:
        await client.publish(command_topic(), to_msgpack(command), qos=1)
        async with running(agent, wait=WAIT):
            message = await receive(client)
    assert isinstance(message.payload, bytes)
    result = decode(message.payload, CommandResult)
    assert (result.causationid, result.status) == (command.id, "ok")
    assert not old.exists()


@pytest.mark.broker
async def test_reconnects_after_the_broker_restarts(  # noqa: PLR0917 - fixtures
    mosquitto: Mosquitto, agent: EdgeAgent, signer: Signer, root: Path, put: Put, running: Running
) -> None:
    old = put(root / "old.log", age=2 * HOUR)
    async with running(agent, wait=WAIT):
        await mosquitto.stop()
        async with asyncio.timeout(WAIT):
            while agent.ready.is_set():
                await asyncio.sleep(0.01)
        await mosquitto.start()
        async with asyncio.timeout(2 * WAIT):
            await agent.ready.wait()
        async with central(mosquitto.url, RESULTS) as client:
            _, result = await result_of(client, command_topic(), to_msgpack(signer.sign(make())))
    assert result.status == "ok"
    assert not old.exists()


def test_settings_round_trip_for_the_subprocess(tmp_path: Path, root: Path, keys: Path) -> None:
    # The dying-edge test hands its settings over as JSON: they must come back the same.
    settings = edge_settings("mqtt://127.0.0.1:1883", tmp_path, root, keys)
    assert Settings.model_validate(json.loads(settings.model_dump_json())) == settings


def test_readings_past_the_cap_are_dropped_oldest_first_and_reported_as_an_event(
    tmp_path: Path, root: Path, keys: Path, journal: CommandJournal
) -> None:
    settings = edge_settings("mqtt://127.0.0.1:1", tmp_path, root, keys)
    with Outbox(tmp_path / "capped.sqlite3", device=DEVICE, max_bytes=64 * 1024) as outbox:
        agent = make_agent(settings, journal, outbox)
        for i in range(1000):
            agent._write_reading(Reading(metric="cpu", value=float(i), unit="%"))
        assert outbox.dropped > 0
        entries = outbox.peek(2000)
        reports = [decode(e.payload, Event) for e in entries if e.kind is OutboxKind.EVENTS]
        readings = [decode(e.payload, Event) for e in entries if e.kind is OutboxKind.TELEMETRY]
    assert reports
    assert all(
        e.topic == f"nerve/{DEVICE}/events/{DROPPED_EVENT}" for e in entries if e.kind is OutboxKind.EVENTS
    )
    assert sum(report.data["dropped"] for report in reports) == reports[-1].data["total"] == outbox.dropped
    assert reports[-1].data["max_bytes"] == settings.edge.outbox.max_bytes
    assert reports[0].type == f"nerve.events.{DROPPED_EVENT}"
    # What is left of the readings is the newest, in order.
    values = [event.data["value"] for event in readings]
    assert values == [float(i) for i in range(1000 - len(values), 1000)]


def test_writing_outside_run_is_a_clear_error(
    tmp_path: Path, root: Path, keys: Path, journal: CommandJournal
) -> None:
    agent = make_agent(edge_settings("mqtt://127.0.0.1:1", tmp_path, root, keys), journal)
    with pytest.raises(RuntimeError, match="only while it runs"):
        agent._write_reading(Reading(metric="cpu", value=1.0, unit="%"))
