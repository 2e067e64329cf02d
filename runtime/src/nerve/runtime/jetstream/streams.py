"""The JetStream streams nerve keeps, created (or brought up to date) idempotently at start.

Every stream has a byte limit and an age limit (`StreamsSettings`, docs/streams.md), and what happens at
the byte limit is chosen for what it holds:

- telemetry, events, dead letters: the oldest messages go (`DiscardPolicy.OLD`); how many went is
  `last_seq - messages` (`StreamUsage.dropped`), so a capped dead-letter stream still counts what it lost.
- commands, results, facts: a new message is refused (`DiscardPolicy.NEW`) and its publisher gets
  `StreamFull`: nothing is dropped without someone being told. Facts are never deleted or purged either.

Telemetry is stored s2-compressed (`streams.telemetry.compression`): a raw reading the bridge wraps takes
about 87 bytes of disk instead of 338 (bench/telemetry_storage.py). Its limit is a disk budget
(`streams.telemetry.disk_budget`); JetStream counts bytes before compression, so its `max_bytes` is the
budget times `COMPRESSION_CREDIT` (docs/streams.md, "Telemetry").
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StoreCompression,
    StreamConfig,
)
from nats.js.errors import APIError, BadRequestError, NotFoundError

from nerve.runtime.config.settings import EngineSettings, StreamLimits, StreamsSettings, TelemetryLimits
from nerve.runtime.errors import NerveError
from nerve.runtime.subjects import Kind, deadletter_subject, kind_filter, subject_root

if TYPE_CHECKING:
    from nats.js import JetStreamContext
    from nats.js.api import StreamInfo
    from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

DAY: Final = 24 * 3600.0
# JetStream drops a second message with the same Nats-Msg-Id inside this window: long enough to cover
# a bridge restart and an edge replaying its outbox after a short outage. Telemetry's is its own, and
# shorter (`streams.telemetry.duplicate_window_s`, 30 s): its ids come 10,000 a second.
DUPLICATE_WINDOW_S: Final = 20 * 60.0
DEFAULT_STREAMS: Final = StreamsSettings()
DEFAULT_ENGINE: Final = EngineSettings()


class StreamShrinkRefused(NerveError):
    """A new limit of a stream that is never pruned (facts) would delete what it holds; not applied."""

    def __init__(self, stream: str, reason: str) -> None:
        self.stream = stream
        self.reason = reason
        super().__init__(f"{stream}: not updated: {reason}")


class StreamConfigRefused(NerveError):
    """nats-server refused a stream's configuration (storage, compression); `reason` says what to do."""

    def __init__(self, stream: str, reason: str) -> None:
        self.stream = stream
        self.reason = reason
        super().__init__(f"{stream}: {reason}")


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """One stream: its name, what it holds, its settings key, and what happens when it is full."""

    name: str
    kind: Kind | None
    key: str  # its section in `StreamsSettings`
    discard: DiscardPolicy
    kept: bool = False  # facts: no delete, no purge, no shrinking that would drop one

    def limits(self, streams: StreamsSettings) -> StreamLimits | TelemetryLimits:
        """This stream's limits in `streams`."""
        limits: StreamLimits | TelemetryLimits = getattr(streams, self.key)
        return limits

    def config(self, prefix: str, streams: StreamsSettings = DEFAULT_STREAMS) -> StreamConfig:
        """The JetStream configuration of this stream under `prefix`, with its limits from `streams`."""
        subject = kind_filter(self.kind, prefix) if self.kind else deadletter_subject("*", prefix)
        limits = self.limits(streams)
        # Compression is left unset (the server's default, none) where nerve does not choose, so that
        # applying these limits never changes what an operator chose for another stream.
        compression: StoreCompression | None = None
        duplicate_window = DUPLICATE_WINDOW_S
        if isinstance(limits, TelemetryLimits):
            compression = StoreCompression.S2 if limits.compression == "s2" else StoreCompression.NONE
            duplicate_window = limits.duplicate_window_s
        return StreamConfig(
            name=self.name,
            subjects=[subject],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=limits.max_age_s,
            max_bytes=limits.max_bytes,
            discard=self.discard,
            duplicate_window=duplicate_window,
            allow_direct=True,  # the engine's waits read stored messages one by one (direct gets)
            deny_delete=self.kept,
            deny_purge=self.kept,
            compression=compression,
        )


