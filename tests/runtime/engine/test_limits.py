"""Flow control: the window arithmetic (Hypothesis), breakers, and each limit on a real nats-server.

Where a limit's state must be shared, two engines take the same agent's triggers (a deliver group).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import TYPE_CHECKING

import msgspec
import nats
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tests.runtime.engine.conftest import FAST, PREFIX, publish_event

from nerve.runtime.engine import Engine, Step, Trigger, durable_agent, wait_for_run
from nerve.runtime.engine.errors import AgentDeclarationError
from nerve.runtime.engine.flow import Pool, admit, key_hash, leave
from nerve.runtime.engine.limits import (
    BlastRadius,
    Breaker,
    BreakerRecord,
    Limits,
    Window,
    breaker_failed,
    breaker_state,
    breaker_succeeded,
    counted,
    next_start,
)
from nerve.runtime.engine.names import LIMITS_BUCKET, limit_key
from nerve.runtime.envelope.codec import decode
from nerve.runtime.envelope.model import Event, Fact
from nerve.runtime.jetstream.client import publish_envelope
from nerve.runtime.jetstream.streams import FACTS_STREAM
from nerve.runtime.subjects import Address, Kind
from nerve.runtime.testing import stream_messages

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext

    from nerve.runtime.engine import DurableAgent
    from nerve.runtime.envelope.model import Envelope
    from nerve.runtime.stack.brokers import NatsServer

# --- the arithmetic ----------------------------------------------------------------------------------

windows = st.builds(Window, st.integers(1, 5), st.floats(0.5, 10.0))
arrivals = st.lists(st.floats(0.0, 50.0), max_size=40).map(sorted)


@given(windows, arrivals)
def test_a_throttle_starts_every_trigger_in_order_never_more_than_count_per_period(
    window: Window, times: list[float]
) -> None:
    starts: list[float] = []
    kept: list[float] = []
    for now in times:
        start = next_start(kept, now, window)
        # never before the trigger, in order, and no later than it must be
        assert start >= now
        assert not starts or start >= starts[-1]
        due = max(
            [
                now,
                *starts[-1:],
                *([starts[-window.count] + window.period_s] if len(starts) >= window.count else []),
            ]
        )
        assert start == due
        starts.append(start)
        kept = counted(kept, start, window, now)
    for i in range(len(starts) - window.count):
        assert starts[i + window.count] >= starts[i] + window.period_s  # any period holds at most count


@given(windows, arrivals)
def test_a_rate_limit_drops_only_what_is_over_count_in_the_last_period(
    window: Window, times: list[float]
) -> None:
    kept: list[float] = []
    admitted: list[float] = []
    for now in times:
        recent = [at for at in admitted if at + window.period_s > now]  # within the last period
        if next_start(kept, now, window) > now:
            assert len(recent) >= window.count  # dropped: count were admitted within the period
            continue
        assert len(recent) < window.count
        admitted.append(now)
        kept = counted(kept, now, window, now)
    assert len(kept) <= window.count


# A run: (its id, its key). Operations: a run arrives or is woken (True), or a run ends (False).
pool_ops = st.lists(st.tuples(st.integers(0, 7), st.booleans()), max_size=60)


@settings(max_examples=500)
@given(st.integers(1, 3), st.booleans(), st.integers(1, 4), pool_ops)
@example(2, False, 4, [(1, True), (2, True), (3, True), (1, False), (4, True)])  # a newcomer, a slot free
def test_slots_never_exceed_the_cap_and_the_queue_goes_first_in_order(
    cap: int, by_key: bool, queue: int, ops: list[tuple[int, bool]]
) -> None:
    pool = Pool()
    ended: set[str] = set()
    for number, arrives in ops:
        run_id, key = f"r{number}", f"k{number % 3}"
        if run_id in ended:
            continue
        if arrives:
            before = list(pool.queued)
            keys_before = {slot.key for slot in pool.running.values()}
            used_before = len(keys_before) if by_key else len(pool.running)
            was_running = run_id in pool.running
            new, outcome = admit(
                pool, run_id, key, cap=cap, by_key=by_key, queue=queue, wait=True, now=0.0, final=True
            )
            pool = new or pool
            if outcome == "run" and not was_running:
                # never ahead of the runs queued before it (all of them, for a newcomer), unless they fit
                # too, or its key holds a slot already (blast radius)
                ahead = before[: before.index(run_id)] if run_id in before else before
                assert used_before + len(ahead) < cap or (by_key and key in keys_before)
            assert outcome != "blocked"
        else:
            new, _woken = leave(pool, run_id)
            pool = new or pool
            ended.add(run_id)
        used = len({slot.key for slot in pool.running.values()}) if by_key else len(pool.running)
        assert used <= cap
        assert len(pool.queued) <= queue
        assert not set(pool.queued) & set(pool.running)
    if not pool.running and pool.queued:  # everything ended: the head of the queue gets a slot
        head = next(iter(pool.queued))
        _new, outcome = admit(
            pool, head, "k", cap=cap, by_key=by_key, queue=queue, wait=True, now=0.0, final=True
        )
        assert outcome == "run"


def test_a_breaker_opens_after_n_failures_within_t_probes_after_the_cool_off_and_closes() -> None:
    breaker = Breaker(failures=3, within_s=10.0, cooloff_s=5.0)
    record = BreakerRecord()
    for at in (0.0, 1.0):
        record = breaker_failed(record, at, breaker)
        assert breaker_state(record, at, breaker) == "closed"
    record = breaker_failed(BreakerRecord(failures=[-20.0, 1.0]), 2.0, breaker)  # one too old: 2 of 3
    assert breaker_state(record, 2.0, breaker) == "closed"
    record = breaker_failed(breaker_failed(BreakerRecord(), 0.0, breaker), 1.0, breaker)
    record = breaker_failed(record, 2.0, breaker)
    assert breaker_state(record, 2.0, breaker) == "open"
    assert breaker_state(record, 6.9, breaker) == "open"
    assert breaker_state(record, 7.0, breaker) == "half_open"
    probing = BreakerRecord(opened=record.opened, probing=7.0)
    assert breaker_state(probing, 8.0, breaker) == "open"  # one probe at a time
    reopened = breaker_failed(probing, 8.0, breaker)  # the probe failed: open again, for a cool-off
    assert breaker_state(reopened, 12.9, breaker) == "open"
    assert breaker_state(breaker_succeeded(), 8.0, breaker) == "closed"


def test_limits_refuse_wrong_numbers_with_one_clear_line() -> None:
    for make, words in (
        (lambda: Window(0, 1.0), "count must be"),
        (lambda: Limits(concurrency=0), "concurrency 0"),
        (lambda: Limits(debounce_s=0), "debounce_s 0"),
        (BlastRadius, "give max_keys, percent"),
        (lambda: BlastRadius(percent=150), "percent 150"),
        (lambda: Limits(breakers={"a.b": Breaker()}), "not a token"),
    ):
        with pytest.raises(AgentDeclarationError, match=words):
            make()
    assert BlastRadius(percent=10).cap(25) == 2
    assert BlastRadius(percent=10, max_keys=1).cap(1000) == 1
    assert BlastRadius(percent=1).cap(5) == 1  # never below one


# --- on a real nats-server ---------------------------------------------------------------------------

#: What the agents saw: (agent, key) -> trigger ids, in the order their runs started.
started: dict[str, list[str]] = defaultdict(list)
open_runs: dict[str, int] = defaultdict(int)
most_open: dict[str, int] = defaultdict(int)


class Gate:
    """Runs of the blocking agents wait here until the test opens it (one per test: a fresh loop)."""

    event = asyncio.Event()


async def _blocking(name: str, event: Envelope, step: Step) -> None:
    async def work() -> None:
        started[name].append(event.id)
        open_runs[name] += 1
        most_open[name] = max(most_open[name], open_runs[name])
        try:
            async with asyncio.timeout(30):
                await Gate.event.wait()
        finally:
            open_runs[name] -= 1

    await step.run("work", work)


def _key(event: Envelope) -> str:
    return str(event.data["key"])


@durable_agent("rated", trigger=Trigger(Kind.EVENTS, "rated"), key=_key, limits=Limits(rate=Window(2, 60.0)))
async def rated(event: Envelope, step: Step) -> None:
    await step.run("work", lambda: _note("rated", event))


async def _note(name: str, event: Envelope) -> None:
    started[name].append(event.id)


@durable_agent("single", trigger=Trigger(Kind.EVENTS, "single"), key=_key, limits=Limits(singleton="drop"))
async def single(event: Envelope, step: Step) -> None:
    await _blocking("single", event, step)


@durable_agent("queued", trigger=Trigger(Kind.EVENTS, "queued"), key=_key, limits=Limits(concurrency=1))
async def queued(event: Envelope, step: Step) -> None:
    await _blocking("queued", event, step)


@durable_agent(
    "throttled",
    trigger=Trigger(Kind.EVENTS, "throttled"),
    key=_key,
    limits=Limits(throttle=Window(1, 1.0)),
)
async def throttled(event: Envelope, step: Step) -> float:
    return float(await step.run("at", _now))


async def _now() -> float:
    return time.time()


@durable_agent(
    "debounced", trigger=Trigger(Kind.EVENTS, "debounced"), key=_key, limits=Limits(debounce_s=1.0)
)
async def debounced(event: Envelope, step: Step) -> str:
    await step.run("work", lambda: _note("debounced", event))
    return event.id


@durable_agent(
    "blasted",
    trigger=Trigger(Kind.EVENTS, "blasted"),
    key=_key,
    limits=Limits(blast=BlastRadius(max_keys=1, group="test_blast")),
)
async def blasted(event: Envelope, step: Step) -> None:
    await _blocking("blasted", event, step)


@durable_agent("echo", trigger=Trigger(Kind.EVENTS, "ping"), key=_key, limits=Limits(max_hops=3))
async def echo(event: Envelope, step: Step) -> None:
    """Answers a ping with a ping about the same key: its own effect would trigger it again."""

    async def answer() -> None:
        started["echo"].append(event.id)
        reply = Event(
            id=step.id("answer"),
            source="nerve://shop",
            type="ping",
            subject="shop",
            data=event.data,
            **event.caused(),
        )
        subject = Address(device="shop", kind=Kind.EVENTS, name="ping").subject(PREFIX)
        await publish_envelope(js_of[0], subject, reply)

    await step.run("answer", answer)


js_of: list[JetStreamContext] = []


#: Short leases, and a counted fact every half second after the first.
QUICK = FAST.model_copy(update={"limit_facts_window_s": 0.5})


@pytest.fixture
async def other_nc(nats_server: NatsServer) -> AsyncIterator[NatsClient]:
    """A second connection, for a second engine: as another central process would have."""
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


def _two_engines(nc: NatsClient, other_nc: NatsClient, agents: list[DurableAgent]) -> tuple[Engine, Engine]:
    """Two engines sharing `agents`' work, each on its own connection."""
    return Engine(nc=nc, agents=agents, prefix=PREFIX, settings=QUICK), Engine(
        nc=other_nc, agents=agents, prefix=PREFIX, settings=QUICK
    )


