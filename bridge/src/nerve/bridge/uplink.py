"""Uplink: what an MQTT message becomes in JetStream.

`Translator.translate` is pure in what it returns: topic, bytes (and the PUBLISH's user properties and
content type) in, either a `Forward` (subject, body, dedup id) or a `Reject` (the reason, for the
dead-letter stream). It never raises for any input. The body is a CloudEvent in structured mode, in the
codec the bridge stores (`nats.codec`: msgpack or JSON). The topic names the device: an enveloped
message whose `subject` names another device is refused, and an event without a `subject` is stored
with the topic's device as its subject. Everything under the prefix reaches the bridge, so a mistyped
topic is dead-lettered with its reason; commands and presence are `Ignore`d. A reading of a metric with
a range (`bridge.ranges`) outside it is refused.

A message comes in one of the CloudEvents MQTT binding's two content modes: structured (the payload is
the whole event, msgpack or JSON) or, on an events or telemetry topic, binary (MQTT v5: the attributes
are user properties, `specversion` among them, and the payload is the data); a payload that is neither
(`95`, `{"value": 95}`) is a raw reading or event and is wrapped into one.

What a topic of nerve's own scheme says (device, kind, subject, range) is worked out once per topic and
kept in a bounded cache (`bridge.route_cache` topics, 65,536 by default; emptied when full): devices
publish on the same topics again and again, and parsing them was a tenth of the bridge's time. The
cache must hold every topic of the fleet: devices report in turn, so a cache smaller than the fleet's
topics is emptied before any topic comes again, and every message pays for the parse. At 4,096 (the
size before) a fleet of 5,000 devices with 3 metrics did: 125 µs a raw reading instead of 48 µs
(30,000 topics, each translated twice, on this machine), 13 % of the bridge's time at 5,000 readings/s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import msgspec

from nerve.runtime.config.settings import DEFAULT_ROUTE_CACHE
from nerve.runtime.envelope.binary import event_from_binary, is_binary_mode
from nerve.runtime.envelope.codec import (
    DEFAULT_CODEC,
    MODEL_OF_KIND,
    Codec,
    decode,
    encode,
    is_enveloped,
    is_msgpack_map,
    load_document,
    wrap_raw,
)
from nerve.runtime.errors import DecodeError, PayloadTooLarge, TopicError
from nerve.runtime.subjects import Address, Kind, is_token, parse_topic

if TYPE_CHECKING:
    from collections.abc import Collection, Sequence

    from nerve.runtime.config.settings import TopicMapping
    from nerve.runtime.envelope.model import Envelope, Event

UPLINK_KINDS = frozenset({Kind.TELEMETRY, Kind.EVENTS, Kind.RESULTS})
#: Kinds whose messages may come in binary content mode (results are structured: they are signed).
BINARY_KINDS = frozenset({Kind.TELEMETRY, Kind.EVENTS})


class Forward(NamedTuple):
    """Store `body` on `subject`; `msg_id` is the dedup id (the event id).

    `minted`: the message had no id of its own (a raw reading, wrapped): `msg_id` was made here, so a
    redelivery of the same PUBLISH must be given it again (`nerve.bridge.redelivery`). A named tuple
    (immutable, and cheaper to build than a frozen dataclass): one is made per message.
    """

    subject: str
    body: bytes
    msg_id: str
    device: str
    minted: bool = False


@dataclass(frozen=True, slots=True)
class Reject:
    """Dead-letter the message: `reason` says why."""

    reason: str


@dataclass(frozen=True, slots=True)
class Ignore:
    """Acknowledge the message and store nothing: it is not the uplink's (a command, a presence)."""

    reason: str


@dataclass(frozen=True, slots=True)
class _Route:
    """What a valid topic of nerve's scheme says, worked out once: where its messages go and how."""

    address: Address
    model: type[Envelope]
    subject: str
    source: str
    bounds: tuple[float, float] | None