STREAMS: Final = (
    StreamSpec("NERVE_TELEMETRY", Kind.TELEMETRY, "telemetry", DiscardPolicy.OLD),
    StreamSpec("NERVE_EVENTS", Kind.EVENTS, "events", DiscardPolicy.OLD),
    StreamSpec("NERVE_COMMANDS", Kind.COMMANDS, "commands", DiscardPolicy.NEW),
    StreamSpec("NERVE_RESULTS", Kind.RESULTS, "results", DiscardPolicy.NEW),
    StreamSpec("NERVE_FACTS", Kind.FACTS, "facts", DiscardPolicy.NEW, kept=True),
    StreamSpec("NERVE_DEADLETTER", None, "deadletter", DiscardPolicy.OLD),
)
STREAM_OF_KIND: Final = {spec.kind: spec.name for spec in STREAMS if spec.kind is not None}
SPEC_OF_STREAM: Final = {spec.name: spec for spec in STREAMS}
DEADLETTER_STREAM: Final = "NERVE_DEADLETTER"
FACTS_STREAM: Final = "NERVE_FACTS"


@dataclass(frozen=True, slots=True)
class BucketSpec:
    """One JetStream KV bucket central keeps: its name and how many values per key it remembers.

    Buckets are created by the admin identity with the streams (`apply_streams`); central only uses them
    (`open_bucket`), and its NATS permissions are derived from this list (`permissions.py`).
    """

    name: str
    history: int = 1
    # Every bucket is bounded too: JetStream refuses a put beyond `max_bytes` (KV buckets discard new)
    # or a value over `max_value_size`, and the putter is told (docs/streams.md).
    max_bytes: int = 64 * 1024 * 1024
    max_value_size: int = 64 * 1024
    max_age_s: float = 0.0  # 0: values are kept until deleted

    def config(self) -> KeyValueConfig:
        """The bucket's configuration, with its limits."""
        return KeyValueConfig(
            bucket=self.name,
            history=self.history,
            max_bytes=self.max_bytes,
            max_value_size=self.max_value_size,
            ttl=self.max_age_s or None,
            storage=StorageType.FILE,
        )

    @property
    def stream(self) -> str:
        """The stream JetStream keeps the bucket in."""
        return f"KV_{self.name}"


#: The durable agent engine's run journals (`run.<run id>`, `cancel.<run id>`): docs/engine.md.
RUNS_BUCKET: Final = "nerve_runs"
#: Flow control's state (`nerve.runtime.engine.flow`): windows, slots, debounces, breakers.
LIMITS_BUCKET: Final = "nerve_limits"
#: Which runs each correlation chain started (the loop guard); kept `central.engine.loop_window_s`.
LINEAGE_BUCKET: Final = "nerve_lineage"
#: The engine's durable timers: nats-server message schedules (docs/engine.md).
TIMERS_STREAM: Final = "NERVE_TIMERS"


def buckets(engine: EngineSettings = DEFAULT_ENGINE) -> tuple[BucketSpec, ...]:
    """Every bucket central uses, the engine's sized by `engine` (`central.engine`)."""
    return (
        BucketSpec(
            RUNS_BUCKET,
            history=1,
            max_bytes=engine.runs.max_bytes,
            max_value_size=engine.max_record_bytes,
            max_age_s=engine.runs.max_age_s,
        ),
        BucketSpec(
            LIMITS_BUCKET,
            history=1,
            max_bytes=engine.limits_max_bytes,
            max_value_size=engine.max_record_bytes,  # a debounce keeps its last trigger
            max_age_s=engine.runs.max_age_s,  # a slot lives as long as a run may
        ),
        BucketSpec(
            LINEAGE_BUCKET,
            history=1,
            max_bytes=engine.limits_max_bytes,
            max_value_size=64 * 1024,
            max_age_s=engine.loop_window_s,
        ),
    )


#: Every bucket central uses: add one to `buckets` (and nowhere else) and `nerve streams apply` creates
#: it and central's NATS identity may use it.
BUCKETS: Final = buckets()


def timers_filter(prefix: str) -> str:
    """Every subject of the timers stream (`<root>.engine.timers.>`: five tokens, never a device's)."""
    return f"{subject_root(prefix)}.engine.timers.>"


def timers_config(prefix: str, engine: EngineSettings = DEFAULT_ENGINE) -> StreamConfig:
    """NERVE_TIMERS: schedules allowed; at its byte limit the oldest messages go.

    nats-server refuses message schedules in a stream that discards new messages, so a full stream drops
    its oldest: fired messages are deleted once their step is journalled (`forget`) to keep it small, and
    a parked run whose timer is overdue by a lease is woken by the engine's watchdog all the same.
    """
    return StreamConfig(
        name=TIMERS_STREAM,
        subjects=[timers_filter(prefix)],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=engine.timers.max_age_s,
        max_bytes=engine.timers.max_bytes,
        discard=DiscardPolicy.OLD,
        duplicate_window=DUPLICATE_WINDOW_S,
        allow_direct=True,
        allow_msg_schedules=True,
    )


