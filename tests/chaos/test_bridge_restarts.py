"""The bridge stopped (SIGKILL or SIGTERM) again and again under load: every event stored once, in order."""

from __future__ import annotations

import asyncio
import random
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from nats.js.errors import NotFoundError

from nerve.runtime.cli.history import read_stream
from nerve.runtime.envelope.codec import decode, to_msgpack
from nerve.runtime.envelope.model import Event
from nerve.runtime.testing import wait_for_count
from nerve.runtime.wire.client import MqttClient

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient

    from nerve.runtime.config.settings import Settings

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
