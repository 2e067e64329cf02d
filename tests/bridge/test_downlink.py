"""The downlink against a real mosquitto and nats-server: commands first, whatever the uplink is doing.

The downlink has its own MQTT connection, so a command's PUBACK never waits behind readings, and it keeps
several commands in flight. Each test asserts an order or a count, never a duration: waits have timeouts
only so that a failure ends.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.chaos.test_bridge_restarts import start_bridge  # one way to run `nerve bridge` in tests

import nerve.bridge.bridge as bridge_module
import nerve.bridge.downlink as downlink_module
from nerve.bridge import Bridge
from nerve.bridge.downlink import downlink_mqtt, lane_of
from nerve.bridge.natswire import open_nats
from nerve.runtime.config.settings import load_settings
from nerve.runtime.envelope.codec import decode
from nerve.runtime.envelope.model import Command, CommandResult, utcnow
from nerve.runtime.jetstream.client import publish_envelope, shared_durable
from nerve.runtime.jetstream.streams import STREAM_OF_KIND, ensure_streams
from nerve.runtime.subjects import Kind, kind_filter
from nerve.runtime.testing import stream_messages
from nerve.runtime.wire.client import MqttClient
from nerve.runtime.wire.mqtt import open_mqtt

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from contextlib import AbstractAsyncContextManager
    from pathlib import Path

    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext
    from tests.conftest import Running, Serve

    from nerve.bridge.natswire import NatsWire
    from nerve.runtime.config.settings import Settings
    from nerve.runtime.stack.brokers import Mosquitto, NatsServer

pytestmark = pytest.mark.broker

WAIT = 30.0
RECEIVE_MAXIMUM = 20  # mosquitto's max_inflight_messages default, which it announces in CONNACK


def command_for(device: str) -> Command:
    return Command.create(device=device, action="clear_temp", args={}, source="t", ttl=timedelta(minutes=5))


async def store_commands(js: JetStreamContext, commands: list[Command]) -> None:
    for command in commands:
        await publish_envelope(js, f"nerve.{command.subject}.commands.{command.action}", command)


async def receive(device: MqttClient, count: int) -> list[Command]:
    """The next `count` commands the subscribed client gets (a timeout only so that a failure ends)."""
    received: list[Command] = []
    async with asyncio.timeout(WAIT):
        async for message in device.messages:
            received.append(decode(message.payload, Command))
            if len(received) == count:
                return received
    return received


async def until(condition: Callable[[], Awaitable[bool]]) -> None:
    async with asyncio.timeout(WAIT):
        while not await condition():
            await asyncio.sleep(0.05)


@dataclass
class Valve:
    """Relays to a real nats-server, and holds what clients send while closed (nothing is dropped)."""

    upstream_port: int
    flowing: asyncio.Event = field(default_factory=asyncio.Event)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._copy(reader, up_writer, self.flowing), name="valve-up")
                tasks.create_task(self._copy(up_reader, writer, None), name="valve-down")
        except* (ConnectionError, OSError):
            pass
        finally:
            up_writer.close()
            writer.close()

    @staticmethod
    async def _copy(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flowing: asyncio.Event | None
    ) -> None:
        while data := await reader.read(65536):
            if flowing is not None:
                await flowing.wait()
            writer.write(data)
            await writer.drain()
        raise ConnectionError  # either side gone: end the other copy too


@contextlib.asynccontextmanager
async def uplink_through_valve(
    nats_server: NatsServer,
    tcp_server: Callable[[Serve], AbstractAsyncContextManager[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Valve]:
    """The uplink's JetStream publisher (only it) goes through a valve, open to begin with."""
    valve = Valve(upstream_port=int(nats_server.url.rsplit(":", 1)[1]))
    valve.flowing.set()
    async with tcp_server(valve.serve) as port:

        async def through_valve(_: str, **options: Any) -> NatsWire:
            return await open_nats(f"nats://127.0.0.1:{port}", **options)

        monkeypatch.setattr(bridge_module, "open_nats", through_valve)
        yield valve


