"""nerve.runtime.jetstream.streams: the stream configurations, no overlaps, idempotent provisioning."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Final, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StoreCompression,
    StreamConfig,
)
from nats.js.errors import BadRequestError, ServerError, ServiceUnavailableError

from nerve.bridge import Bridge
from nerve.runtime.config.settings import (
    COMPRESSION_CREDIT,
    GIB,
    MIB,
    TELEMETRY_DUPLICATE_WINDOW_S,
    StreamsSettings,
    load_settings,
)
from nerve.runtime.envelope.codec import decode, to_msgpack
from nerve.runtime.envelope.model import CommandResult, Event
from nerve.runtime.errors import ConfigError
from nerve.runtime.jetstream.client import STREAM_FULL_CODE, StreamFull, publish_dead_letter, publish_envelope
from nerve.runtime.jetstream.streams import (
    BUCKETS,
    DAY,
    DEADLETTER_STREAM,
    DUPLICATE_WINDOW_S,
    STREAM_OF_KIND,
    STREAMS,
    StreamConfigRefused,
    StreamShrinkRefused,
    StreamSpec,
    ensure_buckets,
    ensure_streams,
    stream_usage,
)
from nerve.runtime.subjects import Address, Kind, deadletter_subject
from nerve.runtime.testing import stream_messages, wait_for_count
from nerve.runtime.trust.signing import generate_keypair
from nerve.runtime.wire.client import MqttClient

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext
    from tests.conftest import Running

    from nerve.runtime.config.settings import Settings
    from nerve.runtime.stack.brokers import NatsServer

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
    window = 30 if spec.name == "NERVE_TELEMETRY" else DUPLICATE_WINDOW_S
    assert DUPLICATE_WINDOW_S == 20 * 60
    assert config.duplicate_window == window
    assert config.as_dict()["duplicate_window"] == window * 10**9  # nanoseconds on the wire
    assert config.subjects is not None
    assert len(config.subjects) == 1


@pytest.mark.parametrize("prefix", PREFIXES)
def test_subjects_per_kind_under_prefix(prefix: str) -> None:
    root = prefix.replace("/", ".")
    for kind, name in STREAM_OF_KIND.items():
        assert SPEC[name].config(prefix).subjects == [f"{root}.*.{kind.value}.*"]
    assert SPEC[DEADLETTER_STREAM].config(prefix).subjects == [f"{root}.deadletter.*"]


def test_facts_are_kept_and_bounded() -> None:
    config = SPEC["NERVE_FACTS"].config("nerve")
    assert config.deny_delete is True
    assert config.deny_purge is True
    assert config.max_bytes == 6 * GIB
    assert config.max_age == 10 * 365 * DAY
    assert config.discard is DiscardPolicy.NEW  # a full facts stream refuses, never forgets


@pytest.mark.parametrize("spec", [s for s in STREAMS if not s.kept], ids=lambda spec: spec.name)
def test_other_streams_age_out_and_can_be_purged(spec: StreamSpec) -> None:
    config = spec.config("nerve")
    assert config.deny_delete is False
    assert config.deny_purge is False
    assert config.max_age is not None
    assert DAY <= config.max_age <= 30 * DAY
    assert config.as_dict()["max_age"] == int(config.max_age * 10**9)


def test_discard_policy_by_purpose() -> None:
    discard = {spec.name: spec.config("nerve").discard for spec in STREAMS}
    assert discard == {
        "NERVE_TELEMETRY": DiscardPolicy.OLD,
        "NERVE_EVENTS": DiscardPolicy.OLD,
        "NERVE_COMMANDS": DiscardPolicy.NEW,
        "NERVE_RESULTS": DiscardPolicy.NEW,
        "NERVE_FACTS": DiscardPolicy.NEW,
        "NERVE_DEADLETTER": DiscardPolicy.OLD,
    }


def test_default_limits_fit_the_documented_budget() -> None:
    ages = {spec.name: spec.config("nerve").max_age for spec in STREAMS}
    assert ages["NERVE_TELEMETRY"] == 7 * DAY
    assert ages["NERVE_EVENTS"] == 30 * DAY
    assert ages["NERVE_COMMANDS"] == 7 * DAY
    assert ages["NERVE_RESULTS"] == 30 * DAY
    assert ages[DEADLETTER_STREAM] == 30 * DAY
    sizes = [spec.config("nerve").max_bytes or 0 for spec in STREAMS]
    assert all(size > 0 for size in sizes)
    assert sum(sizes) <= 10 * GIB  # docs/streams.md: sized for 10 GiB of disk for JetStream


def test_limits_come_from_settings() -> None:
    settings = load_settings(overrides={"streams": {"deadletter": {"max_bytes": 2 * MIB, "max_age_s": 7200}}})
    config = SPEC[DEADLETTER_STREAM].config("nerve", settings.streams)
    assert config.max_bytes == 2 * MIB
    assert config.max_age == 7200
    assert config.as_dict()["max_age"] == 7200 * 10**9


def test_telemetry_is_compressed_and_its_max_bytes_is_its_disk_budget_times_the_credit() -> None:
    default = SPEC["NERVE_TELEMETRY"].config("nerve")
    assert default.compression is StoreCompression.S2
    assert default.max_bytes == int(StreamsSettings().telemetry.disk_budget * COMPRESSION_CREDIT)
    plain = load_settings(
        overrides={"streams": {"telemetry": {"disk_budget": 8 * MIB, "compression": "none"}}}
    )
    config = SPEC["NERVE_TELEMETRY"].config("nerve", plain.streams)
    assert (config.max_bytes, config.compression) == (8 * MIB, StoreCompression.NONE)
    # Other streams keep whatever compression an operator gave them: nerve leaves it unset.
    assert all(spec.config("nerve").compression is None for spec in STREAMS if spec.key != "telemetry")


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"deadletter": {"max_bytes": 1000, "max_age_s": 60}}, "streams.deadletter.max_bytes"),
        ({"facts": {"max_bytes": 8 * MIB, "max_age_s": 0}}, "streams.facts.max_age_s"),
        ({"commands": {"max_bytes": 8 * MIB, "max_age_s": 60}}, "streams.commands.max_age_s"),
        ({"telemetry": {"disk_budget": 1000}}, "streams.telemetry.disk_budget"),
        ({"telemetry": {"max_age_s": 60}}, "streams.telemetry.max_age_s"),
        ({"telemetry": {"compression": "zstd"}}, "streams.telemetry.compression"),
        ({"telemetry": {"max_bytes": 8 * MIB}}, "streams.telemetry: max_bytes is replaced by disk_budget"),
        ({"facts_warn_at": 1.5}, "streams.facts_warn_at"),
        ({"command": {}}, "streams.command"),
    ],
)
def test_bad_limits_are_refused_with_their_key(overrides: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(overrides={"streams": overrides})


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


async def test_ensure_streams_without_settings_leaves_existing_streams_alone() -> None:
    js = FakeJetStream(existing={"NERVE_FACTS", "NERVE_TELEMETRY"})
    await ensure_streams(cast("JetStreamContext", js), "nerve")
    assert js.updated == []
    assert set(js.added) == set(SPEC) - {"NERVE_FACTS", "NERVE_TELEMETRY"}


async def test_ensure_streams_raises_other_errors() -> None:
    js = FakeJetStream(existing={"NERVE_EVENTS"}, err_code=10065)  # e.g. subjects overlap
    with pytest.raises(BadRequestError):
        await ensure_streams(cast("JetStreamContext", js), "nerve")
    assert js.updated == []
    assert js.added == ["NERVE_TELEMETRY"]


async def test_no_room_on_the_server_is_one_line_naming_max_file_store() -> None:
    class Full(FakeJetStream):
        async def add_stream(self, config: StreamConfig) -> None:  # noqa: ARG002 - refuses them all
            raise ServerError(
                code=500, err_code=10047, description="insufficient storage resources available"
            )

    with pytest.raises(
        StreamConfigRefused, match=r"NERVE_TELEMETRY: nats-server has no room .*max_file_store"
    ):
        await ensure_streams(cast("JetStreamContext", Full(existing=set())), "nerve")


async def test_a_server_that_cannot_change_compression_is_one_line() -> None:
    class Old(FakeJetStream):
        async def stream_info(self, name: str) -> SimpleNamespace:
            return SimpleNamespace(
                config=SimpleNamespace(name=name, max_age=None), state=SimpleNamespace(bytes=0, messages=0)
            )

        async def update_stream(self, config: StreamConfig) -> None:  # noqa: ARG002 - refuses them all
            raise BadRequestError(
                code=400, err_code=10052, description="stream configuration for compression invalid"
            )

    js = Old(existing={"NERVE_TELEMETRY"})
    with pytest.raises(StreamConfigRefused, match=r"NERVE_TELEMETRY: .*compression 's2'.*compression: none"):
        await ensure_streams(cast("JetStreamContext", js), "nerve", StreamsSettings())


# --- floods and limits, against a real nats-server ---------------------------------------------------------

BLOB: Final = 100_000  # bytes of data per flooding message
FLOOD: Final = 30  # messages: about three times a 1 MiB limit
TINY: Final = {"max_bytes": MIB, "max_age_s": 3600}


def limits(key: str, max_bytes: int, max_age_s: float = 3600) -> dict[str, object]:
    """Settings for `key` that give its stream `max_bytes` (telemetry: an uncompressed disk budget)."""
    if key == "telemetry":
        return {"disk_budget": max_bytes, "max_age_s": max_age_s, "compression": "none"}
    return {"max_bytes": max_bytes, "max_age_s": max_age_s}


def tiny_streams() -> StreamsSettings:
    return load_settings(overrides={"streams": {key: limits(key, MIB) for key in SPEC_KEYS}}).streams


SPEC_KEYS: Final = [spec.key for spec in STREAMS]


def reading(value: int) -> Event:
    return Event(source="test", type="nerve.telemetry.cpu", subject="pi", data={"value": value})


def blob(i: int) -> Event:
    return Event(source="test", type="flood", subject="flooder", data={"i": i, "blob": "x" * BLOB})


async def flood(js: JetStreamContext, spec: StreamSpec, count: int) -> int:
    """Publish `count` big messages into `spec`'s stream; return how many were refused (StreamFull)."""
    refusals: list[StreamFull] = []
    for i in range(count):
        try:
            if spec.kind is None:
                await publish_dead_letter(
                    js, prefix="nerve", part="test", reason="flood", origin="x", payload=b"x" * BLOB
                )
            else:
                subject = Address("flooder", spec.kind, "flood").subject("nerve")
                await publish_envelope(js, subject, blob(i))
        except StreamFull as exc:
            refusals.append(exc)
    assert all(exc.err_code == STREAM_FULL_CODE and "full" in str(exc) for exc in refusals)
    return len(refusals)


