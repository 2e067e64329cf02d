"""The bridge's MQTT v5 client: packets on the wire, split reads, protocol errors, and a real mosquitto."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import TYPE_CHECKING, TypeAlias

import pytest

from nerve.runtime.config.settings import MqttSettings, host_port
from nerve.runtime.wire.client import MqttClient
from nerve.runtime.wire.mqtt import (
    Incoming,
    MqttWire,
    MqttWireError,
    Will,
    connect_packet,
    open_mqtt,
    packet,
    parse_properties,
    puback_packets,
    publish_packet,
    read_properties,
    read_varint,
    unsubscribe_packet,
    utf8,
    varint,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractAsyncContextManager

    from tests.conftest import FakeTransport, Serve

    from nerve.runtime.stack.brokers import Mosquitto

    Connect: TypeAlias = Callable[[Callable[[list[Incoming]], None]], tuple[MqttWire, FakeTransport]]


def ignore(_batch: list[Incoming]) -> None:
    """Takes messages and does nothing with them."""


async def open_wire(
    port: int,
    client_id: str = "t",
    on_messages: Callable[[list[Incoming]], None] = ignore,
    *,
    host: str = "127.0.0.1",
    clean_start: bool = True,
    session_expiry_s: int = 0,
    receive_maximum: int = 10,
    will: Will | None = None,
    timeout_s: float = 10.0,
) -> MqttWire:
    """`open_mqtt` with the options most tests leave alone filled in (keepalive 30 s)."""
    return await open_mqtt(
        MqttSettings(url=f"mqtt://{host}:{port}", keepalive_s=30),
        client_id=client_id,
        on_messages=on_messages,
        clean_start=clean_start,
        session_expiry_s=session_expiry_s,
        receive_maximum=receive_maximum,
        will=will,
        timeout_s=timeout_s,
    )


class Collected:
    """What a wire received: `take` is its `on_messages`; `wait_for(n)` until n have come."""

    def __init__(self) -> None:
        self.messages: list[Incoming] = []
        self._arrived = asyncio.Event()

    def take(self, batch: list[Incoming]) -> None:
        self.messages.extend(batch)
        self._arrived.set()

    async def wait_for(self, count: int, *, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.messages) < count:
                self._arrived.clear()
                await self._arrived.wait()


def publish(topic: str, payload: bytes, packet_id: int = 0, *, properties: bytes = b"") -> bytes:
    qos = 1 if packet_id else 0
    header = utf8(topic) + (struct.pack("!H", packet_id) if packet_id else b"")
    return packet(0x30 | (qos << 1), header + varint(len(properties)) + properties + payload)


@pytest.fixture
def connected(new_transport: Callable[[], FakeTransport]) -> Connect:
    """Makes a wire that hands what it reads to `on_messages`, on a fresh fake transport."""

    def connect(on_messages: Callable[[list[Incoming]], None]) -> tuple[MqttWire, FakeTransport]:
        wire = MqttWire(on_messages, keepalive_s=0)
        transport = new_transport()
        wire.connection_made(transport)
        return wire, transport

    return connect


def test_varint_round_trips_at_every_boundary() -> None:
    for value in (0, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 268_435_455):
        assert read_varint(varint(value), 0) == (value, len(varint(value)))
    assert read_varint(b"\x80", 0) is None  # ends inside the integer
    with pytest.raises(MqttWireError, match="longer than 4 bytes"):
        read_varint(b"\x80\x80\x80\x80\x01", 0)
    with pytest.raises(ValueError, match="does not fit"):
        varint(268_435_456)


def test_puback_packets_are_short_form_in_order() -> None:
    assert puback_packets([1, 0x1234, 7]) == b"\x40\x02\x00\x01" + b"\x40\x02\x12\x34" + b"\x40\x02\x00\x07"


def test_properties_of_every_size_class_are_read_or_skipped() -> None:
    props = (
        b"\x01\x01"  # payload format indicator (byte)
        b"\x21\x00\x0a"  # receive maximum (two bytes)
        b"\x11\x00\x00\x00\x3c"  # session expiry (four bytes)
        b"\x0b\x81\x01"  # subscription identifier (varint 129)
        b"\x1f"
        + utf8("why")  # reason string
        + b"\x26"
        + utf8("k")
        + utf8("v")  # user property (pair)
    )
    found = read_properties(varint(len(props)) + props, 0, 100)
    assert found.single == {0x01: 1, 0x21: 10, 0x11: 60, 0x0B: 129, 0x1F: "why"}
    assert found.user == [("k", "v")]
    assert found.end == len(props) + 1
    assert parse_properties(varint(len(props)) + props, 0, 100) == (found.single, found.end)
    with pytest.raises(MqttWireError, match="unknown property 0x7f"):
        parse_properties(b"\x02\x7f\x00", 0, 3)
    with pytest.raises(MqttWireError, match="run past the packet"):
        parse_properties(b"\x09\x01\x00", 0, 3)


async def test_publishes_split_at_every_byte_arrive_whole_and_in_order(connected: Connect) -> None:
    stream = (
        publish("nerve/a/telemetry/cpu", b"1", 1)
        + publish("nerve/b/telemetry/cpu", b"x" * 300, 2, properties=b"\x01\x01")
        + publish("nerve/c/events/boot", b"", 0)
        + b"\xd0\x00"  # PINGRESP between them
        + publish("nerve/d/telemetry/cpu", b"4", 65535)
    )
    for cut in range(1, len(stream)):
        batches: list[list[Incoming]] = []
        wire, transport = connected(batches.append)
        wire.data_received(stream[:cut])
        wire.data_received(stream[cut:])
        got = [m for batch in batches for m in batch]
        assert got == [
            Incoming("nerve/a/telemetry/cpu", b"1", 1),
            Incoming("nerve/b/telemetry/cpu", b"x" * 300, 2),
            Incoming("nerve/c/events/boot", b"", 0),
            Incoming("nerve/d/telemetry/cpu", b"4", 65535),
        ], cut
        assert not transport.aborted


async def test_one_read_is_one_batch_and_pubacks_are_one_write(connected: Connect) -> None:
    batches: list[list[Incoming]] = []
    wire, transport = connected(batches.append)
    wire.data_received(b"".join(publish(f"t/{i}", b"v", i + 1) for i in range(50)))
    assert len(batches) == 1
    assert [m.packet_id for m in batches[0]] == list(range(1, 51))
    wire.puback([m.packet_id for m in batches[0]])
    assert bytes(transport.written) == puback_packets(list(range(1, 51)))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (packet(0x34, utf8("t") + b"\x00\x01\x00"), "QoS2"),
        (b"\x30\xff\xff\xff\xff\x01", "longer than 4 bytes"),
        (packet(0x30, b"\x00\x05ab"), "runs past the packet"),
        (packet(0x30, utf8("t") + b"\x05\x01"), "properties run past the packet"),
        (packet(0x30, b"\x00\x02\xff\xfe\x00"), "malformed packet"),  # topic not UTF-8
        (packet(0x50, b"\x00\x01"), "unexpected packet type 5"),  # PUBREC: we never publish at QoS2
        (packet(0xE0, b"\x87\x00"), r"broker disconnected us: not authorized \(0x87\)"),
        (packet(0xE0, b"\x8e\x00"), "session taken over: another client connected with client id"),
    ],
)
async def test_protocol_violations_end_the_connection_with_the_reason(
    data: bytes, reason: str, connected: Connect
) -> None:
    batches: list[list[Incoming]] = []
    wire, transport = connected(batches.append)
    wire.data_received(data)
    assert transport.aborted
    with pytest.raises(MqttWireError, match=reason):
        await wire.closed
    assert batches == []


async def test_a_failing_handler_ends_the_connection(connected: Connect) -> None:
    def boom(batch: list[Incoming]) -> None:
        raise RuntimeError(f"cannot take {len(batch)}")

    wire, transport = connected(boom)
    wire.data_received(publish("t", b"v", 1))
    assert transport.aborted
    with pytest.raises(MqttWireError, match="RuntimeError: cannot take 1"):
        await wire.closed
    wire.puback([1])  # closed: nothing is written any more
    assert transport.written == b""


def answering(reply: bytes) -> Serve:
    """A fake broker's side of a connection: answer whatever comes first with `reply`, once."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(reply)
        await writer.drain()
        await reader.read(1024)

    return serve