def uplink_filters(
    prefix: str, mappings: Sequence[TopicMapping] = (), *, shared_group: str | None = None
) -> list[str]:
    """The MQTT subscriptions of the uplink: everything under the prefix, then each mapping's foreign topic.

    The whole prefix (`nerve/#`), so that a mistyped topic (`nerve/pi/telemetery/disk`, extra levels, a
    kind in capitals) reaches the bridge and is dead-lettered with a reason instead of being dropped by
    the broker; commands and presence under the prefix are acknowledged and ignored (`Ignore`). One
    filter rather than one per kind: mosquitto sends a message once per matching subscription. With
    `shared_group`, each is a shared subscription (`$share/<group>/...`): mosquitto gives each message to
    one bridge of the group.
    """
    filters = [f"{prefix}/#", *(rule.topic for rule in mappings)]
    if shared_group is not None:
        return [f"$share/{shared_group}/{topic}" for topic in filters]
    return filters


def topic_matches(levels: list[str], topic: list[str]) -> bool:
    """Tell whether an MQTT topic (split in levels) matches a subscription filter (split in levels)."""
    for i, level in enumerate(levels):
        if level == "#":
            return True
        if i >= len(topic) or (level not in {"+", topic[i]}):
            return False
    return len(levels) == len(topic)


def check_range(metric: str, data: object, bounds: tuple[float, float] | None) -> None:
    """Raise `DecodeError` unless the reading lies in `bounds` (None: no range to check).

    The reading is `data` itself when it is a number (binary content mode carries `95.5` as the data),
    or its `value` when it is a map (what raw readings become: `{"value": 95.5}`).
    """
    if bounds is None:
        return
    value = data.get("value") if type(data) is dict or isinstance(data, Mapping) else data
    if isinstance(value, bool) or not isinstance(value, int | float):
        return  # the envelope's own checks say what is wrong with a reading that has no number
    low, high = bounds
    if not low <= value <= high:  # False for NaN too
        raise DecodeError(f"{metric} reading {value!r} is out of range (expected {low:g} to {high:g})")


