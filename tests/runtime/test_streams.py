"""nerve.runtime.jetstream.streams: the stream configurations, no overlaps, idempotent provisioning."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from nerve.runtime.jetstream.streams import (
    DAY,
    DEADLETTER_STREAM,
    DUPLICATE_WINDOW_S,
    STREAM_OF_KIND,
    STREAMS,
    StreamSpec,
    ensure_streams,
)
from nerve.runtime.subjects import Address, Kind, deadletter_subject

if TYPE_CHECKING:
    from nats.js import JetStreamContext

PREFIXES = ["nerve", "acme/nerve", "a/b/c"]
SPEC = {spec.name: spec for spec in STREAMS}


def overlap(a: str, b: str) -> bool:
    """Whether some literal subject matches both NATS subject filters (`*` one token, `>` the rest)."""
    ta, tb = a.split("."), b.split(".")
    for i in range(max(len(ta), len(tb))):
        x = ta[i] if i < len(ta) else None
        y = tb[i] if i < len(tb) else None
        if x == ">" or y == ">":
            # `>` needs at least one token where it stands; the other side must have one too.
            return x is not None and y is not None
        if x is None or y is None:
            return False
        if x != y and "*" not in {x, y}:
            return False
    return True


def matches(filter_: str, subject: str) -> bool:
    return "*" not in subject and ">" not in subject and overlap(filter_, subject)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("a.*", "a.b", True),
        ("a.*", "*.b", True),
        ("a.*", "a.b.c", False),
        ("a.*.c", "a.b.*", True),
        ("a.*.c", "a.b.d", False),
        ("a.>", "a.b.c.d", True),
        ("a.>", "a", False),
        (">", "a", True),
        ("a.>", "b.>", False),
        ("a.b.>", "a.*", False),
        ("a.b.>", "a.*.c", True),
        ("nerve.*.telemetry.*", "nerve.deadletter.*", False),
    ],
)
def test_overlap_checker(a: str, b: str, expected: bool) -> None:
    assert overlap(a, b) is expected
    assert overlap(b, a) is expected


def test_every_kind_has_a_stream_and_names_are_unique() -> None:
    assert set(STREAM_OF_KIND) == set(Kind)
    assert STREAM_OF_KIND == {
        Kind.TELEMETRY: "NERVE_TELEMETRY",
        Kind.EVENTS: "NERVE_EVENTS",
        Kind.COMMANDS: "NERVE_COMMANDS",
        Kind.RESULTS: "NERVE_RESULTS",
        Kind.FACTS: "NERVE_FACTS",
    }
    names = [spec.name for spec in STREAMS]
    assert len(names) == len(set(names)) == 6
    assert DEADLETTER_STREAM in names
    assert SPEC[DEADLETTER_STREAM].kind is None


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("spec", STREAMS, ids=lambda spec: spec.name)
def test_config_common(spec: StreamSpec, prefix: str) -> None:
    config = spec.config(prefix)
    assert isinstance(config, StreamConfig)
    assert config.name == spec.name
    assert config.retention is RetentionPolicy.LIMITS
    assert config.storage is StorageType.FILE
    assert config.discard is DiscardPolicy.OLD
    assert config.duplicate_window == DUPLICATE_WINDOW_S == 20 * 60
    assert config.as_dict()["duplicate_window"] == 20 * 60 * 10**9  # nanoseconds on the wire
    assert config.subjects is not None
    assert len(config.subjects) == 1


@pytest.mark.parametrize("prefix", PREFIXES)
def test_subjects_per_kind_under_prefix(prefix: str) -> None:
    root = prefix.replace("/", ".")
    for kind, name in STREAM_OF_KIND.items():
        assert SPEC[name].config(prefix).subjects == [f"{root}.*.{kind.value}.*"]
    assert SPEC[DEADLETTER_STREAM].config(prefix).subjects == [f"{root}.deadletter.*"]


def test_facts_are_kept_forever() -> None:
    config = SPEC["NERVE_FACTS"].config("nerve")
    assert config.deny_delete is True
    assert config.deny_purge is True
    assert not config.max_age  # 0 = no limit
    assert config.as_dict()["max_age"] == 0
    assert config.max_msgs is None
    assert config.max_bytes is None
    assert config.discard is DiscardPolicy.OLD


@pytest.mark.parametrize("spec", [s for s in STREAMS if not s.forever], ids=lambda spec: spec.name)
def test_other_streams_age_out_and_can_be_purged(spec: StreamSpec) -> None:
    config = spec.config("nerve")
    assert config.deny_delete is False
    assert config.deny_purge is False
    assert config.max_age is not None
    assert DAY <= config.max_age <= 30 * DAY
    assert config.as_dict()["max_age"] == int(config.max_age * 10**9)


def test_retention_periods() -> None:
    assert SPEC["NERVE_TELEMETRY"].max_age_s == 7 * DAY
    assert SPEC["NERVE_EVENTS"].max_age_s == 30 * DAY
    assert SPEC["NERVE_COMMANDS"].max_age_s == 7 * DAY
    assert SPEC["NERVE_RESULTS"].max_age_s == 30 * DAY
    assert SPEC[DEADLETTER_STREAM].max_age_s == 30 * DAY


@pytest.mark.parametrize("prefix", PREFIXES)
def test_no_two_streams_overlap(prefix: str) -> None:
    filters = {spec.name: (spec.config(prefix).subjects or [""])[0] for spec in STREAMS}
    for (name_a, a), (name_b, b) in itertools.combinations(filters.items(), 2):
        assert not overlap(a, b), f"{name_a} ({a}) overlaps {name_b} ({b})"


tokens = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=20)


@given(prefix=st.sampled_from(PREFIXES), device=tokens, kind=st.sampled_from(list(Kind)), name=tokens)
def test_each_device_subject_lands_in_exactly_its_stream(
    prefix: str, device: str, kind: Kind, name: str
) -> None:
    subject = Address(device, kind, name).subject(prefix)
    homes = [spec.name for spec in STREAMS if matches((spec.config(prefix).subjects or [""])[0], subject)]
    assert homes == [STREAM_OF_KIND[kind]]


@given(prefix=st.sampled_from(PREFIXES), part=tokens)
def test_each_deadletter_subject_lands_in_the_deadletter_stream(prefix: str, part: str) -> None:
    subject = deadletter_subject(part, prefix)
    homes = [spec.name for spec in STREAMS if matches((spec.config(prefix).subjects or [""])[0], subject)]
    assert homes == [DEADLETTER_STREAM]


# --- ensure_streams, against a fake JetStream -------------------------------------------------------------


class FakeJetStream:
    """Records calls; `existing` streams answer add_stream with JetStream's "name in use" (10058)."""

    def __init__(self, existing: set[str], err_code: int = 10058) -> None:
        self.existing = existing
        self.err_code = err_code
        self.added: list[str] = []
        self.updated: list[str] = []

    async def add_stream(self, config: StreamConfig) -> None:
        assert config.name is not None
        if config.name in self.existing:
            raise BadRequestError(code=400, err_code=self.err_code, description="stream name already in use")
        self.added.append(config.name)

    async def update_stream(self, config: StreamConfig) -> None:
        assert config.name is not None
        self.updated.append(config.name)


async def test_ensure_streams_creates_all() -> None:
    js = FakeJetStream(existing=set())
    await ensure_streams(cast("JetStreamContext", js), "nerve")
    assert js.added == [spec.name for spec in STREAMS]
    assert js.updated == []


async def test_ensure_streams_updates_existing() -> None:
    js = FakeJetStream(existing={"NERVE_FACTS", "NERVE_TELEMETRY"})
    await ensure_streams(cast("JetStreamContext", js), "nerve")
    assert js.updated == ["NERVE_TELEMETRY", "NERVE_FACTS"]
    assert set(js.added) | set(js.updated) == set(SPEC)


async def test_ensure_streams_raises_other_errors() -> None:
    js = FakeJetStream(existing={"NERVE_EVENTS"}, err_code=10065)  # e.g. subjects overlap
    with pytest.raises(BadRequestError):
        await ensure_streams(cast("JetStreamContext", js), "nerve")
    assert js.updated == []
    assert js.added == ["NERVE_TELEMETRY"]