async def test_a_refused_connect_says_why(
    tcp_server: Callable[[Serve], AbstractAsyncContextManager[int]],
) -> None:
    async with tcp_server(answering(packet(0x20, b"\x00\x86\x05\x1f" + utf8("no")))) as port:
        with pytest.raises(
            MqttWireError, match=r"refused the connection: bad user name or password \(0x86, no\)"
        ):
            await open_wire(port, timeout_s=2)


async def test_a_silent_broker_times_out_and_nothing_listening_is_named(
    tcp_server: Callable[[Serve], AbstractAsyncContextManager[int]],
) -> None:
    async with tcp_server(answering(b"")) as port:
        with pytest.raises(MqttWireError, match="no CONNACK"):
            await open_wire(port, timeout_s=2)
    with pytest.raises(MqttWireError, match=f"cannot connect to mqtt://127.0.0.1:{port}"):
        await open_wire(port, timeout_s=2)


# --- against a real mosquitto --------------------------------------------------------------------


@pytest.mark.broker
async def test_receive_maximum_and_the_persistent_session(mosquitto: Mosquitto) -> None:
    """mosquitto sends no more than the Receive Maximum unacknowledged; what was not acked comes again."""
    host, port = host_port(mosquitto.url, 1883)
    received = Collected()

    async def open_session() -> MqttWire:
        return await open_wire(
            port,
            "bounded",
            received.take,
            host=host,
            clean_start=False,
            session_expiry_s=300,
            receive_maximum=5,
        )

    wire = await open_session()
    assert not wire.session_present
    await wire.subscribe(["nerve/+/telemetry/#"])
    sock = wire._transport.get_extra_info("socket")  # type: ignore[union-attr]
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    async with MqttClient(MqttSettings(url=mosquitto.url), client_id="pub") as pub:
        for i in range(12):
            await pub.publish("nerve/pi/telemetry/cpu", str(i).encode(), qos=1)
    await received.wait_for(5)
    await asyncio.sleep(0.3)
    assert [m.payload for m in received.messages] == [str(i).encode() for i in range(5)]  # no more than 5
    # Gone without acknowledging any: the persistent session sends them again, in order, then the rest.
    wire.close()
    received.messages.clear()
    wire = await open_session()
    assert wire.session_present
    acked = 0
    while acked < 12:
        await received.wait_for(acked + 1)
        wire.puback([m.packet_id for m in received.messages[acked:]])
        acked = len(received.messages)
    assert [m.payload for m in received.messages] == [str(i).encode() for i in range(12)]
    wire.close()


