"""nerve.runtime.envelope.binary: the CloudEvents MQTT binding's binary content mode (MQTT v5)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nerve.runtime.envelope.binary import event_from_binary, is_binary_mode, is_json_media_type
from nerve.runtime.envelope.codec import decode, to_json, to_msgpack
from nerve.runtime.envelope.model import Event
from nerve.runtime.errors import DecodeError, PayloadTooLarge
from nerve.runtime.subjects import Address, Kind

DOOR = Address("pi-01", Kind.EVENTS, "door")
REQUIRED = [
    ("specversion", "1.0"),
    ("id", "e-1"),
    ("source", "https://example.com/s"),
    ("type", "door.opened"),
]


def test_required_attributes_and_json_data() -> None:
    event = event_from_binary(REQUIRED, "application/json", b'{"door": "open"}', DOOR)
    assert (event.id, event.source, event.type) == ("e-1", "https://example.com/s", "door.opened")
    assert event.data == {"door": "open"}
    assert event.datacontenttype == "application/json"
    assert event.subject == "pi-01"  # the topic's device
    assert event.time is None


def test_every_attribute_and_extensions() -> None:
    properties = [
        *REQUIRED,
        ("subject", "pi-01"),
        ("time", "2026-11-25T06:52:40+02:00"),
        ("dataschema", "https://example.com/door.json"),
        ("correlationid", "chain-1"),
        ("causationid", "cause-1"),
        ("hops", "3"),
        ("region", "eu"),
        ("floor", "3"),
    ]
    event = event_from_binary(properties, "application/vnd.door+json; charset=utf-8", b"[1, 2]", DOOR)
    assert event.time == datetime(2026, 11, 25, 4, 52, 40, tzinfo=UTC)
    assert event.dataschema == "https://example.com/door.json"
    assert (event.correlationid, event.causationid, event.hops) == ("chain-1", "cause-1", 3)
    assert event.extensions == {"region": "eu", "floor": "3"}  # MQTT carries strings: kept as they came
    assert event.data == [1, 2]
    assert decode(to_json(event), Event) == event
    assert decode(to_msgpack(event), Event) == event


def test_without_content_type_data_is_json() -> None:
    assert event_from_binary(REQUIRED, None, b"95.5", DOOR).data == 95.5


def test_datacontenttype_as_a_user_property() -> None:
    event = event_from_binary([*REQUIRED, ("datacontenttype", "text/plain")], None, b"hello", DOOR)
    assert event.data_base64 == b"hello"
    assert event.datacontenttype == "text/plain"


@pytest.mark.parametrize("content_type", ["image/png", "application/octet-stream", "text/plain"])
def test_other_media_types_are_binary_data(content_type: str) -> None:
    event = event_from_binary(REQUIRED, content_type, b"\x89PNG\x00", DOOR)
    assert event.data is None
    assert event.data_base64 == b"\x89PNG\x00"
    assert event.datacontenttype == content_type
    assert decode(to_json(event), Event).data_base64 == b"\x89PNG\x00"


def test_empty_payload_is_no_data() -> None:
    event = event_from_binary(REQUIRED, "application/json", b"", DOOR)
    assert event.data is None
    assert event.data_base64 is None


@pytest.mark.parametrize(
    ("properties", "content_type", "payload", "reason"),
    [
        (REQUIRED[1:], None, b"{}", "missing required attribute `specversion`"),
        ([p for p in REQUIRED if p[0] != "id"], None, b"{}", "missing required attribute `id`"),
        ([p for p in REQUIRED if p[0] != "type"], None, b"{}", "missing required attribute `type`"),
        ([*REQUIRED[:3], ("type", "")], None, b"{}", r"at `\$\.type`"),
        ([("specversion", "0.3"), *REQUIRED[1:]], None, b"{}", r"at `\$\.specversion`"),
        ([*REQUIRED, ("id", "e-2")], None, b"{}", "attribute 'id' is given twice"),
        ([*REQUIRED, ("hops", "many")], None, b"{}", "hops: 'many' is not an integer"),
        ([*REQUIRED, ("hops", "-1")], None, b"{}", r"at `\$\.hops`"),
        ([*REQUIRED, ("time", "yesterday")], None, b"{}", r"at `\$\.time`"),
        ([*REQUIRED, ("Region", "eu")], None, b"{}", "attribute name 'Region' is not valid"),
        ([*REQUIRED, ("data", "x")], None, b"{}", "'data' is not an attribute"),
        ([*REQUIRED, ("subject", "pi-02")], None, b"{}", "subject 'pi-02' names another device"),
        (REQUIRED, "application/json", b"{not json", "not the application/json its content type says"),
        (REQUIRED, None, b"\xff", r"not the application/json \(implied\)"),
        (REQUIRED, "application/json", b"[" * 40 + b"]" * 40, "data: nested deeper than"),
        (REQUIRED, "application/json", b"[" * 5000, "nested too deeply"),
        (
            [*REQUIRED, ("datacontenttype", "text/plain")],
            "application/json",
            b"{}",
            "disagrees with the PUBLISH content type",
        ),
    ],
)
def test_refusals_name_the_attribute(
    properties: list[tuple[str, str]], content_type: str | None, payload: bytes, reason: str
) -> None:
    with pytest.raises(DecodeError, match=reason):
        event_from_binary(properties, content_type, payload, DOOR)


def test_size_limit_counts_properties_too() -> None:
    with pytest.raises(PayloadTooLarge):
        event_from_binary([*REQUIRED, ("note", "x" * 100)], None, b"1", DOOR, max_size=120)


def test_is_binary_mode() -> None:
    assert is_binary_mode(REQUIRED)
    assert not is_binary_mode([("source", "x")])
    assert not is_binary_mode([])


@pytest.mark.parametrize(
    ("media_type", "expected"),
    [
        ("application/json", True),
        ("Application/JSON; charset=utf-8", True),
        ("application/cloudevents+json", True),
        ("text/json", True),
        ("application/jsonx", False),
        ("text/plain", False),
    ],
)
def test_is_json_media_type(media_type: str, expected: bool) -> None:
    assert is_json_media_type(media_type) is expected


@given(
    properties=st.lists(st.tuples(st.text(max_size=12), st.text(max_size=12)), max_size=8),
    content_type=st.none() | st.text(max_size=20),
    payload=st.binary(max_size=64),
)
def test_any_input_is_an_event_or_a_decode_error(
    properties: list[tuple[str, str]], content_type: str | None, payload: bytes
) -> None:
    try:
        event = event_from_binary([*REQUIRED, *properties], content_type, payload, DOOR)
    except DecodeError as exc:
        reason = exc.reason
    else:
        assert event.subject == "pi-01"
        assert decode(to_json(event), Event) == event
        return
    assert reason, "a dead letter needs a reason"
