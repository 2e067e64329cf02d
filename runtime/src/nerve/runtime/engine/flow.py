"""Flow control at work: what the engine asks when a trigger comes, when a gated run wakes, when a run ends.

The state of every limit is in the KV bucket `nerve_limits`, written only with compare-and-set, so every
central process sharing the work sees one count (`nerve.runtime.engine.names` has the keys). A trigger
goes through, in this order:

1. the loop guard: deeper than `max_hops`, or caused by a run of the same agent and key: refused;
2. the rate limit: over it, dropped;
3. the singleton: a run of the key is open: dropped, or merged into it;
4. the gates, where a run may wait before its first step (it is journalled, parked, and woken by a
   timer, by the end of another run, or by the watchdog): debounce (merged into the pending run, which
   starts with the last trigger once the key is quiet), throttle (started later), concurrency and the
   blast radius (a slot, in order).

Every trigger a limit drops, merges or delays is counted (`Flow.counts`) and kept as a fact, sampled like
`RefusalSampler` (the first per key and limit at once, the rest counted into one fact per window).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, TypeVar

import msgspec
from nats.errors import Error as NatsError
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BadRequestError, KeyNotFoundError, KeyWrongLastSequenceError

from nerve.runtime.engine.clock import SYSTEM_CLOCK, Clock
from nerve.runtime.engine.errors import EngineError
from nerve.runtime.engine.journal import read_record
from nerve.runtime.engine.limits import (
    BreakerRecord,
    breaker_failed,
    breaker_state,
    breaker_succeeded,
    counted,
    next_start,
    pending,
)
from nerve.runtime.engine.names import (
    LIMITS_BUCKET,
    LINEAGE_BUCKET,
    blast_key,
    breaker_key,
    chain_key,
    limit_key,
)
from nerve.runtime.envelope.codec import to_json
from nerve.runtime.envelope.model import Fact, derived_id
from nerve.runtime.errors import NerveError
from nerve.runtime.jetstream.client import publish_fact
from nerve.runtime.jetstream.sampling import RefusalSampler
from nerve.runtime.subjects import is_token

if TYPE_CHECKING:
    from collections.abc import Callable

    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue

    from nerve.runtime.engine.agent import DurableAgent
    from nerve.runtime.engine.journal import RunRecord
    from nerve.runtime.engine.limits import Breaker, BreakerState, Window
    from nerve.runtime.engine.settings import EngineSettings
    from nerve.runtime.envelope.codec import Codec
    from nerve.runtime.envelope.model import Envelope
    from nerve.runtime.jetstream.sampling import Sample
    from nerve.runtime.trust.signing import Signer

log = logging.getLogger(__name__)

#: The gates a run may wait at before its first step, in the order it passes them.
GATES: Final = ("debounce", "throttle", "concurrency", "blast")
Gate = Literal["debounce", "throttle", "concurrency", "blast"]
Outcome = Literal["start", "park", "drop", "merge"]
#: Fact kinds: what a limit did to a trigger.
DROPPED: Final = "trigger_dropped"
MERGED: Final = "trigger_merged"
DELAYED: Final = "trigger_delayed"
#: The same kind as central's loop guard facts (`nerve.runtime.central.runner`).
LOOP_REFUSED: Final = "loop_guard"
BREAKER_OPENED: Final = "breaker_opened"
#: Compare-and-set tries before a limit's state is declared contended (the trigger comes again).
MAX_CAS_TRIES: Final = 20
#: Limit states this process remembers (`Flow._cas` writes them without reading them first), and the
#: largest it remembers.
KNOWN_STATES: Final = 10_000
KNOWN_STATE_BYTES: Final = 4096
#: A slot held by a run whose journal is missing (it was never created) is freed only this much later,
#: so a run that took its slot and is being created is not mistaken for one that vanished.
STALE_AFTER_S: Final = 30.0
#: Where a fact about a key that is not a token is filed.
NO_SUBJECT: Final = "unknown"

S = TypeVar("S", bound=msgspec.Struct)
R = TypeVar("R")


class LimitContended(EngineError):
    """The state of limit `key` kept changing under this process (`MAX_CAS_TRIES` times): try later."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"limit state {key}: contended {MAX_CAS_TRIES} times; the trigger comes again")


