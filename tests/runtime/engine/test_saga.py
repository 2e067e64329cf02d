"""A multi-step saga end to end on a real nats-server: steps once, undos in reverse, each once, as facts."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.runtime.engine.conftest import FAST, PREFIX, publish_event

from nerve.runtime.engine import (
    NO_RETRY,
    Engine,
    RetryPolicy,
    RunFailure,
    Step,
    Terminal,
    Trigger,
    durable_agent,
    wait_for_run,
)
from nerve.runtime.engine.journal import RunRecord, create_record, encode_record, read_record
from nerve.runtime.engine.names import trigger_consumer
from nerve.runtime.envelope.codec import decode
from nerve.runtime.envelope.model import Fact
from nerve.runtime.jetstream.streams import FACTS_STREAM
from nerve.runtime.subjects import Kind
from nerve.runtime.testing import stream_messages

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext

    from nerve.runtime.envelope.model import Envelope

pytestmark = pytest.mark.broker

#: What each run did, in order: ("do", step) or ("undo", step), keyed by the order id.
log: dict[str, list[tuple[str, str]]] = defaultdict(list)
failures: list[RunFailure] = []


async def on_failure(_event: Envelope, failure: RunFailure) -> None:
    failures.append(failure)


@durable_agent(
    "saga",
    trigger=Trigger(Kind.EVENTS, "order_placed"),
    key=lambda event: str(event.data["order"]),
    retry=RetryPolicy(attempts=2, initial_s=0.01, maximum_s=0.02),
    on_failure=on_failure,
)
async def saga(event: Envelope, step: Step) -> dict[str, Any]:
    """Steps 0..n-1, each with an undo; step `fail_at` fails (terminal or by raising every time)."""
    order = str(event.data["order"])
    steps = int(event.data["steps"])
    fail_at = int(event.data.get("fail_at", -1))
    terminal = bool(event.data.get("terminal", True))
    results = []
    for index in range(steps):
        name = f"s{index}"

        async def do(name: str = name, index: int = index) -> int:
            log[order].append(("do", name))
            if index == fail_at:
                raise Terminal("no stock") if terminal else RuntimeError("flaky")
            return index * 10

        async def undo(name: str = name) -> None:
            log[order].append(("undo", name))

        results.append(await step.run(name, do, undo=undo))
        if index == 0:
            await step.fact("noted", kind="order_started", summary=f"order {order} started")
    return {"results": results}


async def facts_of(js: JetStreamContext, run_id: str) -> list[Fact]:
    facts = [decode(message.data, Fact) for message in await stream_messages(js, FACTS_STREAM)]
    return [fact for fact in facts if fact.data.get("run") == run_id]


async def test_a_saga_that_succeeds_runs_each_step_once_and_no_undo(
    nc: NatsClient, js: JetStreamContext
) -> None:
    async with Engine(nc=nc, agents=[saga], prefix=PREFIX, settings=FAST) as engine:
        event = await publish_event(js, "order_placed", {"order": "o-ok", "steps": 3}, event_id="e-ok")
        await publish_event(js, "order_placed", {"order": "o-ok", "steps": 3}, event_id="e-ok-2")
        record = await wait_for_run(engine.kv, saga.run_id(event.id), timeout=20)
        other = await wait_for_run(engine.kv, saga.run_id("e-ok-2"), timeout=20)
    assert record.state == "done"
    assert record.result == {"results": [0, 10, 20]}
    assert record.key == "o-ok"
    assert [entry.status for entry in record.undos] == ["registered"] * 3
    assert other.state == "done"
    # Two runs (two events) of one key, executed side by side: each step twice in all.
    assert sorted(log["o-ok"]) == sorted([("do", "s0"), ("do", "s1"), ("do", "s2")] * 2)
    facts = await facts_of(js, record.run_id)
    assert [fact.kind for fact in facts] == ["order_started"]


async def test_the_same_trigger_twice_starts_one_run(nc: NatsClient, js: JetStreamContext) -> None:
    async with Engine(nc=nc, agents=[saga], prefix=PREFIX, settings=FAST) as engine:
        # Two messages with the same event id, one outside JetStream's duplicate window (another id as
        # Nats-Msg-Id is what a redelivery after 20 minutes looks like): one run, one set of effects.
        event = await publish_event(js, "order_placed", {"order": "o-twice", "steps": 2}, event_id="e-twice")
        record = await wait_for_run(engine.kv, saga.run_id(event.id), timeout=20)
        await js.publish(
            "nerve.shop.events.order_placed",
            msgspec.json.encode(
                {
                    "specversion": "1.0",
                    "id": "e-twice",
                    "source": "nerve://shop",
                    "type": "order_placed",
                    "data": {"order": "o-twice", "steps": 2},
                }
            ),
            headers={"Nats-Msg-Id": "another", "Content-Type": "application/cloudevents+json"},
        )
        await asyncio.sleep(0.5)  # let the engine take it (nothing to wait for: nothing must happen)
    assert record.state == "done"
    assert log["o-twice"] == [("do", "s0"), ("do", "s1")]


@durable_agent(
    "plain", trigger=Trigger(Kind.EVENTS, "order_noted"), key=lambda event: str(event.data["order"])
)
async def plain(event: Envelope, step: Step) -> None:
    """One step without an undo: nothing is journalled before its function runs."""
    order = str(event.data["order"])

    async def do() -> None:
        log[order].append(("do", "first"))

    await step.run("first", do)


async def test_a_trigger_whose_run_another_process_holds_runs_no_step_there(
    nc: NatsClient, js: JetStreamContext
) -> None:
    """A new run starts while its journal is on its way: when the run existed (another process holds it),
    no step function runs here, the journal is left as it was, and the trigger is acknowledged."""
    event_id = f"e-held-{uuid.uuid4().hex}"
    run_id = plain.run_id(event_id)
    async with Engine(nc=nc, agents=[plain], prefix=PREFIX, settings=FAST) as engine:
        kv = engine.kv
        held = RunRecord(
            run_id=run_id,
            agent=plain.name,
            key="o-held",
            trigger=msgspec.Raw(b"{}"),
            trigger_stream="NERVE_EVENTS",
            trigger_seq=1,
            owner="another-process",
            token=1,
            lease_until=time.time() + 600,
        )
        revision = await create_record(kv, run_id, encode_record(held, 1 << 20))
        assert revision is not None
        await publish_event(js, "order_noted", {"order": "o-held"}, event_id=event_id)

        async def acknowledged() -> bool:
            info = await js.consumer_info("NERVE_EVENTS", trigger_consumer(plain.name))
            return bool(info.num_ack_pending == 0 and info.num_pending == 0 and info.delivered.stream_seq)

        async with asyncio.timeout(20):
            while not await acknowledged():
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # a step function that ran anyway would have logged by now
    assert log["o-held"] == []
    found = await read_record(kv, run_id)
    assert found is not None
    assert found[1] == revision  # nothing written over the holder's journal
    assert found[0].owner == "another-process"


@durable_agent(
    "noter", trigger=Trigger(Kind.EVENTS, "order_shipped"), key=lambda event: str(event.data["order"])
)
async def noter(event: Envelope, step: Step) -> str:
    """Three facts, then the end."""
    for name in ("packed", "labelled", "shipped"):
        await step.fact(name, kind=f"order_{name}", summary=f"order {event.data['order']} {name}")
    return "shipped"


async def test_facts_are_journalled_with_the_next_write(nc: NatsClient, js: JetStreamContext) -> None:
    """A fact step has no journal write of its own: the run's end carries all three (two revisions)."""
    event_id = f"e-noted-{uuid.uuid4().hex}"
    writes: set[str] = set()  # each write names the revision it replaces

    async def seen(msg: Msg) -> None:
        writes.add((msg.headers or {}).get("Nats-Expected-Last-Subject-Sequence", ""))

    watch = await nc.subscribe(f"$KV.nerve_runs.run.{noter.run_id(event_id)}", cb=seen)
    async with Engine(nc=nc, agents=[noter], prefix=PREFIX, settings=FAST) as engine:
        await publish_event(js, "order_shipped", {"order": "o-noted"}, event_id=event_id)
        record = await wait_for_run(engine.kv, noter.run_id(event_id), timeout=20)
    await watch.unsubscribe()
    assert record.state == "done"
    assert [(name, entry.status) for name, entry in record.steps.items()] == [
        ("packed", "done"),
        ("labelled", "done"),
        ("shipped", "done"),
    ]
    assert len(writes) == 2  # created, ended
    facts = await facts_of(js, record.run_id)
    assert [fact.kind for fact in facts] == ["order_packed", "order_labelled", "order_shipped"]