async def test_commands_reach_devices_while_the_uplink_is_stalled_behind_a_backlog(  # noqa: PLR0917 - fixtures
    settings: Settings,
    nats_server: NatsServer,
    nc: NatsClient,
    running: Running,
    tcp_server: Callable[[Serve], AbstractAsyncContextManager[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """JetStream stores hang for the uplink: it stops reading mosquitto at max_in_flight, with thousands
    of readings queued behind. Every command still reaches its device before one more reading is stored;
    once the stores flow again, every reading is stored."""
    js = nc.jetstream()
    await ensure_streams(js, settings.prefix)
    readings = 2000
    settings = settings.model_copy(
        update={"bridge": settings.bridge.model_copy(update={"max_in_flight": 50})}
    )
    commands = [command_for(f"dev-{i}") for i in range(5)]
    async with (
        uplink_through_valve(nats_server, tcp_server, monkeypatch) as valve,
        running(Bridge(settings=settings), wait=WAIT) as _,
        MqttClient(settings.mqtt, client_id="devices") as devices,
        MqttClient(settings.mqtt, client_id="sensors") as sensors,
    ):
        await devices.subscribe("nerve/+/commands/+")
        valve.flowing.clear()
        for i in range(readings):
            await sensors.publish(f"nerve/dev-{i % 50}/telemetry/disk", str(i % 100).encode())
        await store_commands(js, commands)
        received = await receive(devices, len(commands))
        stored = (await js.stream_info("NERVE_TELEMETRY")).state.messages
        valve.flowing.set()
        async with asyncio.timeout(WAIT * 2):
            while (await js.stream_info("NERVE_TELEMETRY")).state.messages < readings:
                await asyncio.sleep(0.1)
    assert sorted(c.id for c in received) == sorted(c.id for c in commands)
    assert stored == 0  # the backlog was still all pending when the last command arrived


async def test_the_downlink_thread_waits_at_most_1_ms_for_the_gil_while_it_runs(
    settings: Settings, running: Running
) -> None:
    """The interpreter's switch interval is 1 ms while a bridge's downlink thread runs (a command waits
    that long at most for the uplink thread at each hop, not Python's 5 ms), and as it was once it ended."""
    before = sys.getswitchinterval()
    assert before > bridge_module.DOWNLINK_SWITCH_INTERVAL_S  # Python's default, 5 ms
    async with running(Bridge(settings=settings), wait=WAIT):
        assert sys.getswitchinterval() == bridge_module.DOWNLINK_SWITCH_INTERVAL_S
    assert sys.getswitchinterval() == before


async def test_200_commands_to_200_devices_are_pipelined_and_each_delivered_once(
    settings: Settings, mosquitto: Mosquitto, nc: NatsClient, running: Running
) -> None:
    """mosquitto is stopped (SIGSTOP) while JetStream hands the bridge 200 commands: the downlink writes a
    whole window of them without waiting for a PUBACK (one at a time, it would have written one), never
    more than mosquitto's Receive Maximum; once mosquitto runs again, each device gets its command once."""
    js = nc.jetstream()
    await ensure_streams(js, settings.prefix)
    commands = [command_for(f"dev-{i:03d}") for i in range(200)]
    bridge = Bridge(settings=settings)
    assert mosquitto.pid is not None
    async with MqttClient(settings.mqtt, client_id="devices") as devices:
        await devices.subscribe("nerve/+/commands/+")
        async with running(bridge, wait=WAIT):
            assert bridge.downlink is not None
            downlink = bridge.downlink
            os.kill(mosquitto.pid, signal.SIGSTOP)
            try:
                await store_commands(js, commands)

                async def window_written() -> bool:
                    return downlink.in_flight == downlink.window

                await until(window_written)
            finally:
                os.kill(mosquitto.pid, signal.SIGCONT)
            received = await receive(devices, len(commands))

            async def all_sent() -> bool:
                return bridge.stats.commands_sent == len(commands)

            await until(all_sent)

            async def all_acknowledged() -> bool:
                # Sent counts at mosquitto's PUBACK; JetStream's ack follows it on another connection.
                info = await js.consumer_info("NERVE_COMMANDS", settings.bridge.downlink_durable)
                return bool(info.num_ack_pending == 0)

            await until(all_acknowledged)
            consumer = await js.consumer_info("NERVE_COMMANDS", settings.bridge.downlink_durable)
    per_device = collections.Counter(c.subject for c in received)
    assert per_device == {f"dev-{i:03d}": 1 for i in range(200)}
    assert sorted(c.id for c in received) == sorted(c.id for c in commands)
    # mosquitto's Receive Maximum (its max_inflight_messages) bounds each connection's window
    assert downlink.window == RECEIVE_MAXIMUM * settings.bridge.downlink_connections
    assert downlink.max_in_flight == downlink.window
    assert consumer.num_ack_pending == 0
    assert consumer.num_pending == 0
    assert consumer.num_redelivered == 0


async def test_the_downlink_has_its_own_client_id_and_login(settings: Settings, tmp_path: Path) -> None:
    password = tmp_path / "down-password"
    password.write_text("secret\n")
    password.chmod(0o600)
    derived = load_settings(overrides={"bridge": {"client_id": "site-bridge"}})
    assert derived.bridge.effective_downlink_client_id == "site-bridge-down"
    assert downlink_mqtt(derived) == derived.mqtt
    own = load_settings(
        overrides={
            "mqtt": {"username": "up", "password_file": str(password)},
            "bridge": {
                "downlink_client_id": "down-1",
                "downlink_username": "down",
                "downlink_password_file": str(password),
            },
        }
    )
    assert own.bridge.effective_downlink_client_id == "down-1"
    assert own.bridge.downlink_client_ids == ("down-1", "down-1-1", "down-1-2", "down-1-3")
    assert (downlink_mqtt(own).username, downlink_mqtt(own).password_file) == ("down", password)
    assert [downlink_mqtt(own, lane).username for lane in range(4)] == ["down", "down-1", "down-2", "down-3"]
    assert downlink_mqtt(own).url == own.mqtt.url
    one = load_settings(overrides={"bridge": {"downlink_connections": 1}})
    assert one.bridge.downlink_client_ids == ("nerve-bridge-down",)


@given(
    device=st.from_regex(r"[A-Za-z0-9_-]{1,40}", fullmatch=True),
    actions=st.lists(st.from_regex(r"[a-z_]{1,20}", fullmatch=True), min_size=1, max_size=5),
    lanes=st.integers(min_value=1, max_value=16),
)
def test_a_devices_commands_always_take_one_connection(device: str, actions: list[str], lanes: int) -> None:
    """Whatever the action, a device's commands go on one connection (so in JetStream's order)."""
    chosen = {lane_of(f"nerve.{device}.commands.{action}", "nerve", lanes) for action in actions}
    assert len(chosen) == 1
    assert 0 <= chosen.pop() < lanes


def test_commands_spread_over_the_connections_and_an_unreadable_subject_takes_the_first() -> None:
    lanes = collections.Counter(lane_of(f"nerve.dev-{i:03d}.commands.clear", "nerve", 4) for i in range(200))
    assert set(lanes) == {0, 1, 2, 3}
    assert min(lanes.values()) >= 20  # 200 devices: none of 4 connections is left nearly idle
    assert lane_of("nerve.a.b", "nerve", 4) == 0
    assert lane_of("other.dev.commands.x", "nerve", 4) == 0


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"bridge": {"client_id": "b", "downlink_client_id": "b"}}, "is the uplink's client_id"),
        ({"bridge": {"downlink_password_file": "/etc/hostname"}}, "without downlink_username"),
        (
            {"mqtt": {"url": "mqtt://u:p@127.0.0.1"}, "bridge": {"downlink_username": "d"}},
            "mqtt.url carries the bridge's credentials",
        ),
        ({"bridge": {"downlink_in_flight": 0}}, "downlink_in_flight"),
        ({"bridge": {"downlink_connections": 0}}, "downlink_connections"),
        ({"bridge": {"downlink_connections": 17}}, "downlink_connections"),
        ({"bridge": {"part": "sideways"}}, "bridge.part"),
        (  # the downlink's second login would be the uplink's
            {
                "mqtt": {"username": "d-1", "password_file": "/etc/hostname"},
                "bridge": {"downlink_username": "d", "downlink_password_file": "/etc/hostname"},
            },
            "mqtt.username 'd-1' is one of the downlink's logins",
        ),
        # its second connection would be x-1: the uplink's
        ({"bridge": {"client_id": "x-1", "downlink_client_id": "x"}}, "'x-1' .* is the uplink's client_id"),
    ],
)
def test_bad_downlink_settings_are_refused_in_one_line(overrides: dict[str, Any], says: str) -> None:
    from nerve.runtime.errors import ConfigError  # noqa: PLC0415

    with pytest.raises(ConfigError, match=says) as refused:
        load_settings(overrides=overrides)
    assert "\n" not in str(refused.value).strip()


