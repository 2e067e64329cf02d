"""A lean MQTT v5 client: one asyncio `Protocol`, whole batches per read (every part of nerve uses it).

Why not paho/aiomqtt: profiled in the bridge, paho spent ~22% of the bridge's time reading each
PUBLISH (half of it building a v5 `Properties` object per message) and aiomqtt woke the event loop and
re-registered the socket for every PUBACK. This client parses every PUBLISH that one socket read
brought, hands the whole batch to one callback, and writes the PUBACKs of a batch in one write. It does
what nerve needs, and nothing else (it is small too: paho and aiomqtt cost the edge ~5 MiB of RSS):

- CONNECT (clean start or a persistent session with an expiry, a Receive Maximum that bounds how many
  unacknowledged QoS1 messages the broker may send us, our Maximum Packet Size, user name and password,
  an optional will: topic, payload, QoS, retain) and CONNACK; over TCP or TLS (`nerve.runtime.wire.endpoint`);
- SUBSCRIBE/SUBACK (QoS1 maximum, so the broker never sends QoS2; No Local and Retain Handling if asked),
  UNSUBSCRIBE/UNSUBACK (`nerve devices bridge revoke` takes a revoked bridge out of its `$share` group);
- incoming PUBLISH at QoS0/1, with its user properties and content type (the CloudEvents MQTT binary
  mode), acknowledged only when the caller says so (`puback`), in receive order;
- outgoing PUBLISH at QoS1 with a future for its PUBACK (the downlink, the edge's outbox; the broker's
  Receive Maximum from CONNACK is `receive_maximum`, for the caller to keep to), or at QoS0,
  retained or not (the edge's presence), with user properties and a content type if asked;
- keep-alive (PINGREQ/PINGRESP) and DISCONNECT.

It is a security boundary (it reads what a broker sends) and is fuzzed as one: a packet bigger than our
Maximum Packet Size is refused from its header, before it is buffered; a length that runs past its
packet, text that is not UTF-8 or an unknown property ends the connection with the reason. Any protocol
violation, a refused CONNECT or SUBSCRIBE, a broker DISCONNECT or a lost connection ends the connection:
`closed` then holds the reason, and every waiter fails with `MqttWireError`.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple

from nerve.runtime.wire.endpoint import (
    DEFAULT_MAX_PACKET_SIZE,
    DEFAULT_MQTT_PORT,
    MqttEndpoint,
    explain,
    is_tls_error,
    mqtt_endpoint,
)
from nerve.runtime.wire.protocol import WireError, WireProtocol

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from nerve.runtime.wire.endpoint import MqttConnectSettings

__all__ = [
    "DEFAULT_MAX_PACKET_SIZE",
    "DEFAULT_MQTT_PORT",
    "Incoming",
    "MqttRefused",
    "MqttWire",
    "MqttWireError",
    "PacketTooLarge",
    "SessionTakenOver",
    "Will",
    "open_mqtt",
]

#: A subscription's Retain Handling: 0 send retained messages at subscribe, 1 only if new, 2 never.
RetainHandling = Literal[0, 1, 2]

# Packet types (the high nibble of the first byte).
CONNECT: Final = 1
CONNACK: Final = 2
PUBLISH: Final = 3
PUBACK: Final = 4
SUBSCRIBE: Final = 8
SUBACK: Final = 9
UNSUBSCRIBE: Final = 10
UNSUBACK: Final = 11
PINGREQ: Final = 12
PINGRESP: Final = 13
DISCONNECT: Final = 14

PINGREQ_PACKET: Final = b"\xc0\x00"
DISCONNECT_PACKET: Final = b"\xe0\x00"  # normal disconnection, no properties
MAX_PACKET_ID: Final = 0xFFFF
MAX_REMAINING_LENGTH: Final = 268_435_455
SUCCESS_LIMIT: Final = 0x80  # reason codes below this are successes
BAD_USER_NAME_OR_PASSWORD: Final = 0x86
NOT_AUTHORIZED: Final = 0x87
SESSION_TAKEN_OVER: Final = 0x8E
PACKET_TOO_LARGE: Final = 0x95

# Property identifiers used here, and the size class of every property, to skip the ones we ignore.
CONTENT_TYPE: Final = 0x03
SESSION_EXPIRY_INTERVAL: Final = 0x11
SERVER_KEEP_ALIVE: Final = 0x13
REASON_STRING: Final = 0x1F
RECEIVE_MAXIMUM: Final = 0x21
USER_PROPERTY: Final = 0x26
MAXIMUM_PACKET_SIZE: Final = 0x27
_BYTE_PROPS: Final = frozenset({0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A})
_TWO_BYTE_PROPS: Final = frozenset({0x13, 0x21, 0x22, 0x23})
_FOUR_BYTE_PROPS: Final = frozenset({0x02, 0x11, 0x18, 0x27})
_VARINT_PROPS: Final = frozenset({0x0B})
_STRING_PROPS: Final = frozenset({0x03, 0x08, 0x12, 0x15, 0x1A, 0x1C, 0x1F})
_BINARY_PROPS: Final = frozenset({0x09, 0x16})
_INT_WIDTHS: Final = {
    **dict.fromkeys(_BYTE_PROPS, 1),
    **dict.fromkeys(_TWO_BYTE_PROPS, 2),
    **dict.fromkeys(_FOUR_BYTE_PROPS, 4),
}

CONNACK_REASONS: Final = {
    0x80: "unspecified error",
    0x81: "malformed packet",
    0x82: "protocol error",
    0x83: "implementation specific error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x8B: "server shutting down",
    0x8C: "bad authentication method",
    0x8D: "keep alive timeout",
    0x8E: "session taken over",
    0x93: "receive maximum exceeded",
    0x94: "topic alias invalid",
    0x95: "packet too large",
    0x97: "quota exceeded",
    0x98: "administrative action",
    0x99: "payload format invalid",
    0x9C: "use another server",
    0x9D: "server moved",
    0x9F: "connection rate exceeded",
}


class MqttWireError(WireError):
    """The MQTT connection failed, was refused, or the broker broke the protocol."""


class MqttRefused(MqttWireError):
    """The broker refused the CONNECT; `reason_code` is why (0x86: bad user name or password, …)."""

    def __init__(self, message: str, *, reason_code: int) -> None:
        self.reason_code = reason_code
        super().__init__(message)


class SessionTakenOver(MqttWireError):
    """The broker ended our session because another client connected with our client id."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        super().__init__(f"session taken over: another client connected with client id {client_id!r}")


