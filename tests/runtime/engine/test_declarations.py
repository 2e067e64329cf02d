"""Wrong declarations and bad input: one clear line naming what was wrong, never a silent drop."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.msg import Msg
from pydantic import ValidationError
from tests.runtime.engine.conftest import FAST, PREFIX, publish_event

from nerve.runtime.engine import (
    AgentDeclarationError,
    Engine,
    EngineError,
    EngineSettings,
    RetryPolicy,
    Step,
    Trigger,
    durable_agent,
    wait_for_run,
)
from nerve.runtime.engine.names import ENGINE_NAMES, TIMERS_CONSUMER, engine_subjects, trigger_consumer
from nerve.runtime.jetstream.client import num_delivered
from nerve.runtime.jetstream.streams import DEADLETTER_STREAM
from nerve.runtime.subjects import Kind
from nerve.runtime.testing import stream_messages, wait_for_count

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext

    from nerve.runtime.envelope.model import Envelope


async def nothing(_event: Envelope, _step: Step) -> None:
    return None


def test_declarations_are_checked_when_made() -> None:
    with pytest.raises(AgentDeclarationError, match=r"agent name 'a\.b'"):
        durable_agent("a.b", trigger=Trigger(Kind.EVENTS), key=lambda _e: "k")(nothing)
    with pytest.raises(AgentDeclarationError, match="not facts"):
        Trigger(Kind.FACTS)
    with pytest.raises(AgentDeclarationError, match="trigger name 'a>'"):
        Trigger(Kind.EVENTS, "a>")
    with pytest.raises(AgentDeclarationError, match="cannot wait on commands"):
        durable_agent("x", trigger=Trigger(Kind.EVENTS), key=lambda _e: "k", waits_on=(Kind.COMMANDS,))(
            nothing
        )
    with pytest.raises(AgentDeclarationError, match="attempts must be at least 1"):
        RetryPolicy(attempts=0)


def test_every_engine_name_is_in_one_place() -> None:
    assert ENGINE_NAMES.buckets == ("nerve_runs", "nerve_limits", "nerve_lineage")
    assert ENGINE_NAMES.streams == ("KV_nerve_runs", "KV_nerve_limits", "KV_nerve_lineage", "NERVE_TIMERS")
    assert all(
        name.lower().startswith("nerve") or name.startswith("KV_nerve") for name in ENGINE_NAMES.streams
    )
    assert engine_subjects("site/a") == (
        "$KV.nerve_runs.>",
        "$KV.nerve_limits.>",
        "$KV.nerve_lineage.>",
        "site.a.engine.timers.>",
    )
    assert trigger_consumer("disk").startswith(ENGINE_NAMES.consumer_prefix)
    assert TIMERS_CONSUMER.startswith(ENGINE_NAMES.consumer_prefix)


def test_engine_settings_refuse_a_sleep_that_would_outlive_the_journal() -> None:
    with pytest.raises(ValidationError, match="max_sleep_s"):
        EngineSettings(max_sleep_s=100 * 24 * 3600.0)
    with pytest.raises(ValidationError, match="extra"):
        EngineSettings.model_validate({"lease": 3})


async def test_two_agents_with_one_name_are_refused(nc: NatsClient) -> None:
    agent = durable_agent("twin", trigger=Trigger(Kind.EVENTS), key=lambda _e: "k")(nothing)
    with pytest.raises(EngineError, match="two agents share a name"):
        Engine(nc=nc, agents=[agent, agent])


bad_key = durable_agent("badkey", trigger=Trigger(Kind.EVENTS, "bad_key"), key=lambda e: e.data["missing"])(
    nothing
)
picky = durable_agent(
    "picky",
    trigger=Trigger(Kind.EVENTS, "picky", where=lambda e: e.data["wanted"] is True),
    key=lambda _e: "k",
)(nothing)


@pytest.mark.broker
async def test_triggers_that_cannot_start_a_run_are_dead_lettered_with_the_reason(
    nc: NatsClient, js: JetStreamContext
) -> None:
    async with Engine(nc=nc, agents=[bad_key, picky], prefix=PREFIX, settings=FAST) as engine:
        await js.publish("nerve.shop.events.picky", b"{not json")
        await publish_event(js, "bad_key", {"other": 1}, event_id="e-bad-key")
        await publish_event(js, "picky", {"unwanted": True}, event_id="e-picky-raises")
        skipped = await publish_event(js, "picky", {"wanted": False}, event_id="e-picky-no")
        taken = await publish_event(js, "picky", {"wanted": True}, event_id="e-picky-yes")
        record = await wait_for_run(engine.kv, picky.run_id(taken.id), timeout=20)
        await wait_for_count(js, DEADLETTER_STREAM, 3)
        assert await engine.record(picky.run_id(skipped.id)) is None
    assert record.state == "done"
    reasons = sorted(
        message.headers["Nerve-Reason"] for message in await stream_messages(js, DEADLETTER_STREAM)
    )
    assert reasons == [
        "badkey: its trigger raised KeyError: 'missing'",
        "picky: its trigger raised KeyError: 'wanted'",
        "picky: payload is not valid JSON: JSON is malformed: object keys must be strings (byte 1)",
    ]


async def _fine() -> int:
    return 1


async def _unjsonable() -> object:
    return object()


async def _huge() -> str:
    return "x" * 100_000


@durable_agent("misuse", trigger=Trigger(Kind.EVENTS, "misuse"), key=lambda _e: "k")
async def misuse(event: Envelope, step: Step) -> str:
    await step.run("first", _fine)
    if event.data["case"] == "result":
        return "x" * 100_000  # the run's own result, too large to journal
    name, fn = {
        "twice": ("first", _fine),
        "json": ("odd", _unjsonable),
        "huge": ("big", _huge),
        "name": ("", _fine),
    }[event.data["case"]]
    await step.run(name, fn)
    return "unreachable"


@pytest.mark.broker
async def test_steps_used_wrong_fail_the_run_naming_the_step(nc: NatsClient, js: JetStreamContext) -> None:
    expected = {
        "twice": "step name 'first' is used twice",
        "json": "step 'odd' failed: its result cannot be journalled as JSON",
        "huge": "over the limit of 65536",
        "name": "step name '': use 1 to 128 printable characters",
        "result": "RecordTooLarge",
    }
    settings = EngineSettings(lease_s=1.0, max_record_bytes=64 * 1024)
    async with Engine(nc=nc, agents=[misuse], prefix=PREFIX, settings=settings) as engine:
        for case in expected:
            await publish_event(js, "misuse", {"case": case}, event_id=f"e-misuse-{case}")
        records = {
            case: await wait_for_run(engine.kv, misuse.run_id(f"e-misuse-{case}"), timeout=20)
            for case in expected
        }
    for case, reason in expected.items():
        assert records[case].state == "failed", case
        assert reason in records[case].error, (case, records[case].error)


@pytest.mark.broker
async def test_a_trigger_too_large_to_journal_is_dead_lettered_at_once(
    nc: NatsClient, js: JetStreamContext
) -> None:
    # Under the 64 KiB a message may have, but not with the rest of the journal around it.
    agent = durable_agent("big", trigger=Trigger(Kind.EVENTS, "big"), key=lambda _e: "k")(nothing)
    settings = EngineSettings(lease_s=1.0, max_record_bytes=64 * 1024)
    async with Engine(nc=nc, agents=[agent], prefix=PREFIX, settings=settings) as engine:
        event = await publish_event(js, "big", {"blob": "x" * 65_300}, event_id="e-big")
        await wait_for_count(js, DEADLETTER_STREAM, 1)
        assert await engine.record(agent.run_id(event.id)) is None
    [message] = await stream_messages(js, DEADLETTER_STREAM)
    assert message.headers["Nerve-Reason"].startswith("big: run ")
    assert "over the limit of 65536" in message.headers["Nerve-Reason"]


@pytest.mark.broker
async def test_cancelling_a_run_that_is_not_there_or_ended_says_so(
    nc: NatsClient, js: JetStreamContext
) -> None:
    agent = durable_agent("quick", trigger=Trigger(Kind.EVENTS, "quick"), key=lambda _e: "k")(nothing)
    async with Engine(nc=nc, agents=[agent], prefix=PREFIX, settings=FAST) as engine:
        with pytest.raises(EngineError, match="no run nope"):
            await engine.cancel("nope")
        event = await publish_event(js, "quick", {}, event_id="e-quick")
        await wait_for_run(engine.kv, agent.run_id(event.id), timeout=20)
        with pytest.raises(EngineError, match=r"has ended \(done\): nothing to cancel"):
            await engine.cancel(agent.run_id(event.id))


@given(
    delivered=st.integers(min_value=1, max_value=10**9),
    stream_seq=st.integers(min_value=1, max_value=10**12),
    domain=st.sampled_from(["", "hub"]),
)
def test_num_delivered_reads_the_ack_subject_as_nats_py_does(
    delivered: int, stream_seq: int, domain: str
) -> None:
    """The engine reads a trigger's delivery count from its ack subject without nats-py's metadata."""
    if domain:  # the v2 form: domain, account hash, ..., a random token
        reply = (
            f"$JS.ACK.{domain}.ACCHASH.NERVE_EVENTS.c.{delivered}.{stream_seq}.7.1700000000000000000.3.tok"
        )
    else:
        reply = f"$JS.ACK.NERVE_EVENTS.c.{delivered}.{stream_seq}.7.1700000000000000000.3"
    msg = Msg(_client=None, subject="nerve.x.events.y", reply=reply)  # type: ignore[arg-type]
    assert num_delivered(msg) == msg.metadata.num_delivered == delivered
