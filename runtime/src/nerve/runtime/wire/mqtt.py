"""A lean MQTT v5 client: one asyncio `Protocol`, whole batches per read (the bridge, the edge daemon).

Why not paho/aiomqtt here: profiled in the bridge, paho spent ~22% of the bridge's time reading each
PUBLISH (half of it building a v5 `Properties` object per message) and aiomqtt woke the event loop and
re-registered the socket for every PUBACK. This client parses every PUBLISH that one socket read
brought, hands the whole batch to one callback, and writes the PUBACKs of a batch in one write. It does
exactly what the bridge and the edge need, and nothing else (the edge uses it because it is small:
paho and aiomqtt cost the edge process ~5 MiB of RSS, this module next to nothing):

- CONNECT (clean start or a persistent session with an expiry, a Receive Maximum that bounds how many
  unacknowledged QoS1 messages the broker may send us, an optional will: topic, payload, QoS,
  retain) and CONNACK;
- SUBSCRIBE/SUBACK (QoS1 maximum, so the broker never sends QoS2);
- incoming PUBLISH at QoS0/1, acknowledged only when the caller says so (`puback`), in receive order;
- outgoing PUBLISH at QoS1 with a future for its PUBACK (the downlink, the edge's outbox), or at QoS0,
  retained or not (the edge's presence);
- keep-alive (PINGREQ/PINGRESP) and DISCONNECT.

Any protocol violation, a refused CONNECT or SUBSCRIBE, a broker DISCONNECT or a lost connection ends the
connection: `closed` then holds the reason, and every waiter fails with `MqttWireError`.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from nerve.runtime.wire.protocol import WireError, WireProtocol

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

# Packet types (the high nibble of the first byte).
CONNECT: Final = 1
CONNACK: Final = 2
PUBLISH: Final = 3
PUBACK: Final = 4
SUBSCRIBE: Final = 8
SUBACK: Final = 9
PINGREQ: Final = 12
PINGRESP: Final = 13
DISCONNECT: Final = 14

DEFAULT_MQTT_PORT: Final = 1883
PINGREQ_PACKET: Final = b"\xc0\x00"
DISCONNECT_PACKET: Final = b"\xe0\x00"  # normal disconnection, no properties
MAX_PACKET_ID: Final = 0xFFFF
MAX_REMAINING_LENGTH: Final = 268_435_455
SUCCESS_LIMIT: Final = 0x80  # reason codes below this are successes

# Property identifiers used here, and the size class of every property, to skip the ones we ignore.
SESSION_EXPIRY_INTERVAL: Final = 0x11
SERVER_KEEP_ALIVE: Final = 0x13
REASON_STRING: Final = 0x1F
RECEIVE_MAXIMUM: Final = 0x21
_BYTE_PROPS: Final = frozenset({0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A})
_TWO_BYTE_PROPS: Final = frozenset({0x13, 0x21, 0x22, 0x23})
_FOUR_BYTE_PROPS: Final = frozenset({0x02, 0x11, 0x18, 0x27})
_VARINT_PROPS: Final = frozenset({0x0B})
_STRING_PROPS: Final = frozenset({0x03, 0x08, 0x09, 0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F})  # and binary
_PAIR_PROPS: Final = frozenset({0x26})
_INT_WIDTHS: Final = {
    **dict.fromkeys(_BYTE_PROPS, 1),
    **dict.fromkeys(_TWO_BYTE_PROPS, 2),
    **dict.fromkeys(_FOUR_BYTE_PROPS, 4),
}

CONNACK_REASONS: Final = {
    0x80: "unspecified error",
    0x81: "malformed packet",
    0x82: "protocol error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x8C: "bad authentication method",
    0x95: "packet too large",
    0x97: "quota exceeded",
    0x9F: "connection rate exceeded",
}


class MqttWireError(WireError):
    """The MQTT connection failed, was refused, or the broker broke the protocol."""


@dataclass(frozen=True, slots=True)
class Will:
    """The message the broker publishes for us if we vanish without a DISCONNECT (last will)."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Incoming:
    """A PUBLISH from the broker. `packet_id` is 0 at QoS0 (nothing to acknowledge)."""

    topic: str
    payload: bytes
    packet_id: int