@pytest.mark.broker
async def test_paused_reading_leaves_messages_with_the_broker(mosquitto: Mosquitto) -> None:
    host, port = host_port(mosquitto.url, 1883)
    received = Collected()
    wire = await open_wire(port, "paused", received.take, host=host, receive_maximum=100)
    await wire.subscribe(["nerve/+/telemetry/#"])
    wire.pause_reading()
    async with MqttClient(MqttSettings(url=mosquitto.url), client_id="pub") as pub:
        for i in range(20):
            await pub.publish("nerve/pi/telemetry/cpu", str(i).encode(), qos=1)
    await asyncio.sleep(0.3)
    assert received.messages == []
    wire.resume_reading()
    await received.wait_for(20)
    assert [m.payload for m in received.messages] == [str(i).encode() for i in range(20)]
    wire.close()


@pytest.mark.broker
async def test_publish_waits_for_puback_and_a_stopped_broker_fails_it(mosquitto: Mosquitto) -> None:
    host, port = host_port(mosquitto.url, 1883)
    got: list[Incoming] = []
    wire = await open_wire(port, "loop", got.extend, host=host)
    await wire.subscribe(["nerve/+/commands/#"])
    await wire.publish("nerve/pi/commands/clear_temp", b"cmd")
    for _ in range(50):
        if got:
            break
        await asyncio.sleep(0.05)
    assert [(m.topic, m.payload) for m in got] == [("nerve/pi/commands/clear_temp", b"cmd")]
    await mosquitto.kill()
    with pytest.raises(MqttWireError, match="connection"):
        await asyncio.wait_for(wire.closed, 5)
    with pytest.raises(MqttWireError, match="not connected"):
        await wire.publish("nerve/pi/commands/clear_temp", b"cmd")