class PacketTooLarge(MqttWireError):
    """The broker sent a packet bigger than our Maximum Packet Size (`mqtt.max_packet_size`)."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"packet too large: the broker sent a packet of {size} bytes, over mqtt.max_packet_size ({limit})"
        )


@dataclass(frozen=True, slots=True)
class Will:
    """The message the broker publishes for us if we vanish without a DISCONNECT (last will)."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


class Incoming(NamedTuple):
    """A PUBLISH from the broker. `packet_id` is 0 at QoS0 (nothing to acknowledge).

    `user_properties` (in the order sent; a name may repeat) and `content_type` are what the publisher
    set, e.g. the CloudEvents attributes of the MQTT binary mode; `retain` is set on a retained message
    sent because we subscribed; `dup` (QoS1 only) when the broker sends again, after a reconnect, a
    message it sent this session before and got no PUBACK for (same packet id). A NamedTuple: built once
    per message, it costs half a frozen dataclass.
    """

    topic: str
    payload: bytes
    packet_id: int
    user_properties: tuple[tuple[str, str], ...] = ()
    content_type: str | None = None
    retain: bool = False
    dup: bool = False


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


def binary(data: bytes) -> bytes:
    """MQTT binary data: two length bytes, then the bytes."""
    if len(data) > MAX_PACKET_ID:
        raise ValueError(f"binary field of {len(data)} bytes is too long for MQTT (max 65535)")
    return struct.pack("!H", len(data)) + data


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
    max_packet_size: int | None = None,
    username: str | None = None,
    password: bytes | None = None,
) -> bytes:
    """CONNECT, MQTT v5, with an optional will, Maximum Packet Size, user name and password."""
    properties = b""
    if session_expiry_s:
        properties += bytes([SESSION_EXPIRY_INTERVAL]) + struct.pack("!I", session_expiry_s)
    properties += bytes([RECEIVE_MAXIMUM]) + struct.pack("!H", receive_maximum)
    if max_packet_size is not None:
        properties += bytes([MAXIMUM_PACKET_SIZE]) + struct.pack("!I", max_packet_size)
    flags = 0x02 if clean_start else 0x00
    tail = b""
    if will is not None:
        if will.qos not in {0, 1}:
            raise ValueError(f"will QoS must be 0 or 1, got {will.qos}")
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0x00)
        # No will properties; then the will topic and its payload (binary data: two length bytes).
        tail = b"\x00" + utf8(will.topic) + binary(will.payload)
    if username is not None:
        flags |= 0x80
        tail += utf8(username)
    if password is not None:
        flags |= 0x40
        tail += binary(password)
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


