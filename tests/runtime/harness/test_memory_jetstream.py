"""The in-memory JetStream behaves as nats-server where the engine relies on it: one test, both bindings."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import nats
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, KeyValueConfig, StreamConfig
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError

from nerve.runtime.engine.timers import at_expression
from nerve.runtime.harness import FakeClock, MemoryJetStream
from nerve.runtime.harness.memory import subject_matches
from nerve.runtime.jetstream.client import sequence_before

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from nats.aio.msg import Msg

SCHEDULES = StreamConfig(name="T", subjects=["t.>"], allow_msg_schedules=True, duplicate_window=60.0)


class Side:
    """One binding: a JetStream context, and a way to let time pass."""

    def __init__(self, js: Any, clock: FakeClock | None) -> None:
        self.js = js
        self.clock = clock

    async def advance(self, seconds: float) -> None:
        if self.clock is None:
            await asyncio.sleep(seconds)
        else:
            self.clock.advance(seconds)
            await asyncio.sleep(0)

    def now(self) -> float:
        return time.time() if self.clock is None else self.clock.time()


@pytest.fixture
async def side(binding: dict[str, Any]) -> AsyncIterator[Side]:
    if binding["binding"] == "memory":
        server = MemoryJetStream()
        yield Side(server.connect().jetstream(), server.clock)
        return
    nc = await nats.connect(binding["nats_url"])
    try:
        yield Side(nc.jetstream(), None)
    finally:
        await nc.close()


async def test_kv_compare_and_set(side: Side) -> None:
    kv = await side.js.create_key_value(KeyValueConfig(bucket="b", history=1))
    first = await kv.create("run.a", b"1")
    with pytest.raises(KeyWrongLastSequenceError):
        await kv.create("run.a", b"again")
    with pytest.raises(KeyWrongLastSequenceError):
        await kv.update("run.a", b"2", last=first + 7)
    second = await kv.update("run.a", b"2", last=first)
    assert second > first
    assert (await kv.get("run.a")).value == b"2"
    await kv.delete("run.a")
    with pytest.raises(KeyNotFoundError):
        await kv.get("run.a")
    assert await kv.create("run.a", b"3") > second  # a deleted key may be created again
    watcher = await kv.watch("run.*")
    entry = await watcher.updates(timeout=2)
    assert entry is not None
    assert (entry.key, entry.value) == ("run.a", b"3")
    await watcher.stop()


async def test_dedup_and_expected_last_sequence(side: Side) -> None:
    await side.js.add_stream(StreamConfig(name="S", subjects=["s.>"], duplicate_window=60.0))
    one = await side.js.publish("s.x", b"a", headers={"Nats-Msg-Id": "m1"})
    two = await side.js.publish("s.x", b"b", headers={"Nats-Msg-Id": "m1"})
    assert (two.seq, two.duplicate) == (one.seq, True)
    assert (await side.js.stream_info("S")).state.messages == 1
    with pytest.raises(APIError) as refused:
        await side.js.publish("s.x", b"c", headers={"Nats-Expected-Last-Sequence": "7"})
    assert refused.value.err_code == 10071
    await side.js.publish("s.x", b"c", headers={"Nats-Expected-Last-Sequence": str(one.seq)})
    assert (await side.js.get_last_msg("S", "s.x")).data == b"c"
    await side.js.delete_msg("S", one.seq)
    with pytest.raises(NotFoundError):
        await side.js.get_msg("S", seq=one.seq)


async def test_a_schedule_fires_once_on_its_target_and_a_new_one_replaces_it(side: Side) -> None:
    await side.js.add_stream(SCHEDULES)
    for body, delay in ((b"first", 30.0), (b"second", 1.0)):  # the second replaces the first
        await side.js.publish(
            "t.at.x",
            body,
            headers={
                "Nats-Schedule": at_expression(side.now() + delay),
                "Nats-Schedule-Target": "t.fired.x",
                "Nerve-Run": "r1",
            },
        )
    with pytest.raises(NotFoundError):
        await side.js.get_last_msg("T", "t.fired.x")
    fired = None
    for _ in range(40):
        await side.advance(0.25)
        try:
            fired = await side.js.get_last_msg("T", "t.fired.x")
            break
        except NotFoundError:
            continue
    assert fired is not None
    assert fired.data == b"second"
    assert (fired.headers or {}).get("Nerve-Run") == "r1"
    await side.advance(1)
    info = await side.js.stream_info("T")
    assert info.state.messages == 1  # the schedules are gone, the timer fired once


async def test_a_durable_consumer_redelivers_a_nak_and_not_a_term(side: Side) -> None:
    await side.js.add_stream(StreamConfig(name="D", subjects=["d.>"]))
    got: asyncio.Queue[Msg] = asyncio.Queue()

    async def cb(msg: Msg) -> None:
        await got.put(msg)

    config = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=30, deliver_policy=DeliverPolicy.ALL)
    sub = await side.js.subscribe(
        "d.>", durable="c", queue="c", stream="D", cb=cb, manual_ack=True, config=config
    )
    await side.js.publish("d.a", b"a")
    await side.js.publish("d.b", b"b")
    first = await asyncio.wait_for(got.get(), 5)
    second = await asyncio.wait_for(got.get(), 5)
    await first.nak()
    await second.term()
    again = await asyncio.wait_for(got.get(), 5)
    assert (again.data, again.metadata.num_delivered) == (b"a", 2)
    await again.ack()
    await side.advance(0.5)
    assert got.empty()
    await sub.unsubscribe()


async def test_an_ordered_consumer_reads_from_a_sequence(side: Side) -> None:
    await side.js.add_stream(StreamConfig(name="O", subjects=["o.>"]))
    for body in (b"1", b"2", b"3"):
        await side.js.publish("o.x", body)
    got: asyncio.Queue[Msg] = asyncio.Queue()

    async def cb(msg: Msg) -> None:
        await got.put(msg)

    config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=2)
    sub = await side.js.subscribe("o.x", stream="O", cb=cb, ordered_consumer=True, config=config)
    await side.js.publish("o.x", b"4")
    seen = [(await asyncio.wait_for(got.get(), 5)).data for _ in range(3)]
    assert seen == [b"2", b"3", b"4"]
    await sub.unsubscribe()


async def test_the_sequence_a_stream_had_reached_before_a_time(side: Side) -> None:
    """`sequence_before`: what a redelivered trigger's run reads results and events from."""
    await side.js.add_stream(StreamConfig(name="B", subjects=["b.>"], allow_direct=True))
    start = datetime.fromtimestamp(side.now(), UTC)
    assert await sequence_before(side.js, "B", start) == 0  # empty
    cuts = []
    for body in (b"1", b"2", b"3"):
        await side.advance(0.02)
        cuts.append(datetime.fromtimestamp(side.now(), UTC))
        await side.advance(0.02)
        await side.js.publish("b.x", body)
    assert [await sequence_before(side.js, "B", cut) for cut in cuts] == [0, 1, 2]
    await side.advance(0.02)
    assert await sequence_before(side.js, "B", datetime.fromtimestamp(side.now(), UTC)) == 3
    assert await sequence_before(side.js, "B", start - timedelta(days=1)) == 0


tokens = st.lists(st.text("abc", min_size=1, max_size=2), min_size=1, max_size=5)


@given(subject=tokens, wild=st.lists(st.booleans(), min_size=5, max_size=5), cut=st.integers(0, 5))
def test_subject_matching(subject: list[str], wild: list[bool], cut: int) -> None:
    """A pattern made of a subject (`*` for some tokens, `>` for a tail) matches it; a longer one does not."""
    pattern = ["*" if wild[i] else token for i, token in enumerate(subject)]
    assert subject_matches(".".join(pattern), ".".join(subject))
    if cut < len(subject):
        assert subject_matches(".".join([*pattern[:cut], ">"]), ".".join(subject))
    assert not subject_matches(".".join([*pattern, "x"]), ".".join(subject))
    assert not subject_matches(".".join([*subject[:-1], "zz"]), ".".join(subject))
