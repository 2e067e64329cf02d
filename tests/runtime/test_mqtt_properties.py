"""PUBLISH properties (user properties, content type) and the packet size limit; the parser under fuzzing.

nerve's client reads what a broker sends, so it is a security boundary: whatever bytes come, it either
hands over whole messages or closes with an `MqttWireError` that says why, and it never buffers more than
its Maximum Packet Size (plus one socket read). Interop is checked with paho-mqtt as an independent client.
"""

from __future__ import annotations

import asyncio
import queue
import struct
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from nerve.runtime.config.settings import MqttSettings
from nerve.runtime.wire.client import MqttClient
from nerve.runtime.wire.mqtt import (
    Incoming,
    MqttWire,
    MqttWireError,
    PacketTooLarge,
    open_mqtt,
    packet,
    parse_publish,
    publish_packet,
    publish_properties,
    utf8,
    varint,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractAsyncContextManager

    from tests.conftest import FakeTransport, Serve

    from nerve.runtime.stack.brokers import Mosquitto

WAIT = 10.0
CLAIMED = 268_435_455  # the largest remaining length MQTT can express: 256 MiB
CLOUDEVENT = (
    ("ce_specversion", "1.0"),
    ("ce_id", "a1"),
    ("ce_source", "nerve/pi-01"),
    ("ce_type", "disk.full"),
    ("ce_größe", "zwölf"),  # not ASCII
    ("ce_type", "twice"),  # a name may repeat, and the order is kept
)


# --- encoding and parsing --------------------------------------------------------------------------


def test_properties_round_trip_through_a_publish_packet() -> None:
    raw = publish_packet(
        "nerve/pi-01/events/disk",
        b'{"pct": 97}',
        7,
        retain=True,
        properties=publish_properties(CLOUDEVENT, "application/json"),
    )
    head = raw.index(b"nerve") - 2
    got = parse_publish(raw[0], raw, head, len(raw))
    assert got == Incoming(
        "nerve/pi-01/events/disk", b'{"pct": 97}', 7, CLOUDEVENT, "application/json", retain=True
    )


def test_without_properties_nothing_is_added() -> None:
    raw = publish_packet("t", b"v", 1)
    assert raw == packet(0x32, utf8("t") + b"\x00\x01\x00v")
    assert parse_publish(raw[0], raw, 2, len(raw)) == Incoming("t", b"v", 1)


def test_the_dup_flag_of_a_qos1_publish_is_read_and_means_nothing_at_qos0() -> None:
    again = bytearray(publish_packet("t", b"v", 1))
    again[0] |= 0x08  # DUP: the broker sends it again after a reconnect
    assert parse_publish(again[0], again, 2, len(again)) == Incoming("t", b"v", 1, dup=True)
    qos0 = bytearray(publish_packet("t", b"v", 0))
    qos0[0] |= 0x08
    assert parse_publish(qos0[0], qos0, 2, len(qos0)) == Incoming("t", b"v", 0)


text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)  # no lone surrogates: not UTF-8


@given(
    user=st.lists(st.tuples(text, text), max_size=8),
    content_type=st.none() | text,
    payload=st.binary(max_size=200),
)
def test_any_properties_round_trip(
    user: list[tuple[str, str]], content_type: str | None, payload: bytes
) -> None:
    raw = publish_packet("a/b", payload, 0, properties=publish_properties(user, content_type))
    start = len(raw) - len(payload) - len(publish_properties(user, content_type)) - len(utf8("a/b"))
    assert parse_publish(raw[0], raw, start, len(raw)) == Incoming(
        "a/b", payload, 0, tuple(user), content_type
    )


@pytest.mark.parametrize(
    ("properties", "reason"),
    [
        (b"\x05\x26\x00\x09k", "user property runs past the packet"),  # the name's length lies
        (b"\x07\x26\x00\x01k\x00\x05v", "user property runs past the packet"),  # the value's length lies
        (b"\x06\x26\x00\x01\xff\x00\x00", "user property is not valid UTF-8"),
        (b"\x04\x03\x00\x02\xc3", "property 0x03 runs past the packet"),
        (b"\x05\x03\x00\x02\xc3\x28", "property 0x03 is not valid UTF-8"),
        (b"\x06\x03\x00\x00\x03\x00\x00", "property 0x03 twice"),
        (b"\x02\x02\x00", "property 0x02 runs past the properties"),  # four bytes expected
        (b"\x01\x7f", "unknown property 0x7f"),
        (b"\x7f\x26", "properties run past the packet"),
        (b"\x81\x80\x80\x80\x01", "longer than 4 bytes"),
    ],
)
async def test_hostile_property_blocks_close_the_connection_with_the_reason(
    properties: bytes, reason: str, new_transport: Callable[[], FakeTransport]
) -> None:
    got: list[Incoming] = []
    wire = MqttWire(got.extend, keepalive_s=0)
    transport = new_transport()
    wire.connection_made(transport)
    wire.data_received(packet(0x32, utf8("t") + b"\x00\x01" + properties + b"payload"))
    assert transport.aborted
    with pytest.raises(MqttWireError, match=reason):
        await wire.closed
    assert got == []


