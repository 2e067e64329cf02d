"""The bridge against a real mosquitto and a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import urllib.request
from datetime import timedelta
from typing import TYPE_CHECKING

import msgpack
import pytest

from nerve.agents import CommandAudit
from nerve.bridge import Bridge
from nerve.runtime.central.runner import Central
from nerve.runtime.config.settings import TopicMapping
from nerve.runtime.envelope.codec import decode, to_msgpack
from nerve.runtime.envelope.model import Command, CommandResult, Event, Fact
from nerve.runtime.jetstream.client import REASON_HEADER, publish_envelope
from nerve.runtime.jetstream.streams import ensure_streams
from nerve.runtime.stack.brokers import free_port, port_answers
from nerve.runtime.testing import stream_messages, wait_for_count
from nerve.runtime.trust.chain import verify_records
from nerve.runtime.trust.expiry import COMMAND_SEQ_HEADER
from nerve.runtime.trust.signing import Signer, Verifier, generate_keypair
from nerve.runtime.wire.client import MqttClient

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from nats.aio.client import Client as NatsClient
    from tests.conftest import Running

    from nerve.runtime.config.settings import Settings
    from nerve.runtime.stack.brokers import NatsServer

pytestmark = pytest.mark.broker


WAIT = 10.0


@contextlib.asynccontextmanager
async def publisher(settings: Settings, name: str = "test-pub") -> AsyncIterator[MqttClient]:
    async with MqttClient(settings.mqtt, client_id=name) as client:
        yield client


def _clear_temp() -> Command:
    """A command for pi-01 that expires in a minute."""
    return Command.create(device="pi-01", action="clear_temp", args={}, source="t", ttl=timedelta(seconds=60))


async def test_raw_and_enveloped_readings_are_stored_once(
    settings: Settings, nc: NatsClient, running: Running
) -> None:
    js = nc.jetstream()
    event = Event(source="test", type="nerve.telemetry.cpu", subject="pi-01", data={"value": 12.5})
    async with running(Bridge(settings=settings), wait=WAIT), publisher(settings) as pub:
        await pub.publish("nerve/pi-01/telemetry/disk", b"95", qos=1)
        await pub.publish("nerve/pi-01/telemetry/cpu", to_msgpack(event), qos=1)
        await pub.publish("nerve/pi-01/telemetry/cpu", to_msgpack(event), qos=1)  # a duplicate
        await pub.publish("nerve/pi-01/telemetry/memory", b'{"value": 40}', qos=1)
        await wait_for_count(js, "NERVE_TELEMETRY", 3)
        await asyncio.sleep(0.2)
    messages = await stream_messages(js, "NERVE_TELEMETRY")
    assert [m.subject for m in messages] == [
        "nerve.pi-01.telemetry.disk",
        "nerve.pi-01.telemetry.cpu",
        "nerve.pi-01.telemetry.memory",
    ]
    events = [decode(m.data, Event) for m in messages]
    assert events[0].data == {"value": 95}
    assert events[1] == event
    assert messages[1].headers["Nats-Msg-Id"] == event.id


async def test_bad_input_is_dead_lettered_and_bridge_keeps_going(
    settings: Settings, nc: NatsClient, running: Running
) -> None:
    js = nc.jetstream()
    bad = [
        ("nerve/pi-01/telemetry/disk", b"not-a-number", "must be a number"),
        ("nerve/bad$id/telemetry/disk", b"95", "device id 'bad$id' is not valid"),
        ("nerve/pi-01/telemetry/humidity", b"95", "unknown metric 'humidity'"),
        ("nerve/pi-01/telemetry/disk", b"9" * (settings.bridge.max_payload + 1), "exceeds the limit"),
        ("nerve/pi-01/telemetry/disk", b"\x85\xa1a\x01", "malformed msgpack"),
        # Mistyped topics under the prefix: the broker would have dropped them without the bridge's nerve/#.
        ("nerve/vm/telemetery/disk", b"95", "unknown kind 'telemetery'"),
        ("nerve/vm/Telemetry/disk", b"95", "unknown kind 'Telemetry'"),
        ("nerve/a/b/telemetry/disk", b"95", "expected <prefix>/<device>/<kind>/<name>"),
        ("nerve/vm/telemetry", b"95", "expected <prefix>/<device>/<kind>/<name>"),
        # A known metric has a known range.
        ("nerve/pi-01/telemetry/disk", b"150", "disk reading 150 is out of range (expected 0 to 100)"),
        ("nerve/pi-01/telemetry/disk", b"-5", "disk reading -5 is out of range"),
    ]
    bridge = Bridge(settings=settings)
    async with running(bridge, wait=WAIT), publisher(settings) as pub:
        for topic, payload, _ in bad:
            await pub.publish(topic, payload, qos=1)
        # Not the uplink's: acknowledged, neither stored nor dead-lettered.
        await pub.publish("nerve/pi-01/commands/clear_temp", b"{}", qos=1)
        await pub.publish("nerve/pi-01/status", b"online", qos=1)
        await pub.publish("nerve/pi-01/telemetry/disk", b"91", qos=1)
        await wait_for_count(js, "NERVE_DEADLETTER", len(bad))
        await wait_for_count(js, "NERVE_TELEMETRY", 1)
    dead = await stream_messages(js, "NERVE_DEADLETTER")
    assert len(dead) == len(bad)
    assert bridge.stats.deadlettered == len(bad)
    for message, (topic, payload, reason) in zip(dead, bad, strict=True):
        assert message.subject == "nerve.deadletter.bridge"
        record = msgpack.unpackb(message.data)
        assert reason in record["reason"]
        assert record["origin"] == topic
        assert record["payload"] == payload
        assert reason in message.headers[REASON_HEADER]
    stored = await stream_messages(js, "NERVE_TELEMETRY")
    assert decode(stored[0].data, Event).data == {"value": 91}


async def test_command_goes_down_and_expired_one_does_not(
    settings: Settings, nc: NatsClient, running: Running
) -> None:
    js = nc.jetstream()
    await ensure_streams(js, settings.prefix)
    fresh = _clear_temp()
    stale = Command.create(
        device="pi-01", action="clear_temp", args={}, source="t", ttl=timedelta(seconds=-1)
    )
    async with publisher(settings, "device") as device:
        await device.subscribe("nerve/pi-01/commands/+")
        await publish_envelope(js, "nerve.pi-01.commands.clear_temp", stale)
        await publish_envelope(js, "nerve.pi-01.commands.clear_temp", fresh)
        async with running(Bridge(settings=settings), wait=WAIT):
            async with asyncio.timeout(10):
                message = await anext(aiter(device.messages))
            assert message.topic == "nerve/pi-01/commands/clear_temp"
            assert isinstance(message.payload, bytes)
            assert decode(message.payload, Command) == fresh
            await wait_for_count(js, "NERVE_RESULTS", 1)
    result = decode((await stream_messages(js, "NERVE_RESULTS"))[0].data, CommandResult)
    assert result.status == "expired"
    assert result.causationid == stale.id
    # No fact of the bridge's own: central's command audit keeps it, signed (the bridge holds no key).
    assert await stream_messages(js, "NERVE_FACTS") == []
    consumer = await js.consumer_info("NERVE_COMMANDS", settings.bridge.downlink_durable)
    assert consumer.num_ack_pending == 0
    assert consumer.num_pending == 0


async def test_nats_restart_loses_nothing_acknowledged(
    settings: Settings, nats_server: NatsServer, running: Running
) -> None:
    """Readings published while nats-server is down are stored once it is back."""
    total = 60
    async with running(Bridge(settings=settings), wait=WAIT), publisher(settings) as pub:
        for i in range(20):
            await pub.publish(f"nerve/dev-{i % 3}/telemetry/disk", str(i).encode(), qos=1)
        await nats_server.kill()
        for i in range(20, total):
            await pub.publish(f"nerve/dev-{i % 3}/telemetry/disk", str(i).encode(), qos=1)
        await asyncio.sleep(0.5)
        await nats_server.start()
        import nats  # noqa: PLC0415

        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            await wait_for_count(js, "NERVE_TELEMETRY", total, timeout=30)
            values = sorted(
                decode(m.data, Event).data["value"] for m in await stream_messages(js, "NERVE_TELEMETRY")
            )
        finally:
            await nc.close()
    # Raw payloads are at-least-once: every value is there, and a redelivery may add a copy.
    assert set(values) == set(range(total))


async def test_metrics_count_stored_duplicates_and_dead_letters(
    settings: Settings, nc: NatsClient, running: Running
) -> None:
    port = free_port()
    with_metrics = settings.model_copy(
        update={"bridge": settings.bridge.model_copy(update={"metrics_port": port})}
    )
    js = nc.jetstream()
    event = Event(source="test", type="nerve.telemetry.cpu", subject="pi-01", data={"value": 1})
    bridge = Bridge(settings=with_metrics)
    async with running(bridge, wait=WAIT), publisher(settings) as pub:
        await pub.publish("nerve/pi-01/telemetry/cpu", to_msgpack(event), qos=1)
        await pub.publish("nerve/pi-01/telemetry/cpu", to_msgpack(event), qos=1)
        await pub.publish("nerve/pi-01/telemetry/cpu", b"oops", qos=1)
        await wait_for_count(js, "NERVE_DEADLETTER", 1)
        text = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
    assert "nerve_bridge_received_total 3.0" in text
    assert "nerve_bridge_stored_total 2.0" in text
    assert "nerve_bridge_duplicates_total 1.0" in text
    assert "nerve_bridge_spooled_total 0.0" in text  # JetStream kept up: nothing waited in the spool
    assert "nerve_bridge_spool_bytes 0.0" in text
    assert "nerve_bridge_deadlettered_total 1.0" in text
    assert "nerve_bridge_in_flight 0.0" in text
    assert not await port_answers("127.0.0.1", port)  # closed with the bridge


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - a loopback URL we built
        body: bytes = response.read()
    return body.decode()


async def test_foreign_sensor_topic_is_mapped_end_to_end(
    settings: Settings, nc: NatsClient, running: Running
) -> None:
    rule = TopicMapping(name="acme", topic="sensors/+/disk", device_level=2, metric="disk", value_field="pct")
    mapped = settings.model_copy(update={"bridge": settings.bridge.model_copy(update={"mappings": (rule,)})})
    js = nc.jetstream()
    async with running(Bridge(settings=mapped), wait=WAIT), publisher(settings) as pub:
        await pub.publish("sensors/pi-09/disk", b'{"pct": 91}', qos=1)
        await pub.publish("sensors/pi-09/disk", b'{"temp": 40}', qos=1)
        await wait_for_count(js, "NERVE_TELEMETRY", 1)
        await wait_for_count(js, "NERVE_DEADLETTER", 1)
    (stored,) = await stream_messages(js, "NERVE_TELEMETRY")
    assert stored.subject == "nerve.pi-09.telemetry.disk"
    assert decode(stored.data, Event).data == {"value": 91}
    (dead,) = await stream_messages(js, "NERVE_DEADLETTER")
    assert "mapping 'acme'" in msgpack.unpackb(dead.data)["reason"]


async def test_two_bridges_share_the_uplink(settings: Settings, nc: NatsClient, running: Running) -> None:
    def member(name: str) -> Bridge:
        bridge_settings = settings.bridge.model_copy(update={"client_id": name, "shared_group": "site-1"})
        return Bridge(settings=settings.model_copy(update={"bridge": bridge_settings}))

    first, second = member("bridge-a"), member("bridge-b")
    js = nc.jetstream()
    total = 400
    async with running(first, wait=WAIT), running(second, wait=WAIT), publisher(settings) as pub:
        for i in range(total):
            event = Event(
                source="t",
                type="nerve.telemetry.cpu",
                subject=f"dev-{i % 4}",
                data={"value": i % 100, "seq": i},
            )
            await pub.publish(f"nerve/dev-{i % 4}/telemetry/cpu", to_msgpack(event), qos=1)
        await wait_for_count(js, "NERVE_TELEMETRY", total)
        await asyncio.sleep(0.3)
    assert first.stats.stored > 0
    assert second.stats.stored > 0
    assert first.stats.stored + second.stats.stored == total
    assert (await js.stream_info("NERVE_TELEMETRY")).state.messages == total


async def test_an_expired_command_becomes_a_signed_fact_of_central_and_the_chain_verifies(
    settings: Settings, nc: NatsClient, running: Running, tmp_path: Path
) -> None:
    """The bridge writes the `expired` result; central keeps the fact, signed and chained.

    The bridge holds no device's key, so its result is not signed by the device: central acts on nothing
    in it (the incident fails at central's own timeout) and keeps a `result_refused` fact that names it.
    """
    js = nc.jetstream()
    await ensure_streams(js, settings.prefix)
    private, _ = generate_keypair(tmp_path / "keys", "central")
    signer = Signer.from_file(private)
    stale = Command.create(
        device="pi-01", action="clear_temp", args={}, source="t", ttl=timedelta(seconds=-1)
    )
    await publish_envelope(js, "nerve.pi-01.commands.clear_temp", stale)
    audit = Central(settings=settings, signer=signer, agents=[CommandAudit(settings.streams)])
    async with running(audit, wait=WAIT), running(Bridge(settings=settings), wait=WAIT):
        await wait_for_count(js, "NERVE_FACTS", 1)
    stored = await stream_messages(js, "NERVE_FACTS")
    fact = decode(stored[0].data, Fact)
    assert (fact.kind, fact.keyid) == ("result_refused", "central")
    assert fact.data["status"] == "expired"
    assert fact.data["command_id"] == stale.id
    records = [(message.seq, message.data) for message in stored]
    assert verify_records(records, Verifier.from_config({}, tmp_path / "keys")) == []


async def test_the_bridges_expired_for_centrals_own_command_reaches_the_audit_and_a_forged_one_does_not(
    settings: Settings, nc: NatsClient, running: Running, tmp_path: Path
) -> None:
    """A command signed by central, expired in NERVE_COMMANDS: the bridge's `expired` is `command_expired`.

    A forged unsigned `expired` for a command still valid (with the header pointing at it) is refused.
    """
    js = nc.jetstream()
    await ensure_streams(js, settings.prefix)
    private, _ = generate_keypair(tmp_path / "keys", "central")
    signer = Signer.from_file(private)

    def signed(ttl: timedelta) -> Command:
        return signer.sign(
            Command.create(device="pi-01", action="clear_temp", args={}, source="nerve://central/t", ttl=ttl)
        )

    stale, fresh = signed(timedelta(seconds=-2)), signed(timedelta(minutes=5))
    await publish_envelope(js, "nerve.pi-01.commands.clear_temp", stale)
    fresh_seq = (await publish_envelope(js, "nerve.pi-01.commands.clear_temp", fresh)).seq
    forged = CommandResult.for_command(fresh, source="nerve://bridge", status="expired")
    audit = Central(settings=settings, signer=signer, agents=[CommandAudit(settings.streams)])
    async with running(audit, wait=WAIT):
        await publish_envelope(
            js, "nerve.pi-01.results.clear_temp", forged, headers={COMMAND_SEQ_HEADER: str(fresh_seq)}
        )
        async with running(Bridge(settings=settings), wait=WAIT):
            await wait_for_count(js, "NERVE_FACTS", 2)
    facts = {
        fact.kind: fact for fact in (decode(m.data, Fact) for m in await stream_messages(js, "NERVE_FACTS"))
    }
    assert set(facts) == {"command_expired", "result_refused"}
    assert facts["command_expired"].data["command_id"] == stale.id
    assert "before the bridge could send it" in facts["command_expired"].summary
    refused = facts["result_refused"]
    assert (refused.data["command_id"], refused.data["status"]) == (fresh.id, "expired")
    assert "before the command expired" in refused.data["detail"]
    (result,) = [
        decode(m.data, CommandResult)
        for m in await stream_messages(js, "NERVE_RESULTS")
        if decode(m.data, CommandResult).causationid == stale.id
    ]
    assert result.sig == ""


def _part(settings: Settings, part: str) -> Settings:
    return settings.model_copy(update={"bridge": settings.bridge.model_copy(update={"part": part})})


async def test_an_uplink_process_and_a_downlink_process_split_the_bridge(
    settings: Settings, nc: NatsClient, running: Running
) -> None:
    """Same settings but `bridge.part`: readings go through one, commands through the other, once."""
    js = nc.jetstream()
    await ensure_streams(js, settings.prefix)
    uplink, downlink = (
        Bridge(settings=_part(settings, "uplink")),
        Bridge(settings=_part(settings, "downlink")),
    )
    command = _clear_temp()
    async with (
        running(uplink, wait=WAIT),
        running(downlink, wait=WAIT),
        publisher(settings, "device") as device,
    ):
        await device.subscribe("nerve/pi-01/commands/+")
        await device.publish("nerve/pi-01/telemetry/disk", b"95", qos=1)
        await publish_envelope(js, "nerve.pi-01.commands.clear_temp", command)
        async with asyncio.timeout(WAIT):
            message = await anext(aiter(device.messages))
        await wait_for_count(js, "NERVE_TELEMETRY", 1)
        await asyncio.sleep(0.3)
    assert isinstance(message.payload, bytes)
    assert decode(message.payload, Command) == command
    assert uplink.downlink is None
    assert (uplink.stats.stored, uplink.stats.commands_sent) == (1, 0)
    assert (downlink.stats.received, downlink.stats.commands_sent) == (0, 1)
    assert (await js.stream_info("NERVE_TELEMETRY")).state.messages == 1


async def test_a_downlink_process_takes_no_reading_and_an_uplink_process_sends_no_command(
    settings: Settings, nc: NatsClient, running: Running
) -> None:
    js = nc.jetstream()
    await ensure_streams(js, settings.prefix)
    command = _clear_temp()
    downlink_only = Bridge(settings=_part(settings, "downlink"))
    async with publisher(settings, "device") as device:
        await device.subscribe("nerve/pi-01/commands/+")
        async with running(downlink_only, wait=WAIT):
            await device.publish("nerve/pi-01/telemetry/disk", b"95", qos=1)
            await publish_envelope(js, "nerve.pi-01.commands.clear_temp", command)
            async with asyncio.timeout(WAIT):
                await anext(aiter(device.messages))  # the downlink process is up and working
            await asyncio.sleep(0.3)
        assert downlink_only.stats.received == 0
        assert (await js.stream_info("NERVE_TELEMETRY")).state.messages == 0
        # Its client id is the uplink's, but the uplink's id file is not its to open.
        assert not (settings.data_dir / "bridge").exists()

        second = _clear_temp()
        uplink_only = Bridge(settings=_part(settings, "uplink"))
        async with running(uplink_only, wait=WAIT):
            await publish_envelope(js, "nerve.pi-01.commands.clear_temp", second)
            await device.publish("nerve/pi-01/telemetry/disk", b"96", qos=1)
            await wait_for_count(js, "NERVE_TELEMETRY", 1)
            await asyncio.sleep(0.3)
            consumer = await js.consumer_info("NERVE_COMMANDS", settings.bridge.downlink_durable)
        assert uplink_only.stats.commands_sent == 0
        assert consumer.num_pending == 1  # waits for a downlink


async def test_a_metrics_port_in_use_is_one_line(settings: Settings, running: Running) -> None:
    from nerve.runtime.errors import ConfigError  # noqa: PLC0415

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = settings.model_copy(
            update={"bridge": settings.bridge.model_copy(update={"metrics_port": port})}
        )
        with pytest.raises(
            ConfigError, match=rf"bridge.metrics_port: cannot serve metrics on 127.0.0.1:{port}"
        ):
            await Bridge(settings=busy).run()