async def _until(predicate: object, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.05)


def _total(engines: tuple[Engine, ...], name: str) -> int:
    return sum(engine.limit_counts.get(name, 0) for engine in engines)


async def _facts(js: JetStreamContext, kind: str) -> list[Fact]:
    facts = [decode(message.data, Fact) for message in await stream_messages(js, FACTS_STREAM)]
    return [fact for fact in facts if fact.kind == kind]


@pytest.mark.broker
async def test_a_rate_limit_drops_past_its_count_and_keeps_a_fact(
    nc: NatsClient, other_nc: NatsClient, js: JetStreamContext
) -> None:
    first, second = _two_engines(nc, other_nc, [rated])
    async with first, second:
        for n in range(5):
            await publish_event(js, "rated", {"key": "k1"}, event_id=f"rate-{n}")
        await publish_event(js, "rated", {"key": "k2"}, event_id="rate-other-key")
        await _until(
            lambda: _total((first, second), "rated.rate.dropped") == 3 and len(started["rated"]) == 3
        )
        # The first drop in each engine is a fact at once; the others are counted into one per window.
        async with asyncio.timeout(20):
            while sum(fact.data["count"] for fact in await _facts(js, "trigger_dropped")) < 3:
                await asyncio.sleep(0.1)
    # Two engines take the triggers: which two of k1's five run is theirs to race for; two, and k2's.
    assert len([run for run in started["rated"] if run != "rate-other-key"]) == 2
    assert "rate-other-key" in started["rated"]
    dropped = await _facts(js, "trigger_dropped")
    assert sum(fact.data["count"] for fact in dropped) == 3
    assert {fact.data["limit"] for fact in dropped} == {"rate"}
    assert {fact.subject for fact in dropped} == {"k1"}