# --- the packet size limit ---------------------------------------------------------------------------


async def test_a_packet_over_the_limit_is_refused_from_its_header(
    new_transport: Callable[[], FakeTransport],
) -> None:
    """The trust issue's attack: a PUBLISH claiming 256 MiB. Refused from its header, nothing kept."""
    wire = MqttWire(lambda _batch: None, keepalive_s=0, max_packet_size=4096)
    transport = new_transport()
    wire.connection_made(transport)
    wire.data_received(b"\x30" + varint(CLAIMED) + b"\x00\x01t" + b"x" * 65536)
    assert transport.aborted
    with pytest.raises(
        PacketTooLarge, match=r"packet of 268435460 bytes, over mqtt.max_packet_size \(4096\)"
    ):
        await wire.closed
    assert bytes(transport.written) == b"\xe0\x02\x95\x00"  # DISCONNECT: packet too large
    assert len(wire._buffer) <= 65536 + 10


async def test_a_packet_at_the_limit_is_taken(new_transport: Callable[[], FakeTransport]) -> None:
    got: list[Incoming] = []
    wire = MqttWire(got.extend, keepalive_s=0, max_packet_size=4096)
    wire.connection_made(new_transport())
    whole = packet(0x30, utf8("t") + b"\x00" + b"x" * 4089)
    assert len(whole) == 4096
    wire.data_received(whole + b"\x30")  # and the first byte of the next
    assert [len(m.payload) for m in got] == [4089]
    assert not wire.closed.done()


async def test_a_broker_sending_a_huge_packet_is_dropped_and_the_connect_says_our_limit(
    tcp_server: Callable[[Serve], AbstractAsyncContextManager[int]],
) -> None:
    sent: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sent.append(await reader.read(1024))
        huge = b"\x30" + varint(CLAIMED) + b"\x00\x01t" + b"x" * 100_000
        writer.write(packet(0x20, b"\x00\x00\x00") + huge)
        await writer.drain()
        await reader.read(1024)

    async with tcp_server(serve) as port:
        settings = MqttSettings(url=f"mqtt://127.0.0.1:{port}", max_packet_size=8192)
        wire = await open_mqtt(
            settings,
            client_id="t",
            on_messages=lambda _batch: None,
            clean_start=True,
            session_expiry_s=0,
            receive_maximum=10,
        )
        with pytest.raises(PacketTooLarge):
            async with asyncio.timeout(WAIT):
                await wire.closed
        assert len(wire._buffer) < 8192 + 256 * 1024  # the limit and one socket read, never the claim
    assert b"\x27" + struct.pack("!I", 8192) in sent[0]  # Maximum Packet Size in CONNECT


async def test_a_publish_over_the_brokers_limit_is_refused_here(
    tcp_server: Callable[[Serve], AbstractAsyncContextManager[int]],
) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(packet(0x20, b"\x00\x00\x05\x27" + struct.pack("!I", 1024)))  # its limit: 1 KiB
        await writer.drain()
        await reader.read(1024)

    async with (
        tcp_server(serve) as port,
        MqttClient(MqttSettings(url=f"mqtt://127.0.0.1:{port}"), client_id="t") as client,
    ):
        with pytest.raises(MqttWireError, match=r"publish of 2\d\d\d bytes is over the broker's maximum"):
            await client.publish("t", b"x" * 2000)


# --- fuzzing ---------------------------------------------------------------------------------------


def feed(chunks: list[bytes], max_packet_size: int) -> tuple[MqttWire, list[Incoming], int]:
    """Feed `chunks` to a fresh wire; return it, what it delivered, and the most it ever buffered."""

    class Transport(asyncio.Transport):
        def write(self, data: Any) -> None:
            pass

        def abort(self) -> None:
            pass

        def is_closing(self) -> bool:
            return False

    async def run() -> tuple[MqttWire, list[Incoming], int]:
        got: list[Incoming] = []
        wire = MqttWire(got.extend, keepalive_s=0, max_packet_size=max_packet_size)
        wire.connection_made(Transport())
        most = 0
        for chunk in chunks:
            if wire.closed.done():
                break
            wire.data_received(chunk)  # must never raise
            most = max(most, len(wire._buffer))
        return wire, got, most

    return asyncio.run(run())


def closed_reason(wire: MqttWire) -> BaseException | None:
    return wire.closed.exception() if wire.closed.done() else None


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(chunks=st.lists(st.binary(max_size=300), max_size=8), limit=st.integers(16, 512))
def test_arbitrary_bytes_deliver_messages_or_close_with_a_reason(chunks: list[bytes], limit: int) -> None:
    wire, got, most = feed(chunks, limit)
    reason = closed_reason(wire)
    assert reason is None or isinstance(reason, MqttWireError)
    assert most <= limit + max((len(chunk) for chunk in chunks), default=0)
    assert all(isinstance(message, Incoming) for message in got)