#: Streams that hold message schedules (one list, like `STREAMS` and `BUCKETS`): their configuration
#: under a prefix and the engine's settings.
SCHEDULE_STREAMS: Final = ((TIMERS_STREAM, timers_config),)

# JetStream's error code for "stream name already in use with a different configuration".
_STREAM_NAME_IN_USE: Final = 10058
# JetStream's error code for "insufficient storage resources available": the limits of every stream add up
# to more than the server's `max_file_store` (it counts bytes before compression).
_INSUFFICIENT_STORAGE: Final = 10047


@dataclass(frozen=True, slots=True)
class StreamUsage:
    """How full one stream is, and how many messages its limits dropped since it was created."""

    name: str
    bytes: int
    max_bytes: int
    messages: int
    dropped: int

    @property
    def fraction(self) -> float:
        """Bytes held over the byte limit (0 when the stream has none)."""
        return self.bytes / self.max_bytes if self.max_bytes > 0 else 0.0


def usage_of(info: StreamInfo) -> StreamUsage:
    """The usage of a stream from its `StreamInfo`."""
    state = info.state
    return StreamUsage(
        name=info.config.name or "",
        bytes=state.bytes,
        max_bytes=info.config.max_bytes or 0,
        messages=state.messages,
        # With limits retention nothing is acknowledged away: whatever is not held any more was dropped
        # by a limit (or deleted by hand, which only an admin may do).
        dropped=max(0, state.last_seq - state.messages),
    )


async def stream_usage(js: JetStreamContext, name: str) -> StreamUsage:
    """How full stream `name` is now. Raises nats errors as they come (`NotFoundError`, timeouts)."""
    return usage_of(await js.stream_info(name))


async def _oldest_age_s(js: JetStreamContext, info: StreamInfo) -> float:
    """How old the stream's first message is, in seconds (0 when it holds none)."""
    if not info.state.messages:
        return 0.0
    first = await js.get_msg(info.config.name or "", seq=info.state.first_seq)
    return max(0.0, time.time() - first.time.timestamp()) if first.time is not None else 0.0


async def _check_shrink(js: JetStreamContext, spec: StreamSpec, config: StreamConfig) -> None:
    """Refuse a new limit that would delete kept facts; log what a shrink drops from other streams."""
    info = await js.stream_info(spec.name)
    held = info.state.bytes
    max_bytes = config.max_bytes or 0
    max_age = config.max_age or 0.0
    too_small = 0 < max_bytes < held
    oldest_s = await _oldest_age_s(js, info) if 0 < max_age < (info.config.max_age or math.inf) else 0.0
    too_short = 0 < max_age < oldest_s
    if not (too_small or too_short):
        return
    what = (
        f"max_bytes {max_bytes} is below the {held} bytes it holds"
        if too_small
        else f"max_age {max_age:g}s is shorter than the age of its oldest message ({oldest_s:.0f}s)"
    )
    if spec.kept:
        raise StreamShrinkRefused(spec.name, f"{what}; facts are never dropped (docs/streams.md)")
    log.warning("streams: %s: %s: its oldest messages are dropped to fit", spec.name, what)


async def ensure_streams(js: JetStreamContext, prefix: str, streams: StreamsSettings | None = None) -> None:
    """Create every stream, or bring an existing one to its limits. Safe to call at every start.

    With `streams` (the settings), an existing stream whose configuration differs is updated in place:
    nothing it holds is lost, except that a smaller limit drops the oldest messages of telemetry, events,
    commands, results and dead letters to fit (logged). A limit that would drop facts raises
    `StreamShrinkRefused` and leaves NERVE_FACTS as it was. Without `streams`, missing streams are created
    with the default limits and existing ones are left as they are (so a tool never undoes an operator's
    limits).
    """
    for spec in STREAMS:
        config = spec.config(prefix, streams or DEFAULT_STREAMS)
        try:
            await js.add_stream(config)
        except BadRequestError as exc:
            if exc.err_code != _STREAM_NAME_IN_USE:
                raise _refused(spec.name, config, exc) from None
            if streams is None:
                continue
            await _check_shrink(js, spec, config)
            try:
                await js.update_stream(config)
            except APIError as update_exc:
                raise _refused(spec.name, config, update_exc) from None
        except APIError as exc:
            raise _refused(spec.name, config, exc) from None


