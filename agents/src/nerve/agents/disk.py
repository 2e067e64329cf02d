"""The disk-full runbook, a durable agent: a disk reading at or over the threshold opens an incident.

One incident per device at a time: the agent is a singleton per device (`Limits(singleton="drop")`), so
a spike while the device's incident is open or cooling down starts no run; the engine counts it and keeps
a sampled `trigger_dropped` fact instead.

1. Send `clear_temp`, signed (`step.send`: the reflex comes before the facts about it), keep the
   `incident_opened` and `command_issued` facts, and wait durably for the device's signed result
   (`step.result`).
2. Verify: a reading of the device since the spike must be below `clear_below` within `verify_s`; else a
   person is needed (`incident_failed`). A failed result, or none in time, fails the incident too.
3. Cool down (a durable sleep): the run, and so the device's incident, stays open until then.

Every step is journalled by the engine: a central killed at any point resumes the incident where it was,
and every id published derives from the run, so nothing is sent or kept twice.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

from nerve.runtime.config.settings import DEFAULT_MAX_COMMAND_VALIDITY_S, MAX_MAX_COMMAND_VALIDITY_S
from nerve.runtime.engine import Limits, StepFailed, Trigger, durable_agent
from nerve.runtime.errors import ConfigError
from nerve.runtime.subjects import Kind

if TYPE_CHECKING:
    from nerve.runtime.config.settings import DiskRunbookSettings
    from nerve.runtime.engine import DurableAgent, Step
    from nerve.runtime.envelope.model import Envelope

log = logging.getLogger(__name__)

#: The agent's name (`central.durable_agents`, its runs, its consumer `nerve-engine-disk`).
AGENT: Final = "disk"
ACTION: Final = "clear_temp"


def _value(event: Envelope) -> float | None:
    """The reading's value: only a map with a numeric `value`, about a device, is a reading."""
    data = getattr(event, "data", None)
    value = data.get("value") if isinstance(data, dict) else None
    if event.subject is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _disk(mount: str) -> str:
    return f"disk {mount}" if mount else "disk"


def _mib(size: object) -> str:
    return f"{size / 1048576:.1f} MiB" if isinstance(size, int | float) else "? MiB"


async def _verified(step: Step, settings: DiskRunbookSettings, device: str, mount: str) -> bool:
    """Whether a reading of the device since the spike that opened the run is below `clear_below`.

    Read from right after the trigger (`since_trigger`), not from where the previous step began: the edge
    reports its freed disk right after its result, often before the result's fact step begins, and a
    wait from there would miss it. A reading below the clear level at any point after the spike says the
    disk is no longer full, whoever freed it.
    """

    def cleared(event: Envelope) -> bool:
        level = _value(event)
        same = not mount or (isinstance(event.data, dict) and event.data.get("mount") == mount)
        return same and level is not None and level < settings.clear_below

    found = await step.wait_for_event(
        "verify",
        "disk",
        kind=Kind.TELEMETRY,
        source=device,
        timeout=settings.verify_s,
        match=cleared,
        since_trigger=True,
    )
    return found is not None


def _ttl(settings: DiskRunbookSettings) -> float:
    """How long a command is valid, and waited for: `command_ttl_s`, at most `result_timeout_s`."""
    if settings.command_ttl_s > MAX_MAX_COMMAND_VALIDITY_S:
        raise ConfigError(
            f"{settings.command_ttl_s:g} s is longer than any device accepts a command for "
            f"(edge.max_command_validity_s is at most {MAX_MAX_COMMAND_VALIDITY_S:g} s)",
            key="central.disk.command_ttl_s",
        )
    ttl = min(settings.command_ttl_s, settings.result_timeout_s)
    if ttl > DEFAULT_MAX_COMMAND_VALIDITY_S:
        log.warning(
            "central.disk: commands valid %g s: devices refuse them unless their "
            "edge.max_command_validity_s is raised to match",
            ttl,
        )
    return ttl


def disk_runbook(settings: DiskRunbookSettings) -> DurableAgent:
    """The runbook as a durable agent. Raises `ConfigError` for a ttl no device accepts."""
    ttl = _ttl(settings)

    def spike(event: Envelope) -> bool:
        # A spike deeper than `max_hops` (some loop's effect) is refused by the engine's loop guard, which
        # keeps a `loop_guard` fact (docs/engine.md, "Flow control"): not dropped here unseen.
        value = _value(event)
        return value is not None and value >= settings.threshold

    @durable_agent(
        AGENT,
        trigger=Trigger(Kind.TELEMETRY, "disk", where=spike),
        key=lambda event: str(event.subject),
        waits_on=(Kind.TELEMETRY,),
        limits=Limits(singleton="drop"),
    )
    async def runbook(reading: Envelope, step: Step) -> str:
        device, value = step.key, _value(reading) or 0.0
        mount = str(reading.data.get("mount", "")) if isinstance(reading.data, dict) else ""
        disk, incident = _disk(mount), step.run_id
        # The reflex first: the command is out before the facts about it are kept.
        command_id = await step.send(
            ACTION, device=device, action=ACTION, args={"older_than_s": settings.older_than_s}, ttl=ttl
        )
        await step.fact(
            "opened",
            kind="incident_opened",
            summary=f"{device}: {disk} at {value:.1f}% (threshold {settings.threshold:g}%): incident opened",
            data={"incident_id": incident, "value": value, "mount": mount},
        )
        await step.fact(
            "issued",
            kind="command_issued",
            summary=f"{device}: sent {ACTION} (files older than {settings.older_than_s:g}s), "
            f"command {command_id}, valid {ttl:g}s",
            data={"incident_id": incident, "command_id": command_id, "action": ACTION},
        )
        failed = ""
        try:
            result = await step.result(ACTION)
        except StepFailed as exc:
            if exc.step != ACTION:  # not a timeout: the run is being compensated or stopped
                raise
            result, failed = None, f"no result to {ACTION} within {ttl:g}s"
        if result is not None:
            data: dict[str, Any] = result.data
            reason = f": {result.reason}" if result.reason else ""
            await step.fact(
                "result",
                kind="command_result",
                summary=f"{device}: {ACTION} {result.status}{reason}",
                # The device's data under a key of its own: it can never overwrite nerve's fields.
                data={"incident_id": incident, "status": result.status, "result": data},
            )
            if result.status != "ok":
                failed = f"{ACTION} came back {result.status}" + (
                    f" ({result.reason})" if result.reason else ""
                )
        if not failed and not await _verified(step, settings, device, mount):
            failed = (
                f"{ACTION} ran but the disk was not below {settings.clear_below:g}% in {settings.verify_s:g}s"
            )
        took = step.now() - step.record.created  # for the closing fact's words (kept once, by its id)
        if failed:
            await step.fact(
                "closed",
                kind="incident_failed",
                summary=f"Incident on {device} FAILED after {took:.2f}s: {disk} was at {value:.1f}%; "
                f"{failed}. Needs a person.",
                data={"incident_id": incident, "seconds": round(took, 3), "reason": failed},
            )
        else:
            freed = result.data if result is not None else {}
            await step.fact(
                "closed",
                kind="incident_resolved",
                summary=f"Incident on {device} resolved in {took:.2f}s: {disk} was at {value:.1f}%; "
                f"{ACTION} deleted {freed.get('files_deleted', '?')} files and freed "
                f"{_mib(freed.get('bytes_freed'))}.",
                data={"incident_id": incident, "seconds": round(took, 3), "status": "ok"},
            )
        await step.sleep("cooldown", settings.cooldown_s)
        return "failed" if failed else "resolved"

    return runbook
