"""Durable timers (nats-server message schedules) and wait_for_event, on a real nats-server."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import TYPE_CHECKING

import pytest
from nats.js.errors import NotFoundError
from tests.runtime.engine.conftest import FAST, PREFIX, publish_event

from nerve.runtime.engine import (
    AgentDeclarationError,
    Engine,
    EngineSettings,
    Step,
    Trigger,
    durable_agent,
    wait_for_run,
)
from nerve.runtime.engine.names import TIMERS_STREAM, timer_schedule_subject
from nerve.runtime.engine.timers import has_fired
from nerve.runtime.envelope.model import derived_id
from nerve.runtime.subjects import Kind

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext

    from nerve.runtime.envelope.model import Envelope

pytestmark = pytest.mark.broker

ran: Counter[str] = Counter()


@durable_agent("napper", trigger=Trigger(Kind.EVENTS, "nap"), key=lambda event: str(event.data["k"]))
async def napper(event: Envelope, step: Step) -> str:
    async def before() -> None:
        ran[f"{step.key}:before"] += 1

    async def after() -> None:
        ran[f"{step.key}:after"] += 1

    await step.run("before", before)
    await step.sleep("nap", float(event.data["seconds"]))
    await step.run("after", after)
    return "rested"


async def wait_state(engine: Engine, run_id: str, state: str) -> None:
    async with asyncio.timeout(20):
        while (record := await engine.record(run_id)) is None or record.state != state:
            await asyncio.sleep(0.02)


async def test_a_sleep_parks_the_run_and_its_timer_resumes_it(nc: NatsClient, js: JetStreamContext) -> None:
    async with Engine(nc=nc, agents=[napper], prefix=PREFIX, settings=FAST) as engine:
        event = await publish_event(js, "nap", {"k": "short", "seconds": 0.3}, event_id="e-short-nap")
        record = await wait_for_run(engine.kv, napper.run_id(event.id), timeout=20)
    assert record.state == "done"
    assert record.result == "rested"
    assert record.steps["nap"].status == "done"
    assert record.steps["nap"].finished >= record.steps["nap"].due
    assert (ran["short:before"], ran["short:after"]) == (1, 1)


async def test_a_timer_due_while_no_engine_ran_fires_once_when_one_is_back(
    nc: NatsClient, js: JetStreamContext
) -> None:
    async with Engine(nc=nc, agents=[napper], prefix=PREFIX, settings=FAST) as engine:
        event = await publish_event(js, "nap", {"k": "down", "seconds": 1.0}, event_id="e-nap-down")
        run_id = napper.run_id(event.id)
        await wait_state(engine, run_id, "waiting")
    timer_id = derived_id(run_id, "timer", "nap")
    async with asyncio.timeout(20):  # no engine runs: the server fires the timer by itself
        while not await has_fired(js, prefix=PREFIX, timer_id=timer_id):
            await asyncio.sleep(0.05)
    assert ran["down:after"] == 0
    async with Engine(nc=nc, agents=[napper], prefix=PREFIX, settings=FAST) as engine:
        record = await wait_for_run(engine.kv, run_id, timeout=20)
        assert record.state == "done"
        await asyncio.sleep(0.5)  # a second firing would resume nothing: the step is done, nothing runs
    assert (ran["down:before"], ran["down:after"]) == (1, 1)
    with pytest.raises(NotFoundError):  # no schedule is left to fire again
        await js.get_last_msg(TIMERS_STREAM, timer_schedule_subject(PREFIX, timer_id))
    assert not await has_fired(js, prefix=PREFIX, timer_id=timer_id)  # its fired message was cleared


async def test_a_sleep_longer_than_the_limit_fails_the_run(nc: NatsClient, js: JetStreamContext) -> None:
    async with Engine(nc=nc, agents=[napper], prefix=PREFIX, settings=FAST) as engine:
        event = await publish_event(js, "nap", {"k": "long", "seconds": 1e9}, event_id="e-nap-long")
        record = await wait_for_run(engine.kv, napper.run_id(event.id), timeout=20)
    assert record.state == "failed"
    assert "engine.max_sleep_s" in record.error
    assert AgentDeclarationError.__name__ in record.error


class Gate:
    """Opened by the test (a new event per test: an asyncio.Event belongs to one loop)."""

    event = asyncio.Event()


@durable_agent(
    "recovery",
    trigger=Trigger(Kind.EVENTS, "payment_failed"),
    key=lambda event: str(event.data["order"]),
    waits_on=(Kind.EVENTS,),
)
async def recovery(event: Envelope, step: Step) -> str:
    order = event.data["order"]

    async def offer() -> str:
        return "offered"

    await step.run("offer", offer)
    if event.data.get("gated"):
        await Gate.event.wait()  # the test publishes the payment here: after the step, before the wait
    paid = await step.wait_for_event(
        "paid",
        "payment_succeeded",
        match=lambda e: e.data.get("order") == order,
        timeout=float(event.data.get("timeout", 30)),
    )
    # Parks the run: the function is replayed after it, and the wait returns its journalled event.
    await step.sleep("cooldown", 0.05)
    return "gave_up" if paid is None else f"paid with {paid.id}"


async def test_an_event_between_the_previous_step_and_the_wait_is_not_missed(
    nc: NatsClient, js: JetStreamContext
) -> None:
    Gate.event = asyncio.Event()
    # A payment for this order from before the trigger does not count; one for another order neither.
    await publish_event(js, "payment_succeeded", {"order": "o-race"}, event_id="e-paid-before")
    async with Engine(nc=nc, agents=[recovery], prefix=PREFIX, settings=FAST) as engine:
        event = await publish_event(
            js, "payment_failed", {"order": "o-race", "gated": True}, event_id="e-race"
        )
        run_id = recovery.run_id(event.id)
        async with asyncio.timeout(20):
            while (record := await engine.record(run_id)) is None or "offer" not in record.steps:
                await asyncio.sleep(0.02)
        await publish_event(js, "payment_succeeded", {"order": "o-other"}, event_id="e-paid-other")
        paid = await publish_event(js, "payment_succeeded", {"order": "o-race"}, event_id="e-paid-race")
        Gate.event.set()
        record = await wait_for_run(engine.kv, run_id, timeout=20)
    assert record.result == f"paid with {paid.id}"


async def test_an_event_while_no_engine_ran_is_found_by_the_resumed_wait(
    nc: NatsClient, js: JetStreamContext
) -> None:
    async with Engine(nc=nc, agents=[recovery], prefix=PREFIX, settings=FAST) as engine:
        event = await publish_event(js, "payment_failed", {"order": "o-down"}, event_id="e-down")
        run_id = recovery.run_id(event.id)
        async with asyncio.timeout(20):
            while (record := await engine.record(run_id)) is None or "paid" not in record.steps:
                await asyncio.sleep(0.02)
    await publish_event(js, "payment_succeeded", {"order": "o-down"}, event_id="e-paid-down")
    async with Engine(nc=nc, agents=[recovery], prefix=PREFIX, settings=FAST) as engine:
        record = await wait_for_run(engine.kv, run_id, timeout=20)
    assert record.result == "paid with e-paid-down"


async def test_an_event_before_a_timeout_that_came_due_while_no_engine_ran_still_wins(
    nc: NatsClient, js: JetStreamContext
) -> None:
    """Back after the wait's timeout: its timer fired and the payment is stored, both while no engine ran.
    The payment came first, so it is the answer (read from the stream before the timeout counts)."""
    async with Engine(nc=nc, agents=[recovery], prefix=PREFIX, settings=FAST) as engine:
        data = {"order": "o-down-late", "timeout": 1.0}
        event = await publish_event(js, "payment_failed", data, event_id="e-down-late")
        run_id = recovery.run_id(event.id)
        async with asyncio.timeout(20):
            while (record := await engine.record(run_id)) is None or "paid" not in record.steps:
                await asyncio.sleep(0.02)
    await publish_event(js, "payment_succeeded", {"order": "o-down-late"}, event_id="e-paid-down-late")
    timer = derived_id(run_id, "timer", "paid")
    async with asyncio.timeout(10):
        while not await has_fired(js, prefix=PREFIX, timer_id=timer):
            await asyncio.sleep(0.1)
    async with Engine(nc=nc, agents=[recovery], prefix=PREFIX, settings=FAST) as engine:
        record = await wait_for_run(engine.kv, run_id, timeout=20)
    assert record.result == "paid with e-paid-down-late"


async def test_waiting_runs_make_no_consumer_for_their_timers(nc: NatsClient, js: JetStreamContext) -> None:
    """One subscription per engine hears every timer fire: 5 runs waiting add no consumer on the timers'
    stream (the engine's durable consumer and that subscription are all there is)."""
    async with Engine(nc=nc, agents=[recovery], prefix=PREFIX, settings=FAST) as engine:
        run_ids = []
        for index in range(5):
            data = {"order": f"o-many-{index}", "timeout": 60}
            event = await publish_event(js, "payment_failed", data, event_id=f"e-many-{index}")
            run_ids.append(recovery.run_id(event.id))
        async with asyncio.timeout(20):
            for run_id in run_ids:
                while (record := await engine.record(run_id)) is None or "paid" not in record.steps:
                    await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)  # each wait subscribed by now
        info = await js.stream_info(TIMERS_STREAM)
        assert info.state.consumer_count == 2
        await publish_event(js, "payment_succeeded", {"order": "o-many-3"}, event_id="e-paid-many-3")
        record = await wait_for_run(engine.kv, run_ids[3], timeout=20)
    assert record.result == "paid with e-paid-many-3"