def test_connect_carries_a_will() -> None:
    will = Will(topic="nerve/pi-01/status", payload=b"offline", qos=1, retain=True)
    raw = connect_packet(
        "nerve-edge-pi-01",
        clean_start=False,
        keepalive_s=30,
        session_expiry_s=60,
        receive_maximum=16,
        will=will,
    )
    assert raw[0] == 0x10
    length, start = read_varint(raw, 1) or (0, 0)
    body = raw[start : start + length]
    assert body[:7] == utf8("MQTT") + b"\x05"
    # will flag, will QoS 1, will retain; not clean start
    assert body[7] == 0x04 | 0x08 | 0x20
    props_end = 10 + 1 + body[10]
    rest = body[props_end:]
    assert rest == (
        utf8("nerve-edge-pi-01") + b"\x00" + utf8("nerve/pi-01/status") + struct.pack("!H", 7) + b"offline"
    )


def test_connect_without_a_will_sets_no_will_flags() -> None:
    raw = connect_packet("c", clean_start=True, keepalive_s=30, session_expiry_s=0, receive_maximum=10)
    assert raw[2 + 7] == 0x02
    assert raw.endswith(utf8("c"))


def test_connect_carries_credentials_after_the_will_and_our_packet_limit() -> None:
    will = Will(topic="w", payload=b"x")
    raw = connect_packet(
        "c",
        clean_start=True,
        keepalive_s=30,
        session_expiry_s=0,
        receive_maximum=10,
        will=will,
        max_packet_size=65536,
        username="pi-01",
        password=b"p\x00ss",
    )
    assert raw[2 + 7] == 0x80 | 0x40 | 0x04 | 0x08 | 0x02  # user name, password, will QoS1, clean start
    assert b"\x27" + struct.pack("!I", 65536) in raw
    assert raw.endswith(utf8("c") + b"\x00" + utf8("w") + b"\x00\x01x" + utf8("pi-01") + b"\x00\x04p\x00ss")


def test_publish_retained_at_qos1_and_qos0() -> None:
    assert publish_packet("t", b"x", 7, retain=True) == packet(0x33, utf8("t") + b"\x00\x07" + b"\x00" + b"x")
    assert publish_packet("t", b"x", 0, retain=True) == packet(0x31, utf8("t") + b"\x00" + b"x")
    assert publish_packet("t", b"x", 0) == packet(0x30, utf8("t") + b"\x00" + b"x")


async def test_a_qos0_publish_waits_for_nothing(connected: Connect) -> None:
    wire, transport = connected(ignore)
    await wire.publish("nerve/pi-01/status", b"online", qos=0, retain=True)
    assert bytes(transport.written) == publish_packet("nerve/pi-01/status", b"online", 0, retain=True)
    with pytest.raises(ValueError, match="QoS must be 0 or 1"):
        await wire.publish("t", b"x", qos=2)