@dataclass(frozen=True, slots=True)
class Decision:
    """What flow control says of a trigger or a gated run.

    `start`: go on to the first step. `park`: wait at `gate` until `due` (0: until a slot frees, or the
    watchdog). `drop` / `merge`: no run (a fact says so). `trigger` is the trigger to start with when a
    debounce swapped it for a later one.
    """

    outcome: Outcome
    gate: str = ""
    due: float = 0.0
    trigger: bytes | None = None


START: Final = Decision("start")


# --- state kept in nerve_limits ----------------------------------------------------------------------


class _Starts(msgspec.Struct, omit_defaults=True):
    starts: list[float] = msgspec.field(default_factory=list)


class Slot(msgspec.Struct, array_like=True):
    """A run holding a slot: its key, and since when."""

    key: str
    since: float


class Pool(msgspec.Struct, omit_defaults=True):
    """Slots (concurrency, singleton, blast radius): the runs holding one, and the runs waiting, in order."""

    running: dict[str, Slot] = msgspec.field(default_factory=dict)
    #: Runs waiting for a slot, in order, with when they joined the queue.
    queued: dict[str, float] = msgspec.field(default_factory=dict)


class _Debounce(msgspec.Struct, omit_defaults=True):
    run: str = ""
    trigger: str = ""
    due: float = 0.0
    merged: int = 0


class _Origin(msgspec.Struct, array_like=True):
    run: str
    hops: int


class _Hops(msgspec.Struct):
    hops: int = 0


_HOPS: Final = msgspec.json.Decoder(_Hops)


Taken = Literal["run", "queued", "full", "blocked"]


def admit(
    pool: Pool,
    run_id: str,
    key: str,
    *,
    cap: int,
    by_key: bool,
    queue: int,
    wait: bool,
    now: float,
    final: bool,
) -> tuple[Pool | None, Taken]:
    """Whether `run_id` (for `key`) gets a slot in `pool`: the new pool (None: unchanged) and the outcome.

    At most `cap` runs hold a slot (`by_key`: at most `cap` keys; a run of a key that holds one joins it).
    The queue goes first, in order: a run gets a slot only if the runs queued before it fit too. Until
    `final` (the slots of runs that ended were freed), a run that would wait or be dropped is "blocked".
    """
    if run_id in pool.running:
        return None, "run"
    keys = {slot.key for slot in pool.running.values()}
    used = len(keys) if by_key else len(pool.running)
    order = list(pool.queued)
    ahead = order.index(run_id) if run_id in pool.queued else len(order)
    if (by_key and key in keys) or used + ahead < cap:
        running = {**pool.running, run_id: Slot(key, now)}
        return Pool(running, {other: at for other, at in pool.queued.items() if other != run_id}), "run"
    if not final:
        return None, "blocked"
    if run_id in pool.queued:
        return None, "queued"
    if not wait or len(pool.queued) >= queue:
        return None, "full"
    return Pool(pool.running, {**pool.queued, run_id: now}), "queued"


def leave(pool: Pool, run_id: str) -> tuple[Pool | None, list[str]]:
    """`pool` without `run_id`'s slot or queue place (None: it had neither), and the first queued run."""
    if run_id not in pool.running and run_id not in pool.queued:
        return None, []
    running = {other: slot for other, slot in pool.running.items() if other != run_id}
    queued = {other: at for other, at in pool.queued.items() if other != run_id}
    return Pool(running, queued), list(queued)[:1]


def key_hash(key: str) -> str:
    """A KV-safe name for a run key (any string)."""
    return derived_id("key", key)