async def test_a_wait_times_out_by_its_durable_timer(nc: NatsClient, js: JetStreamContext) -> None:
    async with Engine(nc=nc, agents=[recovery], prefix=PREFIX, settings=FAST) as engine:
        event = await publish_event(
            js, "payment_failed", {"order": "o-late", "timeout": 0.5}, event_id="e-late"
        )
        record = await wait_for_run(engine.kv, recovery.run_id(event.id), timeout=20)
    assert record.result == "gave_up"
    assert record.steps["paid"].result is None


async def test_a_wait_on_a_kind_not_declared_fails_the_run_saying_so(
    nc: NatsClient, js: JetStreamContext
) -> None:
    @durable_agent("undeclared", trigger=Trigger(Kind.EVENTS, "undeclared"), key=lambda _e: "k")
    async def agent(_event: Envelope, step: Step) -> None:
        await step.wait_for_event("w", "x", timeout=1)

    async with Engine(nc=nc, agents=[agent], prefix=PREFIX, settings=FAST) as engine:
        event = await publish_event(js, "undeclared", {}, event_id="e-undeclared")
        record = await wait_for_run(engine.kv, agent.run_id(event.id), timeout=20)
    assert record.state == "failed"
    assert "waits_on=(Kind.EVENTS,)" in record.error