@pytest.mark.broker
async def test_the_will_is_published_when_the_client_vanishes(mosquitto: Mosquitto) -> None:
    host, port = host_port(mosquitto.url, 1883)
    received = Collected()
    watcher = await open_wire(port, "watcher", received.take, host=host)
    try:
        await watcher.subscribe(["will/+"])
        dying = await open_wire(
            port,
            "dying",
            host=host,
            will=Will(topic="will/dying", payload=b"offline", qos=1, retain=True),
        )
        assert dying._transport is not None
        dying._transport.abort()
        await received.wait_for(1, timeout=10)
        assert (received.messages[0].topic, received.messages[0].payload) == ("will/dying", b"offline")
    finally:
        watcher.close()


# --- MqttClient: a session for tools -----------------------------------------------------------------


async def test_the_client_acknowledges_a_message_when_it_hands_it_over_then_reports_the_end(
    tcp_server: Callable[[Serve], AbstractAsyncContextManager[int]],
) -> None:
    from_client: list[bytes] = []
    taken = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)  # CONNECT
        writer.write(packet(0x20, b"\x00\x00\x00") + publish("nerve/pi/commands/x", b"do", 9))
        await writer.drain()
        from_client.append(await reader.readexactly(4))
        taken.set()
        writer.close()  # and the broker goes away

    async with tcp_server(serve) as port:
        async with MqttClient(MqttSettings(url=f"mqtt://127.0.0.1:{port}"), client_id="tool") as client:
            async with asyncio.timeout(5):
                message = await anext(client.messages)
                await taken.wait()
                with pytest.raises(MqttWireError, match="connection"):
                    await anext(client.messages)
        assert (message.topic, message.payload, message.packet_id) == ("nerve/pi/commands/x", b"do", 9)
        assert from_client == [puback_packets([9])]
        with pytest.raises(MqttWireError, match="not connected"):
            await client.publish("t", b"x")
        with pytest.raises(StopAsyncIteration):
            await anext(client.messages)


async def test_send_writes_at_once_and_its_future_is_settled_by_the_puback(connected: Connect) -> None:
    wire, transport = connected(ignore)
    first = wire.publish_nowait("nerve/pi-01/telemetry/cpu", b"a")
    second = wire.publish_nowait("nerve/pi-01/telemetry/cpu", b"b")
    assert bytes(transport.written) == publish_packet("nerve/pi-01/telemetry/cpu", b"a", 1) + publish_packet(
        "nerve/pi-01/telemetry/cpu", b"b", 2
    )
    wire.data_received(bytes([0x40, 2, 0, 2]))  # PUBACK of the second only
    assert second.done()
    assert second.result() is None
    assert not first.done()
    wire.data_received(bytes([0x40, 3, 0, 1, 0x97]))  # the first refused: quota exceeded
    with pytest.raises(MqttWireError, match="quota exceeded"):
        first.result()


async def test_a_closing_transport_takes_no_more_writes(connected: Connect) -> None:
    """A send failed (asyncio says so a loop turn later): publishing is refused at once and acks are
    dropped, instead of writes asyncio throws away with a warning each (70,105 of them in one overload)."""
    wire, transport = connected(ignore)
    transport.aborted = True  # what a failed send leaves: closing, `connection_lost` not called yet
    written = len(transport.written)
    with pytest.raises(MqttWireError, match="not connected"):
        wire.publish_nowait("nerve/pi-01/telemetry/cpu", b"a")
    wire.puback([1, 2])
    assert len(transport.written) == written


async def test_the_brokers_receive_maximum_is_kept_from_its_connack(connected: Connect) -> None:
    wire, _ = connected(ignore)
    assert wire.receive_maximum == 65535  # none said: MQTT's default
    properties = bytes([0x21]) + struct.pack("!H", 20)
    wire.data_received(packet(0x20, bytes([0, 0]) + varint(len(properties)) + properties))
    assert wire.receive_maximum == 20