@pytest.mark.broker
async def test_a_singleton_drops_a_trigger_while_its_key_has_a_run_across_two_engines(
    nc: NatsClient, other_nc: NatsClient, js: JetStreamContext
) -> None:
    Gate.event = asyncio.Event()
    first, second = _two_engines(nc, other_nc, [single])
    async with first, second:
        await publish_event(js, "single", {"key": "d1"}, event_id="single-0")
        await _until(lambda: len(started["single"]) == 1)
        for n in range(1, 4):
            await publish_event(js, "single", {"key": "d1"}, event_id=f"single-{n}")
        await _until(lambda: _total((first, second), "single.singleton.dropped") == 3)
        Gate.event.set()
        await wait_for_run(first.kv, single.run_id("single-0"), timeout=20)
        await publish_event(js, "single", {"key": "d1"}, event_id="single-after")  # the key is free again
        record = await wait_for_run(first.kv, single.run_id("single-after"), timeout=20)
    assert record.state == "done"
    assert started["single"] == ["single-0", "single-after"]
    assert most_open["single"] == 1


@durable_agent("merging", trigger=Trigger(Kind.EVENTS, "merging"), key=_key, limits=Limits(singleton="merge"))
async def merging(event: Envelope, step: Step) -> None:
    await _blocking("merging", event, step)


