"""Unit tests of nerve.runtime.envelope.model: CloudEvents attributes, validation, causal chaining."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from nerve.runtime.envelope.model import Command, CommandResult, Envelope, Event, Fact
from nerve.runtime.plain_envelope import new_id, utcnow

BASE: dict[str, Any] = {"source": "test", "type": "nerve.telemetry.disk", "subject": "pi-01"}


def event(**overrides: Any) -> Event:
    return Event.model_validate({**BASE, **overrides})


def command(**overrides: Any) -> Command:
    return Command.create(
        device="pi-01",
        action="clear_temp",
        args={"older_than_s": 3600},
        source="central/disk",
        ttl=timedelta(seconds=60),
        **overrides,
    )


# --- defaults --------------------------------------------------------------------------------------


def test_defaults() -> None:
    before = datetime.now(UTC)
    e = event()
    after = datetime.now(UTC)
    assert e.specversion == "1.0"
    assert len(e.id) == 32
    int(e.id, 16)  # hex
    assert e.time.utcoffset() == timedelta(0)
    assert before <= e.time <= after
    assert e.data == {}
    assert e.correlationid is None
    assert e.causationid is None
    assert e.hops == 0


def test_ids_are_fresh() -> None:
    assert event().id != event().id
    assert new_id() != new_id()


def test_utcnow_is_aware_utc() -> None:
    assert utcnow().tzinfo is UTC


def test_time_in_other_zone_is_converted_to_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    e = event(time=datetime(2026, 11, 25, 6, 52, 40, tzinfo=plus_two))
    assert e.time == datetime(2026, 11, 25, 4, 52, 40, tzinfo=UTC)
    assert e.time.utcoffset() == timedelta(0)
    assert e.time.hour == 4


def test_time_from_iso_string() -> None:
    e = event(time="2026-11-25T04:52:40Z")
    assert e.time == datetime(2026, 11, 25, 4, 52, 40, tzinfo=UTC)


@pytest.mark.parametrize("value", [datetime(2026, 11, 25, 4, 52, 40), "2026-11-25T04:52:40"])  # noqa: DTZ001
def test_naive_time_is_refused(value: object) -> None:
    with pytest.raises(ValidationError, match="time must carry a timezone"):
        event(time=value)


@pytest.mark.parametrize("value", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_time_out_of_range_in_utc_is_a_validation_error(value: str) -> None:
    # Was an OverflowError escaping pydantic (and so escaping codec.decode).
    with pytest.raises(ValidationError, match="out of range"):
        event(time=value)


def test_naive_expires_is_refused() -> None:
    with pytest.raises(ValidationError, match="expires"):
        Command.model_validate(
            {**BASE, "action": "reboot", "expires": datetime(2030, 1, 1)}  # noqa: DTZ001
        )


# --- refusals --------------------------------------------------------------------------------------


def test_extra_attribute_is_refused() -> None:
    with pytest.raises(ValidationError, match="extra"):
        event(priority="high")


def test_extra_attribute_on_command_is_refused() -> None:
    # a signed command must not smuggle fields its signature does not cover
    document = command().model_dump()
    document["run_as"] = "root"
    with pytest.raises(ValidationError, match="run_as"):
        Command.model_validate(document)


def test_negative_hops_refused() -> None:
    with pytest.raises(ValidationError, match="hops"):
        event(hops=-1)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("specversion", "0.3"),
        ("subject", "bad$id"),
        ("subject", "pi.01"),
        ("subject", ""),
        ("subject", "x" * 65),
        ("source", ""),
        ("type", ""),
        ("id", ""),
        ("id", "x" * 129),
        ("correlationid", ""),
        ("data", [1, 2]),
        ("hops", "many"),
    ],
)
def test_invalid_attribute_refused(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        event(**{field: value})
    assert info.value.errors()[0]["loc"][0] == field


@pytest.mark.parametrize("field", ["source", "type", "subject"])
def test_required_attributes(field: str) -> None:
    document = {k: v for k, v in BASE.items() if k != field}
    with pytest.raises(ValidationError, match=field):
        Event.model_validate(document)


def test_models_are_frozen() -> None:
    e = event()
    with pytest.raises(ValidationError, match="frozen"):
        e.hops = 3  # type: ignore[misc]


# --- chaining --------------------------------------------------------------------------------------


def test_caused_from_a_root_event() -> None:
    root = event()
    assert root.caused() == {"correlationid": root.id, "causationid": root.id, "hops": 1}


def test_caused_chains_keep_the_correlation_and_count_hops() -> None:
    root = event()
    first = event(**root.caused())
    second = event(**first.caused())
    assert second.correlationid == root.id
    assert second.causationid == first.id
    assert second.hops == 2
    assert first.causationid == root.id


def test_caused_keeps_an_existing_correlation() -> None:
    e = event(correlationid="chain-1", hops=5)
    assert e.caused() == {"correlationid": "chain-1", "causationid": e.id, "hops": 6}


# --- Command -----------------------------------------------------------------------------------------


def test_command_create() -> None:
    before = datetime.now(UTC)
    c = command()
    assert c.type == "nerve.command.clear_temp"
    assert c.action == "clear_temp"
    assert c.subject == "pi-01"
    assert c.source == "central/disk"
    assert c.data == {"older_than_s": 3600}
    assert c.expires - c.time == timedelta(seconds=60)
    assert before <= c.time <= datetime.now(UTC)
    assert c.keyid == ""
    assert c.sig == ""
    assert c.hops == 0
    assert c.correlationid is None
    assert c.causationid is None


def test_command_create_with_cause_and_id() -> None:
    cause = event(hops=2, correlationid="chain-9")
    c = command(cause=cause, command_id="cmd-1")
    assert c.id == "cmd-1"
    assert c.correlationid == "chain-9"
    assert c.causationid == cause.id
    assert c.hops == 3


def test_command_create_refuses_bad_action_and_device() -> None:
    with pytest.raises(ValidationError, match="action"):
        Command.create(device="pi-01", action="rm -rf", args={}, source="s", ttl=timedelta(seconds=1))
    with pytest.raises(ValidationError, match="device id"):
        Command.create(device="pi/01", action="reboot", args={}, source="s", ttl=timedelta(seconds=1))


def test_command_requires_action_and_expires() -> None:
    with pytest.raises(ValidationError) as info:
        Command.model_validate(BASE)
    missing = {error["loc"][0] for error in info.value.errors()}
    assert missing == {"action", "expires"}


# --- CommandResult ---------------------------------------------------------------------------------


def test_result_for_command() -> None:
    c = command(cause=event(correlationid="chain-3", hops=1))
    r = CommandResult.for_command(c, source="edge/pi-01", status="ok", data={"freed": 10})
    assert r.causationid == c.id
    assert r.correlationid == "chain-3"
    assert r.hops == c.hops + 1 == 3
    assert r.subject == c.subject
    assert r.action == c.action
    assert r.type == "nerve.result.clear_temp"
    assert r.status == "ok"
    assert r.reason == ""
    assert r.data == {"freed": 10}
    assert r.source == "edge/pi-01"
    assert r.id != c.id


def test_result_for_root_command_correlates_to_the_command() -> None:
    c = command()
    r = CommandResult.for_command(c, source="edge", status="rejected", reason="not signed")
    assert r.correlationid == c.id
    assert r.causationid == c.id
    assert r.data == {}
    assert r.reason == "not signed"


def test_result_status_is_closed() -> None:
    with pytest.raises(ValidationError, match="status"):
        CommandResult.for_command(command(), source="edge", status="maybe")  # type: ignore[arg-type]


# --- Fact ----------------------------------------------------------------------------------------------


def test_fact() -> None:
    f = Fact.model_validate({**BASE, "kind": "loop_dropped", "summary": "hops over 8"})
    assert f.kind == "loop_dropped"
    assert f.summary == "hops over 8"
    with pytest.raises(ValidationError, match="kind"):
        Fact.model_validate({**BASE, "kind": "loop.dropped"})


@pytest.mark.parametrize("model", [Event, Command, CommandResult, Fact])
def test_every_model_is_an_envelope(model: type[Envelope]) -> None:
    assert issubclass(model, Envelope)
    assert model.model_config["frozen"] is True
    assert model.model_config["extra"] == "forbid"
