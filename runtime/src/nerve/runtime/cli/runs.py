"""`nerve runs` (list, show, cancel the engine's runs) and `nerve approve` (decide a pending approval).

Both connect as the cli identity, read the runs bucket (`nerve_runs`) and write in it only what an operator
may: a cancel request (`cancel.<run id>`) or a signed decision (`approval.<run id>.<decision id>`). The
engine does the rest: a cancelled run stops at its next step and its undos run; a decision counts only if
it verifies against the operator keys the engine trusts (docs/engine.md, "Human approval").
"""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TextIO

import msgspec
from nats.errors import Error as NatsError

from nerve.runtime.cli.history import read_facts
from nerve.runtime.cli.send import signer_for
from nerve.runtime.engine.approval import sign_decision
from nerve.runtime.engine.journal import DECODER
from nerve.runtime.engine.names import run_key
from nerve.runtime.engine.runs import (
    list_runs,
    pending_approval,
    read_run,
    request_cancel,
    runs_bucket,
    shown_state,
    store_decision,
)
from nerve.runtime.envelope.model import derived_id
from nerve.runtime.errors import BrokerUnavailable, ConfigError
from nerve.runtime.jetstream.client import connect
from nerve.runtime.subjects import is_token
from nerve.runtime.trust.signing import PRIVATE_SUFFIX, Signer

if TYPE_CHECKING:
    from pathlib import Path

    from nats.aio.client import Client as NatsClient
    from nats.js.kv import KeyValue

    from nerve.runtime.config.settings import Settings
    from nerve.runtime.engine.journal import RunRecord, StepRecord
    from nerve.runtime.envelope.model import Fact

#: The key id (and file stem) of an operator's own key: `nerve approve` prefers `<keys dir>/operator.key`.
OPERATOR_KEYID: Final = "operator"
RESULT_CHARS: Final = 80
#: `nerve approve`'s exit statuses beyond 0 (the run took the decision) and 2 (bad arguments).
EXIT_NOT_TAKEN: Final = 1  # the run took another decision, or the approval expired meanwhile
EXIT_TIMEOUT: Final = 6  # stored, but the run did not take it within --timeout


async def _client(settings: Settings, name: str) -> NatsClient:
    return await connect(settings.nats, name=name)


def _time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds") if epoch else "-"


def _short(value: object) -> str:
    text = msgspec.json.encode(value).decode()
    return text if len(text) <= RESULT_CHARS else text[: RESULT_CHARS - 1] + "…"


def current_step(record: RunRecord) -> str:
    """What the run is at: its last step not done (`name: status`), or its last step."""
    if not record.steps:
        return ""
    for name, step in record.steps.items():
        if step.status != "done":
            until = f" until {_time(step.due)}" if step.due else ""
            return f"{name}: {step.status}{until}"
    name = next(reversed(record.steps))
    return f"{name}: done"


def format_run_line(record: RunRecord) -> str:
    """One line: created, run id, agent, key, state, steps, and what it is at."""
    steps = len(record.steps)
    return (
        f"{_time(record.created)}  {record.run_id}  {record.agent:<18} {record.key:<16} "
        f"{shown_state(record):<11} {steps} step{'s' if steps != 1 else ''}  {current_step(record)}"
    ).rstrip()


async def print_runs(
    settings: Settings, *, state: str | None, as_json: bool, out: TextIO = sys.stdout
) -> int:
    """`nerve runs`: every run (in `state`, if given), oldest first; 0."""
    nc = await _client(settings, "nerve-runs")
    try:
        records, unreadable = await list_runs(nc.jetstream())
    except NatsError as exc:
        raise BrokerUnavailable(settings.nats.url, f"reading the runs failed: {exc}") from exc
    finally:
        await nc.close()
    records = [record for record in records if state is None or shown_state(record) == state]
    if as_json:
        for record in records:
            print(msgspec.json.encode(_summary(record)).decode(), file=out)
        return 0
    if not records:
        print("no runs" + (f" {state}" if state else ""), file=out)
    for record in records:
        print(format_run_line(record), file=out)
    if unreadable:
        print(f"({unreadable} entr{'ies' if unreadable != 1 else 'y'} could not be read as a run)", file=out)
    return 0


