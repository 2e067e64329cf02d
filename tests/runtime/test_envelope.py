"""Unit tests of nerve.runtime.envelope.model: CloudEvents attributes, validation, causal chaining."""

from __future__ import annotations

import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nerve.runtime.envelope.codec import envelope_from
from nerve.runtime.envelope.model import (
    MAX_DATA_DEPTH,
    Command,
    CommandResult,
    Envelope,
    Event,
    Fact,
    check_extensions,
    derived_id,
    new_id,
    utcnow,
)
from nerve.runtime.errors import DecodeError

BASE: dict[str, Any] = {"specversion": "1.0", "id": "e-1", "source": "test", "type": "nerve.telemetry.disk"}


def event(**overrides: Any) -> Event:
    """An Event from a CloudEvents document (as JSON gives it), validated as a decoder does."""
    return envelope_from(json.loads(json.dumps({**BASE, **overrides})), Event)


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


def test_defaults_in_code() -> None:
    e = Event(source="s", type="t")
    assert e.specversion == "1.0"
    assert len(e.id) == 32
    int(e.id, 16)  # hex
    assert e.time is None  # optional in CloudEvents: never made up for an event
    assert e.subject is None
    assert e.data is None
    assert e.extensions == {}
    assert (e.correlationid, e.causationid, e.hops) == (None, None, 0)


def test_only_the_required_attributes() -> None:
    e = event()
    assert (e.id, e.source, e.type, e.time, e.subject, e.data) == (
        "e-1",
        "test",
        "nerve.telemetry.disk",
        None,
        None,
        None,
    )


def test_commands_facts_and_results_get_a_time() -> None:
    before = utcnow()
    assert before <= command().time <= utcnow()
    fact = Fact(source="s", type="t", subject="pi-01", kind="k")
    assert before <= fact.time <= utcnow()


def test_ids_are_fresh() -> None:
    assert Event(source="s", type="t").id != Event(source="s", type="t").id
    assert new_id() != new_id()


