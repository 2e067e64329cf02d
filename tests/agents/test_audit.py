"""The audit: sampled refusals (a flood makes a bounded number of facts) and the stream watch."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, ClassVar, Final

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.js.errors import ServiceUnavailableError

from nerve.agents import CommandAudit, StreamWatch, disk_runbook
from nerve.runtime.central.agent import Agent, AgentContext, Subscription
from nerve.runtime.central.runner import MAX_DELIVER, Central, consumer_name
from nerve.runtime.config.settings import MIB, load_settings
from nerve.runtime.envelope.codec import decode
from nerve.runtime.envelope.model import CommandResult, Envelope, Event, Fact, new_id
from nerve.runtime.jetstream.client import StreamFull, publish_envelope, shared_durable
from nerve.runtime.jetstream.sampling import OVERFLOW_DEVICE, RefusalSampler
from nerve.runtime.jetstream.streams import ensure_streams, stream_usage
from nerve.runtime.subjects import Kind
from nerve.runtime.testing import provision_device, stream_messages
from nerve.runtime.trust.signing import Signer, generate_keypair

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence
    from pathlib import Path

    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext

    from nerve.runtime.config.settings import Settings
    from nerve.runtime.engine import DurableAgent
    from nerve.runtime.stack.brokers import NatsServer

WINDOW: Final = 10.0

# --- the sampler, on a fake clock --------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_first_refusal_at_once_then_one_count_per_window() -> None:
    clock = Clock()
    sampler = RefusalSampler(window_s=WINDOW, max_keys=10, clock=clock)
    first = sampler.offer("pi-01", "rejected", "r1")
    assert first is not None
    assert (first.device, first.reason, first.count) == ("pi-01", "rejected", 1)
    for i in range(99):
        assert sampler.offer("pi-01", "rejected", f"r{i + 2}") is None
    assert sampler.due() == []  # the window is not over
    clock.now += WINDOW
    (sample,) = sampler.due()
    assert (sample.count, sample.last) == (99, "r100")
    clock.now += WINDOW
    assert sampler.due() == []  # a quiet window: forgotten
    assert sampler.keys == 0
    assert sampler.offer("pi-01", "rejected", "again") is not None  # a new first


def test_everything_counted_can_be_taken_before_its_window_ends() -> None:
    clock = Clock()
    sampler = RefusalSampler(window_s=WINDOW, max_keys=10, clock=clock)
    assert sampler.offer("pi-01", "rejected", "r1") is not None
    assert sampler.offer("pi-01", "rejected", "r2") is None
    assert sampler.offer("pi-02", "rejected", "r3") is not None  # only its first: nothing to count
    assert sampler.due() == []
    (sample,) = sampler.due(everything=True)  # stopping: the count is not lost
    assert (sample.device, sample.count, sample.last) == ("pi-01", 1, "r2")
    assert sampler.due(everything=True) == []  # counted once


def test_keys_beyond_max_share_one_overflow_key_per_reason() -> None:
    clock = Clock()
    sampler = RefusalSampler(window_s=WINDOW, max_keys=3, clock=clock)
    immediate = [sampler.offer(f"bogus-{i}", "rejected", str(i)) for i in range(5000)]
    told = [sample for sample in immediate if sample is not None]
    assert [sample.device for sample in told] == ["bogus-0", "bogus-1", "bogus-2", OVERFLOW_DEVICE]
    assert sampler.keys == 4
    clock.now += WINDOW
    (overflow,) = sampler.due()
    assert overflow.overflow
    assert overflow.count == 5000 - 4


offers = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c", "d", "e"]),
        st.sampled_from(["rejected", "failed"]),
        st.floats(min_value=0, max_value=WINDOW / 2),
    ),
    max_size=300,
)


@given(offers=offers, max_keys=st.integers(min_value=1, max_value=6))
def test_every_refusal_is_counted_once_and_facts_are_bounded(
    offers: list[tuple[str, str, float]], max_keys: int
) -> None:
    clock = Clock()
    start = clock.now
    sampler = RefusalSampler(window_s=WINDOW, max_keys=max_keys, clock=clock)
    samples = []
    for device, reason, advance in offers:
        clock.now += advance
        samples.extend(sampler.due())
        sample = sampler.offer(device, reason, "x")
        if sample is not None:
            samples.append(sample)
    for _ in range(2):  # the last windows end, then the quiet ones are forgotten
        clock.now += WINDOW * 1.5
        samples.extend(sampler.due())
    assert sum(sample.count for sample in samples) == len(offers)
    assert sampler.keys == 0
    keys = {(sample.device, sample.reason) for sample in samples}
    assert len({device for device, _ in keys if device != OVERFLOW_DEVICE}) <= max_keys * (
        1 + int((clock.now - start) // WINDOW)
    )
    # Per key, at most one fact at once plus one per window that elapsed.
    windows = 1 + int((clock.now - start) // WINDOW)
    for key in keys:
        assert sum(1 for s in samples if (s.device, s.reason) == key) <= 1 + windows


# --- against a real nats-server ----------------------------------------------------------------------------


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    private, _ = generate_keypair(tmp_path / "keys", "central")
    return Signer.from_file(private)


def settings_for(nats_server: NatsServer, tmp_path: Path, streams: dict[str, Any]) -> Settings:
    return load_settings(
        overrides={"nats": {"url": nats_server.url}, "data_dir": str(tmp_path), "streams": streams}
    )


@contextlib.asynccontextmanager
async def central(
    settings: Settings, signer: Signer, agents: Sequence[Agent], durable: Sequence[DurableAgent] = ()
) -> AsyncIterator[Central]:
    runner = Central(settings=settings, signer=signer, agents=agents, durable=durable)
    task = asyncio.create_task(runner.run())
    try:
        async with asyncio.timeout(10):
            await runner.ready.wait()
        yield runner
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def facts_of(js: JetStreamContext) -> list[Fact]:
    """The facts nerve kept (not the big fillers a test stored raw)."""
    stored = await stream_messages(js, "NERVE_FACTS")
    return [decode(m.data, Fact) for m in stored if not m.subject.endswith(".filler")]


def refused(device: Signer) -> CommandResult:
    """A device's genuine (signed) answer refusing a forged command: what a probing attacker causes."""
    return device.sign(
        CommandResult(
            id=new_id(),
            source="nerve://edge/" + device.keyid,
            type="nerve.result.clear_temp",
            subject=device.keyid,
            action="clear_temp",
            status="rejected",
            reason="bad signature",
            causationid=new_id(),
        )
    )