@pytest.mark.broker
async def test_a_singleton_merges_a_trigger_into_the_open_run_of_its_key(
    nc: NatsClient, js: JetStreamContext
) -> None:
    Gate.event = asyncio.Event()
    async with Engine(nc=nc, agents=[merging], prefix=PREFIX, settings=FAST) as engine:
        await publish_event(js, "merging", {"key": "m1"}, event_id="merging-0")
        await _until(lambda: len(started["merging"]) == 1)
        await publish_event(js, "merging", {"key": "m1"}, event_id="merging-1")
        await _until(lambda: engine.limit_counts.get("merging.singleton.merged", 0) == 1)
        Gate.event.set()
        await wait_for_run(engine.kv, merging.run_id("merging-0"), timeout=20)
    assert await engine.record(merging.run_id("merging-1")) is None
    (merged,) = await _facts(js, "trigger_merged")
    assert merged.data["into"] == merging.run_id("merging-0")
    assert merged.data["trigger"] == "merging-1"


@pytest.mark.broker
async def test_concurrency_one_runs_a_keys_triggers_one_at_a_time_in_order_across_two_engines(
    nc: NatsClient, other_nc: NatsClient, js: JetStreamContext
) -> None:
    Gate.event = asyncio.Event()
    first, second = _two_engines(nc, other_nc, [queued])
    async with first, second:
        # The first in before the others come (two engines take the triggers: published one after the
        # other, they may reach the pool in either order).
        await publish_event(js, "queued", {"key": "q1"}, event_id="queued-0")
        await _until(lambda: len(started["queued"]) == 1)
        for n in (1, 2):
            await publish_event(js, "queued", {"key": "q1"}, event_id=f"queued-{n}")
        await _until(lambda: _total((first, second), "queued.concurrency.delayed") == 2)
        Gate.event.set()
        for n in range(3):
            record = await wait_for_run(first.kv, queued.run_id(f"queued-{n}"), timeout=20)
            assert record.state == "done"
    # The one that held the slot first; 1 and 2 in the order they joined the queue, which may be either.
    assert started["queued"][0] == "queued-0"
    assert sorted(started["queued"]) == ["queued-0", "queued-1", "queued-2"]
    assert most_open["queued"] == 1
    delayed = await _facts(js, "trigger_delayed")
    assert delayed[0].data["limit"] == "concurrency"


