"""wait_for_event(since_trigger=True): an event stored after the trigger counts, whatever steps ran since."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from tests.runtime.engine.conftest import FAST, PREFIX, publish_event

from nerve.runtime.engine import NO_RETRY, DurableAgent, Engine, Step, Trigger, durable_agent, wait_for_run
from nerve.runtime.subjects import Kind

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext

    from nerve.runtime.envelope.model import Envelope

pytestmark = pytest.mark.broker


def asking(js: JetStreamContext) -> DurableAgent:
    """Its first step stores the answer, its second does nothing, then it waits for the answer."""

    @durable_agent(
        "since",
        trigger=Trigger(Kind.EVENTS, "asked"),
        key=lambda event: str(event.data["n"]),
        waits_on=(Kind.EVENTS, Kind.RESULTS),
        retry=NO_RETRY,
    )
    async def since(event: Envelope, step: Step) -> str | None:
        n = str(event.data["n"])

        async def answer() -> None:
            await publish_event(js, "answered", {"n": n}, event_id=f"a{n}")

        async def nothing() -> None:
            return None

        await step.run("answer", answer)
        await step.run("nothing", nothing)  # began after the answer was stored
        found = await step.wait_for_event(
            "answer_seen",
            "answered",
            kind=Kind.RESULTS if event.data.get("wrong") else Kind.EVENTS,
            match=lambda e: str(e.data["n"]) == n,
            timeout=float(event.data.get("timeout", 30)),
            since_trigger=bool(event.data.get("since", True)),
        )
        return None if found is None else found.id

    return since


async def test_an_event_stored_before_the_previous_step_began_counts(
    nc: NatsClient, js: JetStreamContext
) -> None:
    since = asking(js)
    async with Engine(nc=nc, agents=[since], prefix=PREFIX, settings=FAST) as engine:
        await publish_event(js, "asked", {"n": 1}, event_id="q1")
        await publish_event(js, "asked", {"n": 2, "since": False, "timeout": 1}, event_id="q2")
        found = await wait_for_run(engine.kv, since.run_id("q1"), timeout=20)
        missed = await wait_for_run(engine.kv, since.run_id("q2"), timeout=20)
    assert (found.state, found.result) == ("done", "a1")
    assert (missed.state, missed.result) == ("done", None)  # without it, the wait reads after "nothing" began


async def test_since_trigger_on_another_stream_is_a_declaration_error(
    nc: NatsClient, js: JetStreamContext
) -> None:
    since = asking(js)
    async with Engine(nc=nc, agents=[since], prefix=PREFIX, settings=FAST) as engine:
        await publish_event(js, "asked", {"n": 3, "wrong": True}, event_id="q3")
        record = await wait_for_run(engine.kv, since.run_id("q3"), timeout=20)
    assert record.state == "failed"
    assert "since_trigger reads only the trigger's stream" in record.error
