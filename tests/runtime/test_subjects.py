"""Unit tests of nerve.runtime.subjects: MQTT topic ⇄ NATS subject, token rules, filters, dead-letters."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nerve.runtime.errors import NerveError, TopicError
from nerve.runtime.subjects import (
    DEFAULT_PREFIX,
    MQTT_KINDS,
    Address,
    Kind,
    check_prefix,
    check_token,
    deadletter_subject,
    is_token,
    kind_filter,
    parse_subject,
    parse_topic,
    status_topic,
    subject_root,
    subject_to_topic,
    topic_to_subject,
)

DEVICE_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
tokens = st.text(alphabet=DEVICE_CHARS, min_size=1, max_size=64)
prefixes = st.lists(tokens, min_size=1, max_size=3).map("/".join)
kinds = st.sampled_from(list(Kind))

BAD_DEVICE_IDS = [
    pytest.param("bad$id", id="dollar"),
    pytest.param("pi.01", id="dot"),
    pytest.param("", id="empty"),
    pytest.param("x" * 65, id="65-chars"),
    pytest.param("pï-01", id="unicode"),
    pytest.param("٣", id="arabic-digit"),  # \d would match it; the token rule must not
    pytest.param("+", id="plus"),
    pytest.param("#", id="hash"),
    pytest.param("pi 01", id="space"),
    pytest.param("*", id="star"),
    pytest.param(">", id="gt"),
]


def nats_match(filter_: str, subject: str) -> bool:
    """Whether a NATS subject filter (`*`, `>`) matches a literal subject."""
    f, s = filter_.split("."), subject.split(".")
    for i, level in enumerate(f):
        if level == ">":
            return len(s) > i
        if i >= len(s) or (level not in {"*", s[i]}):
            return False
    return len(f) == len(s)


def test_nats_match_helper_is_sound() -> None:
    assert nats_match("a.*.c", "a.b.c")
    assert not nats_match("a.*.c", "a.b.c.d")
    assert not nats_match("a.*.c", "a.c")
    assert nats_match("a.>", "a.b.c")
    assert not nats_match("a.>", "a")


# --- tokens and prefixes ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["pi-01", "a", "A_b-9", "x" * 64, "deadletter", "telemetry"])
def test_valid_tokens(value: str) -> None:
    assert is_token(value)
    assert check_token(value, "device id") == value


@pytest.mark.parametrize("value", BAD_DEVICE_IDS)
def test_invalid_tokens_are_refused_with_value_error_naming_what(value: str) -> None:
    assert not is_token(value)
    with pytest.raises(ValueError, match=r"^metric .* is not valid"):
        check_token(value, "metric")


def test_trailing_newline_is_not_a_token() -> None:
    # `re.match` + `$` would accept "pi\n"; fullmatch must not.
    assert not is_token("pi\n")


@pytest.mark.parametrize("prefix", ["nerve", "acme/nerve", "a/b/c"])
def test_valid_prefixes(prefix: str) -> None:
    assert check_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["", "acme/", "/nerve", "acme//nerve", "ac.me", "a+b", "#", "nerve/$"])
def test_invalid_prefixes(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        check_prefix(prefix)


# --- mapping ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "subject"),
    [
        ("nerve/pi-01/telemetry/disk", "nerve.pi-01.telemetry.disk"),
        ("nerve/pi-01/events/door_open", "nerve.pi-01.events.door_open"),
        ("nerve/pi-01/commands/clear_temp", "nerve.pi-01.commands.clear_temp"),
        ("nerve/pi-01/results/clear_temp", "nerve.pi-01.results.clear_temp"),
    ],
)
def test_topic_subject_mapping_default_prefix(topic: str, subject: str) -> None:
    assert topic_to_subject(topic) == subject
    assert subject_to_topic(subject) == topic


def test_multi_level_prefix() -> None:
    prefix = "acme/nerve"
    topic = "acme/nerve/pi-01/telemetry/disk"
    assert topic_to_subject(topic, prefix) == "acme.nerve.pi-01.telemetry.disk"
    assert subject_to_topic("acme.nerve.pi-01.telemetry.disk", prefix) == topic
    assert parse_topic(topic, prefix) == Address("pi-01", Kind.TELEMETRY, "disk")
    assert subject_root(prefix) == "acme.nerve"
    assert kind_filter(Kind.EVENTS, prefix) == "acme.nerve.*.events.*"
    assert deadletter_subject("bridge", prefix) == "acme.nerve.deadletter.bridge"
    assert status_topic("pi-01", prefix) == "acme/nerve/pi-01/status"


def test_multi_level_prefix_topic_under_only_its_first_level_is_refused() -> None:
    with pytest.raises(TopicError, match="prefix 'acme/nerve'"):
        parse_topic("acme/pi-01/telemetry/disk", "acme/nerve")


def test_address_renders_topic_and_subject() -> None:
    address = Address("pi-01", Kind.RESULTS, "reboot")
    assert address.topic() == "nerve/pi-01/results/reboot"
    assert address.subject() == "nerve.pi-01.results.reboot"
    assert parse_subject(address.subject()) == address
    assert parse_topic(address.topic()) == address


def test_parsed_kind_is_the_enum() -> None:
    assert parse_topic("nerve/pi/telemetry/cpu").kind is Kind.TELEMETRY


def test_status_topic_and_defaults() -> None:
    assert DEFAULT_PREFIX == "nerve"
    assert status_topic("pi-01") == "nerve/pi-01/status"
    assert Kind.FACTS not in MQTT_KINDS
    assert {Kind.TELEMETRY, Kind.EVENTS, Kind.COMMANDS, Kind.RESULTS} == MQTT_KINDS


@given(prefix=prefixes, device=tokens, kind=kinds, name=tokens)
def test_round_trip_property(prefix: str, device: str, kind: Kind, name: str) -> None:
    address = Address(device, kind, name)
    topic = address.topic(prefix)
    subject = topic_to_subject(topic, prefix)
    assert subject == address.subject(prefix)
    assert subject_to_topic(subject, prefix) == topic
    assert parse_topic(topic, prefix) == address
    assert parse_subject(subject, prefix) == address
    assert nats_match(kind_filter(kind, prefix), subject)
    for other in Kind:
        if other is not kind:
            assert not nats_match(kind_filter(other, prefix), subject)


# --- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", BAD_DEVICE_IDS)
def test_invalid_device_id_in_topic_is_refused(device: str) -> None:
    topic = f"nerve/{device}/telemetry/disk"
    with pytest.raises(TopicError) as info:
        parse_topic(topic)
    error = info.value
    assert isinstance(error, NerveError)
    assert error.topic == topic
    if "." in device:
        # On MQTT a dot is just a bad character; the level count is still right.
        assert "device id" in error.reason
    elif device:
        assert f"device id {device!r} is not valid" in error.reason
    else:
        assert "device id ''" in error.reason
    assert repr(topic) in str(error)


@pytest.mark.parametrize("device", [d for d in BAD_DEVICE_IDS if d.values[0] != "pi.01"])
def test_invalid_device_id_in_subject_is_refused(device: str) -> None:
    with pytest.raises(TopicError, match="device id"):
        parse_subject(f"nerve.{device}.telemetry.disk")


def test_dot_in_device_on_nats_is_a_level_count_error() -> None:
    with pytest.raises(TopicError, match=r"expected <prefix>/<device>/<kind>/<name>"):
        parse_subject("nerve.pi.01.telemetry.disk")


@pytest.mark.parametrize("name", ["bad$", "", "x" * 65, "+", "#", "dïsk"])
def test_invalid_name_is_refused_naming_the_kind(name: str) -> None:
    with pytest.raises(TopicError, match=re.escape(f"telemetry name {name!r} is not valid")):
        parse_topic(f"nerve/pi-01/telemetry/{name}")
    with pytest.raises(TopicError, match=re.escape(f"commands name {name!r} is not valid")):
        parse_topic(f"nerve/pi-01/commands/{name}")


@pytest.mark.parametrize("kind", ["status", "telemetrys", "Telemetry", "TELEMETRY", "", "+", "deadletter"])
def test_unknown_kind_is_refused_listing_known_kinds(kind: str) -> None:
    with pytest.raises(TopicError) as info:
        parse_topic(f"nerve/pi-01/{kind}/disk")
    assert f"unknown kind {kind!r}" in info.value.reason
    for known in Kind:
        assert known.value in info.value.reason


@pytest.mark.parametrize(
    "topic",
    ["sensors/pi-01/telemetry/disk", "Nerve/pi-01/telemetry/disk", "/nerve/pi-01/telemetry/disk", "+/pi/x/y"],
)
def test_wrong_prefix_is_refused(topic: str) -> None:
    with pytest.raises(TopicError, match="does not start with the prefix 'nerve'"):
        parse_topic(topic)


@pytest.mark.parametrize(
    "topic",
    [
        "nerve",
        "nerve/pi-01",
        "nerve/pi-01/telemetry",
        "nerve/pi-01/status",
        "nerve/#",
        "nerve/pi-01/telemetry/disk/extra",
        "nerve/pi-01/telemetry/disk/",
        "nerve/pi-01/telemetry/#/x",
    ],
)
def test_wrong_number_of_levels_is_refused(topic: str) -> None:
    with pytest.raises(TopicError, match=r"expected <prefix>/<device>/<kind>/<name>"):
        parse_topic(topic)


def test_subject_with_mqtt_separators_is_refused() -> None:
    with pytest.raises(TopicError):
        parse_subject("nerve/pi-01/telemetry/disk")
    with pytest.raises(TopicError):
        topic_to_subject("nerve.pi-01.telemetry.disk")


def test_error_is_never_a_silent_rewrite() -> None:
    # A topic that differs only by an invalid character does not map onto a "cleaned" subject.
    with pytest.raises(TopicError):
        topic_to_subject("nerve/pi$01/telemetry/disk")


# --- dead-letters and filters ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(Kind))
def test_kind_filter(kind: Kind) -> None:
    assert kind_filter(kind) == f"nerve.*.{kind.value}.*"


@pytest.mark.parametrize("part", ["bridge", "edge", "central"])
def test_deadletter_subject_has_three_tokens(part: str) -> None:
    subject = deadletter_subject(part)
    assert subject == f"nerve.deadletter.{part}"
    assert len(subject.split(".")) == 3
    with pytest.raises(TopicError):
        parse_subject(subject)


@given(part=tokens, device=tokens, name=tokens, prefix=prefixes)
def test_deadletter_never_collides_with_device_subjects(
    part: str, device: str, name: str, prefix: str
) -> None:
    deadletter = deadletter_subject(part, prefix)
    assert len(deadletter.split(".")) == len(subject_root(prefix).split(".")) + 2
    for kind in Kind:
        assert not nats_match(kind_filter(kind, prefix), deadletter)
        # and the dead-letter filter never takes a device's message, even a device called "deadletter"
        device_subject = Address(device, kind, name).subject(prefix)
        assert not nats_match(deadletter_subject("*", prefix), device_subject)
        assert not nats_match(
            deadletter_subject("*", prefix), Address("deadletter", kind, name).subject(prefix)
        )