def subscribe_packet(
    packet_id: int,
    filters: Sequence[str],
    *,
    qos: int = 1,
    no_local: bool = False,
    retain_handling: RetainHandling = 0,
) -> bytes:
    """SUBSCRIBE to `filters` at maximum QoS `qos`, no properties, the same options for each filter.

    Options byte (MQTT v5 3.8.3.1): QoS in bits 0-1, No Local bit 2, Retain As Published bit 3 (always
    0 here), Retain Handling bits 4-5.
    """
    options = bytes([qos | (0x04 if no_local else 0) | (retain_handling << 4)])
    body = struct.pack("!H", packet_id) + b"\x00"  # no properties
    for topic in filters:
        body += utf8(topic) + options
    return packet((SUBSCRIBE << 4) | 0x02, body)


def unsubscribe_packet(packet_id: int, filters: Sequence[str]) -> bytes:
    """UNSUBSCRIBE from `filters`, no properties (MQTT v5 3.10)."""
    body = struct.pack("!H", packet_id) + b"\x00" + b"".join(utf8(topic) for topic in filters)
    return packet((UNSUBSCRIBE << 4) | 0x02, body)


def publish_properties(
    user_properties: Sequence[tuple[str, str]] = (), content_type: str | None = None
) -> bytes:
    """The property block of a PUBLISH (its length first): a content type, then the user properties."""
    properties = b""
    if content_type is not None:
        properties += bytes([CONTENT_TYPE]) + utf8(content_type)
    for name, value in user_properties:
        properties += bytes([USER_PROPERTY]) + utf8(name) + utf8(value)
    return varint(len(properties)) + properties


def publish_packet(
    topic: str, payload: bytes, packet_id: int, *, retain: bool = False, properties: bytes = b"\x00"
) -> bytes:
    """PUBLISH at QoS1 with `packet_id`, or at QoS0 when `packet_id` is 0.

    `properties` is a property block from `publish_properties` (default: none).
    """
    first = (PUBLISH << 4) | (0x02 if packet_id else 0x00) | (0x01 if retain else 0x00)
    packet_id_field = struct.pack("!H", packet_id) if packet_id else b""
    return packet(first, utf8(topic) + packet_id_field + properties + payload)


def puback_packets(packet_ids: Sequence[int]) -> bytes:
    """PUBACKs (success, short form) for `packet_ids`, in that order, as one write."""
    return struct.pack("!" + "BBH" * len(packet_ids), *_puback_fields(packet_ids))


def _puback_fields(packet_ids: Sequence[int]) -> list[int]:
    fields: list[int] = []
    for packet_id in packet_ids:
        fields += (PUBACK << 4, 2, packet_id)
    return fields


# --- decoding ---------------------------------------------------------------------------------------
# Every reader takes the end of what it may read (`stop`): a length that points past it is malformed,
# whatever the buffer holds after it (the next packet, or nothing yet).


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


def _bounded_varint(buf: bytes | bytearray, pos: int, stop: int, what: str) -> tuple[int, int]:
    value = read_varint(buf, pos) if pos < stop else None
    if value is None or value[1] > stop:
        raise MqttWireError(f"malformed packet: {what} runs past the packet")
    return value


def _text(buf: bytes | bytearray, pos: int, stop: int, what: str) -> tuple[str, int]:
    raw, pos = _bytes(buf, pos, stop, what)
    try:
        return raw.decode(), pos
    except UnicodeDecodeError:
        raise MqttWireError(f"malformed packet: {what} is not valid UTF-8") from None


def _bytes(buf: bytes | bytearray, pos: int, stop: int, what: str) -> tuple[bytes, int]:
    if pos + 2 > stop:
        raise MqttWireError(f"malformed packet: {what} runs past the packet")
    after = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
    if after > stop:
        raise MqttWireError(f"malformed packet: {what} runs past the packet")
    return bytes(buf[pos + 2 : after]), after


class Properties(NamedTuple):
    """A property block: single properties by identifier, the user properties in order, and its end."""

    single: dict[int, int | str | bytes]
    user: list[tuple[str, str]]
    end: int


