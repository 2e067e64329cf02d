"""The harness itself: misuse is one clear error; a cancel and an explicit crash on both bindings."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from nacl.signing import SigningKey
from tests.runtime.harness.orders import COMPENSATED, DONE, drive, fulfil, sink

from nerve.runtime.engine import Limits, Trigger, Window, durable_agent
from nerve.runtime.envelope.model import Event
from nerve.runtime.harness import AgentHarness, HarnessError
from nerve.runtime.jetstream.streams import FACTS_STREAM
from nerve.runtime.stack.brokers import free_port
from nerve.runtime.subjects import Kind
from nerve.runtime.trust.chain import verify_records
from nerve.runtime.trust.signing import Signer, Verifier

if TYPE_CHECKING:
    from nerve.runtime.engine import Step
    from nerve.runtime.envelope.model import Envelope


async def test_a_wrong_binding_or_crash_point_is_refused() -> None:
    with pytest.raises(HarnessError, match="binding 'redis'"):
        AgentHarness(agents=[fulfil], binding="redis")  # type: ignore[arg-type]
    with pytest.raises(HarnessError, match="crash_at 0"):
        AgentHarness(agents=[fulfil], crash_at=0)
    with pytest.raises(HarnessError, match="crash_when 'during'"):
        AgentHarness(agents=[fulfil], crash_at=1, crash_when="during")  # type: ignore[arg-type]


async def test_an_unreachable_server_is_named() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    with pytest.raises(HarnessError, match=re.escape(f"cannot connect to {url}")):
        async with AgentHarness(agents=[fulfil], binding="nats", nats_url=url):
            pass


@pytest.mark.broker
async def test_the_nats_binding_starts_a_server_of_its_own() -> None:
    async with AgentHarness(agents=[fulfil], binding="nats") as h:
        event = await h.publish_event("order_placed", {"order": "o-own"})
        run_id = fulfil.run_id(event.id)
        await h.wait_for_step(run_id, "shipped", status="waiting")
        assert sink.landed["o-own"] == ["reserve", "charge"]
        assert h.clock is None


async def test_misuse_inside_is_one_clear_error() -> None:
    async with AgentHarness(agents=[fulfil]) as h:
        with pytest.raises(HarnessError, match=r"subject 'a\.b' names no device"):
            await h.publish(Event(id="e1", source="nerve://x", type="order_placed", subject="a.b"))
        with pytest.raises(HarnessError, match="time does not go back"):
            await h.advance(-1)
        with pytest.raises(HarnessError, match="no journal"):
            await h.wait_for_run("nope", timeout=0.1)
        with pytest.raises(HarnessError, match="no step 'x'"):
            await h.wait_for_step("nope", "x", timeout=0.1)
        assert await h.run_state("nope") is None
        with pytest.raises(HarnessError, match="device 'dev 1': not a token"):
            h.device("dev 1")
    with pytest.raises(HarnessError, match="has not started"):
        h.device("dev1")


@durable_agent(
    "limited",
    trigger=Trigger(Kind.EVENTS, "tick", source="shop"),
    key=lambda _event: "one",
    limits=Limits(rate=Window(1, 60.0)),
)
async def limited(event: Envelope, step: Step) -> str:
    return event.id


async def test_flow_control_counts_by_the_harness_clock() -> None:
    """A minute advanced is a minute passed for the limits too, as for timers (not the machine's clock)."""
    async with AgentHarness(agents=[limited]) as h:
        await h.advance(3600)
        first = await h.publish_event("tick", {})
        assert (await h.wait_for_run(limited.run_id(first.id))).state == "done"
        await h.advance(30)
        early = await h.publish_event("tick", {})
        async with asyncio.timeout(10):
            while not (dropped := await h.facts("trigger_dropped")):
                await asyncio.sleep(0.01)
        assert [fact.data["trigger"] for fact in dropped] == [early.id]
        await h.advance(31)
        later = await h.publish_event("tick", {})
        assert (await h.wait_for_run(limited.run_id(later.id))).state == "done"
        assert await h.run(limited.run_id(early.id)) is None


async def test_a_cancelled_run_is_compensated(binding: dict[str, Any]) -> None:
    async with AgentHarness(agents=[fulfil], **binding) as h:
        event = await h.publish_event("order_placed", {"order": "o-cancel"})
        run_id = fulfil.run_id(event.id)
        await h.wait_for_step(run_id, "shipped", status="waiting")
        await h.engine.cancel(run_id)
        record = await h.wait_for_run(run_id)
        assert (record.state, record.cancelled) == ("compensated", True)
        assert sink.landed["o-cancel"] == COMPENSATED


async def test_a_crash_while_parked_resumes_in_the_next_engine(binding: dict[str, Any]) -> None:
    async with AgentHarness(agents=[fulfil], **binding) as h:
        event = await h.publish_event("order_placed", {"order": "o-parked"})
        run_id = fulfil.run_id(event.id)
        await h.wait_for_step(run_id, "shipped", status="waiting")
        await h.publish_event("order_shipped", {"order": "o-parked"})
        await h.wait_for_run(run_id, state="waiting")  # parked in its cool-down: nobody holds it
        first = h.engine
        await h.crash_and_restart()
        assert h.engine is not first
        assert h.crashes == 1
        assert await drive(h, run_id, tick=0.5) == "done"
        assert sink.landed["o-parked"] == DONE
        assert all(sink.calls[f"o-parked:{what}"] == 1 for what in DONE)


def test_the_docs_show_the_example_word_for_word() -> None:
    root = Path(__file__).resolve().parents[3]
    example = (root / "tests/runtime/harness/test_docs_example.py").read_text()
    page = (root / "docs/testing-agents.md").read_text()
    block = page.split("<!-- example: tests/runtime/harness/test_docs_example.py -->\n```python\n", 1)[1]
    assert block.split("```\n", 1)[0] == example


async def test_facts_kept_with_a_signer_are_signed_and_chained(binding: dict[str, Any]) -> None:
    key = SigningKey.generate()
    async with AgentHarness(agents=[fulfil], signer=Signer("central", key), **binding) as h:
        event = await h.publish_event("order_placed", {"order": "o-signed"})
        run_id = fulfil.run_id(event.id)
        await h.wait_for_step(run_id, "shipped", status="waiting")
        await h.engine.cancel(run_id)
        await h.wait_for_run(run_id)
        stored = await h.messages(FACTS_STREAM)
        assert len(stored) == 4  # charged, two undos, and the run cancelled
        verifier = Verifier({"central": key.verify_key})
        assert verify_records([(message.seq, message.data) for message in stored], verifier) == []
