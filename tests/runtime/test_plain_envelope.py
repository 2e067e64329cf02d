"""The lean edge's plain envelopes against the pydantic models: same acceptance, same values, same bytes."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from nerve.runtime.envelope.codec import decode, to_msgpack
from nerve.runtime.envelope.model import Command, CommandResult, Event
from nerve.runtime.errors import DecodeError
from nerve.runtime.plain_envelope import (
    PlainCommand,
    PlainResult,
    decode_command,
    event_bytes,
    format_time,
    load_document,
    parse_command,
    parse_result,
)
from nerve.runtime.trust.signing import canonical_bytes

PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Every attribute of a command, from the model the plain parser must agree with.
FIELDS = tuple(Command.model_fields)

tokens = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
moments = st.datetimes(
    min_value=datetime(1, 1, 2),  # noqa: DTZ001 - a naive bound, the zone comes from `timezones`
    max_value=datetime(9999, 12, 30),  # noqa: DTZ001
    timezones=st.sampled_from(
        [UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5, minutes=-30))]
    ),
)


@st.composite
def times(draw: st.DrawFn) -> object:  # noqa: PLR0911 - one return per form
    """A time attribute as central writes it, or in one of the other forms a person might type."""
    moment = draw(moments)
    form = draw(st.sampled_from(["model", "iso", "space", "offset", "numbers", "naive", "date", "bytes"]))
    if form == "model":
        return format_time(moment.astimezone(UTC))
    if form == "iso":
        return moment.isoformat()
    if form == "space":
        return moment.isoformat(sep=" ").replace("+00:00", "Z")
    if form == "offset":
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%f%z")
    if form == "numbers":
        return draw(
            st.integers(-(10**14), 10**14)
            | st.floats(-1e13, 1e13)
            | st.from_regex(r"-?[0-9]{1,12}(\.[0-9]{0,8})?", fullmatch=True)
        )
    if form == "naive":
        return moment.replace(tzinfo=None).isoformat()
    if form == "date":
        return moment.date().isoformat()
    return format_time(moment.astimezone(UTC)).encode()


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """A command document, valid unless a draw makes it otherwise (every attribute may be left out)."""
    document: dict[str, Any] = {
        "specversion": "1.0",
        "id": draw(st.text(min_size=1, max_size=130)),
        "source": draw(st.text(min_size=1, max_size=40)),
        "type": draw(st.text(min_size=1, max_size=40)),
        "subject": draw(tokens),
        "time": draw(times()),
        "data": draw(st.dictionaries(st.text(max_size=8), json_values, max_size=4)),
        "correlationid": draw(st.none() | st.text(min_size=1, max_size=130)),
        "causationid": draw(st.none() | st.text(min_size=1, max_size=130)),
        "hops": draw(st.integers(-2, 1_000_002)),
        "action": draw(tokens),
        "expires": draw(times()),
        "keyid": draw(st.text(max_size=10)),
        "sig": draw(st.text(max_size=10)),
    }
    left_out = draw(st.sets(st.sampled_from(FIELDS), max_size=2))
    return {key: value for key, value in document.items() if key not in left_out}


odd_values = (
    json_values
    | st.binary(max_size=20)
    | st.text(max_size=300)
    | st.from_regex(r"\s*[+-]?[0-9_]{1,8}(\.[0-9]{0,3})?\s*", fullmatch=True)
    | st.sampled_from(["1.0", "2.0", "", "pi 01", "a/b", "1e3", "nan", "2030-01-01T00:00:00+24:00", b"\xff"])
)


@st.composite
def mutated(draw: st.DrawFn) -> dict[Any, Any]:
    """A document with some attributes replaced by odd values, and perhaps an unknown or a bytes key."""
    document: dict[Any, Any] = draw(documents())
    for key in draw(st.lists(st.sampled_from(FIELDS), max_size=3)):
        document[key] = draw(odd_values)
    extra = draw(st.sampled_from([None, "extra", b"id", "Sig"]))
    if extra is not None:
        document[extra] = draw(odd_values)
    return document


def same(a: object, b: object) -> bool:
    """Equal, where NaN equals NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def check_equivalent(document: object) -> None:
    """`parse_command` accepts exactly when `Command` does, with the same values and signed bytes."""
    try:
        model: Command | None = Command.model_validate(document)
    except ValidationError:
        model = None
    try:
        plain: PlainCommand | None = parse_command(document)
    except DecodeError as exc:
        reason = exc.reason
        plain = None
    else:
        reason = ""
    assert plain is not None or reason.startswith("not a valid Command: ") or "must be a map" in reason
    assert (model is None) == (plain is None), (document, model, plain)
    if model is None or plain is None:
        return
    generated = {"id", "time"} - set(document) if isinstance(document, dict) else set()
    for name in FIELDS:
        if name not in generated:
            assert same(getattr(model, name), getattr(plain, name)), name
    # The signature covers the same bytes (or neither has them: data with no JSON form).
    try:
        signed = canonical_bytes(model)
    except (ValueError, TypeError):  # a PydanticSerializationError is a ValueError
        with pytest.raises((ValueError, TypeError)):
            plain.canonical_bytes()
        return
    assert plain.canonical_bytes() == signed.replace(model.id.encode(), plain.id.encode()).replace(
        format_time(model.time).encode(), format_time(plain.time).encode()
    )