def read_properties(buf: bytes | bytearray, pos: int, end: int) -> Properties:
    """The property block (its length first) at `buf[pos:]`, which must end by `end`."""
    length, pos = _bounded_varint(buf, pos, end, "properties")
    stop = pos + length
    if stop > end:
        raise MqttWireError("malformed packet: properties run past the packet")
    single: dict[int, int | str | bytes] = {}
    user: list[tuple[str, str]] = []
    while pos < stop:
        ident = buf[pos]
        pos += 1
        width = _INT_WIDTHS.get(ident)
        value: int | str | bytes
        if width is not None:
            if pos + width > stop:
                raise MqttWireError(f"malformed packet: property 0x{ident:02x} runs past the properties")
            value, pos = int.from_bytes(buf[pos : pos + width], "big"), pos + width
        elif ident == USER_PROPERTY:
            name, pos = _text(buf, pos, stop, "user property")
            text, pos = _text(buf, pos, stop, "user property")
            user.append((name, text))
            continue
        elif ident in _STRING_PROPS:
            value, pos = _text(buf, pos, stop, f"property 0x{ident:02x}")
        elif ident in _BINARY_PROPS:
            value, pos = _bytes(buf, pos, stop, f"property 0x{ident:02x}")
        elif ident in _VARINT_PROPS:
            value, pos = _bounded_varint(buf, pos, stop, f"property 0x{ident:02x}")
        else:
            raise MqttWireError(f"malformed packet: unknown property 0x{ident:02x}")
        if ident in single and ident not in _VARINT_PROPS:  # (subscription identifiers may repeat)
            raise MqttWireError(f"protocol error: property 0x{ident:02x} twice")
        single[ident] = value
    return Properties(single, user, stop)


def parse_properties(buf: bytes | bytearray, pos: int, end: int) -> tuple[dict[int, int | str | bytes], int]:
    """The single properties in the block at `buf[pos:]` (which must end by `end`), and where it ends."""
    found = read_properties(buf, pos, end)
    return found.single, found.end


def parse_publish(first: int, buf: bytes | bytearray, start: int, end: int) -> Incoming:
    """The PUBLISH whose first byte is `first` and whose body is `buf[start:end]`."""
    qos = (first >> 1) & 0x03
    if start + 2 > end:
        raise MqttWireError("malformed packet: PUBLISH header runs past the packet")
    i = start + 2 + ((buf[start] << 8) | buf[start + 1])
    if i + (3 if qos else 1) > end:
        raise MqttWireError("malformed packet: PUBLISH header runs past the packet")
    topic = buf[start + 2 : i].decode()
    packet_id = 0
    if qos:
        if qos > 1:
            raise MqttWireError("protocol error: QoS2 PUBLISH on a QoS1 subscription")
        packet_id = (buf[i] << 8) | buf[i + 1]
        i += 2
    if not buf[i] and not first & 0x09:  # no properties, not retained, not DUP: the usual case
        return Incoming(topic, bytes(buf[i + 1 : end]), packet_id)
    properties = read_properties(buf, i, end)
    content_type = properties.single.get(CONTENT_TYPE)
    return Incoming(
        topic,
        bytes(buf[properties.end : end]),
        packet_id,
        tuple(properties.user),
        content_type if isinstance(content_type, str) else None,
        bool(first & 0x01),
        bool(qos and first & 0x08),  # DUP means nothing at QoS0 (MQTT v5 3.3.1.1)
    )


def _reason_text(code: int, properties: dict[int, int | str | bytes]) -> str:
    text = CONNACK_REASONS.get(code, "refused")
    reason = properties.get(REASON_STRING)
    return f"{text} (0x{code:02x}{', ' + str(reason) if reason else ''})"


# --- the connection ---------------------------------------------------------------------------------


