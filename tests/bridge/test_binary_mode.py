"""CloudEvents MQTT binary content mode through a real bridge: attributes as MQTT v5 user properties.

Published by paho-mqtt (another MQTT v5 implementation) and by nerve's own client, stored by the bridge
in JetStream, and read back with the official CloudEvents SDK. Same rules as structured mode: the topic
names the device, ranges and limits hold, and what breaks one is dead-lettered with the reason.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import msgpack
import paho.mqtt.client as paho
import pytest
from cloudevents.core.formats.json import JSONFormat
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from nerve.bridge import Bridge
from nerve.runtime.config.settings import load_settings
from nerve.runtime.envelope.codec import CONTENT_TYPE_HEADER, decode
from nerve.runtime.envelope.model import Event
from nerve.runtime.jetstream.client import MSG_ID_HEADER, REASON_HEADER
from nerve.runtime.testing import stream_messages, wait_for_count
from nerve.runtime.wire.client import MqttClient

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from tests.conftest import Running

    from nerve.runtime.config.settings import Settings

pytestmark = pytest.mark.broker

WAIT = 10.0
DOOR = (
    ("specversion", "1.0"),
    ("id", "door-1"),
    ("source", "https://example.com/sites/7"),
    ("type", "com.example.door.opened"),
    ("region", "eu"),
)


def json_codec(settings: Settings) -> Settings:
    """The same settings, storing JSON: the bytes in JetStream are what the SDK's JSON format reads."""
    return load_settings(
        overrides={
            "mqtt": {"url": settings.mqtt.url},
            "nats": {"url": settings.nats.url, "codec": "json"},
            "data_dir": str(settings.data_dir),
        }
    )


class Paho:
    """A paho-mqtt v5 publisher on its own network thread."""

    def __init__(self, url: str) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="paho-device", protocol=paho.MQTTv5)
        port = int(url.rsplit(":", 1)[1])
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(
        self, topic: str, payload: bytes, attributes: tuple[tuple[str, str], ...], content: str
    ) -> None:
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.UserProperty = list(attributes)
        properties.ContentType = content
        info = self.client.publish(topic, payload, qos=1, properties=properties)
        info.wait_for_publish(timeout=WAIT)
        assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def test_binary_mode_from_paho_is_stored_as_a_cloudevent_the_sdk_reads(
    settings: Settings, nc: NatsClient, running: Running
) -> None:
    js = nc.jetstream()
    settings = json_codec(settings)
    async with running(Bridge(settings=settings), wait=WAIT):
        device = await asyncio.to_thread(Paho, settings.mqtt.url)
        try:
            await asyncio.to_thread(
                device.publish, "nerve/pi-01/events/door", b'{"door": "open"}', DOOR, "application/json"
            )
        finally:
            await asyncio.to_thread(device.close)
        await wait_for_count(js, "NERVE_EVENTS", 1)
    [stored] = await stream_messages(js, "NERVE_EVENTS")
    assert stored.subject == "nerve.pi-01.events.door"
    assert stored.headers is not None
    assert stored.headers[MSG_ID_HEADER] == "door-1"
    assert stored.headers[CONTENT_TYPE_HEADER] == "application/cloudevents+json"
    sdk = JSONFormat().read(None, stored.data)
    assert sdk.get_id() == "door-1"
    assert sdk.get_source() == "https://example.com/sites/7"
    assert sdk.get_type() == "com.example.door.opened"
    assert sdk.get_subject() == "pi-01"  # none given: the topic's device
    assert sdk.get_datacontenttype() == "application/json"
    assert sdk.get_extension("region") == "eu"
    assert sdk.get_data() == {"door": "open"}


async def test_binary_mode_from_nerves_client_with_every_rule_of_structured_mode(
    settings: Settings, nc: NatsClient, running: Running
) -> None:
    js = nc.jetstream()
    reading = (("specversion", "1.0"), ("id", "r-1"), ("source", "s"), ("type", "nerve.telemetry.disk"))
    bad = [
        # topic, properties, payload, the reason it is dead-lettered
        ("nerve/pi-01/telemetry/disk", (*reading[:1], ("id", "r-2"), *reading[2:]), b"150", "out of range"),
        ("nerve/pi-01/events/door", (*DOOR, ("subject", "pi-02")), b"{}", "names another device"),
        ("nerve/pi-01/events/door", DOOR[:1] + DOOR[2:], b"{}", "missing required attribute"),
        ("nerve/pi-01/events/door", (*DOOR, ("hops", "many")), b"{}", "hops: 'many' is not an integer"),
        ("nerve/pi-01/events/door", DOOR, b"{not json", "payload is not the application/json"),
        ("nerve/pi-01/results/clear_temp", DOOR, b"{}", "must be structured envelopes"),
        ("nerve/pi-01/telemetry/nope", reading, b"1", "unknown metric 'nope'"),
    ]
    settings = json_codec(settings)
    bridge = Bridge(settings=settings)
    async with running(bridge, wait=WAIT), MqttClient(settings.mqtt, client_id="nerve-device") as device:
        await device.publish("nerve/pi-01/telemetry/disk", b"95.5", user_properties=reading)
        for topic, properties, payload, _ in bad:
            await device.publish(topic, payload, user_properties=properties, content_type="application/json")
        # Not binary mode (no specversion among the properties): a raw reading, as without properties.
        await device.publish("nerve/pi-01/telemetry/disk", b"42", user_properties=(("unit", "%"),))
        await wait_for_count(js, "NERVE_TELEMETRY", 2)
        await wait_for_count(js, "NERVE_DEADLETTER", len(bad))
    stored = await stream_messages(js, "NERVE_TELEMETRY")
    sdk = JSONFormat().read(None, stored[0].data)
    assert (sdk.get_id(), sdk.get_source(), sdk.get_type(), sdk.get_subject()) == (
        "r-1",
        "s",
        "nerve.telemetry.disk",
        "pi-01",
    )
    data: object = sdk.get_data()  # the SDK's annotation leaves out numbers; CloudEvents data may be one
    assert data == 95.5
    assert sdk.get_datacontenttype() is None  # none was sent: data read as JSON, as CloudEvents says
    assert decode(stored[1].data, Event).data == {"value": 42}
    dead = await stream_messages(js, "NERVE_DEADLETTER")
    for message, (topic, _, payload, reason) in zip(dead, bad, strict=True):
        record = msgpack.unpackb(message.data)
        assert reason in record["reason"], record["reason"]
        assert record["origin"] == topic
        assert record["payload"] == payload
        assert message.headers is not None
        assert reason in message.headers[REASON_HEADER]
    assert bridge.stats.deadlettered == len(bad)
    assert bridge.stats.stored == 2