@pytest.mark.slow
async def test_a_bridge_killed_with_commands_in_flight_loses_none(
    settings: Settings, mosquitto: Mosquitto, nc: NatsClient
) -> None:
    """SIGKILL while mosquitto (stopped) owes PUBACKs for a window of commands: each still arrives.

    The consumer is made beforehand with a short ack wait, so that JetStream delivers again soon what
    the killed bridge never acknowledged; a device may get a command twice (its journal drops the copy).
    """
    js = nc.jetstream()
    await ensure_streams(js, settings.prefix)
    made = await shared_durable(
        js,
        subject=kind_filter(Kind.COMMANDS, settings.prefix),
        stream=STREAM_OF_KIND[Kind.COMMANDS],
        name=settings.bridge.downlink_durable,
        ack_wait_s=2.0,
        max_ack_pending=256,
    )
    await made.unsubscribe()  # the consumer stays, for the bridge to bind; this test takes no command
    warmup = command_for("warmup")
    commands = [command_for(f"dev-{i:02d}") for i in range(60)]
    assert mosquitto.pid is not None
    bridge = await start_bridge(settings)
    try:
        async with MqttClient(settings.mqtt, client_id="devices") as devices:
            await devices.subscribe("nerve/+/commands/+")
            await store_commands(js, [warmup])
            assert [c.id for c in await receive(devices, 1)] == [warmup.id]

            async def warmup_acknowledged() -> bool:
                # mosquitto may deliver to the device before it PUBACKs the bridge: without this wait the
                # kill can catch the warmup in flight too, and it arrives again with the sixty.
                info = await js.consumer_info("NERVE_COMMANDS", settings.bridge.downlink_durable)
                return bool(info.num_ack_pending == 0)

            await until(warmup_acknowledged)
            os.kill(mosquitto.pid, signal.SIGSTOP)
            try:
                await store_commands(js, commands)

                async def delivered_to_the_bridge() -> bool:
                    # At least mosquitto's Receive Maximum (20) of them are out and unacknowledged: the
                    # window the kill catches in flight. (Not all 60: on a slow machine the bridge may
                    # already have handed some back to JetStream, which redelivers them anyway.)
                    info = await js.consumer_info("NERVE_COMMANDS", settings.bridge.downlink_durable)
                    return bool(info.num_ack_pending >= RECEIVE_MAXIMUM)

                await until(delivered_to_the_bridge)
                bridge.send_signal(signal.SIGKILL)
                await bridge.wait()
            finally:
                os.kill(mosquitto.pid, signal.SIGCONT)
            bridge = await start_bridge(settings)
            seen: list[Command] = []
            async with asyncio.timeout(WAIT * 2):
                async for message in devices.messages:
                    seen.append(decode(message.payload, Command))
                    if {c.id for c in seen} >= {c.id for c in commands}:
                        break

            async def all_acknowledged() -> bool:
                info = await js.consumer_info("NERVE_COMMANDS", settings.bridge.downlink_durable)
                return bool(info.num_ack_pending == 0 and info.num_pending == 0)

            await until(all_acknowledged)
    finally:
        bridge.send_signal(signal.SIGTERM)
        await bridge.wait()
    assert {c.id for c in seen} == {c.id for c in commands}
    assert await stream_messages(js, "NERVE_RESULTS") == []  # none expired


