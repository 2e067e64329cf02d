"""The agent harness on both bindings: an order saga done, compensated, cancelled, under duplicates."""

from __future__ import annotations

from typing import Any

from tests.runtime.harness.orders import COMPENSATED, DONE, drive, fulfil, sink

from nerve.runtime.harness import AgentHarness


async def test_a_shipped_order_is_fulfilled(binding: dict[str, Any]) -> None:
    async with AgentHarness(agents=[fulfil], **binding) as h:
        event = await h.publish_event("order_placed", {"order": "o-done"})
        run_id = fulfil.run_id(event.id)
        await h.wait_for_step(run_id, "shipped", status="waiting")
        await h.publish_event("order_shipped", {"order": "o-done"})
        await h.wait_for_run(run_id, state="waiting")  # the cool-down sleep parks it
        assert sink.landed["o-done"] == ["reserve", "charge"]
        await h.advance(1)
        record = await h.wait_for_run(run_id)
        assert record.state == "done"
        assert record.result == "fulfilled"
        assert sink.landed["o-done"] == DONE
        facts = await h.facts("order_charged")
        assert [fact.summary for fact in facts] == ["order o-done charged"]


async def test_an_order_not_shipped_is_compensated_in_reverse(binding: dict[str, Any]) -> None:
    async with AgentHarness(agents=[fulfil], **binding) as h:
        event = await h.publish_event("order_placed", {"order": "o-late"})
        run_id = fulfil.run_id(event.id)
        await h.wait_for_run(run_id, state="open")
        assert await drive(h, run_id) == "compensated"
        assert sink.landed["o-late"] == COMPENSATED
        undone = [fact.data["step"] for fact in await h.facts("compensated")]
        assert undone == ["charge", "reserve"]


async def test_every_message_delivered_twice_changes_nothing(binding: dict[str, Any]) -> None:
    async with AgentHarness(agents=[fulfil], deliver_twice=True, **binding) as h:
        event = await h.publish_event("order_placed", {"order": "o-twice"})
        run_id = fulfil.run_id(event.id)
        assert await drive(h, run_id, ship="o-twice") == "done"
        assert sink.landed["o-twice"] == DONE
        assert all(sink.calls[f"o-twice:{what}"] == 1 for what in DONE)
        assert len(await h.facts("order_charged")) == 1
        assert [record.run_id for record in await h.runs() if record.key == "o-twice"] == [run_id]
