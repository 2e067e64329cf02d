"""Bench-only baseline: the hand-written disk runbook as it was before the engine (commit ebc3488).

Not shipped and not used by nerve: `bench/central.py` measures today's engine path beside it, as
`bench/naive_bridge.py` is the bridge's baseline. It is `git show ebc3488:agents/src/nerve/agents/disk.py`
(~270 lines of a KV compare-and-set state machine on the Agent API, `nerve.runtime.central.agent`, run by
`Central`'s push consumer `nerve-agent-disk-telemetry-disk`, which iterates `sub.messages`), adapted
minimally: this docstring, and a `main` that runs it as a central process the way `nerve central` runs
the engine (the shipped runner agents beside it, the disk runbook swapped in for the durable one):

    .venv/bin/python bench/baseline_runbook.py --config nerve.yaml [--log-level warning]

What it did, unchanged:
1. A `disk` reading >= threshold on a device with no open incident (and not cooling down) opens one.
   The claim is atomic (a JetStream KV `create`), so two central processes never open two incidents.
2. It signs and sends `clear_temp` to the device and keeps facts: incident opened, command issued.
3. The device's signed result (its `causationid` the incident's command) closes the incident (resolved
   or failed) with facts; no result before the timeout fails it (`tick`).
4. The device then cools down (`cooldown_s`): readings in that time open nothing (no alert storms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal

from nats.js.api import KeyValueConfig
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError

from nerve.runtime.cancellation import until_signalled
from nerve.runtime.central.agent import Agent, AgentContext, Subscription
from nerve.runtime.central.runner import Central
from nerve.runtime.config.settings import (
    DEFAULT_MAX_COMMAND_VALIDITY_S,
    MAX_MAX_COMMAND_VALIDITY_S,
    load_settings,
)
from nerve.runtime.envelope.model import CommandResult, Envelope, Event, derived_id
from nerve.runtime.errors import ConfigError, NerveError
from nerve.runtime.subjects import Kind
from nerve.runtime.trust.signing import Signer

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

    from nerve.runtime.config.settings import DiskRunbookSettings

log = logging.getLogger(__name__)

#: Its incidents, one key per device (nerve kept this bucket for it until the engine's singleton).
BUCKET: Final = "nerve_incidents"
ACTION: Final = "clear_temp"


@dataclass(frozen=True, slots=True)
class Incident:
    """The state of one device's disk incident, kept in the KV bucket under the device id."""

    state: Literal["open", "cooling"]
    incident_id: str
    command_id: str
    device: str
    mount: str
    value: float
    opened_at: float
    deadline: float
    until: float = 0.0

    def encode(self) -> bytes:
        """As stored in KV."""
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Incident:
        """From KV."""
        return cls(**json.loads(raw))


def _disk(mount: str) -> str:
    return f"disk {mount}" if mount else "disk"


def _mib(size: object) -> str:
    return f"{size / 1048576:.1f} MiB" if isinstance(size, int | float) else "? MiB"