async def test_a_command_handed_back_that_expired_before_it_came_again_is_unknown_not_expired(
    settings: Settings,
    nc: NatsClient,
    mosquitto: Mosquitto,
    running: Running,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Written to mosquitto, no PUBACK, handed back; expired when it comes again: the bridge cannot say
    it never sent it (mosquitto may deliver what it read), so its result is `unknown`, which central never
    believes unsigned, not `expired`, which it does once the command expired (nerve.runtime.trust.expiry)."""
    monkeypatch.setattr(downlink_module, "MQTT_PUBLISH_TIMEOUT_S", 1.0)
    js = nc.jetstream()
    await ensure_streams(js, settings.prefix)
    command = Command.create(
        device="dev-x", action="clear_temp", args={}, source="t", ttl=timedelta(seconds=2)
    )
    bridge = Bridge(settings=settings)
    assert mosquitto.pid is not None
    async with running(bridge, wait=WAIT):
        assert bridge.downlink is not None
        downlink = bridge.downlink
        os.kill(mosquitto.pid, signal.SIGSTOP)
        try:
            await store_commands(js, [command])

            async def written() -> bool:
                return downlink.in_flight == 1

            await until(written)
            left = (command.expires - utcnow()).total_seconds()
            await asyncio.sleep(max(0.0, left) + 0.1)  # no PUBACK: handed back, and expired by now
        finally:
            os.kill(mosquitto.pid, signal.SIGCONT)

        async def answered() -> bool:
            return bool(await stream_messages(js, "NERVE_RESULTS"))

        await until(answered)
    (stored,) = await stream_messages(js, "NERVE_RESULTS")
    result = decode(stored.data, CommandResult)
    assert (result.status, result.causationid, result.sig) == ("unknown", command.id, "")
    assert "an earlier attempt may have reached the device" in result.reason
    assert bridge.stats.commands_sent == 0
    assert bridge.stats.commands_expired == 1


async def test_each_devices_commands_keep_their_order_and_a_connection_taken_over_loses_none(
    settings: Settings, nc: NatsClient, running: Running
) -> None:
    """Four devices' commands, ten each, interleaved over the downlink's connections: each device gets
    its own in the order stored. Then a client takes one connection's session over (its client id):
    the downlink makes them all again, and every command stored after still arrives."""
    js = nc.jetstream()
    await ensure_streams(js, settings.prefix)
    assert settings.bridge.downlink_connections > 1
    devices = [f"dev-{i}" for i in range(4)]
    first = [command_for(devices[i % 4]) for i in range(40)]
    bridge = Bridge(settings=settings)
    async with MqttClient(settings.mqtt, client_id="devices") as client:
        await client.subscribe("nerve/+/commands/+")
        async with running(bridge, wait=WAIT):
            await store_commands(js, first)
            received = await receive(client, len(first))
            for device in devices:
                assert [c.id for c in received if c.subject == device] == [
                    c.id for c in first if c.subject == device
                ]
            intruder = await open_mqtt(
                settings.mqtt,
                client_id=settings.bridge.downlink_client_ids[-1],
                on_messages=lambda _: None,
                clean_start=True,
                session_expiry_s=0,
                receive_maximum=1,
            )
            try:

                async def reconnected() -> bool:
                    return bridge.stats.downlink_reconnects >= 1 and bridge.ready.is_set()

                await until(reconnected)
            finally:
                intruder.close()
            later = [command_for(devices[i % 4]) for i in range(20)]
            await store_commands(js, later)
            got = await receive(client, len(later))
    assert {c.id for c in got} == {c.id for c in later}


def test_a_session_taken_over_says_what_to_set(tmp_path: Path) -> None:
    """On a broker that makes the login the client id, connections sharing a login take each other's
    session over: the log line says which logins each needs, or to use one connection."""
    from nerve.bridge.stats import BridgeStats  # noqa: PLC0415
    from nerve.runtime.wire.mqtt import SessionTakenOver  # noqa: PLC0415

    password = tmp_path / "password"
    password.write_text("secret\n")
    password.chmod(0o600)
    login = {"username": "up", "password_file": str(password)}

    def hint(bridge: dict[str, Any]) -> str:
        settings = load_settings(overrides={"mqtt": login, "bridge": bridge})
        downlink = downlink_module.Downlink(settings=settings, stats=BridgeStats(), on_ready=lambda: None)
        return downlink._hint(SessionTakenOver("x"))

    assert "logs in as the uplink does" in hint({})
    own = {"downlink_username": "down", "downlink_password_file": str(password)}
    lanes = hint(own)
    assert "(down, down-1, down-2, down-3)" in lanes
    assert "bridge.downlink_connections: 1" in lanes
    assert "another bridge process runs a downlink" in lanes
    alone = hint({**own, "downlink_connections": 1})
    assert "logins" not in alone
    assert "bridge.part: downlink" in alone