class MqttWire(WireProtocol[Incoming]):
    """One MQTT v5 connection. Use `open_mqtt`; then `subscribe`, `puback`, `publish`, `close`.

    `on_messages` is called (synchronously, from the socket read) with every PUBLISH one read brought,
    in receive order. It must not raise; if it does, the connection is closed with that error. A packet
    over `max_packet_size` bytes ends the connection (`PacketTooLarge`) before it is buffered: the
    buffer never holds more than that plus one socket read.
    """

    error = MqttWireError
    peer = "broker"
    batch_name = "received messages"
    malformed = "malformed packet"

    def __init__(
        self,
        on_messages: Callable[[list[Incoming]], None],
        *,
        keepalive_s: int,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        endpoint: MqttEndpoint | None = None,
        on_connack: Callable[[bool], None] | None = None,
    ) -> None:
        super().__init__(on_messages)
        self._on_connack_hook = on_connack
        self._keepalive_s = keepalive_s
        self._max_packet_size = max_packet_size
        self._endpoint = endpoint
        self._client_id = ""
        self._connack: asyncio.Future[tuple[bool, dict[int, int | str | bytes]]] = self._loop.create_future()
        self._subacks: dict[int, asyncio.Future[bytes]] = {}
        self._pubacks: dict[int, asyncio.Future[None]] = {}
        self._next_id = 0
        self._broker_max_packet_size = MAX_REMAINING_LENGTH + 5
        #: How many QoS1 publishes the broker takes unacknowledged at once (its CONNACK's Receive
        #: Maximum; 65535 when it sets none). Exceeding it is a protocol error the broker disconnects for.
        self.receive_maximum = MAX_PACKET_ID
        self.session_present = False
        self.lost: Exception | None = None
        self._gone = asyncio.Event()  # the transport is closed: connection_lost was called

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
            if end - pos > self._max_packet_size:
                self._refuse(PACKET_TOO_LARGE)
                raise PacketTooLarge(end - pos, self._max_packet_size)
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

    def _refuse(self, code: int) -> None:
        # Best effort: the connection is aborted right after, which may drop this DISCONNECT unsent.
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(bytes([DISCONNECT << 4, 2, code, 0]))

    def _control(self, kind: int, first: int, buf: bytearray, start: int, end: int) -> None:
        if kind == PUBACK:
            self._on_puback(buf, start, end)
        elif kind == PINGRESP:
            self._pong()
        elif kind in {SUBACK, UNSUBACK}:  # the same layout: packet id, properties, one reason code a filter
            self._on_suback(buf, start, end)
        elif kind == CONNACK:
            self._on_connack(buf, start, end)
        elif kind == DISCONNECT:
            code = buf[start] if end > start else 0
            properties = read_properties(buf, start + 1, end).single if end - start > 1 else {}
            if code == SESSION_TAKEN_OVER:
                raise SessionTakenOver(self._client_id)
            raise MqttWireError(f"broker disconnected us: {_reason_text(code, properties)}")
        else:
            raise MqttWireError(f"protocol error: unexpected packet type {kind} (0x{first:02x})")

    def _on_puback(self, buf: bytearray, start: int, end: int) -> None:
        if end - start < 2:  # noqa: PLR2004 - a packet id
            raise MqttWireError("malformed packet: PUBACK without a packet id")
        packet_id = (buf[start] << 8) | buf[start + 1]
        code = buf[start + 2] if end - start > 2 else 0  # noqa: PLR2004 - the short form
        waiter = self._pubacks.pop(packet_id, None)
        if waiter is not None and not waiter.done():
            if code >= SUCCESS_LIMIT:
                reason = CONNACK_REASONS.get(code, "refused")
                waiter.set_exception(MqttWireError(f"broker refused the publish: {reason} (0x{code:02x})"))
            else:
                waiter.set_result(None)

    def _on_suback(self, buf: bytearray, start: int, end: int) -> None:
        if end - start < 3:  # noqa: PLR2004 - a packet id and properties
            raise MqttWireError("malformed packet: SUBACK too short")
        packet_id = (buf[start] << 8) | buf[start + 1]
        pos = read_properties(buf, start + 2, end).end
        suback = self._subacks.pop(packet_id, None)
        if suback is not None and not suback.done():
            suback.set_result(bytes(buf[pos:end]))

    def _on_connack(self, buf: bytearray, start: int, end: int) -> None:
        if end - start < 3:  # noqa: PLR2004 - flags, reason code, properties
            raise MqttWireError("malformed packet: CONNACK too short")
        session_present = bool(buf[start] & 0x01)
        code = buf[start + 1]
        properties = read_properties(buf, start + 2, end).single
        if code >= SUCCESS_LIMIT:
            raise MqttRefused(
                f"broker refused the connection: {_reason_text(code, properties)}", reason_code=code
            )
        limit = properties.get(MAXIMUM_PACKET_SIZE)
        if isinstance(limit, int) and limit:
            self._broker_max_packet_size = limit
        receive_maximum = properties.get(RECEIVE_MAXIMUM)
        if isinstance(receive_maximum, int) and receive_maximum:
            self.receive_maximum = receive_maximum
        self.session_present = session_present
        if self._on_connack_hook is not None:
            # Before any PUBLISH of the session is handed over (they follow in this read or later).
            self._on_connack_hook(session_present)
        if not self._connack.done():
            self._connack.set_result((session_present, properties))

    # -- failure

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail every waiter and `closed` with the reason (a TLS alert, a reset…) in one line."""
        self.lost = exc
        self._gone.set()
        if is_tls_error(exc) and exc is not None and self._endpoint is not None:  # a TLS alert: say which
            self._fail(MqttWireError(f"connection lost: {explain(exc, self._endpoint)}"))
        elif exc is None and self._connack.done():
            # mosquitto before 2.0.15 says nothing when another client takes our session over, nor when
            # a reload (SIGHUP) finds our login gone from its password file (`nerve devices revoke`).
            self._fail(
                MqttWireError(
                    "connection closed by the broker without a reason (another client connected with "
                    f"client id {self._client_id!r}, or our login was revoked?)"
                )
            )
        else:
            super().connection_lost(exc)

    def _take_waiters(self) -> list[asyncio.Future[Any]]:
        waiters: list[asyncio.Future[Any]] = [self._connack, *self._subacks.values(), *self._pubacks.values()]
        self._subacks.clear()
        self._pubacks.clear()
        return waiters

    # -- requests

    def _write(self, data: bytes) -> None:
        # A transport closing (a send failed: asyncio tells `connection_lost` a loop turn later) takes
        # nothing more: a write then is lost all the same, and asyncio logs a warning for each.
        if self._transport is None or self.closed.done() or self._transport.is_closing():
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
        username: str | None = None,
        password: bytes | None = None,
    ) -> None:
        """Send CONNECT and wait for a successful CONNACK (then keep the connection alive).

        Raises `MqttRefused` (with the broker's reason) or `MqttWireError`; wrap it in a timeout.
        """
        self._client_id = client_id
        self._write(
            connect_packet(
                client_id,
                clean_start=clean_start,
                keepalive_s=self._keepalive_s,
                session_expiry_s=session_expiry_s,
                receive_maximum=receive_maximum,
                will=will,
                max_packet_size=self._max_packet_size,
                username=username,
                password=password,
            )
        )
        self.session_present, properties = await self._connack
        keepalive = properties.get(SERVER_KEEP_ALIVE)
        if isinstance(keepalive, int):
            self._keepalive_s = keepalive
        if self._keepalive_s:
            self._keep_alive(self._keepalive_s / 2, PINGREQ_PACKET)

    async def subscribe(
        self,
        filters: Sequence[str],
        *,
        timeout_s: float = 30.0,
        no_local: bool = False,
        retain_handling: RetainHandling = 0,
    ) -> None:
        """Subscribe at QoS1 (maximum); raise `MqttWireError` naming any filter the broker refused.

        A QoS1 message received is acknowledged only when the caller calls `puback`. No SUBACK within
        `timeout_s` is an `MqttWireError` too. `no_local`: the broker does not send us back what we
        publish ourselves (not allowed on a shared `$share/...` filter: `ValueError`). `retain_handling`:
        0 sends the retained messages that match at every subscribe, 1 only when the subscription is
        new, 2 never (what is published from now on still comes).
        """
        if no_local and any(topic.startswith("$share/") for topic in filters):
            raise ValueError(
                "no_local cannot be set on a shared subscription ($share/...): MQTT v5 forbids it"
            )
        if retain_handling not in {0, 1, 2}:
            raise ValueError(f"retain_handling must be 0, 1 or 2, not {retain_handling!r}")
        await self._acknowledged(
            lambda packet_id: subscribe_packet(
                packet_id, filters, no_local=no_local, retain_handling=retain_handling
            ),
            filters,
            ack="SUBACK",
            refused="broker refused subscriptions",
            timeout_s=timeout_s,
        )

    async def unsubscribe(self, filters: Sequence[str], *, timeout_s: float = 30.0) -> None:
        """Unsubscribe from `filters` (one that was not subscribed is no error: UNSUBACK 0x11).

        Raises `MqttWireError` naming a filter the broker refused, or if no UNSUBACK came within `timeout_s`.
        """
        await self._acknowledged(
            lambda packet_id: unsubscribe_packet(packet_id, filters),
            filters,
            ack="UNSUBACK",
            refused="broker refused to unsubscribe",
            timeout_s=timeout_s,
        )

    async def _acknowledged(
        self,
        packet: Callable[[int], bytes],
        filters: Sequence[str],
        *,
        ack: str,
        refused: str,
        timeout_s: float,
    ) -> None:
        """Send `packet(packet_id)` and wait for its SUBACK or UNSUBACK (they share the packet ids' map).

        Raises `MqttWireError` naming each filter whose reason code is a refusal, or if no answer came
        within `timeout_s`.
        """
        packet_id = self._packet_id(self._subacks)
        waiter: asyncio.Future[bytes] = self._loop.create_future()
        self._subacks[packet_id] = waiter
        self._write(packet(packet_id))
        try:
            async with asyncio.timeout(timeout_s):
                codes = await waiter
        except TimeoutError:
            self._subacks.pop(packet_id, None)
            raise MqttWireError(f"no {ack} within {timeout_s:g}s") from None
        named = [
            f"{topic} ({CONNACK_REASONS.get(code, 'refused')}, 0x{code:02x})"
            for topic, code in zip(filters, codes, strict=False)
            if code >= SUCCESS_LIMIT
        ]
        if named or len(codes) != len(filters):
            raise MqttWireError(f"{refused}: {', '.join(named) or codes.hex()}")

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
        if packet_ids and not self.closed.done() and self._transport and not self._transport.is_closing():
            self._transport.write(puback_packets(packet_ids))

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        user_properties: Sequence[tuple[str, str]] = (),
        content_type: str | None = None,
    ) -> None:
        """Publish at QoS1 and wait for the broker's PUBACK, or at QoS0 (written, nothing to wait for).

        `user_properties` and `content_type` go with the message (MQTT v5 properties). Raises
        `MqttWireError` if not connected, if the packet is over the broker's Maximum Packet Size, if
        the connection fails before the PUBACK, or if the broker refuses the message; `ValueError` for
        a QoS other than 0 or 1 or a field over 65535 bytes. Wrap it in `asyncio.timeout` to bound the wait.
        """
        if qos not in {0, 1}:
            raise ValueError(f"QoS must be 0 or 1, got {qos}")
        properties = (
            publish_properties(user_properties, content_type) if user_properties or content_type else b"\x00"
        )
        if qos == 0:
            self._write(
                self._checked(publish_packet(topic, payload, 0, retain=retain, properties=properties))
            )
            return
        await self.publish_nowait(topic, payload, retain=retain, properties=properties)

    def publish_nowait(
        self, topic: str, payload: bytes, *, retain: bool = False, properties: bytes = b"\x00"
    ) -> asyncio.Future[None]:
        """Write a QoS1 PUBLISH now; return the future of its PUBACK (what `publish` awaits).

        For a caller that must not wait a loop iteration to send (the bridge's downlink), or that keeps
        many publishes in flight without a task each (`nerve simulate`), within `receive_maximum`. The future
        fails with `MqttWireError` as `publish` would; the PUBLISH is written before this returns, or
        `MqttWireError` (not connected, over the broker's Maximum Packet Size) is raised.
        """
        packet_id = self._packet_id(self._pubacks)
        data = self._checked(publish_packet(topic, payload, packet_id, retain=retain, properties=properties))
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._pubacks[packet_id] = waiter
        try:
            self._write(data)
        except BaseException:
            self._pubacks.pop(packet_id, None)
            raise
        return waiter

    def _checked(self, data: bytes) -> bytes:
        if len(data) > self._broker_max_packet_size:
            raise MqttWireError(
                f"publish of {len(data)} bytes is over the broker's maximum packet size "
                f"({self._broker_max_packet_size})"
            )
        return data

    def close(self) -> None:
        """Say DISCONNECT (the session stays, if persistent) and close the socket."""
        if self._transport is not None and not self._transport.is_closing():
            if not self.closed.done():
                self._transport.write(DISCONNECT_PACKET)
            self._transport.close()
        self._fail(MqttWireError("closed"))

    async def wait_closed(self, timeout_s: float = 1.0) -> None:
        """Wait until the socket is closed after `close` (over TLS, after the TLS shutdown); else abort it.

        A loop about to end must wait for it (the bridge's downlink, in a thread of its own): over TLS,
        `close` only starts the TLS shutdown, and a loop closed before it completes leaves the socket open.
        """
        if self._transport is None:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await self._gone.wait()
        except TimeoutError:
            self._transport.abort()


async def open_mqtt(
    settings: MqttConnectSettings,
    *,
    client_id: str,
    on_messages: Callable[[list[Incoming]], None],
    clean_start: bool,
    session_expiry_s: int,
    receive_maximum: int,
    will: Will | None = None,
    timeout_s: float = 10.0,
    on_connack: Callable[[bool], None] | None = None,
) -> MqttWire:
    """Connect to the broker of `settings` (TCP or TLS, credentials) and complete CONNECT/CONNACK.

    `on_connack` is called with the CONNACK's Session Present flag before `on_messages` gets any message
    of the session (a resumed session's messages may come in the same read as the CONNACK).

    The keep-alive and Maximum Packet Size come from `settings` too. Raises `MqttWireError` with one
    line saying why not (`MqttRefused` when the broker refused the CONNECT: bad user name or
    password, not authorized…), or `ConfigError` when a certificate, key or password file cannot be
    used. asyncio sets TCP_NODELAY on TCP sockets, so a lone PUBACK is not held back by Nagle's algorithm.
    """
    endpoint = mqtt_endpoint(settings)
    loop = asyncio.get_running_loop()

    def protocol() -> MqttWire:
        return MqttWire(
            on_messages,
            keepalive_s=settings.keepalive_s,
            max_packet_size=settings.max_packet_size,
            endpoint=endpoint,
            on_connack=on_connack,
        )

    try:
        async with asyncio.timeout(timeout_s):
            _, wire = await loop.create_connection(
                protocol,
                endpoint.host,
                endpoint.port,
                ssl=endpoint.tls,
                ssl_handshake_timeout=timeout_s if endpoint.tls else None,
            )
            try:
                await wire.handshake(
                    client_id,
                    clean_start=clean_start,
                    session_expiry_s=session_expiry_s,
                    receive_maximum=receive_maximum,
                    will=will,
                    username=endpoint.username,
                    password=endpoint.password,
                )
            except MqttRefused as exc:
                wire.close()
                raise MqttRefused(_refused(exc, endpoint), reason_code=exc.reason_code) from None
            except MqttWireError as exc:
                wire.close()
                raise MqttWireError(_before_connack(exc, wire.lost, endpoint)) from None
            except BaseException:
                wire.close()
                raise
    except TimeoutError:  # (an OSError too: first)
        raise MqttWireError(f"no CONNACK from {endpoint.shown} within {timeout_s:g}s") from None
    except OSError as exc:  # refused, reset, unreachable, a name that does not resolve, a TLS failure
        closed = isinstance(exc, ConnectionResetError | BrokenPipeError) or is_tls_error(exc, "SSLEOFError")
        if closed and endpoint.uses_tls:
            raise MqttWireError(
                f"TLS to {endpoint.shown}: the broker closed the connection during the TLS handshake "
                "(not a TLS listener? then use mqtt://)"
            ) from None
        raise MqttWireError(explain(exc, endpoint)) from None
    return wire


def _refused(exc: MqttRefused, endpoint: MqttEndpoint) -> str:
    """The broker's reason, and what to check (mosquitto says "not authorized" for a wrong password too)."""
    if exc.reason_code not in {NOT_AUTHORIZED, BAD_USER_NAME_OR_PASSWORD}:
        return f"{endpoint.shown}: {exc}"
    if endpoint.username is None:
        hint = "it wants a login: set mqtt.username and mqtt.password_file, or a client certificate"
    else:
        hint = f"check the user name {endpoint.username!r} and its password, and the broker's ACL"
    return f"{endpoint.shown}: {exc}: {hint}"


def _before_connack(exc: MqttWireError, lost: Exception | None, endpoint: MqttEndpoint) -> str:
    """What a connection that ended before its CONNACK means."""
    if lost is not None and not isinstance(lost, ConnectionResetError | BrokenPipeError):
        return str(exc)  # a TLS failure or the like, explained already
    if lost is None and str(exc) != "connection closed by the broker":
        return f"{endpoint.shown}: {exc}"  # a protocol error
    if not endpoint.uses_tls:
        hint = "a TLS listener? then use mqtts://"
    elif not endpoint.client_certificate:
        hint = "does it want a client certificate? set mqtt.cert_file and mqtt.key_file"
    else:
        hint = "did it refuse our client certificate? see its log"
    return f"{endpoint.shown}: the broker closed the connection before its CONNACK ({hint})"