@pytest.mark.broker
async def test_a_throttle_delays_starts_to_count_per_period(nc: NatsClient, js: JetStreamContext) -> None:
    async with Engine(nc=nc, agents=[throttled], prefix=PREFIX, settings=FAST) as engine:
        published = time.time()
        for n in range(3):
            await publish_event(js, "throttled", {"key": "t1"}, event_id=f"throttled-{n}")
        starts = []
        for n in range(3):
            record = await wait_for_run(engine.kv, throttled.run_id(f"throttled-{n}"), timeout=20)
            assert record.state == "done"
            starts.append(record.result)
        assert engine.limit_counts["throttled.throttle.delayed"] == 2
    # The first starts at once; the n-th a period after the one before: never before published + n.
    starts.sort()
    assert starts[1] >= published + 1.0
    assert starts[2] >= published + 2.0


@pytest.mark.broker
async def test_debounce_starts_one_run_with_the_last_trigger_of_a_burst(
    nc: NatsClient, js: JetStreamContext
) -> None:
    async with Engine(nc=nc, agents=[debounced], prefix=PREFIX, settings=FAST) as engine:
        for n in range(4):
            await publish_event(js, "debounced", {"key": "b1"}, event_id=f"debounced-{n}")
        record = await wait_for_run(engine.kv, debounced.run_id("debounced-0"), timeout=20)
        assert engine.limit_counts["debounced.debounce.merged"] == 3
        for n in range(1, 4):
            assert await engine.record(debounced.run_id(f"debounced-{n}")) is None
    assert record.result == "debounced-3"
    assert started["debounced"] == ["debounced-3"]
    merged = await _facts(js, "trigger_merged")
    assert merged[0].data["into"] == debounced.run_id("debounced-0")


@pytest.mark.broker
async def test_the_blast_radius_holds_a_second_key_until_the_first_is_done(
    nc: NatsClient, other_nc: NatsClient, js: JetStreamContext
) -> None:
    Gate.event = asyncio.Event()
    first, second = _two_engines(nc, other_nc, [blasted])
    async with first, second:
        await publish_event(js, "blasted", {"key": "dev-a"}, event_id="blast-a")
        await _until(lambda: started["blasted"] == ["blast-a"])
        await publish_event(js, "blasted", {"key": "dev-a"}, event_id="blast-a2")  # same key: no new key
        await publish_event(js, "blasted", {"key": "dev-b"}, event_id="blast-b")
        await _until(lambda: _total((first, second), "blasted.blast.delayed") == 1)
        await _until(lambda: len(started["blasted"]) == 2)
        assert "blast-b" not in started["blasted"]
        Gate.event.set()
        record = await wait_for_run(first.kv, blasted.run_id("blast-b"), timeout=20)
    assert record.state == "done"
    assert started["blasted"][-1] == "blast-b"


