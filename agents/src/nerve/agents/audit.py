"""The audit: refused or failed commands, and streams filling up, become facts.

A forged, unsigned, expired or replayed command is a security event even when no runbook sent it
(someone with access to the broker may be probing devices), so it must be in the audit trail. But a
result comes from a device over MQTT, and anyone who reaches the broker can forge one: a fact per result
would let a flood fill NERVE_FACTS. So `CommandAudit` samples them (`RefusalSampler`): per device and
status, the first gives its own fact, the rest are counted into at most one fact per window
(`streams.sample_window_s`, 60 s by default; at most `streams.sample_max_keys` devices, 100, told apart).

`StreamWatch` checks the streams every `streams.check_interval_s` (60 s): a stream that refuses new
messages when full (facts, commands, results) gets a warning (log + fact) from `streams.facts_warn_at`
(80 %) of its byte limit, and again at every further 5 %; what a capped stream dropped (dead letters,
telemetry, events) is counted into a fact.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from typing import TYPE_CHECKING, ClassVar, Final

from nats.errors import Error as NatsError
from nats.js.api import DiscardPolicy

from nerve.runtime.central.agent import Agent, AgentContext, Subscription
from nerve.runtime.config.settings import StreamsSettings
from nerve.runtime.envelope.model import CommandResult, Event, derived_id
from nerve.runtime.jetstream.sampling import RefusalSampler
from nerve.runtime.jetstream.streams import STREAMS, stream_usage
from nerve.runtime.subjects import Kind

if TYPE_CHECKING:
    from nerve.runtime.envelope.model import Envelope
    from nerve.runtime.jetstream.sampling import Sample
    from nerve.runtime.jetstream.streams import StreamUsage

log = logging.getLogger(__name__)

AUDITED: Final = frozenset({"rejected", "expired", "unknown", "failed"})
# The fact subject of what many devices sent beyond `sample_max_keys` (a token, unlike `*`).
MANY_DEVICES: Final = "many-devices"
# The fact subject of what nerve says about its own streams.
STREAMS_SUBJECT: Final = "nerve-streams"
WARN_STEP: Final = 0.05
_VERBS: Final = {"rejected": "refused", "expired": "refused (expired)", "unknown": "could not confirm"}


class CommandAudit(Agent):
    """Keeps `command_<status>` facts for results that are not `ok`, sampled (module docstring)."""

    name: ClassVar[str] = "audit"
    subscriptions: ClassVar[tuple[Subscription, ...]] = (Subscription(Kind.RESULTS, "*"),)

    def __init__(self, streams: StreamsSettings | None = None) -> None:
        streams = streams or StreamsSettings()
        self._window_s = streams.sample_window_s
        self._instance = uuid.uuid4().hex  # tells this process's windows from another's
        self.sampler = RefusalSampler(window_s=streams.sample_window_s, max_keys=streams.sample_max_keys)

    async def handle(self, envelope: Envelope, ctx: AgentContext) -> None:
        """Record a refused or failed command: at once if it is the first of its kind, else counted."""
        if not isinstance(envelope, CommandResult) or envelope.status not in AUDITED:
            return
        # What the window's fact says of the last one counted: its command and why.
        last = f"command {envelope.causationid}" + (f": {envelope.reason}" if envelope.reason else "")
        sample = self.sampler.offer(envelope.subject, envelope.status, last)
        if sample is None:
            return
        if sample.overflow:  # the first from beyond the devices told apart: about them all
            await self._counted(sample, ctx, first=True)
            return
        verb = _VERBS.get(envelope.status, "failed to run")
        await ctx.fact(
            envelope,
            kind=f"command_{envelope.status}",
            summary=(
                f"{envelope.subject} {verb} {envelope.action} (command {envelope.causationid})"
                + (f": {envelope.reason}" if envelope.reason else "")
            ),
            data={
                "command_id": envelope.causationid,
                "action": envelope.action,
                "status": envelope.status,
                "count": 1,
            },
            key="audit",
        )

    async def tick(self, ctx: AgentContext) -> None:
        """Keep one fact per key whose window ended with refusals counted."""
        for sample in self.sampler.due():
            await self._counted(sample, ctx, first=False)

    async def _counted(self, sample: Sample, ctx: AgentContext, *, first: bool) -> None:
        device = MANY_DEVICES if sample.overflow else sample.device
        # Unique per process, key and window; the process's source keeps two processes' facts apart.
        cause = Event(
            id=derived_id(
                ctx.source,
                self._instance,
                device,
                sample.reason,
                repr(sample.since),
                "first" if first else "window",
            ),
            source=ctx.source,
            type="nerve.audit.sampled",
            subject=device,
        )
        await ctx.fact(
            cause,
            kind=f"command_{sample.reason}",
            summary=(
                f"{device}: {sample.count} result(s) {sample.reason} within {self._window_s:g}s "
                f"(counted, not kept one by one; the last: {sample.last})"
            ),
            data={
                "status": sample.reason,
                "count": sample.count,
                "window_s": self._window_s,
                "last": sample.last,
            },
            key="sampled",
        )
        log.warning("audit: %s: %d results %s in %gs", device, sample.count, sample.reason, self._window_s)


class StreamWatch(Agent):
    """Warns (log + fact) before a stream that refuses new messages fills; counts what limits dropped."""

    name: ClassVar[str] = "streams"
    subscriptions: ClassVar[tuple[Subscription, ...]] = ()

    def __init__(self, streams: StreamsSettings | None = None) -> None:
        self._streams = streams or StreamsSettings()
        self._next_check = 0.0
        self._warned: dict[str, int] = {}  # stream -> the highest 5 % step warned about
        self._dropped: dict[str, int] = {}  # stream -> dropped count at the last check

    async def tick(self, ctx: AgentContext) -> None:
        """Check every stream, at most once per `check_interval_s`."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self._streams.check_interval_s
        for spec in STREAMS:
            try:
                usage = await stream_usage(ctx.js, spec.name)
            except (NatsError, TimeoutError) as exc:
                log.warning("streams: cannot read %s: %s", spec.name, exc)
                continue
            if spec.discard is DiscardPolicy.NEW:
                await self._filling(usage, ctx)
            else:
                await self._dropping(usage, ctx)

    async def _filling(self, usage: StreamUsage, ctx: AgentContext) -> None:
        warn_at = self._streams.facts_warn_at
        if usage.fraction < warn_at:
            self._warned.pop(usage.name, None)  # below again: warn again when it next crosses
            return
        step = math.floor(usage.fraction / WARN_STEP)
        if self._warned.get(usage.name, -1) >= step:
            return
        self._warned[usage.name] = step
        percent = usage.fraction * 100
        summary = (
            f"{usage.name} is {percent:.0f}% full ({usage.bytes} of {usage.max_bytes} bytes); at 100% it "
            "refuses new messages: raise streams.<kind>.max_bytes or free disk (docs/streams.md)"
        )
        log.warning("streams: %s", summary)
        cause = Event(
            id=derived_id("stream_filling", usage.name, str(step), str(usage.max_bytes)),
            source=ctx.source,
            type="nerve.streams.filling",
            subject=STREAMS_SUBJECT,
        )
        await ctx.fact(
            cause,
            kind="stream_filling",
            summary=summary,
            data={
                "stream": usage.name,
                "bytes": usage.bytes,
                "max_bytes": usage.max_bytes,
                "percent": percent,
            },
        )

    async def _dropping(self, usage: StreamUsage, ctx: AgentContext) -> None:
        # The first look reports all that was dropped before; its id (from the total) makes a restart
        # that finds the same total keep no second fact.
        before = self._dropped.get(usage.name, 0)
        self._dropped[usage.name] = usage.dropped
        if usage.dropped <= before:
            return
        count = usage.dropped - before
        summary = f"{usage.name} dropped its {count} oldest messages at its limits ({usage.dropped} in all)"
        log.warning("streams: %s", summary)
        cause = Event(
            id=derived_id("stream_dropped", usage.name, str(usage.dropped)),
            source=ctx.source,
            type="nerve.streams.dropped",
            subject=STREAMS_SUBJECT,
        )
        await ctx.fact(
            cause,
            kind="stream_dropped",
            summary=summary,
            data={"stream": usage.name, "count": count, "total": usage.dropped},
        )

    async def handle(self, envelope: Envelope, ctx: AgentContext) -> None:
        """Nothing: this agent has no subscriptions."""
