"""The JetStream streams nerve keeps, created (or brought up to date) idempotently at start."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from nerve.runtime.subjects import Kind, deadletter_subject, kind_filter

if TYPE_CHECKING:
    from nats.js import JetStreamContext

DAY: Final = 24 * 3600.0
# JetStream drops a second message with the same Nats-Msg-Id inside this window: long enough to cover
# a bridge restart and an edge replaying its outbox after a short outage.
DUPLICATE_WINDOW_S: Final = 20 * 60.0


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """One stream: its name, what it holds and how long."""

    name: str
    kind: Kind | None
    max_age_s: float
    forever: bool = False

    def config(self, prefix: str) -> StreamConfig:
        """The JetStream configuration of this stream under `prefix`."""
        subject = kind_filter(self.kind, prefix) if self.kind else deadletter_subject("*", prefix)
        return StreamConfig(
            name=self.name,
            subjects=[subject],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=0 if self.forever else self.max_age_s,
            discard=DiscardPolicy.OLD,
            duplicate_window=DUPLICATE_WINDOW_S,
            deny_delete=self.forever,
            deny_purge=self.forever,
        )


STREAMS: Final = (
    StreamSpec("NERVE_TELEMETRY", Kind.TELEMETRY, 7 * DAY),
    StreamSpec("NERVE_EVENTS", Kind.EVENTS, 30 * DAY),
    StreamSpec("NERVE_COMMANDS", Kind.COMMANDS, 7 * DAY),
    StreamSpec("NERVE_RESULTS", Kind.RESULTS, 30 * DAY),
    StreamSpec("NERVE_FACTS", Kind.FACTS, 0, forever=True),
    StreamSpec("NERVE_DEADLETTER", None, 30 * DAY),
)
STREAM_OF_KIND: Final = {spec.kind: spec.name for spec in STREAMS if spec.kind is not None}
DEADLETTER_STREAM: Final = "NERVE_DEADLETTER"

# JetStream's error code for "stream name already in use with a different configuration".
_STREAM_NAME_IN_USE: Final = 10058


async def ensure_streams(js: JetStreamContext, prefix: str) -> None:
    """Create every stream, or update one whose configuration differs. Safe to call at every start."""
    for spec in STREAMS:
        config = spec.config(prefix)
        try:
            await js.add_stream(config)
        except BadRequestError as exc:
            if exc.err_code != _STREAM_NAME_IN_USE:
                raise
            await js.update_stream(config)
