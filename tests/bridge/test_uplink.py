"""translate(): what each MQTT message becomes (no brokers)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nerve.bridge.uplink import Forward, Reject, translate, uplink_filters
from nerve.runtime.config.settings import DEFAULT_METRICS
from nerve.runtime.envelope.codec import decode, to_json, to_msgpack
from nerve.runtime.envelope.model import CommandResult, Event

LIMIT = 1024


def run(topic: str, payload: bytes) -> Forward | Reject:
    return translate(topic, payload, prefix="nerve", metrics=DEFAULT_METRICS, max_payload=LIMIT)


@pytest.mark.parametrize(
    "payload", [b"95", b"95.5", b" 95\n", b'{"value": 95}', b'{"value": 95, "mount": "/"}']
)
def test_raw_telemetry_is_wrapped(payload: bytes) -> None:
    outcome = run("nerve/pi-01/telemetry/disk", payload)
    assert isinstance(outcome, Forward)
    assert outcome.subject == "nerve.pi-01.telemetry.disk"
    event = decode(outcome.body, Event)
    assert event.subject == "pi-01"
    assert event.type == "nerve.telemetry.disk"
    assert event.data["value"] in (95, 95.5)
    assert outcome.msg_id == event.id


def test_enveloped_msgpack_is_forwarded_as_is_with_its_id() -> None:
    event = Event(source="test", type="nerve.telemetry.cpu", subject="pi-01", data={"value": 3})
    body = to_msgpack(event)
    outcome = run("nerve/pi-01/telemetry/cpu", body)
    assert outcome == Forward(subject="nerve.pi-01.telemetry.cpu", body=body, msg_id=event.id, device="pi-01")


def test_enveloped_json_is_reencoded_as_msgpack() -> None:
    event = Event(source="test", type="nerve.events.door", subject="pi-01", data={"open": True})
    outcome = run("nerve/pi-01/events/door", to_json(event))
    assert isinstance(outcome, Forward)
    assert decode(outcome.body, Event) == event
    assert outcome.msg_id == event.id


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("nerve/pi-01/telemetry/disk", b"abc", "must be a number"),
        ("nerve/pi-01/telemetry/disk", b'{"value": "high"}', "numeric 'value'"),
        ("nerve/pi-01/telemetry/disk", b"NaN", "must be a number"),
        ("nerve/bad$id/telemetry/disk", b"95", "device id 'bad$id' is not valid"),
        ("nerve/pi-01/telemetry/humidity", b"95", "unknown metric 'humidity'"),
        ("nerve/pi-01/telemetry/disk/extra", b"95", "expected <prefix>/<device>/<kind>/<name>"),
        ("nerve/pi-01/telemetry/disk", b"9" * (LIMIT + 1), f"exceeds the limit of {LIMIT} bytes"),
        ("nerve/pi-01/telemetry/disk", b"\x85\xa1a\x01", "malformed msgpack"),
        ("nerve/pi-01/telemetry/disk", msgpack.packb({"value": 95}), "must be envelopes"),
        ("nerve/pi-01/results/clear_temp", b"ok", "must be enveloped"),
        ("nerve/pi-01/telemetry/disk", b"\xff\xfe", "not UTF-8"),
    ],
)
def test_bad_input_is_rejected_with_reason(topic: str, payload: bytes, reason: str) -> None:
    outcome = run(topic, payload)
    assert isinstance(outcome, Reject)
    assert reason in outcome.reason


def test_envelope_for_another_device_is_rejected() -> None:
    event = Event(source="test", type="nerve.telemetry.cpu", subject="pi-02", data={"value": 3})
    outcome = run("nerve/pi-01/telemetry/cpu", to_msgpack(event))
    assert isinstance(outcome, Reject)
    assert "subject 'pi-02' names another device than the topic's 'pi-01'" in outcome.reason


def test_result_with_wrong_model_is_rejected() -> None:
    event = Event(source="test", type="x", subject="pi-01")
    outcome = run("nerve/pi-01/results/clear_temp", to_msgpack(event))
    assert isinstance(outcome, Reject)
    assert "CommandResult" in outcome.reason


def test_filters_catch_extra_levels() -> None:
    assert uplink_filters("nerve") == ["nerve/+/events/#", "nerve/+/results/#", "nerve/+/telemetry/#"]


@given(st.binary(max_size=200), st.sampled_from(["telemetry/disk", "events/x", "results/clear_temp"]))
def test_translate_never_raises(payload: bytes, tail: str) -> None:
    outcome = run(f"nerve/pi-01/{tail}", payload)
    assert isinstance(outcome, Forward | Reject)


def test_command_result_forwarded() -> None:
    result = CommandResult(
        source="e", type="nerve.result.clear_temp", subject="pi-01", action="clear_temp", status="ok"
    )
    outcome = run("nerve/pi-01/results/clear_temp", to_msgpack(result))
    assert isinstance(outcome, Forward)
    assert outcome.subject == "nerve.pi-01.results.clear_temp"


@pytest.mark.parametrize(
    "payload",
    [
        b'{"value": 99999999999999999999999}',
        b'{"value": 1, "x": ' + b"9" * 5000 + b"}",
        b"{" * 5000,
    ],
)
def test_unstorable_json_is_rejected_not_raised(payload: bytes) -> None:
    outcome = translate(
        "nerve/pi-01/telemetry/disk", payload, prefix="nerve", metrics=DEFAULT_METRICS, max_payload=65536
    )
    assert isinstance(outcome, Reject)