def _summary(record: RunRecord) -> dict[str, Any]:
    return {
        "run": record.run_id,
        "agent": record.agent,
        "key": record.key,
        "state": shown_state(record),
        "steps": len(record.steps),
        "at": current_step(record),
        "created": _time(record.created),
        "updated": _time(record.updated),
        "error": record.error,
    }


def _undo_of(record: RunRecord, name: str) -> str:
    for undo in record.undos:
        if undo.step == name:
            return undo.status + (f" ({undo.error})" if undo.error else "")
    return ""


def step_facts(record: RunRecord, name: str, facts: list[Fact]) -> list[Fact]:
    """The facts of step `name` of the run: kept by it, or about it (its undo, its approval)."""
    own = derived_id(record.run_id, "fact", name)
    return [fact for fact in facts if fact.id == own or fact.data.get("step") == name]


def format_step(record: RunRecord, name: str, step: StepRecord, facts: list[Fact]) -> list[str]:
    """The lines of one step: name and status, times, tries, result or error, undo, facts."""
    took = f" ({step.finished - step.started:.3f}s)" if step.finished and step.started else ""
    lines = [f"  {name}  {step.status}  {_time(step.started)} -> {_time(step.finished)}{took}"]
    details = [f"tries {step.attempts}"] if step.attempts else []
    if step.due:
        details.append(f"due {_time(step.due)}")
    undo = _undo_of(record, name)
    if undo:
        details.append(f"undo {undo}")
    if details:
        lines.append("    " + ", ".join(details))
    if step.error:
        lines.append(f"    error: {step.error}")
    if step.result is not None:
        lines.append(f"    result: {_short(step.result)}")
    lines.extend(f"    fact {fact.kind}: {fact.summary}" for fact in step_facts(record, name, facts))
    return lines


def format_run(record: RunRecord, facts: list[Fact]) -> list[str]:
    """`nerve runs show`: the run, then each step."""
    trigger = msgspec.json.decode(bytes(record.trigger))
    lines = [
        f"run {record.run_id}  agent {record.agent}  key {record.key}  {shown_state(record)}",
        f"  trigger {trigger.get('type')} {trigger.get('id')} from {trigger.get('source')}",
        f"  created {_time(record.created)}, updated {_time(record.updated)}",
    ]
    if record.owner and not record.terminal:
        lines.append(f"  held by engine {record.owner[:8]} until {_time(record.lease_until)}")
    if record.cancelled:
        lines.append("  cancelled")
    if record.error:
        lines.append(f"  error: {record.error}")
    if record.result is not None:
        lines.append(f"  result: {_short(record.result)}")
    lines.append(f"  steps ({len(record.steps)}):" if record.steps else "  no steps yet")
    for name, step in record.steps.items():
        lines.extend(format_step(record, name, step, facts))
    undos = [undo for undo in record.undos if undo.step not in record.steps]
    lines.extend(f"  undo of {undo.step}: {undo.status}" for undo in undos)
    return lines


async def show_run(settings: Settings, run_id: str, *, as_json: bool, out: TextIO = sys.stdout) -> int:
    """`nerve runs show RUN_ID`; raises `NoSuchRun` (one line) for an id that names no run."""
    nc = await _client(settings, "nerve-runs")
    try:
        js = nc.jetstream()
        record = await read_run(await runs_bucket(js), run_id)
        about = record.key if is_token(record.key) else None
        facts, _ = await read_facts(js, prefix=settings.prefix, device=about)
    except NatsError as exc:
        raise BrokerUnavailable(settings.nats.url, f"reading run {run_id} failed: {exc}") from exc
    finally:
        await nc.close()
    facts = [fact for fact in facts if fact.data.get("run") == record.run_id]
    if as_json:
        document = msgspec.json.decode(msgspec.json.encode(record))  # the trigger is raw JSON in it
        document["facts"] = [msgspec.to_builtins(fact) for fact in facts]
        print(msgspec.json.encode(document).decode(), file=out)
        return 0
    print("\n".join(format_run(record, facts)), file=out)
    return 0


