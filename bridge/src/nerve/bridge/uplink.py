"""Uplink: what an MQTT message becomes in JetStream.

`translate` is pure: topic and bytes in, either a `Forward` (subject, body, dedup id) or a `Reject`
(the reason, for the dead-letter stream). It never raises for any input. The body is a CloudEvent in
structured mode, in the codec the bridge stores (`nats.codec`: msgpack or JSON). The topic names the
device: an enveloped message whose `subject` names another device is refused, and an event without a
`subject` is stored with the topic's device as its subject. Everything under the prefix reaches the
bridge, so a mistyped topic is dead-lettered with its reason; commands and presence are `Ignore`d. A reading
of a metric with a range (`bridge.ranges`) outside it is refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

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

UPLINK_KINDS = frozenset({Kind.TELEMETRY, Kind.EVENTS, Kind.RESULTS})


@dataclass(frozen=True, slots=True)
class Forward:
    """Store `body` on `subject`; `msg_id` is the dedup id (the event id)."""

    subject: str
    body: bytes
    msg_id: str
    device: str


@dataclass(frozen=True, slots=True)
class Reject:
    """Dead-letter the message: `reason` says why."""

    reason: str


@dataclass(frozen=True, slots=True)
class Ignore:
    """Acknowledge the message and store nothing: it is not the uplink's (a command, a presence)."""

    reason: str


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


def _mapped(
    rule: TopicMapping, topic: str, payload: bytes, *, codec: Codec, bounds: tuple[float, float] | None
) -> Forward:
    """Apply a foreign-topic mapping; raise `DecodeError` naming the rule."""
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
        event = wrap_raw(address, payload, source=f"mqtt://{topic}")
        check_range(rule.metric, event.data, bounds)
    except DecodeError as exc:
        raise DecodeError(f"mapping {rule.name!r}: {exc.reason}") from None
    return Forward(subject="", body=encode(event, codec), msg_id=event.id, device=device)


def check_range(metric: str, data: object, bounds: tuple[float, float] | None) -> None:
    """Raise `DecodeError` unless the reading's `value` lies in `bounds` (None: no range to check)."""
    if bounds is None or not isinstance(data, Mapping):
        return
    value = data.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return  # the envelope's own checks say what is wrong with a reading that has no number
    low, high = bounds
    if not low <= value <= high:  # False for NaN too
        raise DecodeError(f"{metric} reading {value!r} is out of range (expected {low:g} to {high:g})")


def _enveloped(
    address: Address,
    payload: bytes,
    *,
    as_msgpack: bool,
    codec: Codec,
    bounds: tuple[float, float] | None = None,
) -> Forward:
    envelope = decode(payload, MODEL_OF_KIND[address.kind], max_size=len(payload))
    subject = envelope.subject
    if subject is None:
        # CloudEvents makes `subject` optional; the topic says which device sent it.
        envelope = msgspec.structs.replace(envelope, subject=address.device)
    elif subject != address.device:
        raise DecodeError(f"subject {subject!r} names another device than the topic's {address.device!r}")
    check_range(address.name, envelope.data, bounds)
    # A valid envelope already in the stored codec goes as it came: no second encode on the hot path.
    if subject is not None and as_msgpack is (codec is Codec.MSGPACK):
        body = payload
    else:
        body = encode(envelope, codec)
    return Forward(subject="", body=body, msg_id=envelope.id, device=address.device)


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
) -> Forward | Reject | Ignore:
    """Turn an MQTT message into what the bridge stores (encoded with `codec`), or the reason it cannot.

    `ranges` bounds the `value` of a reading per metric (a reading outside is rejected). Never raises.
    """
    try:
        if len(payload) > max_payload:
            raise PayloadTooLarge(len(payload), max_payload)
        if topic.startswith(f"{prefix}/"):
            return _own(topic, payload, prefix=prefix, metrics=metrics, codec=codec, ranges=ranges or {})
        return _foreign(topic, payload, prefix=prefix, mappings=mappings, codec=codec, ranges=ranges or {})
    except (TopicError, DecodeError) as exc:
        return Reject(str(exc))
    except (ValueError, OverflowError, RecursionError, TypeError) as exc:
        # e.g. an integer too large for msgpack: valid JSON, but nothing we can store as an envelope.
        return Reject(f"cannot store this payload: {type(exc).__name__}: {exc}")


def _own(
    topic: str,
    payload: bytes,
    *,
    prefix: str,
    metrics: Collection[str],
    codec: Codec,
    ranges: Mapping[str, tuple[float, float]],
) -> Forward | Reject | Ignore:
    """A message on nerve's own scheme: enveloped (msgpack or JSON) or raw."""
    levels = topic.split("/")
    if len(levels) == prefix.count("/") + 3 and levels[-1] == "status":
        return Ignore("presence")
    address = parse_topic(topic, prefix)
    if address.kind is Kind.COMMANDS:
        return Ignore("a command, on its way down")
    if address.kind not in UPLINK_KINDS:
        return Reject(f"{address.kind.value} are not accepted from devices")
    if address.kind is Kind.TELEMETRY and address.name not in metrics:
        return Reject(
            f"unknown metric {address.name!r} (known: {', '.join(sorted(metrics))}; add it to bridge.metrics)"
        )
    bounds = ranges.get(address.name) if address.kind is Kind.TELEMETRY else None
    if is_msgpack_map(payload):
        if not is_enveloped(payload):
            load_document(payload)  # malformed msgpack: DecodeError, saying so
            return Reject("msgpack payloads must be envelopes (with specversion)")
        forward = _enveloped(address, payload, as_msgpack=True, codec=codec, bounds=bounds)
    elif payload.lstrip().startswith(b"{") and is_enveloped(payload):
        forward = _enveloped(address, payload, as_msgpack=False, codec=codec, bounds=bounds)
    else:
        event = wrap_raw(address, payload, source=f"mqtt://{topic}")
        check_range(address.name, event.data, bounds)
        forward = Forward(subject="", body=encode(event, codec), msg_id=event.id, device=address.device)
    return Forward(
        subject=address.subject(prefix), body=forward.body, msg_id=forward.msg_id, device=forward.device
    )


def _foreign(
    topic: str,
    payload: bytes,
    *,
    prefix: str,
    mappings: Sequence[TopicMapping],
    codec: Codec,
    ranges: Mapping[str, tuple[float, float]],
) -> Forward | Reject:
    """A third-party topic, brought into the scheme by the first mapping that matches it."""
    levels = topic.split("/")
    rule = next((r for r in mappings if topic_matches(r.topic.split("/"), levels)), None)
    if rule is None:
        return Reject(f"topic {topic!r} is outside {prefix!r}/ and matches no mapping")
    bounds = ranges.get(rule.metric) if rule.kind == "telemetry" else None
    mapped = _mapped(rule, topic, payload, codec=codec, bounds=bounds)
    subject = Address(mapped.device, Kind(rule.kind), rule.metric).subject(prefix)
    return Forward(subject=subject, body=mapped.body, msg_id=mapped.msg_id, device=mapped.device)


def _json_object(payload: bytes) -> object:
    """The parsed JSON object if `payload` is one, else None (raw text is handled by `wrap_raw`)."""
    stripped = payload.lstrip()
    if not stripped.startswith(b"{"):
        return None
    try:
        return json.loads(stripped)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