async def ensure_flow_storage(js: JetStreamContext, settings: EngineSettings) -> tuple[KeyValue, KeyValue]:
    """Create (or bring to their limits) `nerve_limits` and `nerve_lineage`; return both."""
    limits = KeyValueConfig(
        bucket=LIMITS_BUCKET,
        history=1,
        ttl=settings.runs.max_age_s,  # a slot lives as long as a run may
        max_bytes=settings.limits_max_bytes,
        max_value_size=settings.max_record_bytes,  # a debounce keeps its last trigger
        storage=StorageType.FILE,
    )
    lineage = KeyValueConfig(
        bucket=LINEAGE_BUCKET,
        history=1,
        ttl=settings.loop_window_s,
        max_bytes=settings.limits_max_bytes,
        max_value_size=64 * 1024,
        storage=StorageType.FILE,
    )
    buckets = []
    for config in (limits, lineage):
        try:
            buckets.append(await js.create_key_value(config))
        except BadRequestError:  # it exists with other limits: keep what it holds
            info = await js.stream_info(f"KV_{config.bucket}")
            stream = info.config
            stream.max_age = config.ttl
            stream.max_bytes = config.max_bytes
            stream.max_msg_size = config.max_value_size
            await js.update_stream(stream)
            buckets.append(await js.key_value(config.bucket))
    return buckets[0], buckets[1]