@pytest.mark.broker
@pytest.mark.parametrize("spec", STREAMS, ids=lambda spec: spec.name)
async def test_a_flood_stays_within_the_limit(nc: NatsClient, spec: StreamSpec) -> None:
    js = nc.jetstream()
    await ensure_streams(js, "nerve", tiny_streams())
    refused = await flood(js, spec, FLOOD)
    usage = await stream_usage(js, spec.name)
    assert usage.max_bytes == MIB
    assert usage.bytes <= MIB
    if spec.discard is DiscardPolicy.NEW:
        # Refused, and every refusal told the publisher: nothing stored beyond the limit, nothing dropped.
        assert refused > 0
        assert usage.messages + refused == FLOOD
        assert usage.dropped == 0
    else:
        # The oldest went, and the stream counts them.
        assert refused == 0
        assert usage.dropped > 0
        assert usage.messages + usage.dropped == FLOOD


@pytest.mark.broker
async def test_ensure_streams_brings_old_streams_to_their_limits_without_losing_data(nc: NatsClient) -> None:
    js = nc.jetstream()
    unbounded = {spec.name: spec.config("nerve") for spec in STREAMS}
    for config in unbounded.values():  # as the release before limits made them
        await js.add_stream(replace(config, max_bytes=None, max_age=0, discard=DiscardPolicy.OLD))
    for i in range(5):
        await publish_envelope(js, "nerve.pi.facts.kept", blob(i))
        await publish_envelope(js, "nerve.pi.telemetry.cpu", blob(i))
    await ensure_streams(js, "nerve", StreamsSettings())
    await ensure_streams(js, "nerve", StreamsSettings())  # twice: idempotent
    for name in ("NERVE_FACTS", "NERVE_TELEMETRY"):
        info = await js.stream_info(name)
        assert info.state.messages == 5
        assert info.config.max_bytes == SPEC[name].config("nerve").max_bytes
        assert info.config.discard == SPEC[name].config("nerve").discard