def test_ids_are_128_random_bits_never_repeated_across_threads() -> None:
    """new_id reads its randomness in batches: threads taking ids at once still never share one."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        batches = list(pool.map(lambda _: [new_id() for _ in range(3000)], range(8)))
    ids = [made for batch in batches for made in batch]
    assert len(set(ids)) == len(ids)
    assert all(len(made) == 32 and int(made, 16) >= 0 for made in ids)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    new_id()  # the parent has a pool of ids read ahead
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.write(write, "".join(new_id() for _ in range(10)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as pipe:
        child = pipe.read().decode()
    parent = "".join(new_id() for _ in range(10))
    assert len(child) == len(parent) == 320
    assert {child[i : i + 32] for i in range(0, 320, 32)}.isdisjoint(
        parent[i : i + 32] for i in range(0, 320, 32)
    )


def test_utcnow_is_aware_utc() -> None:
    assert utcnow().tzinfo is UTC


def test_time_from_rfc3339() -> None:
    assert event(time="2026-11-25T04:52:40Z").time == datetime(2026, 11, 25, 4, 52, 40, tzinfo=UTC)
    assert event(time="2026-11-25T06:52:40+02:00").time == datetime(2026, 11, 25, 4, 52, 40, tzinfo=UTC)


@pytest.mark.parametrize("value", ["2026-11-25T04:52:40", "yesterday", "2026-13-01T00:00:00Z", 1764046360])
def test_bad_time_is_refused_by_name(value: object) -> None:
    with pytest.raises(DecodeError, match=r"at `\$\.time`"):
        event(time=value)


def test_naive_expires_is_refused() -> None:
    document = {**json.loads(msgspec.json.encode(command())), "expires": "2030-01-01T00:00:00"}
    with pytest.raises(DecodeError, match=r"timezone .* at `\$\.expires`"):
        envelope_from(document, Command)


# --- CloudEvents -------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [{"a": 1}, [1, 2], "text", 95, 95.5, True, None])
def test_data_is_any_json_value(data: object) -> None:
    assert event(data=data).data == data


def test_optional_attributes() -> None:
    e = event(subject="door/3", datacontenttype="application/json", dataschema="https://example.com/s")
    assert (e.subject, e.datacontenttype, e.dataschema) == (
        "door/3",
        "application/json",
        "https://example.com/s",
    )


def test_data_base64_is_binary_data() -> None:
    assert event(data_base64="AAE=").data_base64 == b"\x00\x01"


def test_data_and_data_base64_together_are_refused() -> None:
    with pytest.raises(DecodeError, match="data and data_base64"):
        event(data=1, data_base64="AAE=")


def test_extensions_are_kept_as_they_came() -> None:
    e = event(region="eu", rank=3, ratio=0.5, hot=False, traceparent="00-abc-01")
    assert e.extensions == {"region": "eu", "rank": 3, "ratio": 0.5, "hot": False, "traceparent": "00-abc-01"}
    assert type(e.extensions["rank"]) is int


def test_null_attributes_are_absent() -> None:
    e = event(subject=None, region=None)
    assert e.subject is None
    assert e.extensions == {}


@pytest.mark.parametrize("name", ["Region", "trace_id", "trace-id", "x" * 65, "ümlaut", "a b"])
def test_bad_extension_names_are_refused(name: str) -> None:
    with pytest.raises(DecodeError, match=f"attribute name {name!r} is not valid"):
        event(**{name: "x"})


@pytest.mark.parametrize("value", [{"a": 1}, [1], [], {}])
def test_extension_values_are_scalars(value: object) -> None:
    with pytest.raises(DecodeError, match="extension 'ext': a value must be a string, a number or a boolean"):
        event(ext=value)


def test_check_extensions_in_code() -> None:
    with pytest.raises(ValueError, match="'id' is an attribute of its own"):
        check_extensions({"id": "x"})
    with pytest.raises(ValueError, match="not valid"):
        Event(source="s", type="t", extensions={"Bad": 1})
    with pytest.raises(ValueError, match="not a number JSON can carry"):
        Event(source="s", type="t", extensions={"bad": float("nan")})


# --- refusals --------------------------------------------------------------------------------------


def test_extra_attribute_on_command_is_refused() -> None:
    # a signed command must not smuggle fields its signature does not cover
    document = json.loads(msgspec.json.encode(command()))
    document["runas"] = "root"
    with pytest.raises(DecodeError, match="unknown attribute `runas`"):
        envelope_from(document, Command)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("specversion", "0.3", r"Invalid enum value '0\.3' - at `\$\.specversion`"),
        ("specversion", 1.0, r"at `\$\.specversion`"),
        ("source", "", r"length >= 1 - at `\$\.source`"),
        ("source", 5, r"Expected `str`, got `int` - at `\$\.source`"),
        ("type", "", r"at `\$\.type`"),
        ("id", "", r"at `\$\.id`"),
        ("id", "x" * 129, r"length <= 128 - at `\$\.id`"),
        ("subject", "", r"at `\$\.subject`"),
        ("correlationid", "", r"at `\$\.correlationid`"),
        ("hops", -1, r"at `\$\.hops`"),
        ("hops", 1_000_001, r"<= 1000000 - at `\$\.hops`"),
        ("hops", "many", r"at `\$\.hops`"),
        ("datacontenttype", 3, r"at `\$\.datacontenttype`"),
        ("data_base64", "not base64!", r"at `\$\.data_base64`"),
    ],
)
def test_invalid_attribute_refused_by_name(field: str, value: object, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        event(**{field: value})


@pytest.mark.parametrize("field", ["specversion", "id", "source", "type"])
def test_required_attributes(field: str) -> None:
    document = {k: v for k, v in BASE.items() if k != field}
    with pytest.raises(DecodeError, match=f"missing required attribute `{field}`"):
        envelope_from(document, Event)


def test_data_depth_and_numbers_are_checked_in_code_too() -> None:
    deep: object = 1
    for _ in range(MAX_DATA_DEPTH + 1):
        deep = [deep]
    with pytest.raises(ValueError, match=f"data: nested deeper than {MAX_DATA_DEPTH} levels"):
        Event(source="s", type="t", data=deep)
    with pytest.raises(ValueError, match="data: inf is not a number JSON can carry"):
        Event(source="s", type="t", data={"value": float("inf")})
    with pytest.raises(ValueError, match=r"data: integer .* does not fit in 64 bits"):
        Event(source="s", type="t", data={"value": 2**64})
    with pytest.raises(ValueError, match="data: map keys must be strings"):
        Event(source="s", type="t", data={1: 2})
    with pytest.raises(ValueError, match="data: a bytes is not JSON data"):
        Event(source="s", type="t", data={"raw": b"x"})


def test_models_are_frozen() -> None:
    e = Event(source="s", type="t")
    with pytest.raises(AttributeError):
        e.hops = 3  # type: ignore[misc]


# --- chaining --------------------------------------------------------------------------------------


def test_caused_from_a_root_event() -> None:
    root = event()
    assert root.caused() == {"correlationid": root.id, "causationid": root.id, "hops": 1}


def test_caused_chains_keep_the_correlation_and_count_hops() -> None:
    root = Event(source="s", type="t")
    first = Event(source="s", type="t", **root.caused())
    second = Event(source="s", type="t", **first.caused())
    assert second.correlationid == root.id
    assert second.causationid == first.id
    assert second.hops == 2
    assert first.causationid == root.id


def test_caused_keeps_an_existing_correlation_and_caps_hops() -> None:
    e = event(correlationid="chain-1", hops=5)
    assert e.caused() == {"correlationid": "chain-1", "causationid": e.id, "hops": 6}
    assert event(hops=1_000_000).caused()["hops"] == 1_000_000


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
    assert (c.keyid, c.sig, c.hops, c.correlationid, c.causationid) == ("", "", 0, None, None)


def test_command_create_with_cause_and_id() -> None:
    cause = event(hops=2, correlationid="chain-9")
    c = command(cause=cause, command_id="cmd-1")
    assert c.id == "cmd-1"
    assert c.correlationid == "chain-9"
    assert c.causationid == cause.id
    assert c.hops == 3


def test_command_create_refuses_bad_action_and_device() -> None:
    deep: object = 1
    for _ in range(MAX_DATA_DEPTH):
        deep = [deep]
    with pytest.raises(msgspec.ValidationError, match=r"\$\.action"):
        Command.create(device="pi-01", action="rm -rf", args={}, source="s", ttl=timedelta(seconds=1))
    with pytest.raises(msgspec.ValidationError, match=r"\$\.subject"):
        Command.create(device="pi/01", action="reboot", args={}, source="s", ttl=timedelta(seconds=1))
    with pytest.raises(ValueError, match="data: nested deeper"):
        Command.create(
            device="pi-01", action="reboot", args={"a": deep}, source="s", ttl=timedelta(seconds=1)
        )


@pytest.mark.parametrize("missing", ["action", "expires", "subject"])
def test_command_requires_action_expires_and_device(missing: str) -> None:
    document = json.loads(msgspec.json.encode(command()))
    del document[missing]
    with pytest.raises(DecodeError, match=f"missing required attribute `{missing}`"):
        envelope_from(document, Command)


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
    r = CommandResult.for_command(c, source="edge", status="rejected", reason="not signed", subject="pi-02")
    assert r.correlationid == c.id
    assert r.causationid == c.id
    assert r.data == {}
    assert r.reason == "not signed"
    assert r.subject == "pi-02"


def test_result_status_is_closed() -> None:
    document = json.loads(msgspec.json.encode(CommandResult.for_command(command(), source="e", status="ok")))
    document["status"] = "maybe"
    with pytest.raises(DecodeError, match=r"at `\$\.status`"):
        envelope_from(document, CommandResult)


# --- Fact ----------------------------------------------------------------------------------------------


def test_fact() -> None:
    document = {**BASE, "subject": "pi-01", "kind": "loop_dropped", "summary": "hops over 8"}
    f = envelope_from(document, Fact)
    assert f.kind == "loop_dropped"
    assert f.summary == "hops over 8"
    with pytest.raises(DecodeError, match=r"at `\$\.kind`"):
        envelope_from({**document, "kind": "loop.dropped"}, Fact)


@pytest.mark.parametrize("model", [Event, Command, CommandResult, Fact])
def test_every_model_is_an_envelope(model: type[Envelope]) -> None:
    assert issubclass(model, Envelope)
    assert model.__struct_config__.frozen is True
    assert model.__struct_config__.forbid_unknown_fields is True


@given(st.lists(st.text(max_size=40), min_size=1, max_size=5))
def test_derived_id_is_uuid5_of_its_parts(parts: list[str]) -> None:
    """Ids derived before (uuid.uuid5) and now are the same: a run resumed across an upgrade keeps them."""
    expected = uuid.uuid5(uuid.UUID("6f1c1f1e-5e7a-4f43-9a35-8f2f3b9a6a10"), "\x1f".join(parts)).hex
    assert derived_id(*parts) == expected
