"""No trigger vanishes: what the engine cannot take ends in NERVE_DEADLETTER, once, with the reason."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
from typing import TYPE_CHECKING

import msgspec
import pytest
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from tests.runtime.engine.conftest import FAST, PREFIX, publish_event

from nerve.runtime.engine import Engine, Step, Trigger, durable_agent, wait_for_run
from nerve.runtime.engine import engine as engine_module
from nerve.runtime.engine.engine import (
    ACK_WAIT_S,
    MAX_ACK_PENDING,
    MAX_DELIVER,
    NO_LIMIT,
    RETRY_FIRST_S,
    retry_delay,
)
from nerve.runtime.engine.names import trigger_consumer
from nerve.runtime.jetstream.client import MSG_ID_HEADER, REASON_HEADER, shared_durable
from nerve.runtime.jetstream.streams import DEADLETTER_STREAM, STREAM_OF_KIND
from nerve.runtime.subjects import Kind
from nerve.runtime.testing import stream_messages, wait_for_count

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext

    from nerve.runtime.engine.agent import DurableAgent
    from nerve.runtime.envelope.model import Envelope

pytestmark = pytest.mark.broker

EVENTS = STREAM_OF_KIND[Kind.EVENTS]
#: The retry delays in these tests (the engine's start at `RETRY_FIRST_S`, 2 s).
FIRST_S = 0.1


async def nothing(_event: Envelope, _step: Step) -> None:
    return None


def agent_on(name: str, trigger: str, *, waits_on: tuple[Kind, ...] = ()) -> DurableAgent:
    return durable_agent(name, trigger=Trigger(Kind.EVENTS, trigger), key=lambda _e: "k", waits_on=waits_on)(
        nothing
    )


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "RETRY_FIRST_S", FIRST_S)


async def settled(js: JetStreamContext, consumer: str) -> None:
    """Wait until `consumer` of the events stream holds nothing unacknowledged and nothing undelivered."""
    async with asyncio.timeout(10):
        while True:
            info = await js.consumer_info(EVENTS, consumer)
            if info.num_ack_pending == 0 and info.num_pending == 0:
                return
            await asyncio.sleep(0.05)


def test_a_trigger_not_taken_comes_again_later_and_later_up_to_the_ack_wait() -> None:
    assert RETRY_FIRST_S == 2.0
    assert [retry_delay(n) for n in range(1, 8)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert retry_delay(0) == RETRY_FIRST_S  # a count nats-py could not read: the first delay
    assert max(retry_delay(n) for n in range(1, 100)) == ACK_WAIT_S


@pytest.mark.usefixtures("quick_retries")
async def test_a_trigger_nats_fails_every_time_is_dead_lettered_once_per_agent_after_max_deliveries(
    nc: NatsClient, js: JetStreamContext, caplog: pytest.LogCaptureFixture
) -> None:
    # Two agents on one trigger whose runs look at the results stream, which is gone: each try to start a
    # run gets JetStream's `stream not found` (a NATS error, not the agent's), every time.
    first = agent_on("sick_a", "sick", waits_on=(Kind.RESULTS,))
    second = agent_on("sick_b", "sick", waits_on=(Kind.RESULTS,))
    caplog.set_level(logging.WARNING, logger="nerve.runtime.engine.engine")
    async with Engine(nc=nc, agents=[first, second], prefix=PREFIX, settings=FAST) as engine:
        await js.delete_stream(STREAM_OF_KIND[Kind.RESULTS])
        event = await publish_event(js, "sick", {"n": 1}, event_id="e-sick")
        await wait_for_count(js, DEADLETTER_STREAM, 2)
        for agent in (first, second):
            await settled(js, trigger_consumer(agent.name))
            assert await engine.record(agent.run_id(event.id)) is None
        await asyncio.sleep(retry_delay(MAX_DELIVER))  # nothing more comes
    stored = sorted(await stream_messages(js, DEADLETTER_STREAM), key=lambda m: m.headers[REASON_HEADER])
    assert len(stored) == 2
    trigger = await js.get_last_msg(EVENTS, "nerve.shop.events.sick")
    for agent, message in zip((first, second), stored, strict=True):
        reason = message.headers[REASON_HEADER]
        assert reason.startswith(
            f"{agent.name}: not taken in {MAX_DELIVER} deliveries, the last: NotFoundError"
        )
        record = msgspec.msgpack.decode(message.data)
        assert (record["stream"], record["seq"], record["payload"]) == (EVENTS, trigger.seq, trigger.data)
        assert record["part"] == "central"
    assert stored[0].headers[MSG_ID_HEADER] != stored[1].headers[MSG_ID_HEADER]  # one per agent
    # Each delivery before the last was nak'ed with a delay that doubles (not at once: a short outage
    # would use up every delivery in milliseconds).
    tries = [r for r in caplog.records if r.getMessage().startswith("engine: trigger of sick_a not taken")]
    assert [re.findall(r"delivery (\d)", r.getMessage()) for r in tries] == [["1"], ["2"], ["3"], ["4"]]
    gaps = [later.created - earlier.created for earlier, later in itertools.pairwise(tries)]
    for delivered, gap in enumerate(gaps, start=1):
        assert gap >= retry_delay(delivered) * 0.9, (delivered, gaps)


@pytest.mark.usefixtures("quick_retries")
async def test_a_trigger_dead_lettered_twice_is_stored_once(
    nc: NatsClient, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The dead letter is stored, then dropping the trigger fails (NATS away at that instant): the trigger
    # comes once more, past its deliveries, and is dead-lettered again, by its sequence: stored once.
    agent = agent_on("sick_once", "sick_once", waits_on=(Kind.RESULTS,))
    terms: list[int] = []
    real_term = Msg.term

    async def term_lost_once(msg: Msg) -> None:
        terms.append(msg.metadata.num_delivered)
        if len(terms) == 1:
            raise NatsTimeoutError
        await real_term(msg)

    monkeypatch.setattr(Msg, "term", term_lost_once)
    async with Engine(nc=nc, agents=[agent], prefix=PREFIX, settings=FAST):
        await js.delete_stream(STREAM_OF_KIND[Kind.RESULTS])
        await publish_event(js, "sick_once", {}, event_id="e-sick-once")
        await wait_for_count(js, DEADLETTER_STREAM, 1)
        await settled(js, trigger_consumer(agent.name))
    assert terms == [MAX_DELIVER, MAX_DELIVER + 1]
    [stored] = await stream_messages(js, DEADLETTER_STREAM)
    assert stored.headers[REASON_HEADER].startswith(f"sick_once: not taken in {MAX_DELIVER} deliveries")


async def test_a_trigger_whose_engines_died_holding_it_is_dead_lettered_unhandled(
    nc: NatsClient, js: JetStreamContext
) -> None:
    agent = agent_on("poison", "poison")
    consumer = trigger_consumer(agent.name)
    # The consumer as an earlier version made it (JetStream gave up after 5 deliveries, silently), with a
    # short ack wait so that each death is noticed in a fraction of a second.
    made = await shared_durable(
        js,
        subject=agent.trigger.subject(PREFIX),
        stream=EVENTS,
        name=consumer,
        ack_wait_s=0.3,
        max_ack_pending=MAX_ACK_PENDING,
        max_deliver=MAX_DELIVER,
    )
    await made.unsubscribe()
    async with Engine(nc=nc, agents=[agent], prefix=PREFIX, settings=FAST):
        pass  # binding it is enough: JetStream now never gives up on a trigger; the ack wait is kept
    info = await js.consumer_info(EVENTS, consumer)
    assert (info.config.max_deliver, info.config.ack_wait) == (NO_LIMIT, 0.3)

    # An engine that dies each time it holds the trigger: it takes it and never settles it.
    await publish_event(js, "poison", {"kills": "central"}, event_id="e-poison")
    dying = await js.subscribe(
        agent.trigger.subject(PREFIX), queue=consumer, durable=consumer, stream=EVENTS, manual_ack=True
    )
    async with asyncio.timeout(10):
        async for msg in dying.messages:
            if msg.metadata.num_delivered == MAX_DELIVER:
                break
    await dying.unsubscribe()

    async with Engine(nc=nc, agents=[agent], prefix=PREFIX, settings=FAST) as engine:
        await wait_for_count(js, DEADLETTER_STREAM, 1)
        await settled(js, consumer)
        assert await engine.record(agent.run_id("e-poison")) is None  # not taken: it is what killed them
    [stored] = await stream_messages(js, DEADLETTER_STREAM)
    assert re.fullmatch(
        rf"poison: delivered [67] times, never settled \(each time NATS failed or the engine holding it "
        rf"stopped\); not taken again after {MAX_DELIVER}",
        stored.headers[REASON_HEADER],
    )
    trigger = await js.get_last_msg(EVENTS, "nerve.shop.events.poison")
    assert msgspec.msgpack.decode(stored.data)["payload"] == trigger.data


held = asyncio.Event()


async def _hold() -> int:
    await held.wait()
    return 1


@durable_agent("busy", trigger=Trigger(Kind.EVENTS, "busy"), key=lambda event: str(event.data["n"]))
async def busy(event: Envelope, step: Step) -> int:
    if event.data["n"] == 1:
        return int(await step.run("hold", _hold))
    return 2


async def test_a_trigger_waiting_for_a_free_slot_is_in_progress_not_delivered_again(
    nc: NatsClient, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A short ack wait (the consumer is made with it) and one execution slot: the second trigger waits
    # for the first run many ack waits long. Redelivered meanwhile, it would end dead-lettered.
    monkeypatch.setattr(engine_module, "ACK_WAIT_S", 0.5)
    held.clear()
    settings = FAST.model_copy(update={"max_live_runs": 1})
    async with Engine(nc=nc, agents=[busy], prefix=PREFIX, settings=settings) as engine:
        first = await publish_event(js, "busy", {"n": 1}, event_id="e-busy-1")
        await wait_for_run(engine.kv, busy.run_id(first.id), timeout=10, ended=False)
        second = await publish_event(js, "busy", {"n": 2}, event_id="e-busy-2")
        await asyncio.sleep(4.0)  # eight ack waits
        info = await js.consumer_info(EVENTS, trigger_consumer(busy.name))
        assert (info.num_ack_pending, info.num_redelivered) == (1, 0)
        held.set()
        done = await wait_for_run(engine.kv, busy.run_id(second.id), timeout=10)
        await settled(js, trigger_consumer(busy.name))
    assert done.result == 2
    assert (await js.stream_info(DEADLETTER_STREAM)).state.messages == 0