@pytest.mark.broker
async def test_apply_compresses_an_existing_telemetry_stream_and_keeps_what_it_holds(nc: NatsClient) -> None:
    """A telemetry stream made before compression: `nerve streams apply` (ensure_streams) turns s2 on."""
    js = nc.jetstream()
    before = SPEC["NERVE_TELEMETRY"].config("nerve")
    await js.add_stream(replace(before, compression=StoreCompression.NONE, max_bytes=2 * GIB))
    for i in range(5):
        await publish_envelope(js, "nerve.pi.telemetry.cpu", reading(i))
    await ensure_streams(js, "nerve", StreamsSettings())
    info = await js.stream_info("NERVE_TELEMETRY")
    assert info.config.compression == StoreCompression.S2
    assert info.config.max_bytes == before.max_bytes
    assert info.state.messages == 5
    await publish_envelope(js, "nerve.pi.telemetry.cpu", reading(5))
    stored = await stream_messages(js, "NERVE_TELEMETRY")
    assert [decode(m.data, Event).data["value"] for m in stored] == list(range(6))


@pytest.mark.broker
async def test_apply_gives_an_existing_telemetry_stream_the_window_of_the_settings(nc: NatsClient) -> None:
    """A telemetry stream made with the 20-minute window of earlier releases gets 30 s (the ids it
    keeps in memory are readings/s x the window); what it holds stays, and an id within the new window
    is still stored once."""
    js = nc.jetstream()
    before = SPEC["NERVE_TELEMETRY"].config("nerve")
    await js.add_stream(replace(before, duplicate_window=DUPLICATE_WINDOW_S))
    first = reading(0)
    await publish_envelope(js, "nerve.pi.telemetry.cpu", first)
    await ensure_streams(js, "nerve", StreamsSettings())
    info = await js.stream_info("NERVE_TELEMETRY")
    assert info.config.duplicate_window == TELEMETRY_DUPLICATE_WINDOW_S == 30
    assert info.state.messages == 1
    again = await publish_envelope(js, "nerve.pi.telemetry.cpu", first)
    assert again.duplicate
    shorter = load_settings(overrides={"streams": {"telemetry": {"duplicate_window_s": 5}}})
    await ensure_streams(js, "nerve", shorter.streams)
    assert (await js.stream_info("NERVE_TELEMETRY")).config.duplicate_window == 5
    events = await js.stream_info("NERVE_EVENTS")
    assert events.config.duplicate_window == DUPLICATE_WINDOW_S  # the other streams keep theirs