@durable_agent(
    "patient",
    trigger=Trigger(Kind.EVENTS, "hold"),
    key=lambda event: str(event.data["k"]),
    waits_on=(Kind.EVENTS,),
)
async def patient(event: Envelope, step: Step) -> str:
    key = str(event.data["k"])
    got = await step.wait_for_event(
        "go", "go", timeout=60, match=lambda e: isinstance(e.data, dict) and e.data.get("k") == key
    )
    return "went" if got is not None else "gave up"


@durable_agent("quick", trigger=Trigger(Kind.EVENTS, "poke"), key=lambda event: str(event.data["k"]))
async def quick(event: Envelope, step: Step) -> str:
    return str(await step.run("one", lambda: _answer("done")))


async def _answer(value: str) -> str:
    return value


@pytest.mark.parametrize("waiting_cap", [10, 2])
async def test_runs_waiting_for_events_leave_their_slots_to_new_runs(
    nc: NatsClient, js: JetStreamContext, waiting_cap: int
) -> None:
    """Two slots, four runs waiting: a new trigger still runs (up to `max_waiting_runs`; past it a wait
    keeps its slot, and the other slot serves the new run)."""
    settings = EngineSettings(lease_s=1.0, max_live_runs=3, max_waiting_runs=waiting_cap)
    async with Engine(nc=nc, agents=[patient, quick], prefix=PREFIX, settings=settings) as engine:
        holds = [await publish_event(js, "hold", {"k": f"h{n}"}, event_id=f"hold-{n}") for n in range(4)]
        run_ids = [patient.run_id(event.id) for event in holds]
        async with asyncio.timeout(20):
            while True:
                records = [await engine.record(run_id) for run_id in run_ids]
                waiting = [r for r in records if r is not None and "go" in r.steps]
                if len(waiting) == len(run_ids):
                    break
                await asyncio.sleep(0.05)
        poke = await publish_event(js, "poke", {"k": "p"}, event_id="poke-1")
        done = await wait_for_run(engine.kv, quick.run_id(poke.id), timeout=20)
        assert done.result == "done"
        for n in range(4):
            await publish_event(js, "go", {"k": f"h{n}"}, event_id=f"go-{n}")
        ended = [await wait_for_run(engine.kv, run_id, timeout=20) for run_id in run_ids]
    assert [record.result for record in ended] == ["went"] * 4