@pytest.mark.broker
async def test_the_loop_guard_refuses_a_runs_own_effect_and_a_trigger_too_deep(
    nc: NatsClient, js: JetStreamContext
) -> None:
    js_of[:] = [js]
    ping = Address(device="shop", kind=Kind.EVENTS, name="ping").subject(PREFIX)
    async with Engine(nc=nc, agents=[echo], prefix=PREFIX, settings=FAST) as engine:
        # A chain's first message: its run is found by its id when its answer comes back.
        await publish_event(js, "ping", {"key": "e1"}, event_id="ping-0")
        # A reaction in another chain starts a run, which notes its chain (nerve_lineage).
        mid = Event(
            id="ping-mid",
            source="nerve://shop",
            type="ping",
            subject="shop",
            data={"key": "e3"},
            correlationid="elsewhere",
            causationid="elsewhere",
            hops=1,
        )
        await publish_envelope(js, ping, mid)
        deep = Event(
            id="ping-deep", source="nerve://shop", type="ping", subject="shop", data={"key": "e2"}, hops=4
        )
        await publish_envelope(js, ping, deep)
        await _until(lambda: engine.limit_counts.get("echo.causation.dropped", 0) == 2)
        await _until(lambda: engine.limit_counts.get("echo.max_hops.dropped", 0) == 1)
    assert sorted(started["echo"]) == ["ping-0", "ping-mid"]  # their answers did not start runs
    refused = await _facts(js, "loop_guard")
    assert {fact.data["limit"] for fact in refused} == {"causation", "max_hops"}


flaky_calls: list[str] = []


async def _always_fails() -> None:
    flaky_calls.append("call")
    raise RuntimeError("gateway down")


@durable_agent(
    "broken",
    trigger=Trigger(Kind.EVENTS, "broken"),
    key=_key,
    limits=Limits(breakers={"gateway": Breaker(failures=2, within_s=60, cooloff_s=60, on_open="terminal")}),
)
async def broken(_event: Envelope, step: Step) -> None:
    await step.run("call", _always_fails, action="gateway", retry=None)


@pytest.mark.broker
async def test_a_breaker_opened_by_failures_fails_the_next_steps_fast(
    nc: NatsClient, js: JetStreamContext
) -> None:
    async with Engine(nc=nc, agents=[broken], prefix=PREFIX, settings=FAST) as engine:
        await publish_event(js, "broken", {"key": "x"}, event_id="broken-0")
        first = await wait_for_run(engine.kv, broken.run_id("broken-0"), timeout=30)
        calls = len(flaky_calls)
        await publish_event(js, "broken", {"key": "y"}, event_id="broken-1")
        second = await wait_for_run(engine.kv, broken.run_id("broken-1"), timeout=30)
    assert first.state == "failed"
    assert calls == 2  # the second failure opened it: the third try failed fast
    assert second.state == "failed"
    assert len(flaky_calls) == calls  # never called while open
    assert "circuit breaker of 'gateway' is open" in second.steps["call"].error
    assert await _facts(js, "breaker_opened")


@durable_agent("healed", trigger=Trigger(Kind.EVENTS, "healed"), key=_key, limits=Limits(concurrency=1))
async def healed(event: Envelope, step: Step) -> None:
    await step.run("work", lambda: _note("healed", event))


@pytest.mark.broker
async def test_a_slot_left_by_a_run_that_vanished_is_freed_by_the_next_trigger(
    nc: NatsClient, js: JetStreamContext
) -> None:
    async with Engine(nc=nc, agents=[healed], prefix=PREFIX, settings=FAST) as engine:
        # A process took the slot and died before it journalled its run (long ago), and another's run
        # ended without giving its slot back: both are freed when the pool is found full.
        limits = await js.key_value(LIMITS_BUCKET)
        ghost = {"running": {"ghost": ["h1", time.time() - 3600]}, "queued": {"ghost-2": time.time() - 3600}}
        await limits.put(limit_key("concurrency", "healed", key_hash("h1")), msgspec.json.encode(ghost))
        await publish_event(js, "healed", {"key": "h1"}, event_id="healed-0")
        record = await wait_for_run(engine.kv, healed.run_id("healed-0"), timeout=20)
    assert record.state == "done"
    assert started["healed"] == ["healed-0"]


