"""Uplink: what an MQTT message becomes in JetStream.

`translate` is pure: topic and bytes in, either a `Forward` (subject, body, dedup id) or a `Reject`
(the reason, for the dead-letter stream). It never raises for any input. The body is a CloudEvent in
structured mode, in the codec the bridge stores (`nats.codec`: msgpack or JSON). The topic names the
device: an enveloped message whose `subject` names another device is refused, and an event without a
`subject` is stored with the topic's device as its subject.
"""

from __future__ import annotations

import json
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


def uplink_filters(
    prefix: str, mappings: Sequence[TopicMapping] = (), *, shared_group: str | None = None
) -> list[str]:
    """The MQTT subscriptions of the uplink: nerve's own topics, then each mapping's foreign topic.

    `#` rather than `+` after the kind, so a topic with extra levels reaches the bridge and is
    dead-lettered with a reason instead of being ignored by the broker. With `shared_group`, each is a
    shared subscription (`$share/<group>/...`): mosquitto gives each message to one bridge of the group.
    """
    filters = [f"{prefix}/+/{kind.value}/#" for kind in sorted(UPLINK_KINDS)] + [
        rule.topic for rule in mappings
    ]
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


def _mapped(rule: TopicMapping, topic: str, payload: bytes, codec: Codec) -> Forward:
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
    except DecodeError as exc:
        raise DecodeError(f"mapping {rule.name!r}: {exc.reason}") from None
    return Forward(subject="", body=encode(event, codec), msg_id=event.id, device=device)


def _enveloped(address: Address, payload: bytes, *, as_msgpack: bool, codec: Codec) -> Forward:
    envelope = decode(payload, MODEL_OF_KIND[address.kind], max_size=len(payload))
    subject = envelope.subject
    if subject is None:
        # CloudEvents makes `subject` optional; the topic says which device sent it.
        envelope = msgspec.structs.replace(envelope, subject=address.device)
    elif subject != address.device:
        raise DecodeError(f"subject {subject!r} names another device than the topic's {address.device!r}")
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
) -> Forward | Reject:
    """Turn an MQTT message into what the bridge stores (encoded with `codec`), or the reason it cannot.

    Never raises.
    """
    try:
        if len(payload) > max_payload:
            raise PayloadTooLarge(len(payload), max_payload)
        if topic.startswith(f"{prefix}/"):
            return _own(topic, payload, prefix=prefix, metrics=metrics, codec=codec)
        return _foreign(topic, payload, prefix=prefix, mappings=mappings, codec=codec)
    except (TopicError, DecodeError) as exc:
        return Reject(str(exc))
    except (ValueError, OverflowError, RecursionError, TypeError) as exc:
        # e.g. an integer too large for msgpack: valid JSON, but nothing we can store as an envelope.
        return Reject(f"cannot store this payload: {type(exc).__name__}: {exc}")


def _own(
    topic: str, payload: bytes, *, prefix: str, metrics: Collection[str], codec: Codec
) -> Forward | Reject:
    """A message on nerve's own scheme: enveloped (msgpack or JSON) or raw."""
    address = parse_topic(topic, prefix)
    if address.kind not in UPLINK_KINDS:
        return Reject(f"{address.kind.value} are not accepted from devices")
    if address.kind is Kind.TELEMETRY and address.name not in metrics:
        return Reject(
            f"unknown metric {address.name!r} (known: {', '.join(sorted(metrics))}; add it to bridge.metrics)"
        )
    if is_msgpack_map(payload):
        if not is_enveloped(payload):
            load_document(payload)  # malformed msgpack: DecodeError, saying so
            return Reject("msgpack payloads must be envelopes (with specversion)")
        forward = _enveloped(address, payload, as_msgpack=True, codec=codec)
    elif payload.lstrip().startswith(b"{") and is_enveloped(payload):
        forward = _enveloped(address, payload, as_msgpack=False, codec=codec)
    else:
        event = wrap_raw(address, payload, source=f"mqtt://{topic}")
        forward = Forward(subject="", body=encode(event, codec), msg_id=event.id, device=address.device)
    return Forward(
        subject=address.subject(prefix), body=forward.body, msg_id=forward.msg_id, device=forward.device
    )


def _foreign(
    topic: str, payload: bytes, *, prefix: str, mappings: Sequence[TopicMapping], codec: Codec
) -> Forward | Reject:
    """A third-party topic, brought into the scheme by the first mapping that matches it."""
    levels = topic.split("/")
    rule = next((r for r in mappings if topic_matches(r.topic.split("/"), levels)), None)
    if rule is None:
        return Reject(f"topic {topic!r} is outside {prefix!r}/ and matches no mapping")
    mapped = _mapped(rule, topic, payload, codec)
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