class DiskRunbook(Agent):
    """Clears temp files on a device whose disk is nearly full; see the module docstring."""

    name: ClassVar[str] = "disk"
    subscriptions: ClassVar[tuple[Subscription, ...]] = (
        Subscription(Kind.TELEMETRY, "disk"),
        Subscription(Kind.RESULTS, ACTION),
    )

    def __init__(self, settings: DiskRunbookSettings) -> None:
        """Raises `ConfigError` if `command_ttl_s` is longer than any device may accept a command for."""
        ttl = settings.command_ttl_s
        if ttl > MAX_MAX_COMMAND_VALIDITY_S:
            raise ConfigError(
                f"{ttl:g} s is longer than any device accepts a command for "
                f"(edge.max_command_validity_s is at most {MAX_MAX_COMMAND_VALIDITY_S:g} s)",
                key="central.disk.command_ttl_s",
            )
        if ttl > DEFAULT_MAX_COMMAND_VALIDITY_S:
            log.warning(
                "central.disk.command_ttl_s (%g s) is longer than devices accept by default (%g s): they "
                "refuse its commands unless their edge.max_command_validity_s is raised to match",
                ttl,
                DEFAULT_MAX_COMMAND_VALIDITY_S,
            )
        self._settings = settings
        self._kv: KeyValue | None = None
        # Open incidents this process watches for timeouts: device -> deadline.
        self._deadlines: dict[str, float] = {}

    @property
    def kv(self) -> KeyValue:
        """The incidents bucket (after `start`)."""
        if self._kv is None:
            msg = "DiskRunbook.start() was not called"
            raise RuntimeError(msg)
        return self._kv

    async def start(self, ctx: AgentContext) -> None:
        """Create the incidents bucket and pick up incidents a previous run left open."""
        self._kv = await ctx.js.create_key_value(KeyValueConfig(bucket=BUCKET, history=1))  # or opens it
        try:
            keys = await self.kv.keys()
        except NoKeysError:
            keys = []
        for device in keys:
            incident = await self._get(device)
            if incident is not None and incident.state == "open":
                self._deadlines[device] = incident.deadline

    async def _get(self, device: str) -> Incident | None:
        try:
            entry = await self.kv.get(device)
        except KeyNotFoundError:
            return None
        return Incident.decode(entry.value) if entry.value else None

    async def handle(self, envelope: Envelope, ctx: AgentContext) -> None:
        """Route a reading or a result."""
        if isinstance(envelope, CommandResult):
            await self._on_result(envelope, ctx)
        elif isinstance(envelope, Event):
            await self._on_reading(envelope, ctx)

    async def _claim(self, device: str, incident: Incident) -> Incident | None:
        """Store `incident` unless another one is open or cooling; return the one that holds."""
        try:
            await self.kv.create(device, incident.encode())
        except KeyWrongLastSequenceError:
            entry = await self.kv.get(device)
            current = Incident.decode(entry.value) if entry.value else None
            if current is not None and (
                current.incident_id == incident.incident_id  # a redelivery: carry on with it
                or current.state == "open"
                or current.until > time.time()
            ):
                return current
            try:
                await self.kv.update(device, incident.encode(), last=entry.revision)
            except KeyWrongLastSequenceError:
                return await self._get(device)  # another process claimed it just now
        return incident

    async def _on_reading(self, reading: Event, ctx: AgentContext) -> None:
        # Any CloudEvent may arrive here: only a map with a numeric `value`, about a device, is a reading.
        data = reading.data
        device = reading.subject
        if not isinstance(data, dict) or device is None:
            return
        value = data.get("value")
        if isinstance(value, bool) or not isinstance(value, int | float):
            return
        if value < self._settings.threshold:
            return
        mount = str(data.get("mount", ""))
        now = time.time()
        proposal = Incident(
            state="open",
            incident_id=derived_id(reading.id, "incident"),
            command_id=derived_id(reading.id, "command", device, ACTION),
            device=device,
            mount=mount,
            value=float(value),
            opened_at=now,
            deadline=now + self._settings.result_timeout_s,
        )
        incident = await self._claim(device, proposal)
        if incident is None or incident.incident_id != proposal.incident_id or incident.state != "open":
            log.debug("disk: %s at %.1f%% but an incident is open or cooling", device, value)
            return
        command = await ctx.command(
            reading,
            device=device,
            action=ACTION,
            args={"older_than_s": self._settings.older_than_s},
            ttl=timedelta(seconds=self._settings.command_ttl_s),
        )
        self._deadlines[device] = incident.deadline
        threshold = self._settings.threshold
        await ctx.fact(
            reading,
            kind="incident_opened",
            summary=f"{device}: {_disk(mount)} at {value:.1f}% (threshold {threshold:g}%): incident opened",
            data={"incident_id": incident.incident_id, "value": value, "mount": mount},
        )
        await ctx.fact(
            reading,
            kind="command_issued",
            summary=(
                f"{device}: sent {ACTION} (files older than {self._settings.older_than_s:g}s), "
                f"command {command.id}, expires {command.expires.isoformat()}"
            ),
            data={"incident_id": incident.incident_id, "command_id": command.id, "action": ACTION},
        )
        log.info(
            "disk: %s at %.1f%%: incident %s opened, %s sent", device, value, incident.incident_id, ACTION
        )

    async def _close(self, device: str, incident: Incident) -> bool:
        """Move an open incident to cooling; False if it was not open any more (closed elsewhere)."""
        try:
            entry = await self.kv.get(device)
        except KeyNotFoundError:
            return False
        current = Incident.decode(entry.value) if entry.value else None
        if current is None or current.state != "open" or current.incident_id != incident.incident_id:
            return False
        cooling = Incident(
            **{**asdict(current), "state": "cooling", "until": time.time() + self._settings.cooldown_s}
        )
        try:
            await self.kv.update(device, cooling.encode(), last=entry.revision)
        except KeyWrongLastSequenceError:
            return False
        self._deadlines.pop(device, None)
        return True

    async def _on_result(self, result: CommandResult, ctx: AgentContext) -> None:
        device = result.subject
        incident = await self._get(device)
        if incident is None or incident.command_id != result.causationid:
            log.debug("disk: result %s matches no open incident on %s", result.id, device)
            return
        data: dict[str, Any] = result.data
        took = time.time() - incident.opened_at
        resolved = result.status == "ok"
        await ctx.fact(
            result,
            kind="command_result",
            summary=f"{device}: {ACTION} {result.status}" + (f": {result.reason}" if result.reason else ""),
            # The device's data under a key of its own: it can never overwrite nerve's fields.
            data={"incident_id": incident.incident_id, "status": result.status, "result": data},
        )
        if resolved:
            summary = (
                f"Incident on {device} resolved in {took:.2f}s: {_disk(incident.mount)} was at "
                f"{incident.value:.1f}%; {ACTION} deleted {data.get('files_deleted', '?')} files and "
                f"freed {_mib(data.get('bytes_freed'))}."
            )
        else:
            summary = (
                f"Incident on {device} FAILED after {took:.2f}s: {_disk(incident.mount)} was at "
                f"{incident.value:.1f}%; {ACTION} came back {result.status}"
                + (f" ({result.reason})" if result.reason else "")
                + ". Needs a person."
            )
        await ctx.fact(
            result,
            kind="incident_resolved" if resolved else "incident_failed",
            summary=summary,
            data={"incident_id": incident.incident_id, "seconds": round(took, 3), "status": result.status},
        )
        await self._close(device, incident)

    async def tick(self, ctx: AgentContext) -> None:
        """Fail open incidents whose device did not answer in time."""
        now = time.time()
        for device, deadline in list(self._deadlines.items()):
            if deadline > now:
                continue
            incident = await self._get(device)
            if incident is None or incident.state != "open":
                self._deadlines.pop(device, None)
                continue
            if not await self._close(device, incident):
                continue
            cause = Event(
                id=incident.incident_id,
                source=ctx.source,
                type="nerve.incident.timeout",
                subject=device,
            )
            await ctx.fact(
                cause,
                kind="incident_failed",
                summary=(
                    f"Incident on {device} FAILED: {_disk(incident.mount)} at {incident.value:.1f}% and no "
                    f"result to {ACTION} within {self._settings.result_timeout_s:g}s. Needs a person."
                ),
                data={"incident_id": incident.incident_id, "command_id": incident.command_id},
                key="timeout",
            )
            log.warning("disk: incident %s on %s timed out", incident.incident_id, device)


async def run_central(config: Path) -> int:
    """A central process as `nerve central` runs it, with this runbook instead of the engine's."""
    from nerve.agents import builtin_agents  # noqa: PLC0415 - as `nerve central` imports it

    settings = load_settings(config)
    if settings.central.signing_key is None:
        msg = "central needs a signing key: set central.signing_key"
        raise ConfigError(msg, key="central.signing_key")
    signer = Signer.from_file(settings.central.signing_key, settings.central.keyid)
    agents = [*builtin_agents(settings), DiskRunbook(settings.central.disk)]
    await Central(settings=settings, signer=signer, agents=agents, durable=()).run()
    return 0


def main() -> int:
    """Run a baseline central process until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="nerve settings (YAML)")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return asyncio.run(until_signalled(run_central(args.config)))
    except NerveError as exc:
        print(f"baseline_runbook: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