def _refused(name: str, config: StreamConfig, exc: APIError) -> StreamConfigRefused | APIError:
    """What a refusal of `config` means, in one line naming the setting to change; else `exc` as it came."""
    said = exc.description or str(exc)
    if exc.err_code == _INSUFFICIENT_STORAGE:
        return StreamConfigRefused(
            name,
            f"nats-server has no room for max_bytes {config.max_bytes} ({said}): the limits of all streams "
            "add up to more than its jetstream max_file_store, which counts bytes before compression; "
            "raise max_file_store in nats-server.conf or lower the streams' limits (docs/streams.md)",
        )
    if config.compression is not None and "compress" in said.lower():
        return StreamConfigRefused(
            name,
            f"nats-server refused compression {config.compression.value!r} ({said}): s2 needs nats-server "
            "2.10 or later; set streams.telemetry.compression: none, or upgrade (docs/streams.md)",
        )
    return exc


class StreamsMissing(NerveError):
    """Streams or buckets nerve needs are not on the server, and this identity may not create them."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        super().__init__(
            f"{'stream' if len(names) == 1 else 'streams'} {', '.join(names)} missing on the NATS server: "
            "run `nerve streams apply` with the admin identity (docs/nats.md)"
        )


async def ensure_buckets(js: JetStreamContext, engine: EngineSettings | None = None) -> None:
    """Create every bucket in `buckets(engine)` that is missing, and bring one that exists to its limits.

    Only the limits change (bytes, value size, age): what a bucket holds is kept, and a bucket that already
    holds more than a new `max_bytes` keeps its values (JetStream refuses new puts until it fits).
    """
    for bucket in buckets(engine or DEFAULT_ENGINE):
        try:
            info = await js.stream_info(bucket.stream)
        except NotFoundError:
            await js.create_key_value(bucket.config())
            continue
        config = info.config
        wanted = (bucket.max_bytes, bucket.max_value_size, bucket.max_age_s)
        if (config.max_bytes, config.max_msg_size, config.max_age or 0.0) != wanted:
            config.max_bytes = bucket.max_bytes
            config.max_msg_size = bucket.max_value_size
            config.max_age = bucket.max_age_s
            await js.update_stream(config)
            log.info("streams: bucket %s brought to its limits", bucket.name)


async def ensure_schedule_streams(
    js: JetStreamContext, prefix: str, engine: EngineSettings | None = None
) -> None:
    """Create every stream of `SCHEDULE_STREAMS`, or bring it to its limits (what it holds is kept)."""
    for _name, make in SCHEDULE_STREAMS:
        config = make(prefix, engine or DEFAULT_ENGINE)
        try:
            await js.add_stream(config)
        except BadRequestError as exc:
            if exc.err_code != _STREAM_NAME_IN_USE:
                raise
            await js.update_stream(config)


async def apply_streams(
    js: JetStreamContext,
    prefix: str,
    streams: StreamsSettings | None = None,
    engine: EngineSettings | None = None,
) -> None:
    """Everything nerve keeps, created or brought to its limits: streams, buckets, schedule streams.

    `streams` and `engine` are the settings' limits (`streams`, `central.engine`); see `ensure_streams`.
    """
    await ensure_streams(js, prefix, streams)
    await ensure_buckets(js, engine)
    await ensure_schedule_streams(js, prefix, engine)


def storage_names() -> list[str]:
    """The name of every stream nerve keeps: `STREAMS`, the buckets' streams, `SCHEDULE_STREAMS`."""
    return (
        [spec.name for spec in STREAMS]
        + [bucket.stream for bucket in BUCKETS]
        + [name for name, _make in SCHEDULE_STREAMS]
    )


async def check_streams(js: JetStreamContext) -> None:
    """Raise `StreamsMissing` naming every stream or bucket of nerve's that the server does not have.

    Asks only STREAM.INFO, which every identity may (docs/nats.md).
    """
    missing = []
    for name in storage_names():
        try:
            await js.stream_info(name)
        except NotFoundError:
            missing.append(name)
    if missing:
        raise StreamsMissing(missing)


async def ready_streams(
    js: JetStreamContext,
    prefix: str,
    streams: StreamsSettings | None = None,
    *,
    configure: bool,
    engine: EngineSettings | None = None,
) -> None:
    """What a part does at start: `apply_streams` if it may `configure` them, else `check_streams`.

    A part connected with an identity (`nats.nkey_file`) may not configure streams under least
    privilege, so it only checks: a missing stream is one clear `StreamsMissing`, not a refused
    request. On a server without authentication (dev) it creates what is missing, as before.
    """
    if configure:
        await apply_streams(js, prefix, streams, engine)
    else:
        await check_streams(js)


async def open_bucket(js: JetStreamContext, name: str) -> KeyValue:
    """Bucket `name`, which must exist (`apply_streams` makes it); `StreamsMissing` if it does not."""
    try:
        return await js.key_value(name)
    except NotFoundError:
        raise StreamsMissing([f"KV_{name}"]) from None
