"""Every JetStream name the engine uses, in one place (the NATS permissions of central derive from it).

- KV bucket `nerve_runs` (its stream is `KV_nerve_runs`): one key `run.<run id>` per run holding its whole
  journal (state, lease, steps, undos), and `cancel.<run id>` when someone asked for a run to be cancelled.
- Stream `NERVE_TIMERS` (message schedules allowed): a durable timer is a schedule message on
  `<root>.engine.timers.at.<timer id>` that the server turns, when due, into one message on
  `<root>.engine.timers.fired.<timer id>`.
- KV bucket `nerve_limits`: flow control's state, one key per limit and key (`<limit>.<agent>.<key hash>`),
  per blast-radius group (`blast.<group>`) and per breaker (`breaker.<action>`).
- KV bucket `nerve_lineage`: `chain.<correlation hash>.<agent>.<key hash>`, the first run of an agent for
  a key in a correlation chain, and its trigger's hops (loop guard).
- Durable consumers `nerve-engine-<agent>` (one per agent: its trigger) and `nerve-engine-timers`.
- In the same bucket, what operators write (`nerve runs cancel`, `nerve approve`): `cancel.<run id>` and
  `approval.<run id>.<decision id>`, one key per signed decision (`operator_subjects`).

Engine subjects have five tokens, device subjects four: the two never overlap, whatever a device is called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# The storage itself is defined with every other stream and bucket of nerve's (created by the admin
# identity: `nerve streams apply`); the names are re-exported here.
from nerve.runtime.jetstream.streams import (
    LIMITS_BUCKET,
    LINEAGE_BUCKET,
    RUNS_BUCKET,
    TIMERS_STREAM,
    timers_filter,
)
from nerve.runtime.subjects import subject_root

RUNS_STREAM: Final = f"KV_{RUNS_BUCKET}"
TIMERS_CONSUMER: Final = "nerve-engine-timers"
RUN_KEY_PREFIX: Final = "run."
CANCEL_KEY_PREFIX: Final = "cancel."
APPROVAL_KEY_PREFIX: Final = "approval."


@dataclass(frozen=True, slots=True)
class EngineNames:
    """What the engine creates and uses: grant central exactly these (and its trigger streams)."""

    buckets: tuple[str, ...]
    streams: tuple[str, ...]
    consumer_prefix: str


#: The one list of the engine's storage names.
ENGINE_NAMES: Final = EngineNames(
    buckets=(RUNS_BUCKET, LIMITS_BUCKET, LINEAGE_BUCKET),
    streams=(RUNS_STREAM, f"KV_{LIMITS_BUCKET}", f"KV_{LINEAGE_BUCKET}", TIMERS_STREAM),
    consumer_prefix="nerve-engine-",
)


def engine_subjects(prefix: str) -> tuple[str, ...]:
    """The subjects the engine publishes on (besides facts and dead letters): its KV bucket's, its timers'."""
    return (
        f"$KV.{RUNS_BUCKET}.>",
        f"$KV.{LIMITS_BUCKET}.>",
        f"$KV.{LINEAGE_BUCKET}.>",
        timers_filter(prefix),
    )


def timer_schedule_subject(prefix: str, timer_id: str) -> str:
    """Where the schedule message of a timer is kept until it fires."""
    return f"{subject_root(prefix)}.engine.timers.at.{timer_id}"


def timer_fired_subject(prefix: str, timer_id: str = "*") -> str:
    """Where a timer's message lands when it fires (`*`: every timer's)."""
    return f"{subject_root(prefix)}.engine.timers.fired.{timer_id}"


def trigger_consumer(agent: str) -> str:
    """The durable consumer (and deliver group) of an agent's trigger."""
    return f"{ENGINE_NAMES.consumer_prefix}{agent}"


def run_key(run_id: str) -> str:
    """The KV key of a run's journal."""
    return f"{RUN_KEY_PREFIX}{run_id}"


def cancel_key(run_id: str) -> str:
    """The KV key that asks for a run to be cancelled."""
    return f"{CANCEL_KEY_PREFIX}{run_id}"


def approval_key(run_id: str, decision_id: str) -> str:
    """The KV key of one operator's signed decision on a run's pending approval."""
    return f"{APPROVAL_KEY_PREFIX}{run_id}.{decision_id}"


def approvals_subject(run_id: str) -> str:
    """The subject (in the bucket's stream) of every decision on run `run_id`."""
    return f"$KV.{RUNS_BUCKET}.{APPROVAL_KEY_PREFIX}{run_id}.*"


def operator_subjects() -> tuple[str, ...]:
    """What an operator (the cli identity) may write in the runs bucket: cancel requests and decisions."""
    return (f"$KV.{RUNS_BUCKET}.{CANCEL_KEY_PREFIX}*", f"$KV.{RUNS_BUCKET}.{APPROVAL_KEY_PREFIX}*.*")


def limit_key(limit: str, agent: str, key_hash: str) -> str:
    """The `nerve_limits` key of one limit of one agent for one key (hashed: a key may be any string)."""
    return f"{limit}.{agent}.{key_hash}"


def blast_key(group: str) -> str:
    """The `nerve_limits` key of a blast-radius group."""
    return f"blast.{group}"


def breaker_key(action: str) -> str:
    """The `nerve_limits` key of an action's circuit breaker."""
    return f"breaker.{action}"


def chain_key(chain_hash: str, agent: str, key_hash: str) -> str:
    """The `nerve_lineage` key of the first run of `agent` for a key in a correlation chain."""
    return f"chain.{chain_hash}.{agent}.{key_hash}"


__all__ = [
    "APPROVAL_KEY_PREFIX",
    "CANCEL_KEY_PREFIX",
    "ENGINE_NAMES",
    "LIMITS_BUCKET",
    "LINEAGE_BUCKET",
    "RUNS_BUCKET",
    "RUNS_STREAM",
    "RUN_KEY_PREFIX",
    "TIMERS_CONSUMER",
    "TIMERS_STREAM",
    "EngineNames",
    "approval_key",
    "approvals_subject",
    "blast_key",
    "breaker_key",
    "cancel_key",
    "chain_key",
    "engine_subjects",
    "limit_key",
    "operator_subjects",
    "run_key",
    "timer_fired_subject",
    "timer_schedule_subject",
    "timers_filter",
    "trigger_consumer",
]
