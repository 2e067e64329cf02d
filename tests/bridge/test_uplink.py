"""translate(): what each MQTT message becomes (no brokers)."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from nerve.bridge.pump import Pump
from nerve.bridge.stats import BridgeStats
from nerve.bridge.uplink import (
    Forward,
    Ignore,
    Reject,
    Translator,
    translate,
    uplink_filters,
)
from nerve.runtime.config.settings import DEFAULT_METRICS, DEFAULT_RANGES, BridgeSettings, load_settings
from nerve.runtime.envelope.codec import decode, to_json, to_msgpack
from nerve.runtime.envelope.model import CommandResult, Event
from nerve.runtime.errors import ConfigError

LIMIT = 1024


def run(topic: str, payload: bytes) -> Forward | Reject | Ignore:
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


def test_one_filter_takes_the_whole_prefix_so_mistyped_topics_reach_the_bridge() -> None:
    assert uplink_filters("nerve") == ["nerve/#"]
    assert uplink_filters("acme/nerve", shared_group="site") == ["$share/site/acme/nerve/#"]


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("nerve/vm/telemetery/disk", "unknown kind 'telemetery'"),
        ("nerve/vm/Telemetry/disk", "unknown kind 'Telemetry'"),
        ("nerve/a/b/telemetry/disk", "expected <prefix>/<device>/<kind>/<name>"),
        ("nerve/vm/telemetry", "expected <prefix>/<device>/<kind>/<name>"),
        ("nerve/vm", "expected <prefix>/<device>/<kind>/<name>"),
        ("nerve/vm/facts/x", "facts are not accepted from devices"),
    ],
)
def test_mistyped_topics_are_rejected_with_the_reason(topic: str, reason: str) -> None:
    outcome = run(topic, b"95")
    assert isinstance(outcome, Reject)
    assert reason in outcome.reason


@pytest.mark.parametrize(
    "topic", ["nerve/pi-01/commands/clear_temp", "nerve/pi-01/status", "nerve/x y/status"]
)
def test_commands_and_presence_are_ignored_not_dead_lettered(topic: str) -> None:
    assert isinstance(run(topic, b"online"), Ignore)


def ranged(topic: str, payload: bytes, ranges: dict[str, tuple[float, float]]) -> Forward | Reject | Ignore:
    return translate(
        topic, payload, prefix="nerve", metrics=DEFAULT_METRICS, max_payload=LIMIT, ranges=ranges
    )


@given(
    metric=st.sampled_from(sorted(DEFAULT_RANGES)),
    value=st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6),
)
def test_a_known_metric_is_stored_only_inside_its_range(metric: str, value: float) -> None:
    low, high = DEFAULT_RANGES[metric]
    for payload in (repr(value).encode(), f'{{"value": {value!r}}}'.encode()):
        outcome = ranged(f"nerve/pi-01/telemetry/{metric}", payload, DEFAULT_RANGES)
        if low <= value <= high:
            assert isinstance(outcome, Forward), outcome
        else:
            assert isinstance(outcome, Reject)
            assert f"{metric} reading" in outcome.reason
            assert "out of range" in outcome.reason


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 150.0, -0.5])
def test_an_enveloped_reading_out_of_range_or_not_finite_is_rejected(value: float) -> None:
    event = Event(source="t", type="nerve.telemetry.disk", subject="pi-01", data={"value": 1})
    document = {**msgpack.unpackb(to_msgpack(event)), "data": {"value": value}}  # NaN as msgpack has it
    outcome = ranged("nerve/pi-01/telemetry/disk", msgpack.packb(document), DEFAULT_RANGES)
    assert isinstance(outcome, Reject)


def test_configured_ranges_widen_and_add() -> None:
    bridge = BridgeSettings(
        metrics=(*DEFAULT_METRICS, "humidity"), ranges={"disk": (0, 200), "humidity": (0, 100)}
    )
    ranges = bridge.effective_ranges
    assert isinstance(ranged("nerve/pi-01/telemetry/disk", b"150", ranges), Forward)
    assert isinstance(ranged("nerve/pi-01/telemetry/cpu", b"150", ranges), Reject)
    metrics = bridge.metrics
    outcome = translate(
        "nerve/pi-01/telemetry/humidity",
        b"101",
        prefix="nerve",
        metrics=metrics,
        max_payload=LIMIT,
        ranges=ranges,
    )
    assert isinstance(outcome, Reject)


@pytest.mark.parametrize("bad", [(5, 1), (0, float("nan")), (float("-inf"), 1)])
def test_a_range_must_be_finite_and_ordered(bad: tuple[float, float]) -> None:
    with pytest.raises(ValidationError, match="range of 'disk'"):
        BridgeSettings(ranges={"disk": bad})


@given(st.binary(max_size=200), st.sampled_from(["telemetry/disk", "events/x", "results/clear_temp"]))
def test_translate_never_raises(payload: bytes, tail: str) -> None:
    outcome = run(f"nerve/pi-01/{tail}", payload)
    assert isinstance(outcome, Forward | Reject | Ignore)


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


def translator(**overrides: object) -> Translator:
    settings: dict[str, object] = {"prefix": "nerve", "metrics": DEFAULT_METRICS, "max_payload": LIMIT}
    return Translator(**(settings | overrides))  # type: ignore[arg-type]


TOPICS = st.sampled_from(
    [
        "nerve/pi-01/telemetry/disk",
        "nerve/pi-01/telemetry/nope",
        "nerve/pi-02/events/door",
        "nerve/pi-01/results/clear_temp",
        "nerve/pi-01/commands/clear_temp",
        "nerve/pi-01/facts/x",
        "nerve/pi-01/status",
        "nerve/pi 01/telemetry/disk",
        "nerve/pi-01/telemetery/disk",
        "elsewhere/pi-01",
    ]
)
PAYLOADS = st.one_of(
    st.sampled_from([b"95", b"150", b"nan", b'{"value": 3}', b"online"]),
    st.binary(max_size=40),
    st.builds(
        lambda subject: to_msgpack(
            Event(id="e-1", source="t", type="nerve.telemetry.disk", subject=subject, data={"value": 1})
        ),
        st.sampled_from(["pi-01", "pi-02"]),
    ),
)


def comparable(outcome: Forward | Reject | Ignore) -> object:
    """An outcome without what differs between two wraps of one raw reading (its fresh id and time)."""
    if isinstance(outcome, Forward) and outcome.msg_id != "e-1":
        event = decode(outcome.body, Event)
        return (outcome.subject, outcome.device, event.type, event.subject, event.source, event.data)
    return outcome


@given(st.lists(st.tuples(TOPICS, PAYLOADS), max_size=30))
def test_a_translator_that_remembers_topics_says_what_a_fresh_one_says(
    messages: list[tuple[str, bytes]],
) -> None:
    remembering = translator(ranges=DEFAULT_RANGES)
    for topic, payload in messages:
        fresh = translate(
            topic, payload, prefix="nerve", metrics=DEFAULT_METRICS, max_payload=LIMIT, ranges=DEFAULT_RANGES
        )
        assert comparable(remembering.translate(topic, payload)) == comparable(fresh)


def test_the_route_cache_is_bounded_and_starts_again_when_full() -> None:
    remembering = translator(route_cache=100)
    for i in range(100 + 10):
        outcome = remembering.translate(f"nerve/dev-{i}/telemetry/disk", b"5")
        assert isinstance(outcome, Forward)
        assert outcome.device == f"dev-{i}"
        assert len(remembering._routes) <= 100
    assert len(remembering._routes) == 10  # emptied at 100, then refilled


def test_by_default_the_topics_of_10000_devices_with_3_metrics_stay_remembered() -> None:
    remembering = translator()
    topics = [
        f"nerve/dev-{i}/telemetry/{metric}" for i in range(10_000) for metric in ("cpu", "memory", "disk")
    ]
    for _ in range(2):
        for topic in topics:
            remembering.translate(topic, b"5")
    assert len(remembering._routes) == len(topics)  # the second round found every one


def test_topics_that_do_not_parse_are_not_remembered() -> None:
    remembering = translator()
    for i in range(50):
        assert isinstance(remembering.translate(f"nerve/pi 01/telemetry/x{i}", b"5"), Reject)
        assert isinstance(remembering.translate(f"nerve/{'x' * 500}{i}/status", b"online"), Ignore)
    assert remembering._routes == {}


BINARY = (("specversion", "1.0"), ("id", "b-1"), ("source", "s"), ("type", "nerve.telemetry.disk"))


@pytest.mark.parametrize(
    ("value", "stored"), [(b"50", True), (b"150", False), (b"-1", False), (b"nan", False)]
)
def test_a_reading_that_is_a_bare_number_has_its_range_checked_in_either_mode(
    value: bytes, stored: bool
) -> None:
    topic = "nerve/pi-01/telemetry/disk"
    structured = {**msgpack.unpackb(to_msgpack(Event(id="s-1", source="s", type="t", subject="pi-01")))}
    structured["data"] = float(value)
    for outcome in (
        ranged(topic, msgpack.packb(structured), DEFAULT_RANGES),
        translate(
            topic,
            value,
            prefix="nerve",
            metrics=DEFAULT_METRICS,
            max_payload=LIMIT,
            ranges=DEFAULT_RANGES,
            properties=BINARY,
        ),
    ):
        assert isinstance(outcome, Forward if stored else Reject), outcome


def test_binary_mode_is_recognised_by_specversion_and_keeps_the_id() -> None:
    outcome = translate(
        "nerve/pi-01/telemetry/disk",
        b"12.5",
        prefix="nerve",
        metrics=DEFAULT_METRICS,
        max_payload=LIMIT,
        properties=BINARY,
        content_type="application/json",
    )
    assert isinstance(outcome, Forward)
    assert outcome.msg_id == "b-1"
    event = decode(outcome.body, Event)
    assert (event.data, event.subject, event.datacontenttype) == (12.5, "pi-01", "application/json")


@given(st.lists(st.tuples(st.text(max_size=12), st.text(max_size=12)), max_size=8), st.binary(max_size=64))
def test_binary_mode_never_raises(properties: list[tuple[str, str]], payload: bytes) -> None:
    for topic in ("nerve/pi-01/telemetry/disk", "nerve/pi-01/events/x", "nerve/pi-01/results/a"):
        outcome = translate(
            topic,
            payload,
            prefix="nerve",
            metrics=DEFAULT_METRICS,
            max_payload=LIMIT,
            properties=[("specversion", "1.0"), *properties],
        )
        assert isinstance(outcome, Forward | Reject)


def test_a_route_cache_below_one_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match="route_cache") as refused:
        load_settings(overrides={"bridge": {"route_cache": 0}})
    assert "\n" not in str(refused.value).strip()


async def test_the_pump_remembers_as_many_topics_as_the_setting_says() -> None:
    settings = load_settings(overrides={"bridge": {"route_cache": 3}})
    pump = Pump(
        loop=asyncio.get_running_loop(),
        stats=BridgeStats(),
        prefix="nerve",
        metrics=DEFAULT_METRICS,
        max_payload=LIMIT,
        mappings=(),
        store_timeout_s=5.0,
        max_in_flight=100,
        route_cache=settings.bridge.route_cache,
    )
    translator = pump._translator
    for i in range(4):
        translator.translate(f"nerve/dev-{i}/telemetry/disk", b"5")
    assert len(translator._routes) == 1  # emptied at 3