class Translator:
    """Turns MQTT messages into what the bridge stores, with one session's settings; see `translate`."""

    def __init__(
        self,
        *,
        prefix: str,
        metrics: Collection[str],
        max_payload: int,
        mappings: Sequence[TopicMapping] = (),
        codec: Codec = DEFAULT_CODEC,
        ranges: Mapping[str, tuple[float, float]] | None = None,
        route_cache: int = DEFAULT_ROUTE_CACHE,
    ) -> None:
        self._prefix = prefix
        self._route_cache = route_cache
        self._own_start = f"{prefix}/"
        self._status_levels = prefix.count("/") + 3
        self._metrics = metrics
        self._max_payload = max_payload
        self._mappings = mappings
        self._codec = codec
        self._as_msgpack = codec is Codec.MSGPACK
        self._ranges = ranges or {}
        self._routes: dict[str, _Route | Reject | Ignore] = {}

    def translate(
        self,
        topic: str,
        payload: bytes,
        properties: Sequence[tuple[str, str]] = (),
        content_type: str | None = None,
        *,
        event_id: str | None = None,
    ) -> Forward | Reject | Ignore:
        """What the message on `topic` becomes (encoded with the codec), or the reason it cannot be stored.

        `properties` and `content_type` are the PUBLISH's user properties and Content Type (MQTT v5): with
        a `specversion` among the properties, the message is a CloudEvent in binary content mode.
        `event_id`: the id to give a message that has none of its own (a raw reading) instead of a fresh
        one, i.e. the id its first delivery got. Never raises.
        """
        try:
            if len(payload) > self._max_payload:
                raise PayloadTooLarge(len(payload), self._max_payload)
            if topic.startswith(self._own_start):
                route = self._routes.get(topic)
                if route is None:
                    route = self._route(topic)
                if isinstance(route, _Route):
                    return self._own(route, payload, properties, content_type, event_id)
                return route  # Reject | Ignore: the topic alone decided
            return self._foreign(topic, payload, event_id)
        except (TopicError, DecodeError) as exc:
            return Reject(str(exc))
        except (ValueError, OverflowError, RecursionError, TypeError) as exc:
            # e.g. an integer too large for msgpack: valid JSON, but nothing we can store as an envelope.
            return Reject(f"cannot store this payload: {type(exc).__name__}: {exc}")

    def _route(self, topic: str) -> _Route | Reject | Ignore:
        """Work out what `topic` says (raises `TopicError`); remember it if the topic is a valid one."""
        levels = topic.split("/")
        if len(levels) == self._status_levels and levels[-1] == "status":
            return Ignore("presence")  # not kept: a presence topic's device is not checked
        address = parse_topic(topic, self._prefix)
        route: _Route | Reject | Ignore
        if address.kind is Kind.COMMANDS:
            route = Ignore("a command, on its way down")
        elif address.kind not in UPLINK_KINDS:
            route = Reject(f"{address.kind.value} are not accepted from devices")
        elif address.kind is Kind.TELEMETRY and address.name not in self._metrics:
            route = Reject(
                f"unknown metric {address.name!r} (known: {', '.join(sorted(self._metrics))}; "
                "add it to bridge.metrics)"
            )
        else:
            route = _Route(
                address=address,
                model=MODEL_OF_KIND[address.kind],
                subject=address.subject(self._prefix),
                source=f"mqtt://{topic}",
                bounds=self._ranges.get(address.name) if address.kind is Kind.TELEMETRY else None,
            )
        # Only topics that parsed get here: their levels are tokens, so each key is at most ~200 characters.
        if len(self._routes) >= self._route_cache:
            self._routes.clear()
        self._routes[topic] = route
        return route

    def _own(
        self,
        route: _Route,
        payload: bytes,
        properties: Sequence[tuple[str, str]],
        content_type: str | None,
        event_id: str | None,
    ) -> Forward | Reject:
        """A message on nerve's own scheme: binary mode, enveloped (msgpack or JSON), or raw."""
        address = route.address
        if properties and is_binary_mode(properties):
            if address.kind not in BINARY_KINDS:
                return Reject(
                    f"{address.kind.value} must be structured envelopes, not CloudEvents binary content mode"
                )
            event = event_from_binary(properties, content_type, payload, address, max_size=self._max_payload)
            check_range(address.name, event.data, route.bounds)
            return Forward(route.subject, encode(event, self._codec), event.id, address.device)
        if is_msgpack_map(payload):
            try:
                envelope = decode(payload, route.model, max_size=len(payload))
            except DecodeError:
                if is_enveloped(payload):
                    raise  # a CloudEvent that is not a valid one: the reason names the attribute
                load_document(payload)  # malformed msgpack: DecodeError, saying so
                return Reject("msgpack payloads must be envelopes (with specversion)")
            return self._enveloped(route, payload, envelope, as_msgpack=True)
        if payload.lstrip().startswith(b"{") and is_enveloped(payload):
            envelope = decode(payload, route.model, max_size=len(payload))
            return self._enveloped(route, payload, envelope, as_msgpack=False)
        event = wrap_raw(address, payload, source=route.source)
        if event_id is not None:
            event = msgspec.structs.replace(event, id=event_id)
        check_range(address.name, event.data, route.bounds)
        return Forward(route.subject, encode(event, self._codec), event.id, address.device, True)  # noqa: FBT003

    def _enveloped(self, route: _Route, payload: bytes, envelope: Envelope, *, as_msgpack: bool) -> Forward:
        device = route.address.device
        subject = envelope.subject
        if subject is None:
            # CloudEvents makes `subject` optional; the topic says which device sent it.
            envelope = msgspec.structs.replace(envelope, subject=device)
        elif subject != device:
            raise DecodeError(f"subject {subject!r} names another device than the topic's {device!r}")
        check_range(route.address.name, envelope.data, route.bounds)
        # A valid envelope already in the stored codec goes as it came: no second encode on the hot path.
        if subject is not None and as_msgpack is self._as_msgpack:
            body = payload
        else:
            body = encode(envelope, self._codec)
        return Forward(route.subject, body, envelope.id, device)

    def _foreign(self, topic: str, payload: bytes, event_id: str | None = None) -> Forward | Reject:
        """A third-party topic, brought into the scheme by the first mapping that matches it."""
        levels = topic.split("/")
        rule = next((r for r in self._mappings if topic_matches(r.topic.split("/"), levels)), None)
        if rule is None:
            return Reject(f"topic {topic!r} is outside {self._prefix!r}/ and matches no mapping")
        bounds = self._ranges.get(rule.metric) if rule.kind == "telemetry" else None
        return _mapped(
            rule, topic, payload, prefix=self._prefix, codec=self._codec, bounds=bounds, event_id=event_id
        )