async def counted(js: JetStreamContext) -> int:
    return sum(int(fact.data.get("count", 0)) for fact in await facts_of(js))


@pytest.mark.broker
async def test_a_flood_of_refusals_makes_few_facts_with_the_right_counts(
    nats_server: NatsServer, tmp_path: Path, nc: NatsClient, signer: Signer
) -> None:
    # Forged commands sent to ten devices: each answers every one with a signed refusal.
    settings = settings_for(nats_server, tmp_path, {"sample_window_s": 1.0, "sample_max_keys": 3})
    js = nc.jetstream()
    devices = [provision_device(tmp_path / "devices", f"dev-{i}") for i in range(10)]
    async with central(settings, signer, [CommandAudit(settings.streams)]) as runner:
        for _ in range(30):
            for device in devices:
                await publish_envelope(js, f"nerve.{device.keyid}.results.clear_temp", refused(device))
        async with asyncio.timeout(30):
            while runner.handled < 300 or await counted(js) < 300:
                await asyncio.sleep(0.1)
    facts = await facts_of(js)
    assert await counted(js) == 300  # every refusal counted, none twice
    per_subject: dict[str, int] = {}
    for fact in facts:
        assert fact.kind == "command_rejected"
        per_subject[fact.subject] = per_subject.get(fact.subject, 0) + int(fact.data["count"])
    assert per_subject == {"dev-0": 30, "dev-1": 30, "dev-2": 30, "many-devices": 210}
    # 300 facts before; now a few per key and window (4 keys here).
    assert len(facts) <= 4 * 6
    assert any("result(s) rejected within 1s" in fact.summary for fact in facts)


def context(js: JetStreamContext, settings: Settings, signer: Signer) -> AgentContext:
    return AgentContext(js=js, settings=settings, signer=signer, agent="streams")


