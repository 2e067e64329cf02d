"""The bridge stopped (SIGKILL or SIGTERM) again and again under load: every event stored once, in order."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from nats.js.errors import NotFoundError

from nerve.bridge.redelivery import ids_path
from nerve.runtime.cli.history import read_stream
from nerve.runtime.envelope.codec import decode, to_msgpack
from nerve.runtime.envelope.model import Event
from nerve.runtime.testing import stream_messages, wait_for_count
from nerve.runtime.wire.client import MqttClient

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient

    from nerve.runtime.config.settings import Settings
    from nerve.runtime.stack.brokers import NatsServer

pytestmark = [pytest.mark.broker, pytest.mark.slow]

NERVE = str(Path(sys.executable).parent / "nerve")
EVENTS = 20_000
DEVICES = 10
KILLS = 5


async def start_bridge(settings: Settings) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        NERVE,
        "bridge",
        "--mqtt-url",
        settings.mqtt.url,
        "--nats-url",
        settings.nats.url,
        "--log-level",
        "error",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "NERVE_DATA_DIR": str(settings.data_dir)},  # its id file: not in the checkout
    )


async def until_bridging(settings: Settings, nc: NatsClient) -> None:
    """Wait until the bridge has its MQTT session (a warm-up event reaches JetStream)."""
    js = nc.jetstream()
    try:
        before = (await js.stream_info("NERVE_EVENTS")).state.messages
    except NotFoundError:
        before = 0
    async with MqttClient(settings.mqtt, client_id="chaos-warmup") as client:
        async with asyncio.timeout(30):
            while True:
                await client.publish("nerve/warmup/events/ping", b"{}", qos=1)
                try:
                    if (await js.stream_info("NERVE_EVENTS")).state.messages > before:
                        return
                except NotFoundError:
                    pass
                await asyncio.sleep(0.1)


async def publish_all(settings: Settings, events: list[Event]) -> None:
    async with MqttClient(settings.mqtt, client_id="chaos-publisher") as client:
        for event in events:
            await client.publish(f"nerve/{event.subject}/telemetry/cpu", to_msgpack(event), qos=1)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
async def test_bridge_stopped_five_times_loses_and_duplicates_nothing(
    settings: Settings, nc: NatsClient, signum: signal.Signals
) -> None:
    events = [
        Event(
            source="chaos",
            type="nerve.telemetry.cpu",
            subject=f"dev-{i % DEVICES}",
            data={"value": i % 100, "seq": i // DEVICES},
        )
        for i in range(EVENTS)
    ]
    bridge = await start_bridge(settings)
    js = nc.jetstream()
    await until_bridging(settings, nc)
    publisher = asyncio.create_task(publish_all(settings, events))
    rng = random.Random(7)  # noqa: S311 - test randomness
    kills = 0
    try:
        while kills < KILLS:
            await asyncio.sleep(rng.uniform(0.3, 1.2))
            bridge.send_signal(signum)
            async with asyncio.timeout(15):
                code = await bridge.wait()
            if signum == signal.SIGTERM:
                assert code == 0, "SIGTERM must be a clean stop"
            kills += 1
            bridge = await start_bridge(settings)
            if signum == signal.SIGTERM:
                # A clean stop needs the bridge past start-up (a SIGTERM before Python has set its
                # handlers is the default, fatal one); SIGKILL covers every other moment.
                await until_bridging(settings, nc)
        await publisher
        await wait_for_count(js, "NERVE_TELEMETRY", EVENTS, timeout=120)
        await asyncio.sleep(1.0)  # anything stored twice would show up now
    finally:
        publisher.cancel()
        if bridge.returncode is None:
            bridge.send_signal(signal.SIGTERM)
            await bridge.wait()
    assert kills == KILLS
    stored = [
        decode(msg.data, Event) for msg in await read_stream(js, "NERVE_TELEMETRY", "nerve.*.telemetry.*")
    ]
    ids = [event.id for event in stored]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} events stored twice"
    assert set(ids) == {event.id for event in events}
    for device in range(DEVICES):
        seqs = [e.data["seq"] for e in stored if e.subject == f"dev-{device}"]
        assert seqs == sorted(seqs), f"dev-{device}'s events are out of order"


async def test_a_bridge_killed_with_raw_readings_stored_and_unacknowledged_stores_none_twice(
    settings: Settings, nc: NatsClient, nats_server: NatsServer
) -> None:
    """Raw readings (no id of their own) stored by a bridge SIGKILLed before it PUBACKed them: mosquitto
    sends them again to the next bridge process, which gives them the ids of its predecessor (the id file
    in the data dir), so JetStream keeps each once. Every value is published twice: two readings.

    nats-server is held (SIGSTOP) while the bridge reads the readings and sends their stores; the bridge
    is killed once its id file holds them all; released, nats-server stores what the dead connection sent.
    """
    values = range(20)
    ids = ids_path(settings)
    bridge = await start_bridge(settings)
    try:
        await until_bridging(settings, nc)
        assert nats_server.pid is not None
        os.kill(nats_server.pid, signal.SIGSTOP)
        try:
            async with MqttClient(settings.mqtt, client_id="raw-publisher") as client:
                for value in values:
                    for _ in range(2):
                        await client.publish("nerve/pi-01/telemetry/cpu", b'{"value": %d}' % value, qos=1)
            async with asyncio.timeout(30):  # a wait for the bridge, not a timing assertion
                while len(ids.read_bytes().splitlines()) < 2 * len(values):
                    await asyncio.sleep(0.02)
            bridge.send_signal(signal.SIGKILL)
            await bridge.wait()
        finally:
            os.kill(nats_server.pid, signal.SIGCONT)
        js = nc.jetstream()
        await wait_for_count(js, "NERVE_TELEMETRY", 2 * len(values), timeout=30)
        bridge = await start_bridge(settings)
        async with MqttClient(settings.mqtt, client_id="raw-publisher") as client:
            # Behind mosquitto's redeliveries on the bridge's session: stored once they are handled.
            await client.publish("nerve/pi-01/telemetry/memory", b'{"value": 50}', qos=1)
        await wait_for_count(js, "NERVE_TELEMETRY", 2 * len(values) + 1, timeout=30)
        await asyncio.sleep(1.0)  # anything stored twice would be stored by now
    finally:
        if bridge.returncode is None:
            bridge.send_signal(signal.SIGTERM)
            await bridge.wait()
    readings = [decode(stored.data, Event) for stored in await stream_messages(js, "NERVE_TELEMETRY")]
    assert Counter((reading.type, int(reading.data["value"])) for reading in readings) == Counter(
        {**{("nerve.telemetry.cpu", value): 2 for value in values}, ("nerve.telemetry.memory", 50): 1}
    )
