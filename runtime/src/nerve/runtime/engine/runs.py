"""What an operator does with runs, beside the engine: list them, read one, cancel one, decide an approval.

Used by `nerve runs` and `nerve approve` (`nerve.runtime.cli.runs`) and by `Engine.cancel`. Everything
here reads the runs bucket or writes the two kinds of key operators may write (`names.operator_subjects`):
`cancel.<run id>` and `approval.<run id>.<decision id>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

import msgspec
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from nerve.runtime.engine.approval import is_pending_approval
from nerve.runtime.engine.errors import EngineError
from nerve.runtime.engine.journal import DECODER, read_record
from nerve.runtime.engine.names import (
    RUN_KEY_PREFIX,
    RUNS_BUCKET,
    RUNS_STREAM,
    approval_key,
    cancel_key,
)
from nerve.runtime.subjects import is_token

if TYPE_CHECKING:
    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue

    from nerve.runtime.engine.journal import RunRecord, StepRecord
    from nerve.runtime.envelope.model import Command

#: What `nerve runs --state` filters on: a run's journalled state, except that `waiting` also takes a run
#: held by an engine while one of its steps waits (an event, a decision) or sleeps.
ShownState = Literal["open", "waiting", "done", "failed", "compensated"]
SHOWN_STATES: Final = ("open", "waiting", "done", "failed", "compensated")
READ_TIMEOUT_S: Final = 5.0


class NoSuchRun(EngineError):
    """There is no run `run_id` (or it is not a run id at all); the message says which."""

    def __init__(self, run_id: str, reason: str = "") -> None:
        self.run_id = run_id
        super().__init__(reason or f"no run {run_id}")


def check_run_id(run_id: str) -> str:
    """`run_id` if it can be a run id (a token: never a wildcard or an extra key level); else `NoSuchRun`."""
    if not is_token(run_id):
        raise NoSuchRun(run_id, f"{run_id!r} is not a run id (1-64 of A-Z a-z 0-9 _ -)")
    return run_id


def shown_state(record: RunRecord) -> ShownState:
    """The state `nerve runs` shows: `waiting` for a parked run and for one whose step waits."""
    if record.state == "open" and any(
        step.status in {"waiting", "sleeping"} for step in record.steps.values()
    ):
        return "waiting"
    return record.state


async def runs_bucket(js: JetStreamContext) -> KeyValue:
    """The runs bucket; `EngineError` if there is none (no engine ever ran on this server)."""
    try:
        return await js.key_value(RUNS_BUCKET)
    except NotFoundError:
        raise EngineError(f"there is no {RUNS_BUCKET} bucket: no engine ran on this server yet") from None


async def read_run(kv: KeyValue, run_id: str) -> RunRecord:
    """The journal of run `run_id`; `NoSuchRun` if there is none."""
    found = await read_record(kv, check_run_id(run_id))
    if found is None:
        raise NoSuchRun(run_id)
    return found[0]


async def list_runs(js: JetStreamContext) -> tuple[list[RunRecord], int]:
    """Every run's journal, oldest first, and how many entries could not be read as one."""
    subject = f"$KV.{RUNS_BUCKET}.{RUN_KEY_PREFIX}*"
    try:
        info = await js.stream_info(RUNS_STREAM, subjects_filter=subject)
    except NotFoundError:
        return [], 0
    if info.state.messages == 0:
        return [], 0
    sub = await js.subscribe(
        subject, stream=RUNS_STREAM, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    records: list[RunRecord] = []
    unreadable = 0
    try:
        while True:
            msg = await sub.next_msg(timeout=READ_TIMEOUT_S)
            if msg.data:  # a delete marker has none
                try:
                    records.append(DECODER.decode(msg.data))
                except msgspec.DecodeError:
                    unreadable += 1
            if msg.metadata.num_pending == 0:
                break
    except TimeoutError:
        pass
    finally:
        await sub.unsubscribe()
    records.sort(key=lambda record: record.created)
    return records, unreadable


async def request_cancel(kv: KeyValue, run_id: str) -> RunRecord:
    """Ask for run `run_id` to be cancelled (its undos run); return its journal as it was.

    Raises `NoSuchRun`, or `EngineError` if the run has ended already.
    """
    record = await read_run(kv, run_id)
    if record.terminal:
        raise EngineError(f"run {run_id} has ended ({record.state}): nothing to cancel")
    await kv.put(cancel_key(run_id), b"cancel")
    return record


@dataclass(frozen=True, slots=True)
class PendingApproval:
    """The step of a run that waits for a person's decision."""

    step: str
    route: str
    expires: float
    on_expiry: str
    summary: str


def pending_approval(record: RunRecord) -> PendingApproval:
    """The approval run `record` waits for; `EngineError` saying why there is none."""
    for name, step in record.steps.items():
        if step.status == "waiting" and is_pending_approval(step.result):
            return _pending(name, step)
    if record.terminal:
        raise EngineError(f"run {record.run_id} has ended ({record.state}): nothing to approve")
    raise EngineError(f"run {record.run_id} waits for no approval")


def _pending(name: str, step: StepRecord) -> PendingApproval:
    info = step.result["approval"]
    return PendingApproval(
        step=name,
        route=str(info.get("route", "")),
        expires=float(info.get("expires", step.due)),
        on_expiry=str(info.get("on_expiry", "")),
        summary=str(info.get("summary", "")),
    )


async def store_decision(kv: KeyValue, decision: Command) -> None:
    """Store a signed decision (`approval.sign_decision`) where the engine reads it."""
    await kv.put(approval_key(decision.subject, decision.id), msgspec.json.encode(decision))
