"""The bridge stopped (SIGKILL or SIGTERM) again and again under load: every event stored once, in order."""

from __future__ import annotations

import asyncio
import contextlib
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
from nerve.bridge.spool import Spool, spool_path
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


async def start_bridge(settings: Settings, **env: str) -> asyncio.subprocess.Process:
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
        # Its id file and spool: not in the checkout.
        env={**os.environ, "NERVE_DATA_DIR": str(settings.data_dir), **env},
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


async def throttle(pid: int) -> None:
    """Hold nats-server most of the time (SIGSTOP 40 ms, SIGCONT 5 ms): a JetStream slower than the inflow."""
    try:
        while True:
            os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(0.04)
            os.kill(pid, signal.SIGCONT)
            await asyncio.sleep(0.005)
    finally:
        os.kill(pid, signal.SIGCONT)


async def test_a_bridge_killed_with_readings_in_its_spool_stores_each_once_and_in_order(
    settings: Settings, nc: NatsClient, nats_server: NatsServer
) -> None:
    """JetStream slower than the inflow (nats-server held most of the time) with a window of 8 stores:
    what mosquitto sends meanwhile is spooled and acknowledged, so mosquitto keeps nothing of it. The
    bridge is killed with records in its spool not yet stored; its successor stores them, each once, in
    order. Raw readings (ids given by the bridge): what was in the window and not acknowledged to
    mosquitto comes again with the ids the id file kept.
    """
    values = range(3000)
    window = {"NERVE_BRIDGE__MAX_IN_FLIGHT": "8"}
    path = spool_path(settings)
    bridge = await start_bridge(settings, **window)
    try:
        await until_bridging(settings, nc)
        assert nats_server.pid is not None
        throttling = asyncio.create_task(throttle(nats_server.pid))
        try:
            async with MqttClient(settings.mqtt, client_id="raw-publisher") as client:
                for value in values:
                    reading = b'{"value": %d, "seq": %d}' % (value % 100, value)
                    await client.publish("nerve/pi-01/telemetry/cpu", reading, qos=1)
            async with asyncio.timeout(30):  # a wait for the bridge, not a timing assertion
                while not path.exists() or path.stat().st_size < 500 * 100:
                    await asyncio.sleep(0.02)
            throttling.cancel()
            os.kill(nats_server.pid, signal.SIGSTOP)
            bridge.send_signal(signal.SIGKILL)
            await bridge.wait()
        finally:
            throttling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await throttling
            os.kill(nats_server.pid, signal.SIGCONT)
        left = Spool(path, budget=1 << 30)  # what the killed bridge had on disk and not stored
        waiting = len(left.take(10_000))
        left.close()
        assert waiting > 0
        bridge = await start_bridge(settings, **window)
        js = nc.jetstream()
        await wait_for_count(js, "NERVE_TELEMETRY", len(values), timeout=60)
        await asyncio.sleep(1.0)  # anything stored twice would be stored by now
    finally:
        if bridge.returncode is None:
            bridge.send_signal(signal.SIGTERM)
            await bridge.wait()
    stored = [int(decode(m.data, Event).data["seq"]) for m in await stream_messages(js, "NERVE_TELEMETRY")]
    assert stored == list(values)  # each once, in the order published
    async with asyncio.timeout(10):
        while path.stat().st_size != 16:  # all stored: the spool is cut back to its header
            await asyncio.sleep(0.05)
