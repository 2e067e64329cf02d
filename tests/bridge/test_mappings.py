"""Foreign topics brought into nerve's scheme by the bridge's mapping rules."""

from __future__ import annotations

from typing import Any

import pytest

from nerve.bridge.uplink import Forward, Ignore, Reject, topic_matches, translate, uplink_filters
from nerve.runtime.config.settings import DEFAULT_METRICS, BridgeSettings, load_settings
from nerve.runtime.envelope.codec import decode
from nerve.runtime.envelope.model import Event
from nerve.runtime.errors import ConfigError

DISK_RULE: dict[str, Any] = {
    "name": "acme-disk",
    "topic": "sensors/+/disk",
    "device_level": 2,
    "metric": "disk",
    "value_field": "pct",
}


def bridge(*rules: dict[str, Any]) -> BridgeSettings:
    return load_settings(overrides={"bridge": {"mappings": list(rules)}}).bridge


def run(topic: str, payload: bytes, settings: BridgeSettings) -> Forward | Reject | Ignore:
    return translate(
        topic, payload, prefix="nerve", metrics=DEFAULT_METRICS, max_payload=1024, mappings=settings.mappings
    )


def test_json_field_becomes_a_reading_of_the_device() -> None:
    outcome = run("sensors/pi-07/disk", b'{"pct": 93.5, "fw": "1.2"}', bridge(DISK_RULE))
    assert isinstance(outcome, Forward)
    assert outcome.subject == "nerve.pi-07.telemetry.disk"
    event = decode(outcome.body, Event)
    assert event.subject == "pi-07"
    assert event.data == {"value": 93.5}
    assert event.source == "mqtt://sensors/pi-07/disk"


def test_raw_payload_without_value_field() -> None:
    rule = {**DISK_RULE, "value_field": None, "topic": "plant/+/line/+/temp", "device_level": 4}
    rule["metric"] = "temperature"
    outcome = run("plant/p1/line/oven-3/temp", b"212.5", bridge(rule))
    assert isinstance(outcome, Forward)
    assert outcome.subject == "nerve.oven-3.telemetry.temperature"


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (
            "sensors/pi 07/disk",
            b'{"pct": 93}',
            "mapping 'acme-disk': device id 'pi 07' (level 2) is not valid",
        ),
        (
            "sensors/pi-07/disk",
            b'{"other": 93}',
            "mapping 'acme-disk': payload is not a JSON map with field 'pct'",
        ),
        ("sensors/pi-07/disk", b'{"pct": "full"}', "mapping 'acme-disk': telemetry payload"),
        ("sensors/pi-07/cpu", b"1", "matches no mapping"),
        ("elsewhere/x", b"1", "outside 'nerve'/"),
    ],
)
def test_unmappable_messages_are_rejected_naming_the_rule(topic: str, payload: bytes, reason: str) -> None:
    outcome = run(topic, payload, bridge(DISK_RULE))
    assert isinstance(outcome, Reject)
    assert reason in outcome.reason


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"device_level": 3}, "device_level 3 must point at a '+' level"),
        ({"device_level": 9}, "device_level 9 must point at a '+' level"),
        ({"topic": "sensors/#/disk"}, "'#' may only be the last level"),
        ({"topic": "sensors/a+/disk"}, "a wildcard must be a whole level"),
        ({"topic": "nerve/+/disk"}, "overlaps nerve's own topics"),
        ({"metric": "humidity"}, "metric 'humidity' is not in bridge.metrics"),
        ({"name": "bad name"}, "mapping name 'bad name' is not valid"),
        ({"kind": "commands"}, "bridge.mappings.0.kind"),
        ({"colour": "red"}, "bridge.mappings.0.colour: unknown key"),
    ],
)
def test_bad_rules_are_refused_at_start(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        bridge({**DISK_RULE, **change})
    assert message in str(caught.value)


def test_duplicate_rule_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="mapping names must be unique"):
        bridge(DISK_RULE, {**DISK_RULE, "topic": "other/+/disk"})


def test_rules_add_their_subscriptions() -> None:
    assert uplink_filters("nerve", bridge(DISK_RULE).mappings)[-1] == "sensors/+/disk"


@pytest.mark.parametrize(
    ("pattern", "topic", "matches"),
    [
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/c/d", False),
        ("a/#", "a/b/c", True),
        ("a/#", "a", True),
        ("a/b", "a/c", False),
        ("+/+", "a", False),
    ],
)
def test_topic_matches(pattern: str, topic: str, matches: bool) -> None:
    assert topic_matches(pattern.split("/"), topic.split("/")) is matches