@durable_agent("cancelled", trigger=Trigger(Kind.EVENTS, "cancelled"), key=_key, limits=Limits(concurrency=1))
async def cancelled(event: Envelope, step: Step) -> None:
    await _blocking("cancelled", event, step)


@pytest.mark.broker
async def test_a_run_cancelled_while_it_waits_for_a_slot_leaves_the_queue(
    nc: NatsClient, js: JetStreamContext
) -> None:
    Gate.event = asyncio.Event()
    async with Engine(nc=nc, agents=[cancelled], prefix=PREFIX, settings=FAST) as engine:
        for n in range(3):
            await publish_event(js, "cancelled", {"key": "c1"}, event_id=f"cancelled-{n}")
        await _until(lambda: engine.limit_counts.get("cancelled.concurrency.delayed", 0) == 2)
        await engine.cancel(cancelled.run_id("cancelled-1"))
        gone = await wait_for_run(engine.kv, cancelled.run_id("cancelled-1"), timeout=20)
        Gate.event.set()
        last = await wait_for_run(engine.kv, cancelled.run_id("cancelled-2"), timeout=20)
    assert gone.state == "failed"  # cancelled before its first step: nothing to undo
    assert gone.cancelled
    assert not gone.steps
    assert last.state == "done"
    assert started["cancelled"] == ["cancelled-0", "cancelled-2"]


@pytest.mark.broker
async def test_drops_counted_in_a_window_are_kept_when_the_engine_stops(
    nc: NatsClient, js: JetStreamContext
) -> None:
    async with Engine(nc=nc, agents=[rated], prefix=PREFIX, settings=FAST) as engine:  # a 60 s window
        for n in range(6):
            await publish_event(js, "rated", {"key": "k9"}, event_id=f"stop-{n}")
        await _until(lambda: engine.limit_counts.get("rated.rate.dropped", 0) == 4)
    dropped = await _facts(js, "trigger_dropped")
    assert [fact.data["count"] for fact in dropped] == [1, 3]  # the first at once, the rest at the stop


@durable_agent(
    "capped",
    trigger=Trigger(Kind.EVENTS, "capped"),
    key=_key,
    limits=Limits(concurrency=1, blast=BlastRadius(max_keys=1, group="test_capped", on_full="drop")),
)
async def capped(event: Envelope, step: Step) -> None:
    await _blocking("capped", event, step)


@pytest.mark.broker
async def test_a_trigger_dropped_at_the_blast_radius_gives_back_the_slot_an_earlier_gate_took(
    nc: NatsClient, js: JetStreamContext
) -> None:
    Gate.event = asyncio.Event()
    async with Engine(nc=nc, agents=[capped], prefix=PREFIX, settings=FAST) as engine:
        await publish_event(js, "capped", {"key": "a"}, event_id="capped-a")
        await _until(lambda: started["capped"] == ["capped-a"])
        await publish_event(js, "capped", {"key": "b"}, event_id="capped-b")  # b's slot taken, then dropped
        await _until(lambda: engine.limit_counts.get("capped.blast.dropped", 0) == 1)
        Gate.event.set()
        await wait_for_run(engine.kv, capped.run_id("capped-a"), timeout=20)
        await publish_event(js, "capped", {"key": "b"}, event_id="capped-b2")
        record = await wait_for_run(engine.kv, capped.run_id("capped-b2"), timeout=20)
    assert record.state == "done"
    assert started["capped"] == ["capped-a", "capped-b2"]
    assert "capped.concurrency.delayed" not in engine.limit_counts  # b's slot was free: it never waited
