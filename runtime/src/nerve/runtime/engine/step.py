"""The `step` object: everything an agent does goes through it and is journalled.

Each step has a name, unique within a run; its id derives from the run id and that name, so a re-run
publishes the same ids (JetStream keeps them once). A step whose result is journalled is never run again:
a resumed run replays the agent function, and every step already done returns its journalled result at
once. Steps are at-least-once: a process killed while a step's function runs has it run again by
whoever resumes the run, so a step's effect must be idempotent (use `step.id(name)` as its id).

`command(name, device=, action=, args=, ttl=)` (a signed command whose id is the step id, then a journalled
wait on NERVE_RESULTS for the device's signed result) is in `nerve.runtime.engine.command`. Still to come
(issue 10): `approve(...)`, a step of the same shape: a first write that records what is awaited, an
effect published under the step id, and a durable wait with a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal, NoReturn, TypeVar, overload

import msgspec
from nats.js.api import ConsumerConfig, DeliverPolicy

from nerve.runtime.cancellation import checkpoint
from nerve.runtime.engine.approval import (
    ON_EXPIRY,
    Decision,
    DecisionRefused,
    OnExpiry,
    check_decision,
    expiry_path,
    is_pending_approval,
    pending_info,
)
from nerve.runtime.engine.clock import SYSTEM_CLOCK
from nerve.runtime.engine.errors import (
    AgentDeclarationError,
    LeaseLost,
    Retryable,
    RunCancelled,
    StepFailed,
    Terminal,
)
from nerve.runtime.engine.fallback import command_with_fallbacks, run_with_fallbacks
from nerve.runtime.engine.journal import RecordTooLarge, RunRecord, StepRecord, UndoRecord, error_text
from nerve.runtime.engine.names import RUNS_STREAM, approvals_subject
from nerve.runtime.engine.timers import TimerBell, forget, has_fired, schedule
from nerve.runtime.envelope.codec import MODEL_OF_KIND, decode, to_json
from nerve.runtime.envelope.model import Fact, derived_id
from nerve.runtime.errors import DecodeError
from nerve.runtime.jetstream.client import Stored, last_sequence, next_stored, publish_fact
from nerve.runtime.jetstream.streams import STREAM_OF_KIND, open_bucket
from nerve.runtime.subjects import Kind, is_token, subject_root

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

    from nats.aio.msg import Msg
    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue

    from nerve.runtime.engine.agent import DurableAgent, RetryPolicy
    from nerve.runtime.engine.clock import Clock
    from nerve.runtime.engine.command import ResultRefusals, Sent
    from nerve.runtime.engine.fallback import CommandFallback, FallbackSpec, Person
    from nerve.runtime.engine.flow import Flow
    from nerve.runtime.engine.journal import RunHandle
    from nerve.runtime.engine.settings import EngineSettings
    from nerve.runtime.envelope.codec import Codec
    from nerve.runtime.envelope.model import CommandResult, Envelope
    from nerve.runtime.trust.devices import DeviceKeys
    from nerve.runtime.trust.signing import Signer, Verifier

    StepFunction = Callable[[], Awaitable[Any]]
    UndoFunction = Callable[[], Awaitable[Any]]

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_STEP_NAME_CHARS: Final = 128
#: How many stored messages a wait reads one by one before it subscribes (`Step._look`).
LOOK_AHEAD: Final = 8
#: How long an expired wait (an approval's, an event's) waits for what was stored before to be read.
STORED_READ_S: Final = 10.0
# The subject of a fact about a run whose key is not a token (an order id with a dot, say).
NO_SUBJECT: Final = "unknown"


@dataclass(frozen=True, slots=True)
class EngineContext:
    """What steps need from the engine: JetStream, names, limits, and the key that signs facts."""

    js: JetStreamContext
    prefix: str
    settings: EngineSettings
    signer: Signer | None
    codec: Codec
    #: Tells waiting steps that their timer fired (one subscription per engine).
    bell: TimerBell
    clock: Clock = SYSTEM_CLOCK
    #: The operator keys whose decisions `approve` acts on (None: none).
    operators: Verifier | None = None
    #: `step.command`: whose results to believe (none: no result is), and who keeps refusals as facts.
    device_keys: DeviceKeys | None = None
    refusals: ResultRefusals | None = None
    #: Flow control (circuit breakers); None: no breakers.
    flow: Flow | None = None
    #: The KV buckets steps opened (`Step.bucket`), each once.
    buckets: dict[str, KeyValue] = field(default_factory=dict)
    #: Where NERVE_RESULTS was lately (`RunRecord.results_from`); made by the engine.
    results: StreamMark = field(init=False)

    def __post_init__(self) -> None:
        """Make `results` on `js`."""
        object.__setattr__(self, "results", StreamMark(self.js, STREAM_OF_KIND[Kind.RESULTS]))


class StreamMark:
    """A lower bound of a stream's last sequence, re-read at most every `max_age_s` in the background.

    For reads that filter exactly what they look for (a command's result, by the command's id): starting
    further back only reads more.
    """

    def __init__(self, js: JetStreamContext, stream: str, *, max_age_s: float = 1.0) -> None:
        self._js = js
        self.stream = stream
        self.max_age_s = max_age_s
        self._seq: int | None = None
        self._read_at = 0.0
        self._reading: asyncio.Future[None] | None = None

    def known(self) -> int | None:
        """A sequence the stream had reached before this call (None: not read yet); re-read if stale."""
        if time.monotonic() - self._read_at > self.max_age_s:
            self.refresh()
        return self._seq

    def refresh(self) -> None:
        """Read it again in the background (unless a read is under way)."""
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(self._read())
            self._reading.add_done_callback(mark_retrieved)

    async def bound(self) -> int:
        """As `known`, but waits for a first read."""
        seq = self.known()
        if seq is None and self._reading is not None:
            await self._reading
            seq = self._seq
        if seq is None:  # cannot happen: `_read` set it or raised
            raise RuntimeError(f"no position of {self.stream}")
        return seq

    async def _read(self) -> None:
        asked = time.monotonic()
        seq = await last_sequence(self._js, self.stream)
        # A stream made again from scratch starts over: follow it down too.
        self._seq, self._read_at = seq, asked


class Waiting:
    """How many runs of one process wait without an execution slot, and how many may (`max_waiting_runs`)."""

    __slots__ = ("cap", "count")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.count = 0


class Slot:
    """A run's share of its process's execution slots (`max_live_runs`).

    Taken when the run is claimed; given back while it waits for an event, a result or a decision (up to
    `max_waiting_runs` such runs: past that, a wait keeps its slot), so that long waits cannot use up
    the slots new triggers need; given back for good when the run stops.
    """

    __slots__ = ("_held", "_slots", "_waiting")

    def __init__(self, slots: asyncio.Semaphore, waiting: Waiting) -> None:
        self._slots = slots
        self._waiting = waiting
        self._held = True

    def give_back(self) -> None:
        """Give the slot back, if held."""
        if self._held:
            self._held = False
            self._slots.release()

    @contextlib.asynccontextmanager
    async def waiting(self) -> AsyncIterator[None]:
        """Wait without the slot (room permitting); take one again after."""
        if not self._held or self._waiting.count >= self._waiting.cap:
            yield
            return
        self._waiting.count += 1
        self.give_back()
        try:
            yield
        finally:
            self._waiting.count -= 1
            await self._slots.acquire()
            self._held = True


class Park(BaseException):
    """Raised through the agent function when the run must wait for timer `timer_id`: it is parked.

    A `BaseException`, so that an agent's `except Exception` cannot swallow it.
    """

    def __init__(self, timer_id: str, due: float) -> None:
        self.timer_id = timer_id
        self.due = due
        super().__init__(timer_id)


def _check_name(name: str) -> None:
    if not name or len(name) > MAX_STEP_NAME_CHARS or not name.isprintable():
        raise AgentDeclarationError(
            f"step name {name!r}: use 1 to {MAX_STEP_NAME_CHARS} printable characters"
        )


class Step:
    """The journal of one run, as its agent function sees it. Made by the engine, one per execution."""

    def __init__(
        self,
        *,
        ctx: EngineContext,
        handle: RunHandle,
        agent: DurableAgent,
        trigger: Envelope,
        slot: Slot | None = None,
    ) -> None:
        """`slot`: the run's execution slot, given back while it waits (default: none to give back)."""
        self._ctx = ctx
        self.slot = slot or Slot(asyncio.Semaphore(1), Waiting(0))
        self._handle = handle
        self._agent = agent
        self._trigger = trigger
        self._seen: set[str] = set()
        #: The undo of each step that registered one, in the order this execution reached them.
        self.undos: dict[str, UndoFunction] = {}
        self._cancelled = False
        self._wakeups: asyncio.Queue[Literal["cancel"]] = asyncio.Queue()
        #: Commands sent and not waited for yet (`send`, `result`).
        self._sent: dict[str, Sent] = {}

    @property
    def run_id(self) -> str:
        """The run's id."""
        return self._handle.run_id

    @property
    def key(self) -> str:
        """The run's key (what `key(event)` returned)."""
        return self._handle.record.key

    @property
    def record(self) -> RunRecord:
        """The run's journal as this process last wrote it."""
        return self._handle.record

    @property
    def js(self) -> JetStreamContext:
        """JetStream, for a step function's own effects (inside `run`, so that they are journalled)."""
        return self._ctx.js

    def id(self, name: str) -> str:
        """The id of step `name` of this run: the id to give what the step publishes (dedup)."""
        return derived_id(self.run_id, "step", name)

    async def bucket(self, name: str) -> KeyValue:
        """KV bucket `name` (it must exist: `StreamsMissing` if not), opened once per engine."""
        bucket = self._ctx.buckets.get(name)
        if bucket is None:
            bucket = self._ctx.buckets[name] = await open_bucket(self._ctx.js, name)
        return bucket

    def now(self) -> float:
        """Now, by the engine's clock (the harness's fake clock in tests): what a step function should read.

        Not journalled: a replayed run reads it again.
        """
        return self._ctx.clock.time()

    def retrigger(self, trigger: Envelope) -> None:
        """Flow control swapped the run's trigger for a later one (debounce) before its first step."""
        self._trigger = trigger

    def cancel(self) -> None:
        """Have the run stop at its next step (or its current wait) and compensate."""
        self._cancelled = True
        self._wakeups.put_nowait("cancel")

    # --- bookkeeping ---------------------------------------------------------------------------------

    def _enter(self, name: str) -> StepRecord | None:
        """Check `name` (unique in this run) and return what the journal holds of it."""
        _check_name(name)
        if name in self._seen:
            raise AgentDeclarationError(f"agent {self._agent.name}: step name {name!r} is used twice")
        self._seen.add(name)
        return self._handle.record.steps.get(name)

    def _before_new_step(self, *, new: bool = True) -> None:
        """Refuse to start (or, `new` false, go on with) a step not done yet when the run is stopping."""
        if self._handle.lost:
            raise LeaseLost(self.run_id)
        if self._cancelled:
            raise RunCancelled(self.run_id)
        record = self._handle.record
        if record.compensating:
            # A replay during compensation goes only as far as the journal: it re-registers the undos.
            raise StepFailed(self.run_id, "(replay)", record.error or "the run is compensating")
        if new and len(record.steps) >= self._ctx.settings.max_steps:
            raise StepFailed(
                self.run_id, "(limit)", f"more than {self._ctx.settings.max_steps} steps (engine.max_steps)"
            )

    async def _positions(self) -> dict[str, int]:
        """The last sequence of each stream the agent waits on: where its next wait will read from."""
        streams = [STREAM_OF_KIND[kind] for kind in self._agent.waits_on]
        lasts = await asyncio.gather(*(last_sequence(self._ctx.js, stream) for stream in streams))
        return dict(zip(streams, lasts, strict=True))

    def _positions_soon(self) -> asyncio.Future[dict[str, int]]:
        """`_positions()`, asked now and read in the background while the step goes on.

        Asked at the step's start, before the step sends anything on the engine's connection, so nothing
        the step causes can be stored before the position it reads from; the step awaits it before it
        journals. Saves a round trip per step.
        """
        if not self._agent.waits_on:
            done: asyncio.Future[dict[str, int]] = asyncio.get_running_loop().create_future()
            done.set_result({})
            return done
        future = asyncio.ensure_future(self._positions())
        future.add_done_callback(mark_retrieved)
        return future

    def _record_later(
        self,
        name: str,
        step: StepRecord,
        *,
        positions: dict[str, int] | None = None,
        forget_timer: str = "",
    ) -> None:
        """`_record`, without a write of its own: the run's next journal write carries it.

        Only for what a crash before that write may repeat (`RunHandle.defer`): a fact, kept once by its
        id (JetStream's duplicate window is 20 minutes, and every step that blocks writes first), or a
        wait's answer, which a replay reads again from the same place in its stream. `forget_timer`: the
        step's timer, whose fired message is deleted once the write landed (before, a replay may need it:
        a timer cannot be scheduled again under its id within JetStream's duplicate window).
        """
        then = None
        if forget_timer:
            then = functools.partial(forget, self._ctx.js, prefix=self._ctx.prefix, timer_id=forget_timer)
        change = functools.partial(_put_step, name=name, step=step, positions=positions)
        self._handle.defer(change, then=then)

    async def _record(
        self, name: str, step: StepRecord, *, positions: dict[str, int] | None = None, undo: bool = False
    ) -> None:
        results_from = self._ctx.results.known()

        def change(record: RunRecord) -> None:
            _put_step(record, name=name, step=step, positions=positions)
            if results_from is not None:
                record.results_from = results_from
            if undo and not any(entry.step == name for entry in record.undos):
                record.undos.append(UndoRecord(step=name))

        try:
            await self._handle.write(change)
        except RecordTooLarge as exc:
            raise StepFailed(self.run_id, name, str(exc)) from None

    # --- steps ---------------------------------------------------------------------------------------

    async def run(  # noqa: C901 - the fallbacks' branch is one line; the rest is one loop
        self,
        name: str,
        fn: StepFunction,
        *,
        undo: UndoFunction | None = None,
        retry: RetryPolicy | None = None,
        action: str | None = None,
        fallbacks: Sequence[FallbackSpec] = (),
    ) -> Any:  # noqa: ANN401 - what fn returned, as JSON
        """Run `fn()` once and journal its result (JSON: what `msgspec.to_builtins` makes of it).

        A step done before returns its journalled result without running `fn`. `undo`, if given, is
        journalled before `fn` runs, and runs if the run later fails for good or is cancelled. A `Terminal`
        error fails the step at once; any other error is retried per `retry` (default: the agent's),
        with jittered backoff, then fails the step. Raises `StepFailed` when the step failed for good.
        `action` names what the step does to the outside world: if the agent declares a circuit breaker
        for it (`Limits.breakers`), every try goes through the breaker. `fallbacks`: the other ways of
        doing it, each its own step, taken in turn once the previous failed for good (then `StepFailed`
        names them all): see `nerve.runtime.engine.fallback`.
        """
        if fallbacks:
            return await run_with_fallbacks(
                self, name, fn, undo=undo, retry=retry, action=action, fallbacks=fallbacks
            )
        journalled = self._enter(name)
        if undo is not None:
            self.undos[name] = undo
        if journalled is not None and journalled.status == "done":
            return journalled.result
        if journalled is not None and journalled.status == "failed":
            raise StepFailed(self.run_id, name, journalled.error)
        self._before_new_step(new=journalled is None)
        reading = self._positions_soon()
        started = journalled.started if journalled is not None else self.now()
        attempts = journalled.attempts if journalled is not None else 0
        if undo is not None and not any(entry.step == name for entry in self._handle.record.undos):
            await self._record(
                name, StepRecord(status="started", attempts=attempts, started=started), undo=True
            )
        # Read before `fn` runs: `fn` may act on other connections, which nothing orders after the read.
        positions = await reading
        await self._handle.flush()  # before `fn`, which may take long (`_record_later`)
        policy = retry or self._agent.retry
        backoff = policy.backoff()
        while True:
            attempts += 1
            checkpoint()
            try:
                value = await self._through_breaker(action, fn)
            except Terminal as exc:
                await self._fail(name, attempts, started, error_text(exc))
            except Exception as exc:  # noqa: BLE001 - any other error is retryable
                error = error_text(exc)
                if attempts >= policy.attempts:
                    await self._fail(name, attempts, started, error)
                log.info("engine: run %s step %r try %d failed: %s", self.run_id, name, attempts, error)
                await self._record(
                    name, StepRecord(status="started", attempts=attempts, error=error, started=started)
                )
                await asyncio.sleep(backoff.next_delay())
                continue
            try:
                result = msgspec.to_builtins(value)
            except TypeError as exc:
                await self._fail(name, attempts, started, f"its result cannot be journalled as JSON: {exc}")
            done = StepRecord(
                status="done", result=result, attempts=attempts, started=started, finished=self.now()
            )
            await self._record(name, done, positions=positions)
            return result

    async def _through_breaker(self, action: str | None, fn: StepFunction) -> Any:  # noqa: ANN401
        """`await fn()`, counted by `action`'s breaker; fails at once (`on_open`) while it is open."""
        breaker = None if action is None else self._agent.limits.breakers.get(action)
        flow = self._ctx.flow
        if action is None or breaker is None or flow is None:
            return await fn()
        if await flow.breaker_allows(action, breaker) == "open":
            reason = f"the circuit breaker of {action!r} is open (it fails fast for {breaker.cooloff_s:g}s)"
            raise Terminal(reason) if breaker.on_open == "terminal" else Retryable(reason)
        try:
            value = await fn()
        except Exception:
            if await flow.breaker_outcome(action, breaker, ok=False):
                await self.keep_fact(
                    fact_id=derived_id(self.run_id, "breaker", action, str(self.now())),
                    kind="breaker_opened",
                    summary=(
                        f"{self._agent.name}: circuit breaker of {action!r} opened after {breaker.failures} "
                        f"failure(s) in {breaker.within_s:g}s; its steps fail fast for {breaker.cooloff_s:g}s"
                    ),
                    data={"action": action, "failures": breaker.failures, "within_s": breaker.within_s},
                    subject=None,
                )
            raise
        await flow.breaker_outcome(action, breaker, ok=True)
        return value

    async def _fail(self, name: str, attempts: int, started: float, error: str) -> NoReturn:
        failed = StepRecord(
            status="failed", attempts=attempts, error=error, started=started, finished=self.now()
        )
        await self._record(name, failed)
        raise StepFailed(self.run_id, name, error)

    async def sleep(self, name: str, seconds: float) -> None:
        """Sleep `seconds`, durably: the run is parked, and a nats-server schedule wakes it (once).

        The run resumes when the timer fires, in whichever engine takes it; a timer that came due while no
        engine ran fires when one is back. At most `max_sleep_s` (engine settings).
        """
        journalled = self._enter(name)
        if journalled is not None and journalled.status == "done":
            return
        self._check_duration(name, seconds)
        timer_id = derived_id(self.run_id, "timer", name)
        if journalled is None:
            # One write for the step and the parking (the engine's, when `Park` reaches it), after the
            # schedule: a crash before it leaves a run that comes here again when replayed, and schedules
            # the same timer (kept once by its id: it fires at its first due time, or has fired). The
            # engine looks whether it fired once the run is parked.
            self._before_new_step()
            due = self.now() + seconds
            reading = self._positions_soon()
            await self._schedule(timer_id, due, name)
            sleeping = StepRecord(status="sleeping", due=due, timer=timer_id, started=self.now())
            self._record_later(name, sleeping, positions=await reading)
            raise Park(timer_id, due)
        self._before_new_step(new=False)
        if await has_fired(self._ctx.js, prefix=self._ctx.prefix, timer_id=timer_id):
            # Carried by the next write: a crash before it finds the step sleeping and its timer fired.
            done = StepRecord(status="done", started=journalled.started, finished=self.now(), timer=timer_id)
            self._record_later(name, done, forget_timer=timer_id)
            return
        # Maybe the process that journalled the timer died before it scheduled it, or the schedule was
        # lost: schedule it again (a pending schedule on the same subject is replaced, not doubled).
        await self._schedule(timer_id, journalled.due, name)
        raise Park(timer_id, journalled.due)

    def _check_duration(self, name: str, seconds: float) -> None:
        limit = self._ctx.settings.max_sleep_s
        if not 0 <= seconds <= limit:
            raise AgentDeclarationError(
                f"step {name!r}: {seconds!r} seconds is not between 0 and {limit:g} (engine.max_sleep_s)"
            )

    async def _schedule(self, timer_id: str, due: float, name: str) -> None:
        await schedule(
            self._ctx.js,
            prefix=self._ctx.prefix,
            timer_id=timer_id,
            due=due,
            run_id=self.run_id,
            step_id=self.id(name),
        )

    async def wait_for_event(
        self,
        name: str,
        event_type: str,
        *,
        timeout: float,
        match: Callable[[Envelope], bool] | None = None,
        kind: Kind = Kind.EVENTS,
        source: str = "*",
        since_trigger: bool = False,
    ) -> Envelope | None:
        """The first `kind` message named `event_type` (from `source`) that `match` accepts, or None.

        Reads from where the run was when its previous step began (after the trigger, for a first
        step), so an event that came in between is never missed; with `since_trigger`, from right after
        the trigger (the trigger's own stream only), so one that came while earlier steps ran counts too.
        None when `timeout` seconds passed first (a durable timer). The agent must declare `waits_on`
        with `kind`.
        """
        journalled = self._enter(name)
        model = MODEL_OF_KIND[kind]
        if journalled is not None and journalled.status == "done":
            if journalled.result is None:
                return None
            return decode(str(journalled.result["event"]).encode(), model)
        self._check_duration(name, timeout)
        if kind not in self._agent.waits_on:
            raise AgentDeclarationError(
                f"agent {self._agent.name}: step {name!r} waits on {kind} but the agent does not declare "
                f"waits_on=(Kind.{kind.name},)"
            )
        for what, value in (("event type", event_type), ("source", source)):
            if value != "*" and not is_token(value):
                raise AgentDeclarationError(f"step {name!r}: {what} {value!r} is not valid")
        stream = STREAM_OF_KIND[kind]
        if since_trigger and stream != self._handle.record.trigger_stream:
            raise AgentDeclarationError(f"step {name!r}: since_trigger reads only the trigger's stream")
        timer_id = derived_id(self.run_id, "timer", name)
        subject = f"{subject_root(self._ctx.prefix)}.{source}.{kind.value}.{event_type}"
        if journalled is None:
            self._before_new_step()
            record = self._handle.record
            from_seq = record.trigger_seq if since_trigger else record.positions.get(stream, 0)
            reading = self._positions_soon()
            started = self.now()
            # Already there (a device answers fast): done at once, without a timer or a subscription.
            # What it finds is the stream's first match after `from_seq`: a replay finds the same.
            early = await self._look(subject, stream, model, match, from_seq)
            if early is not None:
                event, seq = early
                done = StepRecord(
                    status="done",
                    result={"event": to_json(event).decode(), "seq": seq},
                    started=started,
                    finished=self.now(),
                    stream=stream,
                    from_seq=from_seq,
                )
                self._record_later(name, done, positions=await reading)
                return event
            positions = await reading
            due = self.now() + timeout
            journalled = StepRecord(
                status="waiting",
                due=due,
                timer=timer_id,
                stream=stream,
                from_seq=from_seq,
                started=self.now(),
            )
            await self._record(name, journalled, positions=positions)
            await self._schedule(timer_id, due, name)
        else:
            self._before_new_step(new=False)
            if not await has_fired(self._ctx.js, prefix=self._ctx.prefix, timer_id=timer_id):
                await self._schedule(timer_id, journalled.due, name)
        found = await self._watch(journalled, subject, stream, model, match)
        result = None if found is None else {"event": to_json(found[0]).decode(), "seq": found[1]}
        done = StepRecord(
            status="done",
            result=result,
            started=journalled.started,
            finished=self.now(),
            timer=timer_id,
            stream=stream,
            from_seq=journalled.from_seq,
        )
        self._record_later(name, done, forget_timer=timer_id)
        return None if found is None else found[0]

    async def _look(
        self,
        subject: str,
        stream: str,
        model: type[Envelope],
        match: Callable[[Envelope], bool] | None,
        from_seq: int,
        *,
        ahead: int | None = LOOK_AHEAD,
    ) -> tuple[Envelope, int] | None:
        """The first message on `subject` after `from_seq` that `match` accepts, if one is stored now.

        At most `ahead` of them are read (None: all); None: none stored yet (or more than that many to
        read: a subscription reads them).
        """
        return await self._first_stored(subject, stream, from_seq, self._envelopes(model, match), ahead=ahead)

    async def _first_stored(
        self,
        subject: str,
        stream: str,
        after: int,
        accept: Callable[[Stored], Awaitable[T | None]],
        *,
        ahead: int | None,
    ) -> tuple[T, int] | None:
        """The first message on `subject` after `after` that `accept` makes something of; None: none now.

        Returns what `accept` made of it and its sequence. Read message by message (`next_stored`), at
        most `ahead` of them (None: all): no consumer to make and delete.
        """
        for _ in range(ahead) if ahead is not None else itertools.count():
            stored = await next_stored(self._ctx.js, stream, after=after, subject=subject)
            if stored is None:
                return None
            after = stored.seq
            found = await accept(stored)
            if found is not None:
                return found, after
        return None

    def _envelopes(
        self, model: type[Envelope], match: Callable[[Envelope], bool] | None
    ) -> Callable[[Stored], Awaitable[Envelope | None]]:
        """What `_first_stored` accepts of a wait: a `model` that `match` accepts."""

        async def accept(stored: Stored) -> Envelope | None:
            return self._accepted(stored.data, stored.subject, model, match)

        return accept

    async def _watch(
        self,
        waiting: StepRecord,
        subject: str,
        stream: str,
        model: type[Envelope],
        match: Callable[[Envelope], bool] | None,
    ) -> tuple[Envelope, int] | None:
        """Read `subject` after `waiting.from_seq` until a message matches or the step's timer fires."""
        queue: asyncio.Queue[Msg | Literal["timer"]] = asyncio.Queue()

        async def on_event(msg: Msg) -> None:
            await queue.put(msg)

        await self._handle.flush()  # before the run blocks (`_record_later`)
        js = self._ctx.js
        events = await js.subscribe(
            subject,
            stream=stream,
            cb=on_event,
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=waiting.from_seq + 1
            ),
        )
        try:
            async with self._timer_rings(waiting.timer, queue), self.slot.waiting():
                return await self._read(queue, waiting, subject, model, match)
        finally:
            await events.unsubscribe()

    @contextlib.asynccontextmanager
    async def _timer_rings(
        self, timer_id: str, queue: asyncio.Queue[Msg | Literal["timer"]]
    ) -> AsyncIterator[None]:
        """Within it, "timer" goes on `queue` once timer `timer_id` fires, or at once if it fired already."""

        def ring() -> None:
            queue.put_nowait("timer")

        with self._ctx.bell.listening(timer_id, ring):
            if await has_fired(self._ctx.js, prefix=self._ctx.prefix, timer_id=timer_id):
                ring()
            yield

    async def _read(
        self,
        queue: asyncio.Queue[Msg | Literal["timer"]],
        waiting: StepRecord,
        subject: str,
        model: type[Envelope],
        match: Callable[[Envelope], bool] | None,
    ) -> tuple[Envelope, int] | None:
        """`_watch`'s loop: the first message `match` accepts, or None when the timer fired.

        When it fires, what was stored before and not read yet is read first (as for an approval): the
        timer may have fired while no engine watched, after the awaited event came.
        """
        js = self._ctx.js
        read_to = waiting.from_seq
        accept = self._envelopes(model, match)
        while True:
            got = await self._next(queue, waiting)
            checkpoint()
            if got == "cancel":
                raise RunCancelled(self.run_id)
            if got == "timer":
                return await self._stored_before(subject, waiting.stream, read_to, accept)
            if got is None:  # the timer is late: look, and schedule it again if it was lost
                if await has_fired(js, prefix=self._ctx.prefix, timer_id=waiting.timer):
                    return await self._stored_before(subject, waiting.stream, read_to, accept)
                await schedule(
                    js,
                    prefix=self._ctx.prefix,
                    timer_id=waiting.timer,
                    due=waiting.due,
                    run_id=self.run_id,
                    step_id=waiting.timer,
                )
                continue
            read_to = got.metadata.sequence.stream
            envelope = self._accepted(got.data, got.subject, model, match)
            if envelope is not None:
                return envelope, read_to

    async def _stored_before(
        self, subject: str, stream: str, read_to: int, accept: Callable[[Stored], Awaitable[T | None]]
    ) -> tuple[T, int] | None:
        """The timer fired: the first message stored on `subject` after `read_to` by now that counts.

        What counts is what `accept` makes something of: a wait's event, an approval's decision. Read
        from the stream (for `STORED_READ_S` at most), not from the subscription, which may not have
        delivered it yet: the timer may have fired while no engine watched, after the message came.
        """
        try:
            async with asyncio.timeout(STORED_READ_S):
                return await self._first_stored(subject, stream, read_to, accept, ahead=None)
        except TimeoutError:
            log.warning("engine: run %s: %s stored before its timeout, unread", self.run_id, subject)
        return None

    def _accepted(
        self, data: bytes, subject: str, model: type[Envelope], match: Callable[[Envelope], bool] | None
    ) -> Envelope | None:
        """`data` (a message on `subject`) decoded if `match` accepts it; None if not, or undecodable."""
        try:
            envelope = decode(data, model)
        except DecodeError as exc:
            log.debug("engine: run %s skips an undecodable %s: %s", self.run_id, subject, exc)
            return None
        return envelope if match is None or match(envelope) else None

    async def _next(
        self, queue: asyncio.Queue[Msg | Literal["timer"]], waiting: StepRecord
    ) -> Msg | Literal["timer", "cancel"] | None:
        """The next message or timer, "cancel", or None when the timer is overdue by a lease."""
        if self._cancelled:
            return "cancel"
        wait_s = max(0.0, waiting.due - self.now()) + self._ctx.settings.lease_s
        got_item = asyncio.ensure_future(queue.get())
        got_cancel = asyncio.ensure_future(self._wakeups.get())
        try:
            done, _ = await asyncio.wait(
                {got_item, got_cancel}, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for future in (got_item, got_cancel):
                if not future.done():
                    future.cancel()
        if got_cancel in done:
            if got_item in done:  # keep what came for the next look
                queue.put_nowait(got_item.result())
            return "cancel"
        if got_item in done:
            return got_item.result()
        return None

    @overload
    async def command(
        self,
        name: str,
        *,
        device: str,
        action: str,
        args: dict[str, Any],
        ttl: float,
        attempts: int = 1,
    ) -> CommandResult: ...

    @overload
    async def command(
        self,
        name: str,
        *,
        device: str,
        action: str,
        args: dict[str, Any],
        ttl: float,
        attempts: int = 1,
        fallbacks: Sequence[CommandFallback | Person],
    ) -> CommandResult | Decision: ...

    async def command(
        self,
        name: str,
        *,
        device: str,
        action: str,
        args: dict[str, Any],
        ttl: float,
        attempts: int = 1,
        fallbacks: Sequence[CommandFallback | Person] = (),
    ) -> CommandResult | Decision:
        """Send `action` to `device`, signed by the engine's signer, and return the device's result.

        The command id is the step id (a re-run sends the same id: kept once). Waits durably for the
        result on NERVE_RESULTS from where the stream was before the send, and acts only on one that
        verifies against the device registry. No result within `ttl` (plus clock skew): the command is
        sent again under a new id while `attempts` last, then the step fails (`StepFailed`).
        `send` and `result` are its two halves, for steps to run in between (facts, say).
        See `nerve.runtime.engine.command`.

        `fallbacks`: the other ways (`CommandFallback`, `Person`), taken in turn once a way got no result
        or an answer other than `ok`; then it returns the `ok` result or the approving `Decision`, and
        `StepFailed` names every way when all failed. See `nerve.runtime.engine.fallback`.
        """
        if fallbacks:
            return await command_with_fallbacks(
                self,
                name,
                device=device,
                action=action,
                args=args,
                ttl=ttl,
                attempts=attempts,
                fallbacks=fallbacks,
            )
        await self.send(name, device=device, action=action, args=args, ttl=ttl, attempts=attempts)
        return await self.result(name)

    async def send(
        self,
        name: str,
        *,
        device: str,
        action: str,
        args: dict[str, Any],
        ttl: float,
        attempts: int = 1,
    ) -> str:
        """The first half of `command`: send it (journalled), return its id; `result(name)` waits for it.

        What a reflex uses: the command is out before the facts about it are kept.
        """
        from nerve.runtime.engine.command import send_command  # noqa: PLC0415 - it imports this module

        self._sent[name] = await send_command(
            self, name, device=device, action=action, args=args, ttl=ttl, attempts=attempts
        )
        return self.id(name)

    async def result(self, name: str) -> CommandResult:
        """The second half of `command`: the device's verified result to the command `send(name)` sent.

        Raises `StepFailed` when no result came in time (after every attempt), `AgentDeclarationError`
        when `send(name)` did not come first.
        """
        from nerve.runtime.engine.command import wait_for  # noqa: PLC0415 - it imports this module

        sent = self._sent.pop(name, None)
        if sent is None:
            raise AgentDeclarationError(f"step {name!r}: result() of a command that send() did not send")
        return await wait_for(self, sent)

    async def fact(
        self,
        name: str,
        *,
        kind: str,
        summary: str,
        data: dict[str, Any] | None = None,
        subject: str | None = None,
    ) -> str:
        """Keep a fact (signed and chained, if the engine has a signer) once; return its id.

        `subject` is the device or service it is about (default: the run's key, if it is a token).
        """
        journalled = self._enter(name)
        if journalled is not None and journalled.status == "done":
            return str(journalled.result)
        if not is_token(kind):
            raise AgentDeclarationError(f"step {name!r}: fact kind {kind!r} is not a token")
        self._before_new_step()
        started = self.now()
        fact_id = await self.keep_fact(
            fact_id=derived_id(self.run_id, "fact", name),
            kind=kind,
            summary=summary,
            data=data,
            subject=subject,
        )
        # No new positions: a wait after a fact reads from where the step before it began (a fact takes
        # a round trip; reading that much further back costs nothing and saves two).
        self._record_later(
            name, StepRecord(status="done", result=fact_id, started=started, finished=self.now())
        )
        return fact_id

    async def keep_fact(
        self, *, fact_id: str, kind: str, summary: str, data: dict[str, Any] | None, subject: str | None
    ) -> str:
        """Publish one fact about this run with id `fact_id` (kept once: JetStream dedups by id)."""
        trigger = self._trigger
        about = subject or (self.key if is_token(self.key) else (trigger.subject or NO_SUBJECT))
        if not is_token(about):
            about = NO_SUBJECT
        fact = Fact(
            id=fact_id,
            source=f"nerve://central/{self._agent.name}",
            type=f"nerve.fact.{kind}",
            subject=about,
            kind=kind,
            summary=summary,
            data={"run": self.run_id, **(data or {})},
            correlationid=trigger.correlationid or trigger.id,
            causationid=trigger.id,
            hops=trigger.hops,
        )
        await publish_fact(
            self._ctx.js, fact, prefix=self._ctx.prefix, signer=self._ctx.signer, codec=self._ctx.codec
        )
        return fact_id

    # --- human approval (nerve.runtime.engine.approval) ----------------------------------------------

    async def approve(
        self,
        name: str,
        *,
        route: str,
        expires: float,
        on_expiry: OnExpiry = "escalate",
        summary: str = "",
    ) -> Decision:
        """Wait up to `expires` seconds for a person (`route`: who, a token) to approve or reject.

        Keeps an `approval_requested` fact; `nerve approve RUN_ID [--reject]` signs the decision with the
        operator's key, and only a decision signed by a key the engine trusts counts (any other is kept as
        an `approval_refused` fact and ignored). Returns the `Decision`. When nobody decided in time the
        declared path is taken: `escalate` keeps an `approval_expired` fact and returns an `expired`
        decision; `compensate` keeps it and fails the step (`StepFailed`: the run's undos run); `fallback`
        (a `Person` fallback before the last way) fails the step too, saying the next fallback is taken.
        """
        journalled = self._enter(name)
        if journalled is not None and journalled.status == "done":
            return msgspec.convert(journalled.result["decision"], Decision)
        if journalled is not None and journalled.status == "failed":
            raise StepFailed(self.run_id, name, journalled.error)
        self._check_duration(name, expires)
        if not is_token(route):
            raise AgentDeclarationError(f"step {name!r}: route {route!r} is not a token")
        if on_expiry not in ON_EXPIRY:
            raise AgentDeclarationError(f"step {name!r}: on_expiry {on_expiry!r} is not one of {ON_EXPIRY}")
        timer_id = derived_id(self.run_id, "timer", name)
        if journalled is None:
            self._before_new_step()
            positions = await self._positions()
            now = self.now()
            journalled = StepRecord(
                status="waiting", due=now + expires, timer=timer_id, stream=RUNS_STREAM, started=now
            )
            await self._record(name, journalled, positions=positions)
            await self._schedule(timer_id, journalled.due, name)
        else:
            self._before_new_step(new=False)
            if not await has_fired(self._ctx.js, prefix=self._ctx.prefix, timer_id=timer_id):
                await self._schedule(timer_id, journalled.due, name)
        until = _iso(journalled.due)
        if not is_pending_approval(journalled.result):
            await self.keep_fact(
                fact_id=derived_id(self.run_id, "fact", name, "requested"),
                kind="approval_requested",
                summary=f"{self._agent.name}: {summary or name}: waiting for {route} to decide until {until} "
                f"(nerve approve {self.run_id} [--reject]); then: {on_expiry}",
                data={"step": name, "route": route, "expires": until, "on_expiry": on_expiry},
                subject=None,
            )
            info = pending_info(route=route, due=journalled.due, on_expiry=on_expiry, summary=summary)
            journalled = msgspec.structs.replace(journalled, result=info)
            await self._record(name, journalled)
        decision = await self._await_decision(name, journalled)
        if decision is None:
            path = expiry_path(on_expiry, route)
            await self.keep_fact(
                fact_id=derived_id(self.run_id, "fact", name, "expired"),
                kind="approval_expired",
                summary=f"{self._agent.name}: nobody decided on {summary or name} by {until}: {path}",
                data={"step": name, "route": route, "on_expiry": on_expiry},
                subject=None,
            )
            if on_expiry != "escalate":  # the step fails
                await forget(self._ctx.js, prefix=self._ctx.prefix, timer_id=timer_id)
                await self._fail(name, 1, journalled.started, f"the approval expired at {until}")
            decision = Decision(outcome="expired")
        else:
            await self.keep_fact(
                fact_id=derived_id(self.run_id, "fact", name, "decided"),
                kind=decision.outcome,
                summary=f"{self._agent.name}: {summary or name}: {decision.outcome} by key {decision.by}"
                + (f": {decision.comment}" if decision.comment else ""),
                data={
                    "step": name,
                    "by": decision.by,
                    "comment": decision.comment,
                    "decision": decision.decision,
                },
                subject=None,
            )
        done = msgspec.structs.replace(
            journalled,
            status="done",
            finished=self.now(),
            result={**journalled.result, "decision": msgspec.to_builtins(decision)},
        )
        await self._record(name, done)
        await forget(self._ctx.js, prefix=self._ctx.prefix, timer_id=timer_id)
        return decision

    async def _await_decision(self, name: str, waiting: StepRecord) -> Decision | None:
        """The first decision on step `name` that counts, or None once the approval expired."""
        queue: asyncio.Queue[Msg | Literal["timer"]] = asyncio.Queue()

        async def on_decision(msg: Msg) -> None:
            await queue.put(msg)

        js = self._ctx.js
        subject = approvals_subject(self.run_id)
        decisions = await js.subscribe(
            subject,
            stream=RUNS_STREAM,
            cb=on_decision,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
        read_to = 0

        async def judged(stored: Stored) -> Decision | None:
            return await self._judge(name, waiting, stored.subject, stored.data, stored.time)

        try:
            async with self._timer_rings(waiting.timer, queue), self.slot.waiting():
                while True:
                    got = await self._next(queue, waiting)
                    checkpoint()
                    if got == "cancel":
                        raise RunCancelled(self.run_id)
                    if got is None and not await has_fired(
                        js, prefix=self._ctx.prefix, timer_id=waiting.timer
                    ):
                        await self._schedule(waiting.timer, waiting.due, name)  # the timer was lost
                        continue
                    if got is None or got == "timer":
                        # Expired: but a decision stored before now is read first (it may have come in time).
                        found = await self._stored_before(subject, RUNS_STREAM, read_to, judged)
                        return None if found is None else found[0]
                    read_to = got.metadata.sequence.stream
                    decision = await self._judge(name, waiting, got.subject, got.data, got.metadata.timestamp)
                    if decision is not None:
                        return decision
        finally:
            await decisions.unsubscribe()

    async def _judge(
        self, name: str, waiting: StepRecord, subject: str, data: bytes, stored: datetime
    ) -> Decision | None:
        """The decision stored on `subject` at `stored` if it counts; else None (a refused one is a fact)."""
        key = subject.rsplit(".", 1)[-1]
        try:
            _, decision = check_decision(
                data,
                run_id=self.run_id,
                step=name,
                due=waiting.due,
                stored=stored,
                operators=self._ctx.operators,
            )
        except DecisionRefused as refused:
            if refused.elsewhere:
                return None
            log.warning("engine: run %s: decision %s refused: %s", self.run_id, key, refused.reason)
            await self.keep_fact(
                fact_id=derived_id(self.run_id, "refused", name, key),
                kind="approval_refused",
                summary=f"{self._agent.name}: a decision on {name!r} of run {self.run_id} was refused: "
                f"{refused.reason}",
                data={"step": name, "decision": key, "reason": refused.reason},
                subject=None,
            )
            return None
        return decision


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def _put_step(
    record: RunRecord, *, name: str, step: StepRecord, positions: dict[str, int] | None = None
) -> None:
    record.steps[name] = step
    if positions:
        record.positions.update(positions)


def mark_retrieved(future: asyncio.Future[Any]) -> None:
    """Mark a background read's error as seen: a step that failed before awaiting it has its own error."""
    if not future.cancelled():
        future.exception()