async def test_a_terminal_failure_undoes_in_reverse_once_each_as_facts(
    nc: NatsClient, js: JetStreamContext
) -> None:
    failures.clear()
    async with Engine(nc=nc, agents=[saga], prefix=PREFIX, settings=FAST) as engine:
        event = await publish_event(
            js, "order_placed", {"order": "o-fail", "steps": 4, "fail_at": 2}, event_id="e-fail"
        )
        record = await wait_for_run(engine.kv, saga.run_id(event.id), timeout=20)
    assert record.state == "compensated"
    assert "no stock" in record.error
    assert log["o-fail"] == [
        ("do", "s0"),
        ("do", "s1"),
        ("do", "s2"),
        ("undo", "s2"),
        ("undo", "s1"),
        ("undo", "s0"),
    ]
    assert [(entry.step, entry.status) for entry in record.undos] == [
        ("s0", "done"),
        ("s1", "done"),
        ("s2", "done"),
    ]
    facts = await facts_of(js, record.run_id)
    assert [fact.kind for fact in facts] == [
        "order_started",
        "compensated",
        "compensated",
        "compensated",
        "run_failed",
    ]
    assert [fact.data["step"] for fact in facts[1:4]] == ["s2", "s1", "s0"]
    assert (facts[4].data["undone"], facts[4].data["undo_failed"]) == (3, 0)
    assert [(failure.run_id, failure.compensated, failure.cancelled) for failure in failures] == [
        (record.run_id, True, False)
    ]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.integers(min_value=1, max_value=5), data=st.data(), terminal=st.booleans())