@settings(max_examples=500, deadline=None)
@given(
    properties=st.binary(max_size=80),
    payload=st.binary(max_size=20),
    qos=st.sampled_from([0x30, 0x32, 0x33]),
    cut=st.integers(0, 200),
)
def test_arbitrary_property_blocks_parse_or_close_with_a_reason(
    properties: bytes, payload: bytes, qos: int, cut: int
) -> None:
    ident = b"\x00\x09" if qos != 0x30 else b""
    raw = packet(qos, utf8("nerve/pi/events/x") + ident + properties + payload)
    wire, got, _ = feed([raw[:cut], raw[cut:]], 4096)
    reason = closed_reason(wire)
    assert reason is None or isinstance(reason, MqttWireError)
    if reason is None:
        assert len(got) == 1
        assert got[0].topic == "nerve/pi/events/x"


# --- against mosquitto, with paho-mqtt as the other side --------------------------------------------


class Paho:
    """A paho-mqtt v5 client on its own network thread; what it receives lands in `received`."""

    def __init__(self, port: int, client_id: str) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        self.received: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.client.on_message = lambda _client, _userdata, message: self.received.put(message)
        self.port = port

    def connect(self) -> None:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()

    def subscribe(self, topic: str) -> None:
        subscribed = self.client.subscribe(topic, qos=1)
        assert subscribed[0] == paho.MQTT_ERR_SUCCESS

    def publish(self, topic: str, payload: bytes, properties: Properties | None = None) -> None:
        info = self.client.publish(topic, payload, qos=1, properties=properties)
        info.wait_for_publish(timeout=WAIT)
        assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.broker
async def test_properties_from_paho_reach_nerve(mosquitto: Mosquitto) -> None:
    other = Paho(mosquitto.port, "paho-publisher")
    await asyncio.to_thread(other.connect)
    try:
        async with MqttClient(MqttSettings(url=mosquitto.url), client_id="nerve-reader") as client:
            await client.subscribe("nerve/+/events/#")
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.UserProperty = list(CLOUDEVENT)
            properties.ContentType = "application/json"
            await asyncio.to_thread(other.publish, "nerve/pi-01/events/disk", b"{}", properties)
            await asyncio.to_thread(other.publish, "nerve/pi-01/events/plain", b"{}")
            async with asyncio.timeout(WAIT):
                first = await anext(client.messages)
                second = await anext(client.messages)
    finally:
        await asyncio.to_thread(other.close)
    assert (first.user_properties, first.content_type) == (CLOUDEVENT, "application/json")
    assert (second.user_properties, second.content_type) == ((), None)


@pytest.mark.broker
async def test_properties_from_nerve_reach_paho(mosquitto: Mosquitto) -> None:
    other = Paho(mosquitto.port, "paho-reader")
    await asyncio.to_thread(other.connect)
    await asyncio.to_thread(other.subscribe, "nerve/#")
    try:
        async with MqttClient(MqttSettings(url=mosquitto.url), client_id="nerve-publisher") as client:
            # The subscription is in place once a message published after it comes back to paho.
            async with asyncio.timeout(WAIT):
                while True:
                    await client.publish("nerve/probe", b"")
                    try:
                        await asyncio.to_thread(other.received.get, timeout=0.5)
                        break
                    except queue.Empty:
                        continue
            await client.publish(
                "nerve/pi-01/events/disk", b"{}", user_properties=CLOUDEVENT, content_type="application/json"
            )
            message = await asyncio.to_thread(other.received.get, timeout=WAIT)
    finally:
        await asyncio.to_thread(other.close)
    assert message.topic == "nerve/pi-01/events/disk"
    assert [tuple(pair) for pair in message.properties.UserProperty] == list(CLOUDEVENT)  # type: ignore[union-attr]
    assert message.properties.ContentType == "application/json"  # type: ignore[union-attr]


@pytest.mark.broker
async def test_mosquitto_keeps_a_message_over_our_limit_from_us(mosquitto: Mosquitto) -> None:
    """mosquitto honours the Maximum Packet Size we send: what is bigger never reaches us."""
    other = Paho(mosquitto.port, "paho-big")
    await asyncio.to_thread(other.connect)
    try:
        settings = MqttSettings(url=mosquitto.url, max_packet_size=4096)
        async with MqttClient(settings, client_id="nerve-small") as client:
            await client.subscribe("t/#")
            await asyncio.to_thread(other.publish, "t/big", b"x" * 10_000)
            await asyncio.to_thread(other.publish, "t/small", b"ok")
            async with asyncio.timeout(WAIT):
                message = await anext(client.messages)
            assert (message.topic, message.payload) == ("t/small", b"ok")
            assert not client.wire.closed.done()
    finally:
        await asyncio.to_thread(other.close)