async def test_the_session_present_flag_is_told_before_the_messages_that_follow_the_connack(
    new_transport: Callable[[], FakeTransport],
) -> None:
    """A resumed session's messages may come in the very read that brings the CONNACK."""
    seen: list[object] = []
    wire = MqttWire(seen.append, keepalive_s=0, on_connack=lambda present: seen.append(("connack", present)))
    wire.connection_made(new_transport())
    connack = packet(0x20, b"\x01\x00\x00")  # Session Present, success, no properties
    again = bytearray(publish_packet("nerve/a/telemetry/cpu", b"95", 7))
    again[0] |= 0x08  # DUP
    wire.data_received(connack + bytes(again))
    assert seen == [("connack", True), [Incoming("nerve/a/telemetry/cpu", b"95", 7, dup=True)]]
    assert wire.session_present


async def test_unsubscribe_is_answered_by_its_unsuback_and_a_refusal_names_the_filter(
    connected: Connect,
) -> None:
    wire, transport = connected(ignore)
    gone = asyncio.ensure_future(wire.unsubscribe(["$share/g/nerve/#", "nerve/#"], timeout_s=5))
    await asyncio.sleep(0)
    assert bytes(transport.written) == unsubscribe_packet(1, ["$share/g/nerve/#", "nerve/#"])
    assert bytes(transport.written) == packet(
        0xA2, b"\x00\x01\x00" + utf8("$share/g/nerve/#") + utf8("nerve/#")
    )
    wire.data_received(packet(0xB0, b"\x00\x01\x00" + bytes([0x00, 0x11])))  # 0x11: there was none: fine
    await gone
    refused = asyncio.ensure_future(wire.unsubscribe(["nerve/#"], timeout_s=5))
    await asyncio.sleep(0)
    wire.data_received(packet(0xB0, b"\x00\x02\x00" + bytes([0x87])))
    with pytest.raises(MqttWireError, match=r"refused to unsubscribe: nerve/# \(not authorized, 0x87\)"):
        await refused
    silent = asyncio.ensure_future(wire.unsubscribe(["nerve/#"], timeout_s=0.05))
    with pytest.raises(MqttWireError, match="no UNSUBACK within"):
        await silent


@pytest.mark.broker
async def test_after_unsubscribe_a_persistent_session_gets_nothing_more(mosquitto: Mosquitto) -> None:
    host, port = host_port(mosquitto.url, 1883)
    received = Collected()
    wire = await open_wire(port, "leaving", received.take, host=host, clean_start=False, session_expiry_s=300)
    await wire.subscribe(["nerve/+/telemetry/#"])
    await wire.unsubscribe(["nerve/+/telemetry/#", "never/subscribed"])
    wire.close()
    async with MqttClient(MqttSettings(url=mosquitto.url), client_id="pub") as pub:
        await pub.publish("nerve/pi/telemetry/cpu", b"while away", qos=1)
        await pub.publish("marker/x", b"marker", qos=1)
    wire = await open_wire(port, "leaving", received.take, host=host, clean_start=False, session_expiry_s=300)
    assert wire.session_present
    await wire.subscribe(["marker/#"])
    async with MqttClient(MqttSettings(url=mosquitto.url), client_id="pub") as pub:
        await pub.publish("marker/x", b"after", qos=1)
    await received.wait_for(1)
    # Messages come in order: one queued for the session while away would have come first.
    assert [m.payload for m in received.messages] == [b"after"]
    wire.close()


async def test_wait_closed_waits_for_the_socket_and_aborts_one_that_does_not_close(
    connected: Connect,
) -> None:
    # Over TLS, close() only starts the shutdown: a loop that ends at once would leave the socket open.
    wire, transport = connected(ignore)
    wire.close()
    assert transport.closed
    await wire.wait_closed(timeout_s=0.05)  # the fake transport never reports the end: aborted
    assert transport.aborted
    wire, transport = connected(ignore)
    wire.close()
    wire.connection_lost(None)  # what asyncio calls once the socket is closed
    await wire.wait_closed(timeout_s=5)
    assert not transport.aborted