async def cancel_run(settings: Settings, run_id: str, *, out: TextIO = sys.stdout) -> int:
    """`nerve runs cancel RUN_ID`: ask the engine to cancel it (its undos run); one line either way."""
    nc = await _client(settings, "nerve-runs")
    try:
        record = await request_cancel(await runs_bucket(nc.jetstream()), run_id)
    except NatsError as exc:
        raise BrokerUnavailable(settings.nats.url, f"cancelling run {run_id} failed: {exc}") from exc
    finally:
        await nc.close()
    print(
        f"cancel requested: run {record.run_id} ({record.agent}, key {record.key}) stops at its next step "
        f"and its {len(record.undos)} registered undo(s) run; see `nerve runs show {record.run_id}`",
        file=out,
    )
    return 0


def operator_signer(settings: Settings, key: Path | None, keys_dir: Path) -> Signer:
    """Who signs a decision: `key`, else `<keys_dir>/operator.key` if it exists, else `nerve send`'s key.

    `operator.key` signs as key id `operator`; `nerve send`'s key is found by `send.signing_key_path`.

    Raises `ConfigError` naming the file when there is none.
    """
    own = keys_dir / f"{OPERATOR_KEYID}{PRIVATE_SUFFIX}"
    if key is None and own.exists():
        return Signer.from_file(own, OPERATOR_KEYID)
    return signer_for(settings, key, keys_dir)


async def approve_run(
    settings: Settings,
    run_id: str,
    *,
    signer: Signer,
    reject: bool,
    comment: str,
    timeout: float,
    out: TextIO = sys.stdout,
) -> int:
    """`nerve approve`: sign a decision on the run's pending approval, store it, wait for the run to take it.

    Exit status: 0 the run took it, 1 it took another (or the approval expired first), 6 not within
    `timeout` (the decision stays stored: a run whose engine is down takes it when one is back, if it
    came before the approval expired). Raises `NerveError` (one line) for a run with nothing to approve.
    """
    nc = await _client(settings, "nerve-approve")
    try:
        kv = await runs_bucket(nc.jetstream())
        record = await read_run(kv, run_id)
        pending = pending_approval(record)
        try:
            decision = sign_decision(
                signer,
                run_id=record.run_id,
                step=pending.step,
                approve=not reject,
                comment=comment,
                valid_until=pending.expires,
            )
        except ValueError as exc:
            if pending.expires <= time.time():
                raise ConfigError(f"its approval expired at {_time(pending.expires)}", key="RUN_ID") from None
            raise ConfigError(str(exc), source="command line", key="--comment") from None
        await store_decision(kv, decision)
        what = "rejected" if reject else "approved"
        print(
            f"{what}: run {record.run_id} step {pending.step!r} (decision {decision.id}, signed with key id "
            f"{signer.keyid})",
            file=out,
            flush=True,
        )
        taken = await _taken(kv, record.run_id, pending.step, timeout=timeout)
    except NatsError as exc:
        raise BrokerUnavailable(settings.nats.url, f"approving run {run_id} failed: {exc}") from exc
    finally:
        await nc.close()
    if taken is None:
        print(
            f"the run has not taken it within {timeout:g}s (is an engine running? a decision it does not "
            "trust is kept as an approval_refused fact: nerve facts)",
            file=out,
        )
        return EXIT_TIMEOUT
    if taken.get("decision") == decision.id:
        print(f"the run took it: {taken.get('outcome')}", file=out)
        return 0
    print(
        f"the run took another decision: {taken.get('outcome')} {taken.get('decision', '')}".rstrip(),
        file=out,
    )
    return EXIT_NOT_TAKEN


async def _taken(kv: KeyValue, run_id: str, step: str, *, timeout: float) -> dict[str, Any] | None:
    """The decision journalled for `step` once it is done, or None after `timeout` seconds."""
    watcher = await kv.watch(run_key(run_id))
    try:
        async with asyncio.timeout(timeout):
            async for entry in watcher:
                if entry is None or not entry.value:
                    continue
                record = DECODER.decode(entry.value)
                journalled = record.steps.get(step)
                if journalled is not None and journalled.status in {"done", "failed"}:
                    result = journalled.result if isinstance(journalled.result, dict) else {}
                    decision = result.get("decision")
                    return decision if isinstance(decision, dict) else {"outcome": journalled.status}
    except TimeoutError:
        return None
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
    return None