# --- encoding ---------------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    """MQTT's variable byte integer (7 bits per byte, high bit = more follows)."""
    if not 0 <= value <= MAX_REMAINING_LENGTH:
        raise ValueError(f"{value} does not fit a variable byte integer")
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | 0x80 if value else digit)
        if not value:
            return bytes(out)


def utf8(text: str) -> bytes:
    """An MQTT UTF-8 string: two length bytes, then the text."""
    raw = text.encode()
    if len(raw) > MAX_PACKET_ID:
        raise ValueError(f"string of {len(raw)} bytes is too long for MQTT (max 65535)")
    return struct.pack("!H", len(raw)) + raw


def packet(first: int, body: bytes) -> bytes:
    """A control packet: first byte, remaining length, body."""
    return bytes([first]) + varint(len(body)) + body


def connect_packet(
    client_id: str,
    *,
    clean_start: bool,
    keepalive_s: int,
    session_expiry_s: int,
    receive_maximum: int,
    will: Will | None = None,
) -> bytes:
    """CONNECT, MQTT v5, with an optional will; no credentials."""
    properties = b""
    if session_expiry_s:
        properties += bytes([SESSION_EXPIRY_INTERVAL]) + struct.pack("!I", session_expiry_s)
    properties += bytes([RECEIVE_MAXIMUM]) + struct.pack("!H", receive_maximum)
    flags = 0x02 if clean_start else 0x00
    tail = b""
    if will is not None:
        if will.qos not in {0, 1}:
            raise ValueError(f"will QoS must be 0 or 1, got {will.qos}")
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0x00)
        # No will properties; then the will topic and its payload (binary data: two length bytes).
        tail = b"\x00" + utf8(will.topic) + struct.pack("!H", len(will.payload)) + will.payload
    body = (
        utf8("MQTT")
        + bytes([5, flags])
        + struct.pack("!H", keepalive_s)
        + varint(len(properties))
        + properties
        + utf8(client_id)
        + tail
    )
    return packet(CONNECT << 4, body)


def subscribe_packet(packet_id: int, filters: Sequence[str], *, qos: int = 1) -> bytes:
    """SUBSCRIBE to `filters` at maximum QoS `qos`, no properties."""
    body = struct.pack("!H", packet_id) + b"\x00"  # no properties
    for topic in filters:
        body += utf8(topic) + bytes([qos])  # no-local 0, retain-as-published 0, retain handling 0
    return packet((SUBSCRIBE << 4) | 0x02, body)


def publish_packet(topic: str, payload: bytes, packet_id: int, *, retain: bool = False) -> bytes:
    """PUBLISH, no properties: at QoS1 with `packet_id`, or at QoS0 when `packet_id` is 0."""
    first = (PUBLISH << 4) | (0x02 if packet_id else 0x00) | (0x01 if retain else 0x00)
    packet_id_field = struct.pack("!H", packet_id) if packet_id else b""
    return packet(first, utf8(topic) + packet_id_field + b"\x00" + payload)


def puback_packets(packet_ids: Sequence[int]) -> bytes:
    """PUBACKs (success, short form) for `packet_ids`, in that order, as one write."""
    return struct.pack("!" + "BBH" * len(packet_ids), *_puback_fields(packet_ids))


def _puback_fields(packet_ids: Sequence[int]) -> list[int]:
    fields: list[int] = []
    for packet_id in packet_ids:
        fields += (PUBACK << 4, 2, packet_id)
    return fields


# --- decoding ---------------------------------------------------------------------------------------


