"""Leases and fencing: two engines never both advance one run; a process that lost its lease stops."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import msgspec
import nats
import pytest
from tests.runtime.engine.conftest import FAST, PREFIX, publish_event

from nerve.runtime.engine import (
    Engine,
    EngineSettings,
    LeaseLost,
    RunRecord,
    Step,
    Trigger,
    durable_agent,
    wait_for_run,
)
from nerve.runtime.engine.engine import ensure_engine_storage
from nerve.runtime.engine.journal import (
    RecordTooLarge,
    RunHandle,
    create_record,
    encode_record,
    read_record,
    try_claim,
)
from nerve.runtime.subjects import Kind

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext

    from nerve.runtime.envelope.model import Envelope
    from nerve.runtime.stack.brokers import NatsServer

pytestmark = pytest.mark.broker

LIMIT = 1 << 20


def a_record(run_id: str, *, owner: str, lease_until: float) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        agent="a",
        key="k",
        trigger=msgspec.Raw(b"{}"),
        trigger_stream="NERVE_EVENTS",
        trigger_seq=1,
        owner=owner,
        token=1,
        lease_until=lease_until,
    )


async def test_a_claim_fences_the_former_holder_out(js: JetStreamContext) -> None:
    kv = await ensure_engine_storage(js, PREFIX, FAST)
    record = a_record("r1", owner="a", lease_until=time.time() - 1)  # a's lease ran out
    revision = await create_record(kv, record.run_id, encode_record(record, LIMIT))
    assert revision is not None
    assert (
        await create_record(kv, record.run_id, encode_record(record, LIMIT)) is None
    )  # the same run twice: one journal
    holder_a = RunHandle(kv=kv, record=record, revision=revision, lease_s=1.0, limit=LIMIT)
    claimed = await try_claim(kv, "r1", owner="b", lease_s=30.0, limit=LIMIT)
    assert claimed is not None
    assert (claimed[0].owner, claimed[0].token) == ("b", 2)
    assert await try_claim(kv, "r1", owner="c", lease_s=30.0, limit=LIMIT) is None  # b holds it
    with pytest.raises(LeaseLost):
        await holder_a.write(lambda r: r.steps.clear())
    assert holder_a.lost
    with pytest.raises(LeaseLost):  # and for good
        await holder_a.renew()
    holder_b = RunHandle(kv=kv, record=claimed[0], revision=claimed[1], lease_s=30.0, limit=LIMIT)
    await holder_b.write(lambda r: setattr(r, "result", "by b"))
    found = await read_record(kv, "r1")
    assert found is not None
    assert (found[0].owner, found[0].token, found[0].result) == ("b", 2, "by b")


executed: list[str] = []


class Hold:
    """Released by the test (a new event per test: an asyncio.Event belongs to one loop)."""

    event = asyncio.Event()


@durable_agent("held", trigger=Trigger(Kind.EVENTS, "held"), key=lambda _e: "k")
async def held(_event: Envelope, step: Step) -> None:
    async def slow() -> None:
        executed.append(f"slow by {step.record.owner}")
        await Hold.event.wait()

    async def then() -> None:
        executed.append(f"then by {step.record.owner}")

    await step.run("slow", slow)
    await step.run("then", then)


async def test_two_engines_one_run_only_the_holder_executes(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    executed.clear()
    Hold.event = asyncio.Event()
    nc_a, nc_b = await nats.connect(nats_server.url), await nats.connect(nats_server.url)
    try:
        async with (
            Engine(nc=nc_a, agents=[held], prefix=PREFIX, settings=FAST, instance="engine-a") as a,
            Engine(nc=nc_b, agents=[held], prefix=PREFIX, settings=FAST, instance="engine-b") as b,
        ):
            event = await publish_event(js, "held", {}, event_id="e-held")
            run_id = held.run_id(event.id)
            async with asyncio.timeout(20):
                while not executed:
                    await asyncio.sleep(0.02)
            # Three leases long the holder renews while the other engine's watchdog looks for runs
            # to resume: it must not take this one.
            await asyncio.sleep(3 * FAST.lease_s)
            holders = [engine.instance for engine in (a, b) if run_id in engine.live]
            assert len(holders) == 1
            Hold.event.set()
            record = await wait_for_run(a.kv, run_id, timeout=20)
    finally:
        await nc_a.close()
        await nc_b.close()
    assert record.state == "done"
    assert record.token == 1  # never claimed again
    assert executed == [f"slow by {holders[0]}", f"then by {holders[0]}"]


async def test_an_engine_that_lost_its_lease_stops_at_once(nc: NatsClient, js: JetStreamContext) -> None:
    executed.clear()
    Hold.event = asyncio.Event()
    async with Engine(nc=nc, agents=[held], prefix=PREFIX, settings=FAST, instance="engine-a") as engine:
        event = await publish_event(js, "held", {}, event_id="e-stolen")
        run_id = held.run_id(event.id)
        async with asyncio.timeout(20):
            while not executed:
                await asyncio.sleep(0.02)
        # Another process claims the run (as if a's clock ran slow): forge an expired lease first.
        found = await read_record(engine.kv, run_id)
        assert found is not None
        stale = msgspec.structs.replace(found[0], lease_until=time.time() - 1)
        await engine.kv.update(f"run.{run_id}", msgspec.json.encode(stale), last=found[1])
        assert await try_claim(engine.kv, run_id, owner="thief", lease_s=3600, limit=LIMIT) is not None
        async with asyncio.timeout(20):  # a's next renewal fails: it stops the run
            while run_id in engine.live:
                await asyncio.sleep(0.02)
        Hold.event.set()
        await asyncio.sleep(0.2)
    found = await read_record(engine.kv, run_id)
    assert found is not None
    record = found[0]
    assert record.owner == "thief"
    assert "then" not in record.steps
    assert executed == ["slow by engine-a"]


async def test_deferred_changes_go_with_the_next_write_and_a_too_large_one_does_not_stop_renewals(
    js: JetStreamContext,
) -> None:
    kv = await ensure_engine_storage(js, PREFIX, FAST)
    record = a_record("r-defer", owner="a", lease_until=time.time() + 30)
    limit = len(encode_record(record, LIMIT)) + 200
    revision = await create_record(kv, record.run_id, encode_record(record, limit))
    assert revision is not None
    handle = RunHandle(kv=kv, record=record, revision=revision, lease_s=30.0, limit=limit)
    done: list[str] = []

    async def then() -> None:
        done.append("then")

    handle.defer(lambda r: r.positions.update(small=1), then=then)
    assert done == []
    await handle.renew()  # carries it
    stored = await read_record(kv, record.run_id)
    assert stored is not None
    assert stored[0].positions == {"small": 1}
    await asyncio.sleep(0.01)
    assert done == ["then"]
    handle.defer(lambda r: r.positions.update({f"big-{i}": i for i in range(100)}))
    before = handle.revision
    await handle.renew()  # the lease is renewed without what is too large
    assert handle.revision > before
    assert "big-0" not in handle.record.positions
    with pytest.raises(RecordTooLarge):  # the next write says so
        await handle.write(lambda r: r.positions.update(more=2))


gate = asyncio.Event()
started: list[str] = []


@durable_agent("gated", trigger=Trigger(Kind.EVENTS, "gated"), key=lambda _e: "k")
async def gated(_event: Envelope, step: Step) -> str:
    async def wait() -> str:
        started.append("wait")
        await gate.wait()
        return "through"

    return str(await step.run("wait", wait))


async def test_a_run_an_engine_gave_back_as_it_stopped_is_resumed_at_once(
    nc: NatsClient, js: JetStreamContext
) -> None:
    """Not at the watchdog's next look: with a 60 s lease, that would be 30 s later."""
    slow = EngineSettings(lease_s=60.0)
    gate.clear()
    async with Engine(nc=nc, agents=[gated], prefix=PREFIX, settings=slow, instance="engine-a") as a:
        event = await publish_event(js, "gated", {}, event_id="e-gated")
        async with asyncio.timeout(10):
            while not started:
                await asyncio.sleep(0.02)
        kv = a.kv
    found = await read_record(kv, gated.run_id(event.id))
    assert found is not None
    assert (found[0].state, found[0].owner) == ("open", "")  # given back
    gate.set()
    async with Engine(nc=nc, agents=[gated], prefix=PREFIX, settings=slow, instance="engine-b"):
        record = await wait_for_run(kv, gated.run_id(event.id), timeout=5)
    assert (record.state, record.result) == ("done", "through")
    assert started == ["wait", "wait"]