@pytest.mark.broker
async def test_the_facts_warning_fires_before_the_stream_fills(
    nats_server: NatsServer,
    tmp_path: Path,
    nc: NatsClient,
    signer: Signer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tiny = {"max_bytes": MIB, "max_age_s": 3600}
    settings = settings_for(nats_server, tmp_path, {"facts": tiny, "check_interval_s": 0.001})
    js = nc.jetstream()
    await ensure_streams(js, "nerve", settings.streams)
    watch = StreamWatch(settings.streams)
    ctx = context(js, settings, signer)
    blob = "x" * 100_000

    async def add_facts(count: int) -> None:
        for _ in range(count):
            fact = Fact(source="test", type="t", subject="pi", kind="filler", data={"blob": blob})
            await publish_envelope(js, "nerve.pi.facts.filler", fact)

    await add_facts(7)  # about 67 %
    await watch.tick(ctx)
    assert [f.kind for f in await facts_of(js)].count("stream_filling") == 0
    await add_facts(2)  # about 86 %
    with caplog.at_level(logging.WARNING):
        await asyncio.sleep(0.01)
        await watch.tick(ctx)
        await asyncio.sleep(0.01)
        await watch.tick(ctx)  # same step: no second warning
    warnings = [f for f in await facts_of(js) if f.kind == "stream_filling"]
    assert len(warnings) == 1
    assert warnings[0].data["stream"] == "NERVE_FACTS"
    assert warnings[0].data["percent"] >= 80
    assert "NERVE_FACTS is 8" in caplog.text
    await add_facts(1)  # about 95 %: the next step warns again
    await asyncio.sleep(0.01)
    await watch.tick(ctx)
    assert [f.kind for f in await facts_of(js)].count("stream_filling") == 2
    with pytest.raises(StreamFull):  # and at the limit, refused, never dropped
        await add_facts(2)


@pytest.mark.broker
async def test_what_the_dead_letter_cap_drops_is_counted_in_a_fact(
    nats_server: NatsServer, tmp_path: Path, nc: NatsClient, signer: Signer
) -> None:
    tiny = {"max_bytes": MIB, "max_age_s": 3600}
    settings = settings_for(nats_server, tmp_path, {"deadletter": tiny, "check_interval_s": 0.001})
    js = nc.jetstream()
    await ensure_streams(js, "nerve", settings.streams)
    for _ in range(30):
        await js.publish("nerve.deadletter.bridge", b"x" * 100_000)
    dropped = (await stream_usage(js, "NERVE_DEADLETTER")).dropped
    assert dropped > 0
    await StreamWatch(settings.streams).tick(context(js, settings, signer))
    (fact,) = [f for f in await facts_of(js) if f.kind == "stream_dropped"]
    assert fact.data == {"stream": "NERVE_DEADLETTER", "count": dropped, "total": dropped}


@pytest.mark.broker
async def test_a_command_refused_at_the_limit_is_not_lost_silently(
    nats_server: NatsServer,
    tmp_path: Path,
    nc: NatsClient,
    signer: Signer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tiny = {"max_bytes": MIB, "max_age_s": 3600}
    settings = settings_for(nats_server, tmp_path, {"commands": tiny})
    js = nc.jetstream()
    await ensure_streams(js, "nerve", settings.streams)
    for size in (100_000, 10_000, 1_000, 100):  # to the last byte a command could use
        with contextlib.suppress(ServiceUnavailableError):  # full (a raw publish: nats-py's error)
            for _ in range(20):
                await js.publish("nerve.filler.commands.clear_temp", b"x" * size)
    spike = Event(source="test", type="nerve.telemetry.disk", subject="pi-01", data={"value": 97})
    # The disk runbook's run fails at its command step, and the fact of its end names the reason.
    with caplog.at_level(logging.INFO):
        async with central(settings, signer, [], [disk_runbook(settings.central.disk)]):
            await publish_envelope(js, "nerve.pi-01.telemetry.disk", spike)
            async with asyncio.timeout(30):
                while not [f for f in await facts_of(js) if f.kind == "run_failed"]:
                    await asyncio.sleep(0.1)
    (fact,) = [f for f in await facts_of(js) if f.kind == "run_failed"]
    assert "its stream is full" in fact.data["error"]
    assert "nerve.pi-01.commands.clear_temp" in fact.data["error"]
    assert "JetStream refused nerve.pi-01.commands.clear_temp" in caplog.text


class Readings(Agent):
    """Reads disk readings and does nothing: the runner's loop guard is what is tested."""

    name = "readings"
    subscriptions = (Subscription(Kind.TELEMETRY, "disk"),)

    async def handle(self, envelope: Envelope, ctx: AgentContext) -> None:
        """Nothing."""


@pytest.mark.broker
async def test_a_flood_of_too_deep_messages_makes_few_loop_guard_facts(
    nats_server: NatsServer, tmp_path: Path, nc: NatsClient, signer: Signer
) -> None:
    settings = settings_for(nats_server, tmp_path, {"sample_window_s": 1.0, "sample_max_keys": 2})
    js = nc.jetstream()
    async with central(settings, signer, [Readings()]):
        for i in range(90):
            device = f"pi-{i % 3}"
            deep = Event(source="x", type="nerve.telemetry.disk", subject=device, data={"value": 99}, hops=50)
            await publish_envelope(js, f"nerve.{device}.telemetry.disk", deep)
        async with asyncio.timeout(30):
            while await counted(js) < 90:
                await asyncio.sleep(0.1)
    facts = await facts_of(js)
    assert await counted(js) == 90
    assert {fact.kind for fact in facts} == {"loop_guard"}
    per_subject: dict[str, int] = {}
    for fact in facts:
        per_subject[fact.subject] = per_subject.get(fact.subject, 0) + int(fact.data["count"])
    assert per_subject == {"pi-0": 30, "pi-1": 30, "many-devices": 30}
    assert len(facts) <= 3 * 6  # 90 before
    assert (await js.stream_info("NERVE_COMMANDS")).state.messages == 0


class Doomed(Agent):
    """An agent on `doomed` events whose handler would fail the test: a poison message is never handled."""

    name = "doomed"
    subscriptions = (Subscription(Kind.EVENTS, "doomed"),)
    handled: ClassVar[list[str]] = []

    async def handle(self, envelope: Envelope, ctx: AgentContext) -> None:  # noqa: ARG002
        """Note it."""
        self.handled.append(envelope.id)


@pytest.mark.broker
async def test_a_message_whose_holders_all_died_is_dead_lettered_once_unhandled(
    nats_server: NatsServer, tmp_path: Path, nc: NatsClient, signer: Signer
) -> None:
    """JetStream never gives up on an agent's message (it would drop it unseen): central dead-letters a
    message delivered more than MAX_DELIVER times without settling, without handling it."""
    settings = settings_for(nats_server, tmp_path, {})
    js = nc.jetstream()
    await ensure_streams(js, "nerve")
    name = consumer_name(Doomed(), Doomed.subscriptions[0])
    subject = Doomed.subscriptions[0].subject("nerve")
    # The consumer as an earlier version made it (JetStream gave up after 5 deliveries); a short ack wait.
    made = await shared_durable(
        js,
        subject=subject,
        stream="NERVE_EVENTS",
        name=name,
        ack_wait_s=0.3,
        max_ack_pending=100,
        max_deliver=5,
    )
    await made.unsubscribe()
    event = Event(source="t", type="doomed", subject="pi-1", data={"kills": "central"})
    await publish_envelope(js, "nerve.pi-1.events.doomed", event)
    dying = await js.subscribe(subject, queue=name, durable=name, stream="NERVE_EVENTS", manual_ack=True)
    async with asyncio.timeout(10):
        async for msg in dying.messages:  # a central that dies each time it holds it
            if msg.metadata.num_delivered == MAX_DELIVER:
                break
    await dying.unsubscribe()
    async with central(settings, signer, [Doomed()]) as runner:
        async with asyncio.timeout(20):
            while not (await stream_messages(js, "NERVE_DEADLETTER")):
                await asyncio.sleep(0.1)
        assert runner.deadlettered == 1
    info = await js.consumer_info("NERVE_EVENTS", name)
    assert info.config.max_deliver == -1  # JetStream no longer drops it unseen
    assert (info.num_ack_pending, info.num_pending) == (0, 0)
    [stored] = await stream_messages(js, "NERVE_DEADLETTER")
    assert "doomed: delivered" in stored.headers["Nerve-Reason"]
    assert "never settled" in stored.headers["Nerve-Reason"]
    assert Doomed.handled == []