class Flow:
    """Flow control for one engine process (the state is shared through KV: see the module docstring)."""

    def __init__(
        self,
        *,
        js: JetStreamContext,
        limits: KeyValue,
        lineage: KeyValue,
        runs: KeyValue,
        prefix: str,
        settings: EngineSettings,
        signer: Signer | None,
        codec: Codec,
        instance: str,
        fleet_size: Callable[[], int] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._js = js
        #: The engine's clock (the harness's fake one in tests): the limits' windows and gates' times.
        self._clock = clock
        self._limits = limits
        self._known: OrderedDict[tuple[int, str], tuple[int, bytes]] = OrderedDict()
        self._lineage = lineage
        self._runs = runs
        self._prefix = prefix
        self._settings = settings
        self._signer = signer
        self._codec = codec
        self._instance = instance
        self._fleet_size = fleet_size
        self._sampler = RefusalSampler(
            window_s=settings.limit_facts_window_s, max_keys=settings.limit_facts_max_keys
        )
        #: What limits did, by `<agent>.<limit>.<outcome>` (this process's count).
        self.counts: Counter[str] = Counter()

    # --- a trigger comes ---------------------------------------------------------------------------

    async def at_trigger(self, agent: DurableAgent, event: Envelope, key: str, run_id: str) -> Decision:
        """What to do with a trigger that would start run `run_id` (drops and merges are kept as facts)."""
        limits = agent.limits
        if event.hops > limits.max_hops:
            reason = f"{event.hops} hops deep, past the limit of {limits.max_hops}"
            return await self._refuse(agent, event, key, limit="max_hops", kind=LOOP_REFUSED, reason=reason)
        if limits.loop_guard and event.causationid is not None and event.correlationid is not None:
            origin = await self._looped(agent, event, key, run_id)
            if origin is not None:
                reason = f"caused by its own run {origin} of key {key!r} (correlation {event.correlationid})"
                return await self._refuse(
                    agent, event, key, limit="causation", kind=LOOP_REFUSED, reason=reason
                )
        if limits.rate is not None and not await self._within_rate(agent, key, limits.rate):
            reason = f"over {limits.rate.count} per {limits.rate.period_s:g}s"
            return await self._refuse(agent, event, key, limit="rate", kind=DROPPED, reason=reason)
        if limits.singleton is not None:
            taken = await self._take(
                limit_key("singleton", agent.name, key_hash(key)), run_id, key, cap=1, wait=False
            )
            if taken != "run":
                holder = await self._holder(limit_key("singleton", agent.name, key_hash(key)))
                kind = DROPPED if limits.singleton == "drop" else MERGED
                reason = f"run {holder} of this key is open"
                return await self._refuse(
                    agent, event, key, limit="singleton", kind=kind, reason=reason, into=holder
                )
        decision = await self._gates(agent, key, run_id, event, GATES[0], arriving=True)
        if decision.outcome == "park":
            self._count(agent, decision.gate, "delayed")
            await self._fact(
                agent, event, key, limit=decision.gate, kind=DELAYED, reason=_delay_text(decision), into=""
            )
        if decision.outcome == "drop":  # no run: give back the slots a gate before took for it
            await self.at_end(agent, key, run_id)
        return decision

    # --- a gated run wakes ---------------------------------------------------------------------------

    async def at_wake(self, agent: DurableAgent, record: RunRecord, event: Envelope) -> Decision:
        """Whether parked run `record` may start now; it waited at `record.gate`."""
        return await self._gates(agent, record.key, record.run_id, event, record.gate, arriving=False)

    async def _gates(  # noqa: C901, PLR0911 - one gate after the other, in order
        self, agent: DurableAgent, key: str, run_id: str, event: Envelope, first: str, *, arriving: bool
    ) -> Decision:
        limits = agent.limits
        swapped: bytes | None = None
        for gate in GATES[GATES.index(first) :] if first in GATES else ():
            parked_here = gate == first and not arriving
            if gate == "debounce" and limits.debounce_s is not None:
                decision = await self._debounce(
                    agent, key, run_id, event, quiet_s=limits.debounce_s, parked=parked_here
                )
                if decision.outcome != "start":
                    return decision
                swapped = decision.trigger
                arriving = True  # a debounced run arrives at the next gates now
            elif gate == "throttle" and limits.throttle is not None and not parked_here:
                start = await self._reserve(agent, key, limits.throttle, limits.max_queued)
                if start is None:
                    reason = f"{limits.max_queued} runs are delayed already"
                    return await self._refuse(
                        agent, event, key, limit="throttle", kind=DROPPED, reason=reason
                    )
                if start > self._clock.time():
                    return Decision("park", gate="throttle", due=start, trigger=swapped)
            elif gate == "concurrency" and limits.concurrency is not None:
                pool = limit_key("concurrency", agent.name, key_hash(key))
                taken = await self._take(pool, run_id, key, cap=limits.concurrency, queue=limits.max_queued)
                if taken == "full":
                    reason = f"{limits.concurrency} runs are open and {limits.max_queued} wait"
                    return await self._refuse(
                        agent, event, key, limit="concurrency", kind=DROPPED, reason=reason
                    )
                if taken == "queued":
                    return Decision("park", gate="concurrency", trigger=swapped)
            elif gate == "blast" and limits.blast is not None:
                blast = limits.blast
                cap = blast.cap(self._fleet())
                taken = await self._take(
                    blast_key(blast.group),
                    run_id,
                    key,
                    cap=cap,
                    by_key=True,
                    queue=limits.max_queued,
                    wait=blast.on_full == "wait",
                )
                if taken == "full":
                    reason = f"{cap} keys of group {blast.group} are under remediation"
                    return await self._refuse(agent, event, key, limit="blast", kind=DROPPED, reason=reason)
                if taken == "queued":
                    return Decision("park", gate="blast", trigger=swapped)
        return Decision("start", trigger=swapped)

    def _fleet(self) -> int:
        if self._settings.fleet_size:
            return self._settings.fleet_size
        if self._fleet_size is None:
            return 0
        try:
            return self._fleet_size()
        except Exception as exc:  # noqa: BLE001 - a registry that cannot be read gives the floor (1)
            log.warning("engine: the fleet's size cannot be read (%s); the blast radius is 1", exc)
            return 0

    # --- a run ends ----------------------------------------------------------------------------------

    async def at_end(self, agent: DurableAgent, key: str, run_id: str) -> list[str]:
        """Give back the slots (and queue places) run `run_id` held; return the runs that may now start."""
        limits = agent.limits
        pools = []
        if limits.singleton is not None:
            pools.append(limit_key("singleton", agent.name, key_hash(key)))
        if limits.concurrency is not None:
            pools.append(limit_key("concurrency", agent.name, key_hash(key)))
        if limits.blast is not None:
            pools.append(blast_key(limits.blast.group))
        woken: list[str] = []
        for pool in pools:
            woken.extend(await self._leave(pool, run_id))
        return woken

    # --- circuit breakers ----------------------------------------------------------------------------

    async def breaker_allows(self, action: str, breaker: Breaker) -> BreakerState:
        """The breaker's state for a step about to run; a half-open breaker lets this one step probe."""
        now = self._clock.time()

        def change(record: BreakerRecord | None) -> tuple[BreakerRecord | None, BreakerState]:
            current = record or BreakerRecord()
            state = breaker_state(current, now, breaker)
            if state == "half_open":
                return msgspec.structs.replace(current, probing=now), state
            return None, state

        return await self._cas(breaker_key(action), BreakerRecord, change)

    async def breaker_outcome(self, action: str, breaker: Breaker, *, ok: bool) -> bool:
        """Count a step's outcome; True if this failure opened the breaker."""
        now = self._clock.time()

        def change(record: BreakerRecord | None) -> tuple[BreakerRecord | None, bool]:
            current = record or BreakerRecord()
            if ok:
                return (breaker_succeeded() if current != BreakerRecord() else None), False
            after = breaker_failed(current, now, breaker)
            return after, after.opened != current.opened

        return await self._cas(breaker_key(action), BreakerRecord, change)

    # --- sampled facts -------------------------------------------------------------------------------

    async def keep_due_facts(self, *, everything: bool = False) -> None:
        """Keep one fact per key and limit whose window ended with more counted. Call it regularly.

        `everything`: whatever was counted, window ended or not (the engine stops: nothing is lost).
        """
        for sample in self._sampler.due(everything=everything):
            await self._counted_fact(sample)

    # --- the limits, one by one ----------------------------------------------------------------------

    async def _within_rate(self, agent: DurableAgent, key: str, window: Window) -> bool:
        now = self._clock.time()

        def change(state: _Starts | None) -> tuple[_Starts | None, bool]:
            starts = (state or _Starts()).starts
            if next_start(starts, now, window) > now:
                return None, False
            return _Starts(counted(starts, now, window, now)), True

        return await self._cas(limit_key("rate", agent.name, key_hash(key)), _Starts, change)

    async def _reserve(self, agent: DurableAgent, key: str, window: Window, max_queued: int) -> float | None:
        """When a throttled run may start (its start is counted now), or None if too many wait."""
        now = self._clock.time()

        def change(state: _Starts | None) -> tuple[_Starts | None, float | None]:
            starts = (state or _Starts()).starts
            start = next_start(starts, now, window)
            if start > now and pending(starts, now) >= max_queued:
                return None, None
            return _Starts(counted(starts, start, window, now)), start

        return await self._cas(limit_key("throttle", agent.name, key_hash(key)), _Starts, change)

    async def _debounce(
        self, agent: DurableAgent, key: str, run_id: str, event: Envelope, *, quiet_s: float, parked: bool
    ) -> Decision:
        now = self._clock.time()
        name = limit_key("debounce", agent.name, key_hash(key))
        if not parked:  # a trigger arrives: the first of a burst opens a run, the others merge into it

            def arrive(state: _Debounce | None) -> tuple[_Debounce | None, tuple[str, float]]:
                if state is not None and state.run and state.run != run_id:
                    later = _Debounce(
                        run=state.run,
                        trigger=to_json(event).decode(),
                        due=now + quiet_s,
                        merged=state.merged + 1,
                    )
                    return later, (state.run, later.due)
                if state is not None and state.run == run_id:  # the same trigger again
                    return None, ("", state.due)
                return _Debounce(run=run_id, trigger=to_json(event).decode(), due=now + quiet_s), ("", 0.0)

            into, due = await self._cas(name, _Debounce, arrive)
            if into:
                reason = f"merged into pending run {into}, which starts {quiet_s:g}s after the last trigger"
                return await self._refuse(
                    agent, event, key, limit="debounce", kind=MERGED, reason=reason, into=into
                )
            return Decision("park", gate="debounce", due=due or now + quiet_s)

        def ready(state: _Debounce | None) -> tuple[_Debounce | None, tuple[float, str]]:
            if state is None or state.run != run_id:
                return None, (0.0, "")  # nothing pending under this run: start with its own trigger
            if state.due > now:
                return None, (state.due, "")
            return _Debounce(), (0.0, state.trigger)

        due, trigger = await self._cas(name, _Debounce, ready)
        if due:
            return Decision("park", gate="debounce", due=due)
        return Decision("start", trigger=trigger.encode() if trigger else None)

    async def _take(
        self,
        name: str,
        run_id: str,
        key: str,
        *,
        cap: int,
        by_key: bool = False,
        queue: int = 0,
        wait: bool = True,
    ) -> Literal["run", "queued", "full"]:
        """A slot in pool `name` for `run_id`: taken, queued (in order), or none (the pool is full).

        See `admit`; when the pool looks full, the slots of runs that ended are freed first (`_prune`).
        """
        for pruned in (False, True):
            now = self._clock.time()

            def change(
                state: Pool | None, now: float = now, *, pruned: bool = pruned
            ) -> tuple[Pool | None, Taken]:
                return admit(
                    state or Pool(),
                    run_id,
                    key,
                    cap=cap,
                    by_key=by_key,
                    queue=queue,
                    wait=wait,
                    now=now,
                    final=pruned,
                )

            outcome = await self._cas(name, Pool, change)
            if outcome != "blocked":
                return outcome
            await self._prune(name)
        raise AssertionError  # pragma: no cover - the second pass never says "blocked"

    async def _prune(self, name: str) -> None:
        """Free the slots (and queue places) of runs that ended or vanished without giving them back."""
        try:
            entry = await self._limits.get(name)
        except KeyNotFoundError:
            return
        if not entry.value:
            return
        pool = msgspec.json.decode(entry.value, type=Pool)
        now = self._clock.time()
        gone = set()
        for run_id, slot in pool.running.items():
            if await self._ended(run_id, slot.since, now):
                gone.add(run_id)
        for run_id, since in list(pool.queued.items())[:1]:  # the head: it holds the others up
            if await self._ended(run_id, since, now):
                gone.add(run_id)
        if not gone:
            return
        log.info(
            "engine: %s: freed the slots of %d run(s) that ended without giving them back", name, len(gone)
        )

        def change(state: Pool | None) -> tuple[Pool | None, None]:
            if state is None:
                return None, None
            running = {run_id: slot for run_id, slot in state.running.items() if run_id not in gone}
            return Pool(
                running, {run_id: at for run_id, at in state.queued.items() if run_id not in gone}
            ), None

        await self._cas(name, Pool, change)

    async def _ended(self, run_id: str, since: float, now: float) -> bool:
        found = await read_record(self._runs, run_id)
        if found is None:
            return since > 0 and now - since > STALE_AFTER_S
        return found[0].terminal

    async def _leave(self, name: str, run_id: str) -> list[str]:
        """Give back `run_id`'s slot (or queue place) in pool `name`; the queued runs that may go now."""

        def change(state: Pool | None) -> tuple[Pool | None, list[str]]:
            return (None, []) if state is None else leave(state, run_id)

        return await self._cas(name, Pool, change)

    async def _holder(self, name: str) -> str:
        try:
            entry = await self._limits.get(name)
        except KeyNotFoundError:
            return "?"
        pool = msgspec.json.decode(entry.value or b"{}", type=Pool)
        return next(iter(pool.running), "?")

    # --- the loop guard ------------------------------------------------------------------------------

    async def _looped(self, agent: DurableAgent, event: Envelope, key: str, run_id: str) -> str | None:
        """The run of this agent and key that `event` descends from, if any.

        Every run notes its correlation chain (`remember`), with its trigger's hops. A trigger in the
        same chain, for the same agent and key, and deeper than that run's trigger, can only have been
        caused by what happened after that run started: it is taken as the run's own effect.
        """
        assert event.correlationid is not None  # noqa: S101 - checked by the caller
        # A run started by the chain's first message: its id derives from the chain's id.
        first = agent.run_id(event.correlationid)
        found = None if first == run_id else await read_record(self._runs, first)
        if found is not None and found[0].key == key:
            if _HOPS.decode(found[0].trigger).hops < event.hops:
                return first
            return None
        name = chain_key(derived_id("chain", event.correlationid), agent.name, key_hash(key))
        try:
            entry = await self._lineage.get(name)
        except KeyNotFoundError:
            return None
        origin = msgspec.json.decode(entry.value or b"[]", type=_Origin)
        return origin.run if origin.run != run_id and origin.hops < event.hops else None

    async def remember(self, agent: DurableAgent, event: Envelope, key: str, run_id: str) -> None:
        """Note that run `run_id` (of `agent`, for `key`) starts in `event`'s chain (the first one stays).

        One write, made while the run's journal is created (the engine does both at once); none for a run
        started by the first message of a chain (its run id says so: see `_looped`).
        """
        chain = event.correlationid or event.id
        if not agent.limits.loop_guard or chain == event.id:
            return
        name = chain_key(derived_id("chain", chain), agent.name, key_hash(key))
        with contextlib.suppress(KeyWrongLastSequenceError):  # a run of the chain came first: it stays
            await self._lineage.create(name, msgspec.json.encode(_Origin(run_id, event.hops)))

    # --- facts ---------------------------------------------------------------------------------------

    async def _refuse(
        self,
        agent: DurableAgent,
        event: Envelope,
        key: str,
        *,
        limit: str,
        kind: str,
        reason: str,
        into: str = "",
    ) -> Decision:
        self._count(agent, limit, "merged" if kind == MERGED else "dropped")
        await self._fact(agent, event, key, limit=limit, kind=kind, reason=reason, into=into)
        return Decision("merge" if kind == MERGED else "drop")

    def _count(self, agent: DurableAgent, limit: str, outcome: str) -> None:
        self.counts[f"{agent.name}.{limit}.{outcome}"] += 1

    async def _fact(
        self, agent: DurableAgent, event: Envelope, key: str, *, limit: str, kind: str, reason: str, into: str
    ) -> None:
        """Keep a fact of what `limit` did to `event`: the first per window at once, the rest counted."""
        sample = self._sampler.offer(key, f"{agent.name}/{limit}/{kind}", event.id)
        if sample is None:
            return
        if sample.overflow:
            await self._counted_fact(sample)
            return
        subject = key if is_token(key) else NO_SUBJECT
        summary = f"{agent.name}: {limit} {kind.removeprefix('trigger_')} {event.type} {event.id}: {reason}"
        data: dict[str, object] = {"agent": agent.name, "key": key, "limit": limit, "trigger": event.id}
        if into:
            data["into"] = into
        data["count"] = 1
        fact = Fact(
            id=derived_id(agent.name, kind, limit, event.id),
            source=f"nerve://central/{agent.name}",
            type=f"nerve.fact.{kind}",
            subject=subject,
            kind=kind,
            summary=summary,
            data=data,
            correlationid=event.correlationid or event.id,
            causationid=event.id,
            hops=event.hops,
        )
        await self._publish(fact, 1)

    async def _publish(self, fact: Fact, count: int) -> None:
        """Keep `fact`; what the limit did is done even if the fact cannot be kept.

        If it cannot (NATS away, facts stream full), the log says so and the count stays in `counts`.
        """
        try:
            await publish_fact(self._js, fact, prefix=self._prefix, signer=self._signer, codec=self._codec)
        except (NerveError, NatsError, TimeoutError) as exc:
            log.warning("engine: %d %s trigger(s) not kept in a fact: %s", count, fact.kind, exc)

    async def _counted_fact(self, sample: Sample) -> None:
        agent, limit, kind = sample.reason.split("/")
        window = self._settings.limit_facts_window_s
        about = "many keys" if sample.overflow else sample.device
        subject = sample.device if is_token(sample.device) and not sample.overflow else NO_SUBJECT
        fact = Fact(
            id=derived_id(self._instance, sample.reason, sample.device, repr(sample.since)),
            source=f"nerve://central/{agent}",
            type=f"nerve.fact.{kind}",
            subject=subject,
            kind=kind,
            summary=(
                f"{agent}: {limit} {kind.removeprefix('trigger_')} {sample.count} trigger(s) of {about} "
                f"within {window:g}s (counted, not kept one by one; the last: {sample.last})"
            ),
            data={"agent": agent, "key": about, "limit": limit, "count": sample.count, "last": sample.last},
        )
        await self._publish(fact, sample.count)

    # --- compare-and-set -----------------------------------------------------------------------------

    async def _cas(
        self,
        name: str,
        kind: type[S],
        change: Callable[[S | None], tuple[S | None, R]],
        *,
        bucket: KeyValue | None = None,
    ) -> R:
        """Apply `change` to the state `name` with compare-and-set; return what `change` said.

        `change` returns the new state (None: unchanged) and a result. The write succeeds only if nothing
        was written in between; else it is tried again. Raises `LimitContended`.
        """
        kv = bucket or self._limits
        where = (id(kv), name)
        # First from what this process wrote last (no read), else as if absent (a create, no read): one
        # round trip either way when nobody else wrote; a refused write reads the state and tries again.
        known = self._known.pop(where, None)
        for attempt in range(MAX_CAS_TRIES):
            if attempt == 0:
                revision, raw = known or (0, b"")
            else:
                try:
                    entry = await kv.get(name)
                    revision, raw = entry.revision or 0, entry.value or b""
                except KeyNotFoundError:
                    revision, raw = 0, b""
            state = msgspec.json.decode(raw, type=kind) if raw else None
            new, result = change(state)
            if new is None:
                if attempt == 0:
                    continue  # nothing to write: say so only of the state as it is now
                self._remember(where, revision, raw)
                return result
            data = msgspec.json.encode(new)
            try:
                if revision:
                    written = await kv.update(name, data, last=revision)
                else:
                    written = await kv.create(name, data)
            except KeyWrongLastSequenceError:
                continue
            self._remember(where, written, data)
            return result
        raise LimitContended(name)

    def _remember(self, where: tuple[int, str], revision: int, raw: bytes) -> None:
        """Keep a state this process read or wrote (small ones, the newest `KNOWN_STATES`)."""
        if revision and len(raw) <= KNOWN_STATE_BYTES:
            self._known[where] = (revision, raw)
            if len(self._known) > KNOWN_STATES:
                self._known.popitem(last=False)


def _delay_text(decision: Decision) -> str:
    if decision.due:
        return f"waits at {decision.gate} until {time.strftime('%H:%M:%S', time.gmtime(decision.due))} UTC"
    return f"waits at {decision.gate} for a slot, in order"


__all__ = [
    "GATES",
    "Decision",
    "Flow",
    "LimitContended",
    "Pool",
    "Slot",
    "admit",
    "ensure_flow_storage",
    "key_hash",
    "leave",
]
