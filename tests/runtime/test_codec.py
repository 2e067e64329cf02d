"""nerve.runtime.envelope.codec: msgpack/JSON round trips, decode failures, raw payload wrapping."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgpack
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nerve.runtime.envelope.codec import (
    DEFAULT_MAX_PAYLOAD,
    MODEL_OF_KIND,
    decode,
    envelope_from,
    is_envelope,
    is_msgpack_map,
    load_document,
    raw_data,
    to_json,
    to_msgpack,
    wrap_raw,
)
from nerve.runtime.envelope.model import MAX_DATA_DEPTH, Command, CommandResult, Envelope, Event, Fact
from nerve.runtime.errors import DecodeError, PayloadTooLarge
from nerve.runtime.subjects import Address, Kind

TIME = datetime(2026, 11, 25, 4, 52, 40, 123456, tzinfo=UTC)
DATA: dict[str, Any] = {
    "value": 95.5,
    "count": 3,
    "big": 2**62,
    "neg": -(2**40),
    "ok": True,
    "none": None,
    "text": "dïsk ✓ 日本",
    "list": [1, "two", 3.0, [4], {"five": 5}],
    "nested": {"a": {"b": {"c": []}}},
}
BASE: dict[str, Any] = {
    "id": "e-1",
    "source": "edge/pi-01",
    "type": "nerve.telemetry.disk",
    "subject": "pi-01",
    "time": TIME,
    "data": DATA,
    "correlationid": "chain-1",
    "causationid": "cause-1",
    "hops": 2,
}

EVENT = Event(**BASE, extensions={"region": "eu", "rank": 3, "ratio": 0.5, "hot": True})
COMMAND = Command(
    **BASE, action="clear_temp", expires=TIME + timedelta(seconds=60), keyid="central", sig="c2ln"
)
RESULT = CommandResult(**BASE, action="clear_temp", status="failed", reason="disk ro")
FACT = Fact(**BASE, kind="runbook_ran", summary="cleared /tmp")
ALL = [EVENT, COMMAND, RESULT, FACT]
TELEMETRY = Address("pi-01", Kind.TELEMETRY, "disk")
EVENTS = Address("pi-01", Kind.EVENTS, "door")


def ids(envelope: Envelope) -> str:
    return type(envelope).__name__


# --- round trips -------------------------------------------------------------------------------------


@pytest.mark.parametrize("envelope", ALL, ids=ids)
def test_msgpack_round_trip(envelope: Envelope) -> None:
    payload = to_msgpack(envelope)
    assert is_msgpack_map(payload)
    again = decode(payload, type(envelope))
    assert again == envelope
    assert type(again) is type(envelope)
    assert to_msgpack(again) == payload


@pytest.mark.parametrize("envelope", ALL, ids=ids)
def test_json_round_trip(envelope: Envelope) -> None:
    payload = to_json(envelope)
    assert not is_msgpack_map(payload)
    assert b'": ' not in payload  # compact
    assert b', "' not in payload
    assert "日本".encode() in payload or b"\\u65e5" in payload  # UTF-8 text, however escaped
    json.loads(payload)  # valid JSON text
    again = decode(payload, type(envelope))
    assert again == envelope
    assert to_json(again) == payload


@pytest.mark.parametrize("envelope", ALL, ids=ids)
def test_json_to_msgpack_to_json(envelope: Envelope) -> None:
    via_json = decode(to_json(envelope), type(envelope))
    via_both = decode(to_msgpack(via_json), type(envelope))
    assert via_both == envelope


def test_unset_attributes_are_left_out() -> None:
    e = Event(source="s", type="t", subject="pi-01")
    document = msgpack.unpackb(to_msgpack(e))
    assert set(document) == {"specversion", "id", "source", "type", "subject"}
    assert set(json.loads(to_json(e))) == {"specversion", "id", "source", "type", "subject"}


def test_extensions_are_top_level_attributes() -> None:
    document = json.loads(to_json(EVENT))
    assert {k: document[k] for k in EVENT.extensions} == EVENT.extensions
    assert "extensions" not in document
    assert "__extensions__" not in document
    assert msgpack.unpackb(to_msgpack(EVENT))["region"] == "eu"


def test_time_on_the_wire() -> None:
    # JSON: RFC 3339 (CloudEvents); msgpack: the msgpack timestamp extension.
    assert json.loads(to_json(EVENT))["time"] == "2026-11-25T04:52:40.123456Z"
    document = msgpack.unpackb(to_msgpack(EVENT), timestamp=3)
    assert document["time"] == TIME


def test_time_keeps_its_offset_in_json() -> None:
    payload = to_json(EVENT).replace(b"2026-11-25T04:52:40.123456Z", b"2026-11-25T06:52:40.123456+02:00")
    again = decode(payload, Event)
    assert again.time == TIME
    assert again.time is not None
    assert again.time.utcoffset() == timedelta(hours=2)
    assert b"+02:00" in to_json(again)


def test_decode_tells_msgpack_from_json() -> None:
    assert decode(to_msgpack(EVENT), Event) == decode(to_json(EVENT), Event)
    assert decode(b"  \n" + to_json(EVENT) + b"\n", Event) == EVENT  # JSON with whitespace around


def test_msgpack_map16_is_detected() -> None:
    # 16+ keys use map16 (0xde): still recognised as msgpack; extensions for an event, refused for a command
    document = {**msgspec.to_builtins(COMMAND), **{f"x{i}": i for i in range(10)}}
    payload = msgpack.packb(document)
    assert payload[0] == 0xDE
    with pytest.raises(DecodeError, match="not a valid Command: unknown attribute `x0`"):
        decode(payload, Command)
    event = {**msgspec.to_builtins(FACT), **{f"x{i}": i for i in range(10)}}
    del event["kind"], event["summary"]
    assert decode(msgpack.packb(event), Event).extensions == {f"x{i}": i for i in range(10)}


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", False),
        (b"{}", False),
        (b"\x80", True),
        (b"\x8f", True),
        (b"\xde\x00\x00", True),
        (b"\xdf\x00\x00\x00\x00", True),
        (b"\x90", False),  # fixarray
        (b"\xc0", False),
    ],
)
def test_is_msgpack_map(payload: bytes, expected: bool) -> None:
    assert is_msgpack_map(payload) is expected


def test_is_envelope() -> None:
    assert is_envelope({"specversion": "1.0"})
    assert not is_envelope({"value": 95})
    assert not is_envelope(["specversion"])
    assert not is_envelope("specversion")


def test_model_of_kind() -> None:
    assert set(MODEL_OF_KIND) == set(Kind)
    assert MODEL_OF_KIND[Kind.TELEMETRY] is Event
    assert MODEL_OF_KIND[Kind.EVENTS] is Event
    assert MODEL_OF_KIND[Kind.COMMANDS] is Command
    assert MODEL_OF_KIND[Kind.RESULTS] is CommandResult
    assert MODEL_OF_KIND[Kind.FACTS] is Fact


# --- decode failures ---------------------------------------------------------------------------------


def test_malformed_msgpack() -> None:
    with pytest.raises(DecodeError, match=r"^not a valid Event: Expected `str`, got `unknown`"):
        decode(b"\x81\xc1\xc1", Event)  # 0xc1 is never used by msgpack
    with pytest.raises(DecodeError, match=r"^malformed msgpack"):
        decode(b"\x81\xa1a\xc1", Event)


def test_truncated_msgpack() -> None:
    payload = to_msgpack(EVENT)
    for cut in (1, 5, len(payload) // 2, len(payload) - 1):
        with pytest.raises(DecodeError, match=r"^malformed msgpack"):
            decode(payload[:cut], Event)


def test_msgpack_with_trailing_bytes() -> None:
    with pytest.raises(DecodeError, match=r"^malformed msgpack"):
        decode(to_msgpack(EVENT) + b"\x00", Event)


def test_msgpack_with_non_string_keys() -> None:
    with pytest.raises(DecodeError, match=r"^not a valid Event: Expected `str`, got `int`"):
        decode(msgpack.packb({1: "x"}), Event)


def test_non_utf8() -> None:
    with pytest.raises(DecodeError, match=r"^payload is not valid JSON"):
        decode(b"\xff\xfe\x00garbage", Event)


@pytest.mark.parametrize("payload", [b"not json", b"{", b'{"a": }', b"", b"   "])
def test_invalid_json(payload: bytes) -> None:
    with pytest.raises(DecodeError, match=r"^payload is not valid JSON"):
        decode(payload, Event)


@pytest.mark.parametrize(
    ("payload", "got"), [(b"[1, 2]", "array"), (b"95", "int"), (b'"x"', "str"), (b"null", "null")]
)
def test_json_that_is_not_a_map(payload: bytes, got: str) -> None:
    with pytest.raises(DecodeError, match=f"^not a valid Event: Expected `object`, got `{got}`$"):
        decode(payload, Event)


def test_nan_is_not_json() -> None:
    with pytest.raises(DecodeError, match=r"^payload is not valid JSON"):
        decode(b"NaN", Event)


def test_json_of_wrong_shape_names_the_missing_attribute() -> None:
    with pytest.raises(DecodeError, match=r"^not a valid Event: missing required attribute `id`$"):
        decode(b'{"specversion": "1.0", "value": 95}', Event)


def test_bad_attribute_value_is_named_with_its_path() -> None:
    payload = to_json(COMMAND).replace(b'"pi-01"', b'"pi.01"')
    with pytest.raises(
        DecodeError, match=r"^not a valid Command: Expected `str` matching .* at `\$\.subject`$"
    ):
        decode(payload, Command)


def test_decode_checks_the_model() -> None:
    # A command's expiry (a msgpack timestamp) is no value an extension can have.
    with pytest.raises(DecodeError, match="not a valid Event: extension 'expires'"):
        decode(to_msgpack(COMMAND), Event)
    with pytest.raises(DecodeError, match="not a valid Command: unknown attribute `region`"):
        decode(to_msgpack(EVENT), Command)
    with pytest.raises(DecodeError, match="not a valid Command: missing required attribute `action`"):
        decode(to_msgpack(Event(**BASE)), Command)


def test_decode_refuses_what_is_not_an_envelope_model() -> None:
    with pytest.raises(TypeError, match="not an envelope model"):
        decode(b"{}", Envelope)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"[" * 5000, id="deep-json-array"),
        pytest.param(b'{"a":' * 5000, id="deep-json-object"),
        pytest.param(b"9" * 5000, id="int-over-4300-digits"),
        pytest.param(b'{"hops": ' + b"9" * 5000 + b"}", id="nested-int-over-4300-digits"),
        pytest.param(b"\x81\xa1a" * 5000 + b"\xc0", id="deep-msgpack"),
        pytest.param(
            b'{"specversion":"1.0","id":"1","source":"s","type":"t","data":' + b"[" * 500 + b"]" * 500 + b"}",
            id="1KB-nested-500-deep",
        ),
    ],
)
def test_hostile_payloads_are_decode_errors(payload: bytes) -> None:
    # Each of these used to escape as RecursionError / ValueError / OverflowError.
    with pytest.raises(DecodeError):
        decode(payload, Event)


def test_data_nested_too_deep_is_refused_by_name() -> None:
    payload = (
        b'{"specversion":"1.0","id":"1","source":"s","type":"t","data":' + b"[" * 500 + b"]" * 500 + b"}"
    )
    assert len(payload) < 1100
    with pytest.raises(
        DecodeError, match=f"^not a valid Event: data: nested deeper than {MAX_DATA_DEPTH} levels$"
    ):
        decode(payload, Event)
    deepest = b'{"specversion":"1.0","id":"1","source":"s","type":"t","data":' + b"[" * MAX_DATA_DEPTH
    assert decode(deepest + b"]" * MAX_DATA_DEPTH + b"}", Event).data is not None


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("0001-01-01T00:00:00+01:00", "time: out of range once converted to UTC"),
        ("9999-12-31T23:59:59Z", "time: must be before 9000"),
    ],
)
def test_command_times_are_bounded(value: str, reason: str) -> None:
    document = {**msgspec.to_builtins(COMMAND), "time": value}
    with pytest.raises(DecodeError, match=f"^not a valid Command: {reason}"):
        decode(json.dumps(document).encode(), Command)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_in_msgpack_data_are_refused(value: float) -> None:
    document = {**msgspec.to_builtins(Event(**BASE)), "data": {"value": value}}
    with pytest.raises(DecodeError, match=r"^not a valid Event: data: .* is not a number JSON can carry$"):
        decode(msgpack.packb(document), Event)


def test_oversize() -> None:
    payload = to_msgpack(EVENT)
    with pytest.raises(PayloadTooLarge) as info:
        decode(payload, Event, max_size=len(payload) - 1)
    error = info.value
    assert isinstance(error, DecodeError)
    assert error.size == len(payload)
    assert error.limit == len(payload) - 1
    assert str(len(payload)) in error.reason
    assert str(len(payload) - 1) in error.reason
    assert decode(payload, Event, max_size=len(payload)) == EVENT  # the limit itself is allowed


def test_oversize_is_checked_before_parsing() -> None:
    with pytest.raises(PayloadTooLarge, match=f"exceeds the limit of {DEFAULT_MAX_PAYLOAD} bytes"):
        decode(b"\xff" * (DEFAULT_MAX_PAYLOAD + 1), Event)


def test_load_document_and_envelope_from() -> None:
    assert load_document(b'{"a": 1}') == {"a": 1}
    assert load_document(msgpack.packb({"a": [1, 2]})) == {"a": [1, 2]}
    assert envelope_from(json.loads(to_json(EVENT)), Event) == EVENT
    with pytest.raises(DecodeError, match="a Fact must be a map, got list"):
        envelope_from([], Fact)


# --- properties ---------------------------------------------------------------------------------------

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
msgpack_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
hostile_leaves = (
    json_leaves
    | msgpack_ints
    | st.floats()
    | st.binary(max_size=8)
    | st.sampled_from(["1.0", "pi-01", "2026-11-25T04:52:40Z", "0001-01-01T00:00:00+01:00", ""])
)
hostile_values = st.recursive(
    hostile_leaves,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
attribute_names = st.sampled_from(
    ["specversion", "id", "source", "type", "subject", "time", "data", "hops", "correlationid", "action"]
)
hostile_maps = st.dictionaries(attribute_names | st.text(max_size=6), hostile_values, max_size=12)
tokens = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=64)


def decode_or_decode_error(payload: bytes, model: type[Envelope]) -> None:
    try:
        envelope = decode(payload, model)
    except DecodeError as exc:
        reason = exc.reason
    else:
        assert isinstance(envelope, model)
        return
    assert reason, "a dead-letter needs a reason"


@given(payload=st.binary(max_size=256))
def test_decode_arbitrary_bytes_only_raises_decode_error(payload: bytes) -> None:
    decode_or_decode_error(payload, Event)


@given(first=st.sampled_from([*range(0x80, 0x90), 0xDE, 0xDF]), rest=st.binary(max_size=256))
def test_decode_arbitrary_msgpack_looking_bytes_only_raises_decode_error(first: int, rest: bytes) -> None:
    decode_or_decode_error(bytes([first]) + rest, Event)


@given(document=hostile_maps, model=st.sampled_from([Event, Command, CommandResult, Fact]))
def test_decode_arbitrary_msgpack_maps_only_raises_decode_error(
    document: dict[str, Any], model: type[Envelope]
) -> None:
    decode_or_decode_error(msgpack.packb(document), model)


offsets = st.integers(min_value=-14 * 60, max_value=14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
time_values = st.sampled_from(
    ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "2026-11-25T04:52:40", "2026-13-01T00:00:00Z"]
) | st.datetimes(timezones=offsets).map(datetime.isoformat)
one_bad_attribute = st.one_of(
    st.tuples(attribute_names, hostile_leaves),
    st.tuples(st.sampled_from(["time", "expires"]), time_values),
).map(lambda pair: {**msgspec.to_builtins(COMMAND), pair[0]: pair[1]})


@given(document=one_bad_attribute, model=st.sampled_from([Event, Command, CommandResult, Fact]))
def test_decode_envelope_with_one_bad_attribute_only_raises_decode_error(
    document: dict[str, Any], model: type[Envelope]
) -> None:
    decode_or_decode_error(msgpack.packb(document), model)
    decode_or_decode_error(json.dumps(document, default=repr).encode(), model)


@given(
    document=json_values
    | st.integers()
    | hostile_maps.map(lambda d: {k: v for k, v in d.items() if not isinstance(v, bytes)})
)
def test_decode_arbitrary_json_only_raises_decode_error(document: object) -> None:
    try:
        payload = json.dumps(document).encode()
    except TypeError:  # bytes nested deeper: not JSON
        return
    decode_or_decode_error(payload, Event)


@given(
    data=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
    device=tokens,
    hops=st.integers(min_value=0, max_value=1_000_000),
    time=st.datetimes(
        min_value=datetime(1970, 1, 2),  # noqa: DTZ001
        max_value=datetime(9000, 1, 1),  # noqa: DTZ001
        timezones=st.just(UTC),
    ),
    correlationid=st.none() | st.text(min_size=1, max_size=128),
)
def test_round_trip_property(
    data: dict[str, Any], device: str, hops: int, time: datetime, correlationid: str | None
) -> None:
    e = Event(
        source="s", type="t", subject=device, time=time, data=data, hops=hops, correlationid=correlationid
    )
    assert decode(to_msgpack(e), Event) == e
    assert decode(to_json(e), Event) == e


# --- raw payloads -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "data"),
    [
        (b"95", {"value": 95}),
        (b"95.5", {"value": 95.5}),
        (b" 95 \n", {"value": 95}),
        (b"-3", {"value": -3}),
        (b"1e3", {"value": 1000.0}),
        (b'{"value": 95}', {"value": 95}),
        (b'{"value": 95, "mount": "/"}', {"value": 95, "mount": "/"}),
        (b'{"value": 0.0}', {"value": 0.0}),
    ],
)
def test_wrap_raw_telemetry(payload: bytes, data: dict[str, Any]) -> None:
    before = datetime.now(UTC)
    e = wrap_raw(TELEMETRY, payload, source="mqtt://nerve/pi-01/telemetry/disk")
    assert e.data == data
    assert type(e.data["value"]) is type(data["value"])  # 95 stays an int
    assert e.type == "nerve.telemetry.disk"
    assert e.subject == "pi-01"
    assert e.source == "mqtt://nerve/pi-01/telemetry/disk"
    assert e.hops == 0
    assert e.correlationid is None
    assert e.time is not None
    assert before <= e.time <= datetime.now(UTC)
    assert decode(to_msgpack(e), Event) == e


def test_wrapped_events_get_fresh_ids() -> None:
    assert wrap_raw(TELEMETRY, b"95", source="s").id != wrap_raw(TELEMETRY, b"95", source="s").id


@pytest.mark.parametrize(
    "payload",
    [
        b"abc",
        b"NaN",
        b"Infinity",
        b"-Infinity",
        b"1e400",
        b"true",
        b"false",
        b"null",
        b'"95"',
        b'{"value": "x"}',
        b'{"value": true}',
        b'{"value": NaN}',
        b'{"value": null}',
        b"{}",
        b"[1]",
        b"",
        b"  \n",
        b"95 percent",
        b"9" * 5000,
        b"[" * 5000,
    ],
)
def test_wrap_raw_telemetry_refusals(payload: bytes) -> None:
    with pytest.raises(DecodeError, match=r"telemetry (payload|map) for 'disk'") as info:
        wrap_raw(TELEMETRY, payload, source="s")
    assert "numeric 'value'" in info.value.reason


def test_wrap_raw_refusal_quotes_a_long_payload_shortened() -> None:
    with pytest.raises(DecodeError) as info:
        wrap_raw(TELEMETRY, b"x" * 500, source="s")
    assert "x" * 40 + "…" in info.value.reason
    assert "x" * 41 not in info.value.reason


def test_wrap_raw_non_utf8() -> None:
    with pytest.raises(DecodeError, match=r"^raw payload is not UTF-8 text$"):
        wrap_raw(EVENTS, b"\xff\xfe", source="s")


@pytest.mark.parametrize(
    ("payload", "data"),
    [
        (b'{"door": "open", "n": 2}', {"door": "open", "n": 2}),
        (b"door opened", {"message": "door opened"}),
        (b"  door opened \n", {"message": "door opened"}),
        (b"95", {"message": "95"}),
        (b"[1, 2]", {"message": "[1, 2]"}),
        (b"", {"message": ""}),
        ("ω".encode(), {"message": "ω"}),
    ],
)
def test_wrap_raw_events_accept_maps_and_text(payload: bytes, data: dict[str, Any]) -> None:
    e = wrap_raw(EVENTS, payload, source="s")
    assert e.data == data
    assert e.type == "nerve.events.door"


@pytest.mark.parametrize("kind", [Kind.RESULTS, Kind.COMMANDS, Kind.FACTS])
def test_wrap_raw_refuses_other_kinds(kind: Kind) -> None:
    with pytest.raises(DecodeError, match=f"^{kind.value} must be enveloped messages, not raw payloads$"):
        wrap_raw(Address("pi-01", kind, "reboot"), b'{"status": "ok"}', source="s")


def test_wrap_raw_refuses_data_nested_too_deep() -> None:
    payload = b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}"
    with pytest.raises(DecodeError, match=r"^cannot wrap payload: data: nested deeper than"):
        wrap_raw(EVENTS, payload, source="s")


def test_raw_data_is_a_copy_with_string_keys() -> None:
    document = {"value": 1}
    data = raw_data(TELEMETRY, document, "")
    assert data == document
    assert data is not document