@pytest.mark.parametrize("window", [0, 0.5, 3601])
def test_a_telemetry_window_outside_1_s_to_an_hour_is_refused_in_one_line(window: float) -> None:
    with pytest.raises(ConfigError, match="duplicate_window_s") as refused:
        load_settings(overrides={"streams": {"telemetry": {"duplicate_window_s": window}}})
    assert "\n" not in str(refused.value).strip()


@pytest.mark.broker
async def test_shrinking_drops_oldest_telemetry_but_never_facts(
    nc: NatsClient, caplog: pytest.LogCaptureFixture
) -> None:
    js = nc.jetstream()
    big = load_settings(overrides={"streams": {key: limits(key, 4 * MIB) for key in SPEC_KEYS}})
    await ensure_streams(js, "nerve", big.streams)
    for i in range(20):  # 2 MB each
        await publish_envelope(js, "nerve.pi.facts.kept", blob(i))
        await publish_envelope(js, "nerve.pi.telemetry.cpu", blob(i))
    small = load_settings(
        overrides={"streams": {"telemetry": limits("telemetry", MIB), "facts": limits("facts", 4 * MIB)}}
    )
    await ensure_streams(js, "nerve", small.streams)
    telemetry = await stream_usage(js, "NERVE_TELEMETRY")
    assert telemetry.bytes <= MIB
    assert telemetry.dropped > 0
    assert "NERVE_TELEMETRY" in caplog.text
    assert "dropped to fit" in caplog.text

    with pytest.raises(StreamShrinkRefused, match=r"NERVE_FACTS.*facts are never dropped"):
        await ensure_streams(js, "nerve", tiny_streams())
    facts = await js.stream_info("NERVE_FACTS")
    assert facts.state.messages == 20
    assert facts.config.max_bytes == 4 * MIB  # left as it was