def read_varint(buf: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    """(value, position after it), or None if `buf` ends inside it. Raises on more than 4 bytes."""
    value = 0
    for shift in (0, 7, 14, 21):
        if pos >= len(buf):
            return None
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise MqttWireError("malformed packet: variable byte integer longer than 4 bytes")


def parse_properties(buf: bytes | bytearray, pos: int, end: int) -> tuple[dict[int, int | str], int]:
    """The properties in `buf[pos:end]` by identifier (a user property keeps its value), and the end."""
    head = read_varint(buf, pos)
    if head is None or head[1] + head[0] > end:
        raise MqttWireError("malformed packet: properties run past the packet")
    length, pos = head
    stop = pos + length
    found: dict[int, int | str] = {}
    while pos < stop:
        ident = buf[pos]
        found[ident], pos = _property(ident, buf, pos + 1)
    if pos != stop:
        raise MqttWireError("malformed packet: properties do not add up")
    return found, stop


def parse_publish(first: int, buf: bytes | bytearray, start: int, end: int) -> Incoming:
    """The PUBLISH whose first byte is `first` and whose body is `buf[start:end]`."""
    qos = (first >> 1) & 0x03
    tlen = (buf[start] << 8) | buf[start + 1]
    i = start + 2 + tlen
    if i + (3 if qos else 1) > end:
        raise MqttWireError("malformed packet: PUBLISH header runs past the packet")
    topic = buf[start + 2 : i].decode()
    packet_id = 0
    if qos:
        if qos > 1:
            raise MqttWireError("protocol error: QoS2 PUBLISH on a QoS1 subscription")
        packet_id = (buf[i] << 8) | buf[i + 1]
        i += 2
    plen = buf[i]
    if plen < 0x80:  # noqa: PLR2004 - a one-byte property length (the usual case)
        i += 1 + plen
    else:
        props = read_varint(buf, i)
        if props is None:
            raise MqttWireError("malformed packet: PUBLISH properties")
        i = props[1] + props[0]
    if i > end:
        raise MqttWireError("malformed packet: PUBLISH header runs past the packet")
    return Incoming(topic, bytes(buf[i:end]), packet_id)


def _property(ident: int, buf: bytes | bytearray, pos: int) -> tuple[int | str, int]:
    """The value of property `ident` starting at `pos`, and the position after it."""
    width = _INT_WIDTHS.get(ident)
    if width is not None:
        return int.from_bytes(buf[pos : pos + width], "big"), pos + width
    if ident in _VARINT_PROPS:
        value = read_varint(buf, pos)
        if value is None:
            raise MqttWireError("malformed packet: truncated property")
        return value
    if ident in _STRING_PROPS or ident in _PAIR_PROPS:
        text = ""
        for _ in range(2 if ident in _PAIR_PROPS else 1):
            size = int.from_bytes(buf[pos : pos + 2], "big")
            text = bytes(buf[pos + 2 : pos + 2 + size]).decode(errors="replace")
            pos += 2 + size
        return text, pos
    raise MqttWireError(f"malformed packet: unknown property 0x{ident:02x}")


def _reason_text(code: int, properties: dict[int, int | str]) -> str:
    text = CONNACK_REASONS.get(code, "refused")
    reason = properties.get(REASON_STRING)
    return f"{text} (0x{code:02x}{', ' + str(reason) if reason else ''})"


# --- the connection ---------------------------------------------------------------------------------


class MqttWire(WireProtocol[Incoming]):
    """One MQTT v5 connection. Use `open_mqtt`; then `subscribe`, `puback`, `publish`, `close`.

    `on_messages` is called (synchronously, from the socket read) with every PUBLISH one read brought,
    in receive order. It must not raise; if it does, the connection is closed with that error.
    """

    error = MqttWireError
    peer = "broker"
    batch_name = "received messages"
    malformed = "malformed packet"

    def __init__(self, on_messages: Callable[[list[Incoming]], None], *, keepalive_s: int) -> None:
        super().__init__(on_messages)
        self._keepalive_s = keepalive_s
        self._connack: asyncio.Future[tuple[bool, dict[int, int | str]]] = self._loop.create_future()
        self._subacks: dict[int, asyncio.Future[bytes]] = {}
        self._pubacks: dict[int, asyncio.Future[None]] = {}
        self._next_id = 0
        self.session_present = False

    # -- parsing

    def _parse(self, data: bytes) -> list[Incoming]:
        buf = self._buffer
        buf += data
        size = len(buf)
        pos = 0
        batch: list[Incoming] = []
        while size - pos >= 2:  # noqa: PLR2004 - the smallest packet
            first = buf[pos]
            head = read_varint(buf, pos + 1)
            if head is None:
                break
            length, start = head
            end = start + length
            if end > size:
                break
            kind = first >> 4
            if kind == PUBLISH:
                batch.append(parse_publish(first, buf, start, end))
            else:
                self._control(kind, first, buf, start, end)
            pos = end
        del buf[:pos]
        return batch

    def _control(self, kind: int, first: int, buf: bytearray, start: int, end: int) -> None:
        if kind == PUBACK:
            packet_id = (buf[start] << 8) | buf[start + 1]
            code = buf[start + 2] if end - start > 2 else 0  # noqa: PLR2004 - the short form
            waiter = self._pubacks.pop(packet_id, None)
            if waiter is not None and not waiter.done():
                if code >= SUCCESS_LIMIT:
                    waiter.set_exception(MqttWireError(f"broker refused the publish (reason 0x{code:02x})"))
                else:
                    waiter.set_result(None)
        elif kind == PINGRESP:
            self._pong()
        elif kind == SUBACK:
            packet_id = (buf[start] << 8) | buf[start + 1]
            _, pos = parse_properties(buf, start + 2, end)
            suback = self._subacks.pop(packet_id, None)
            if suback is not None and not suback.done():
                suback.set_result(bytes(buf[pos:end]))
        elif kind == CONNACK:
            self._on_connack(buf, start, end)
        elif kind == DISCONNECT:
            code = buf[start] if end > start else 0
            properties = parse_properties(buf, start + 1, end)[0] if end - start > 1 else {}
            raise MqttWireError(f"broker disconnected us: {_reason_text(code, properties)}")
        else:
            raise MqttWireError(f"protocol error: unexpected packet type {kind} (0x{first:02x})")

    def _on_connack(self, buf: bytearray, start: int, end: int) -> None:
        session_present = bool(buf[start] & 0x01)
        code = buf[start + 1]
        properties, _ = parse_properties(buf, start + 2, end)
        if code >= SUCCESS_LIMIT:
            raise MqttWireError(f"broker refused the connection: {_reason_text(code, properties)}")
        if not self._connack.done():
            self._connack.set_result((session_present, properties))

    # -- failure

    def _take_waiters(self) -> list[asyncio.Future[Any]]:
        waiters: list[asyncio.Future[Any]] = [self._connack, *self._subacks.values(), *self._pubacks.values()]
        self._subacks.clear()
        self._pubacks.clear()
        return waiters

    # -- requests

    def _write(self, data: bytes) -> None:
        if self._transport is None or self.closed.done():
            raise MqttWireError("not connected")
        self._transport.write(data)

    def _packet_id(self, taken: dict[int, asyncio.Future[bytes]] | dict[int, asyncio.Future[None]]) -> int:
        for _ in range(MAX_PACKET_ID):
            self._next_id = self._next_id % MAX_PACKET_ID + 1
            if self._next_id not in taken:
                return self._next_id
        raise MqttWireError("no free packet id")  # pragma: no cover - 65535 publishes in flight

    async def handshake(
        self,
        client_id: str,
        *,
        clean_start: bool,
        session_expiry_s: int,
        receive_maximum: int,
        will: Will | None = None,
    ) -> None:
        """Send CONNECT and wait for a successful CONNACK (then keep the connection alive)."""
        self._write(
            connect_packet(
                client_id,
                clean_start=clean_start,
                keepalive_s=self._keepalive_s,
                session_expiry_s=session_expiry_s,
                receive_maximum=receive_maximum,
                will=will,
            )
        )
        self.session_present, properties = await self._connack
        keepalive = properties.get(SERVER_KEEP_ALIVE)
        if isinstance(keepalive, int):
            self._keepalive_s = keepalive
        if self._keepalive_s:
            self._keep_alive(self._keepalive_s / 2, PINGREQ_PACKET)

    async def subscribe(self, filters: Sequence[str], *, timeout_s: float = 30.0) -> None:
        """Subscribe at QoS1 (maximum); raise `MqttWireError` naming any filter the broker refused.

        A QoS1 message received is acknowledged only when the caller calls `puback`. No SUBACK within
        `timeout_s` is an `MqttWireError` too.
        """
        packet_id = self._packet_id(self._subacks)
        waiter: asyncio.Future[bytes] = self._loop.create_future()
        self._subacks[packet_id] = waiter
        self._write(subscribe_packet(packet_id, filters))
        try:
            async with asyncio.timeout(timeout_s):
                codes = await waiter
        except TimeoutError:
            self._subacks.pop(packet_id, None)
            raise MqttWireError(f"no SUBACK within {timeout_s:g}s") from None
        refused = [
            f"{topic} (0x{code:02x})"
            for topic, code in zip(filters, codes, strict=False)
            if code >= SUCCESS_LIMIT
        ]
        if refused or len(codes) != len(filters):
            raise MqttWireError(f"broker refused subscriptions: {', '.join(refused) or codes.hex()}")

    def pause_reading(self) -> None:
        """Read nothing more until `resume_reading`: the broker keeps what it has not sent."""
        if not self._paused and self._transport is not None and not self.closed.done():
            self._paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        """Read again after `pause_reading`."""
        if self._paused and self._transport is not None and not self.closed.done():
            self._paused = False
            self._transport.resume_reading()

    def puback(self, packet_ids: Sequence[int]) -> None:
        """Acknowledge received QoS1 messages (in the order they were received). No-op once closed."""
        if packet_ids and not self.closed.done() and self._transport is not None:
            self._transport.write(puback_packets(packet_ids))

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Publish at QoS1 and wait for the broker's PUBACK, or at QoS0 (written, nothing to wait for).

        Raises `MqttWireError` if not connected, if the connection fails before the PUBACK, or if the
        broker refuses the message. Wrap it in `asyncio.timeout` to bound the wait.
        """
        if qos == 0:
            self._write(publish_packet(topic, payload, 0, retain=retain))
            return
        if qos != 1:
            raise ValueError(f"QoS must be 0 or 1, got {qos}")
        packet_id = self._packet_id(self._pubacks)
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._pubacks[packet_id] = waiter
        try:
            self._write(publish_packet(topic, payload, packet_id, retain=retain))
        except BaseException:
            self._pubacks.pop(packet_id, None)
            raise
        await waiter

    def close(self) -> None:
        """Say DISCONNECT (the session stays, if persistent) and close the socket."""
        if self._transport is not None and not self._transport.is_closing():
            if not self.closed.done():
                self._transport.write(DISCONNECT_PACKET)
            self._transport.close()
        self._fail(MqttWireError("closed"))


async def open_mqtt(
    host: str,
    port: int,
    *,
    client_id: str,
    on_messages: Callable[[list[Incoming]], None],
    clean_start: bool,
    session_expiry_s: int,
    keepalive_s: int,
    receive_maximum: int,
    will: Will | None = None,
    timeout_s: float = 10.0,
) -> MqttWire:
    """Connect and complete the CONNECT/CONNACK handshake; raise `MqttWireError` saying why not.

    asyncio sets TCP_NODELAY on TCP sockets, so a lone PUBACK is not held back by Nagle's algorithm.
    """
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            _, wire = await loop.create_connection(
                lambda: MqttWire(on_messages, keepalive_s=keepalive_s), host, port
            )
            try:
                await wire.handshake(
                    client_id,
                    clean_start=clean_start,
                    session_expiry_s=session_expiry_s,
                    receive_maximum=receive_maximum,
                    will=will,
                )
            except BaseException:
                wire.close()
                raise
    except TimeoutError:  # (an OSError too: first)
        raise MqttWireError(f"no CONNACK from mqtt://{host}:{port} within {timeout_s:.0f}s") from None
    except OSError as exc:
        raise MqttWireError(f"cannot connect to mqtt://{host}:{port}: {exc.strerror or exc}") from exc
    return wire