def _mapped(
    rule: TopicMapping,
    topic: str,
    payload: bytes,
    *,
    prefix: str,
    codec: Codec,
    bounds: tuple[float, float] | None,
    event_id: str | None = None,
) -> Forward:
    """Apply a foreign-topic mapping (id: `event_id`, else a fresh one); `DecodeError` names the rule."""
    device = topic.split("/")[rule.device_level - 1]
    if not is_token(device):
        raise DecodeError(
            f"mapping {rule.name!r}: device id {device!r} (level {rule.device_level}) is not valid "
            "(1-64 of A-Z a-z 0-9 _ -)"
        )
    address = Address(device=device, kind=Kind(rule.kind), name=rule.metric)
    if rule.value_field is not None:
        document = _json_object(payload)
        if not isinstance(document, dict) or rule.value_field not in document:
            raise DecodeError(
                f"mapping {rule.name!r}: payload is not a JSON map with field {rule.value_field!r}"
            )
        payload = json.dumps(document[rule.value_field]).encode()
    try:
        event: Event = wrap_raw(address, payload, source=f"mqtt://{topic}")
        if event_id is not None:
            event = msgspec.structs.replace(event, id=event_id)
        check_range(rule.metric, event.data, bounds)
    except DecodeError as exc:
        raise DecodeError(f"mapping {rule.name!r}: {exc.reason}") from None
    return Forward(
        subject=address.subject(prefix),
        body=encode(event, codec),
        msg_id=event.id,
        device=device,
        minted=True,
    )


def translate(
    topic: str,
    payload: bytes,
    *,
    prefix: str,
    metrics: Collection[str],
    max_payload: int,
    mappings: Sequence[TopicMapping] = (),
    codec: Codec = DEFAULT_CODEC,
    ranges: Mapping[str, tuple[float, float]] | None = None,
    properties: Sequence[tuple[str, str]] = (),
    content_type: str | None = None,
) -> Forward | Reject | Ignore:
    """Turn one MQTT message into what the bridge stores (encoded with `codec`), or the reason it cannot.

    `ranges` bounds the `value` of a reading per metric (a reading outside is rejected); `properties`
    and `content_type` are the PUBLISH's (binary content mode). Never raises. For many messages, build
    one `Translator` and call its `translate`: it remembers what each topic says.
    """
    translator = Translator(
        prefix=prefix, metrics=metrics, max_payload=max_payload, mappings=mappings, codec=codec, ranges=ranges
    )
    return translator.translate(topic, payload, properties, content_type)


def _json_object(payload: bytes) -> object:
    """The parsed JSON object if `payload` is one, else None (raw text is handled by `wrap_raw`)."""
    stripped = payload.lstrip()
    if not stripped.startswith(b"{"):
        return None
    try:
        return json.loads(stripped)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