async def test_undos_run_in_reverse_and_once_wherever_the_failure_happens(
    nc: NatsClient, js: JetStreamContext, steps: int, data: st.DataObject, terminal: bool
) -> None:
    fail_at = data.draw(st.integers(min_value=-1, max_value=steps - 1), label="fail_at")
    order = f"o-h-{uuid.uuid4().hex}"  # Hypothesis replays examples: a new event each time
    async with Engine(nc=nc, agents=[saga], prefix=PREFIX, settings=FAST) as engine:
        event = await publish_event(
            js,
            "order_placed",
            {"order": order, "steps": steps, "fail_at": fail_at, "terminal": terminal},
            event_id=f"e-{order}",
        )
        record = await wait_for_run(engine.kv, saga.run_id(event.id), timeout=20)
    tries = 1 if terminal else 2  # the agent's retry policy: 2 attempts for other errors
    if fail_at < 0:
        assert record.state == "done"
        assert log[order] == [("do", f"s{i}") for i in range(steps)]
        return
    done = [("do", f"s{i}") for i in range(fail_at)] + [("do", f"s{fail_at}")] * tries
    undone = [("undo", f"s{i}") for i in reversed(range(fail_at + 1))]
    assert record.state == "compensated"
    assert log[order] == done + undone
    assert [entry.status for entry in record.undos] == ["done"] * (fail_at + 1)
    assert record.steps[f"s{fail_at}"].attempts == tries


async def test_a_failing_undo_is_journalled_and_the_run_ends_failed(
    nc: NatsClient, js: JetStreamContext
) -> None:
    calls: list[str] = []

    async def bad_undo() -> None:
        calls.append("undo")
        raise RuntimeError("gateway down")

    @durable_agent("badundo", trigger=Trigger(Kind.EVENTS, "bad_undo"), key=lambda _e: "k", retry=NO_RETRY)
    async def agent(_event: Envelope, step: Step) -> None:
        async def ok() -> None:
            calls.append("a")

        async def boom() -> None:
            raise Terminal("refused")

        await step.run("a", ok, undo=bad_undo)
        await step.run("b", boom)

    async with Engine(nc=nc, agents=[agent], prefix=PREFIX, settings=FAST) as engine:
        event = await publish_event(js, "bad_undo", {}, event_id="e-bad-undo")
        record = await wait_for_run(engine.kv, agent.run_id(event.id), timeout=20)
    assert record.state == "failed"
    assert calls == ["a", "undo"]
    assert [(entry.status, entry.error) for entry in record.undos] == [
        ("failed", "RuntimeError: gateway down")
    ]
    facts = await facts_of(js, record.run_id)
    assert [fact.kind for fact in facts] == ["compensation_failed", "run_failed"]
    assert (facts[1].data["undone"], facts[1].data["undo_failed"]) == (0, 1)


async def test_a_cancelled_run_compensates(nc: NatsClient, js: JetStreamContext) -> None:
    undone: list[str] = []

    @durable_agent("cancelme", trigger=Trigger(Kind.EVENTS, "cancel_me"), key=lambda _e: "k")
    async def agent(_event: Envelope, step: Step) -> None:
        async def reserve() -> str:
            return "r-1"

        async def release() -> None:
            undone.append("release")

        await step.run("reserve", reserve, undo=release)
        await step.sleep("long", 3600)
        await step.run("never", reserve)

    async with Engine(nc=nc, agents=[agent], prefix=PREFIX, settings=FAST) as engine:
        event = await publish_event(js, "cancel_me", {}, event_id="e-cancel")
        run_id = agent.run_id(event.id)
        async with asyncio.timeout(20):
            while (record := await engine.record(run_id)) is None or record.state != "waiting":
                await asyncio.sleep(0.05)
        await engine.cancel(run_id)
        record = await wait_for_run(engine.kv, run_id, timeout=20)
    assert record.state == "compensated"
    assert record.cancelled
    assert undone == ["release"]
    assert "never" not in record.steps