@pytest.mark.broker
async def test_facts_cannot_be_aged_out_by_a_shorter_max_age(
    nc: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    js = nc.jetstream()
    await ensure_streams(js, "nerve", StreamsSettings())
    await publish_envelope(js, "nerve.pi.facts.kept", blob(0))
    later = time.time() + 2 * 3600  # the fact is two hours old, as far as ensure_streams can tell
    monkeypatch.setattr("nerve.runtime.jetstream.streams.time.time", lambda: later)
    short = load_settings(overrides={"streams": {"facts": {"max_bytes": 64 * MIB, "max_age_s": 3600}}})
    with pytest.raises(StreamShrinkRefused, match="max_age 3600s is shorter"):
        await ensure_streams(js, "nerve", short.streams)
    info = await js.stream_info("NERVE_FACTS")
    assert info.state.messages == 1
    assert info.config.max_age == 10 * 365 * DAY


@pytest.mark.broker
async def test_a_result_refused_at_the_limit_waits_in_mqtt_and_is_stored_once_there_is_room(
    settings: Settings, nc: NatsClient, running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    """The bridge holds the PUBACK of a refused result and retries, saying so: mosquitto keeps it."""
    overrides = {"mqtt": {"url": settings.mqtt.url}, "nats": {"url": settings.nats.url}}
    tight = load_settings(overrides={**overrides, "streams": {"results": TINY}})
    js = nc.jetstream()
    await ensure_streams(js, "nerve", tight.streams)
    for size in (100_000, 10_000, 1_000, 100):  # fill NERVE_RESULTS to the last byte
        with contextlib.suppress(ServiceUnavailableError):
            for _ in range(20):
                await js.publish("nerve.filler.results.clear_temp", b"x" * size)
    held = (await js.stream_info("NERVE_RESULTS")).state.messages
    result = CommandResult(
        source="device", type="nerve.result.clear_temp", subject="pi-01", action="clear_temp", status="ok"
    )
    with caplog.at_level(logging.WARNING):
        async with running(Bridge(settings=tight), wait=10), MqttClient(tight.mqtt, client_id="pi-01") as pi:
            await pi.publish("nerve/pi-01/results/clear_temp", to_msgpack(result), qos=1)
            async with asyncio.timeout(10):
                while "maximum bytes exceeded" not in caplog.text:
                    await asyncio.sleep(0.05)
            assert "retrying" in caplog.text
            assert (await js.stream_info("NERVE_RESULTS")).state.messages == held  # refused, not dropped
            await ensure_streams(js, "nerve", StreamsSettings())  # room again (an operator raised it)
            await wait_for_count(js, "NERVE_RESULTS", held + 1)
    stored = await stream_messages(js, "NERVE_RESULTS")
    assert [decode(m.data, CommandResult).id for m in stored[held:]] == [result.id]


@pytest.mark.parametrize("name", ["central.yaml", "nerve.yaml"])
def test_shipped_configs_show_the_default_limits(name: str) -> None:
    configs = Path(__file__).resolve().parents[2] / "configs"
    assert load_settings(configs / name).streams == StreamsSettings()


@pytest.mark.broker
async def test_nerve_send_says_in_one_line_that_the_commands_stream_is_full(
    nc: NatsClient, nats_server: NatsServer, tmp_path: Path
) -> None:
    js = nc.jetstream()
    await ensure_streams(js, "nerve", load_settings(overrides={"streams": {"commands": TINY}}).streams)
    for size in (100_000, 10_000, 1_000, 100):  # fill NERVE_COMMANDS to the last byte
        with contextlib.suppress(ServiceUnavailableError):
            for _ in range(20):
                await js.publish("nerve.filler.commands.clear_temp", b"x" * size)
    held = (await js.stream_info("NERVE_COMMANDS")).state.messages
    generate_keypair(tmp_path / "keys", "central")
    env = {key: value for key, value in os.environ.items() if not key.startswith("NERVE_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "no-config")
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("nerve")),
        *("send", "pi-01", "clear_temp", "--timeout", "5s", "--nats-url", nats_server.url),
        *("--key", str(tmp_path / "keys" / "central.key")),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    async with asyncio.timeout(60):
        _, err = await process.communicate()
    assert process.returncode not in {0, None}
    last = err.decode().strip().splitlines()[-1]
    assert last.startswith("nerve send: error: JetStream refused nerve.pi-01.commands.clear_temp")
    assert "its stream is full" in last
    assert "Traceback" not in err.decode()
    assert (await js.stream_info("NERVE_COMMANDS")).state.messages == held


@pytest.mark.broker
async def test_buckets_are_bounded_and_an_unbounded_one_is_brought_to_its_limits(nc: NatsClient) -> None:
    js = nc.jetstream()
    bucket = min(BUCKETS, key=lambda spec: spec.max_value_size or 0)  # a value past it still fits a message
    # A bucket made before buckets had limits (or by hand): no byte or value limit, one value in it.
    kv = await js.create_key_value(KeyValueConfig(bucket=bucket.name, history=bucket.history))
    await kv.put("dev1", b"kept")
    await ensure_buckets(js)
    config = (await js.stream_info(bucket.stream)).config
    assert (config.max_bytes, config.max_msg_size) == (bucket.max_bytes, bucket.max_value_size)
    assert (await kv.get("dev1")).value == b"kept"  # limits only: what it holds stays
    # A value over the limit is refused, and the putter is told.
    with pytest.raises(BadRequestError):
        await kv.put("dev2", b"x" * (bucket.max_value_size + 1))
    await kv.put("dev2", b"x" * 100)
    await ensure_buckets(js)  # idempotent
    assert (await js.stream_info(bucket.stream)).state.messages == 2