@PROPERTY
@given(documents())
def test_commands_parse_as_the_model_does(document: dict[str, Any]) -> None:
    check_equivalent(document)


@PROPERTY
@given(mutated())
def test_mutated_commands_are_refused_exactly_when_the_model_refuses_them(document: dict[Any, Any]) -> None:
    check_equivalent(document)


@PROPERTY
@given(
    st.binary(max_size=200)
    | documents().map(msgpack.packb)
    | documents().map(lambda d: json.dumps(d, default=bytes.decode).encode())
)
def test_any_bytes_decode_as_the_model_decodes_them(payload: bytes) -> None:
    try:
        model: Command | None = decode(payload, Command)
    except DecodeError:
        model = None
    try:
        plain: PlainCommand | None = decode_command(payload)
    except DecodeError:
        plain = None
    assert (model is None) == (plain is None)


def test_a_refusal_names_the_attribute() -> None:
    with pytest.raises(DecodeError, match=r"not a valid Command: subject: device id 'a b' is not valid"):
        parse_command({"source": "s", "type": "t", "subject": "a b", "action": "x", "expires": 0})
    with pytest.raises(DecodeError, match=r"smuggled: Extra inputs are not permitted"):
        parse_command(
            {"source": "s", "type": "t", "subject": "d", "action": "x", "expires": 0, "smuggled": 1}
        )
    with pytest.raises(DecodeError, match="must be a map"):
        load_document(b"[1]") and parse_command([1])


@PROPERTY
@given(
    metric=tokens,
    moment=moments,
    data=st.dictionaries(st.text(max_size=8), json_values, max_size=4),
)
def test_events_are_the_bytes_the_model_encodes(metric: str, moment: datetime, data: dict[str, Any]) -> None:
    model = Event(
        id="e1",
        source="nerve://edge/d",
        type=f"nerve.telemetry.{metric}",
        subject="d",
        time=moment,
        data=data,
    )
    packed = event_bytes(
        event_id="e1",
        source="nerve://edge/d",
        type_=f"nerve.telemetry.{metric}",
        subject="d",
        time=moment,
        data=data,
    )
    assert packed == to_msgpack(model)
    assert decode(packed, Event) == decode(to_msgpack(model), Event)  # (inf and nan become None)


@PROPERTY
@given(
    status=st.sampled_from(["ok", "failed", "rejected", "expired", "unknown"]),
    reason=st.text(max_size=50),
    data=st.dictionaries(st.text(max_size=8), json_values, max_size=4),
    hops=st.integers(0, 1_000_000),
    correlation=st.none() | st.text(min_size=1, max_size=128),
)
def test_results_are_the_bytes_the_model_encodes(
    status: str, reason: str, data: dict[str, Any], hops: int, correlation: str | None
) -> None:
    plain = PlainResult(
        source="nerve://edge/d",
        type="nerve.result.x",
        subject="d",
        action="x",
        status=status,
        reason=reason,
        data=data,
        correlationid=correlation,
        causationid="c",
        hops=hops,
    )
    model = decode(plain.encode(), CommandResult)
    assert to_msgpack(model) == plain.encode()
    assert parse_result(load_document(plain.encode())).encode() == plain.encode()
