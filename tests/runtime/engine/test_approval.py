"""Human approval on a real nats-server: approve, reject, a forged decision ignored (a fact), expiry paths."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.signing import SigningKey
from tests.runtime.engine.conftest import FAST, PREFIX, publish_event

from nerve.runtime.engine import NO_RETRY, Decision, Engine, Step, Trigger, durable_agent, wait_for_run
from nerve.runtime.engine.approval import DecisionRefused, check_decision, sign_decision
from nerve.runtime.engine.journal import DECODER, StepRecord
from nerve.runtime.engine.names import RUNS_STREAM, approval_key, run_key
from nerve.runtime.engine.runs import pending_approval, store_decision
from nerve.runtime.envelope.codec import decode
from nerve.runtime.envelope.model import Fact
from nerve.runtime.jetstream.streams import FACTS_STREAM
from nerve.runtime.subjects import Kind
from nerve.runtime.testing import stream_messages
from nerve.runtime.trust.signing import Signer, Verifier

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue

    from nerve.runtime.engine.journal import RunRecord
    from nerve.runtime.envelope.model import Envelope

pytestmark = pytest.mark.broker

CENTRAL = Signer("central", SigningKey.generate())
#: Signs with the key id central's engine trusts, but not with its key.
FORGER = Signer("central", SigningKey.generate())
effects: dict[str, list[str]] = defaultdict(list)


@durable_agent(
    "refund",
    trigger=Trigger(Kind.EVENTS, "refund_requested"),
    key=lambda event: str(event.data["order"]),
    retry=NO_RETRY,
)
async def refund(event: Envelope, step: Step) -> dict[str, Any]:
    order = str(event.data["order"])

    async def hold() -> None:
        effects[order].append("hold")

    async def release() -> None:
        effects[order].append("release")

    await step.run("hold", hold, undo=release)
    decision = await step.approve(
        "ok",
        route="finance",
        expires=float(event.data.get("expires", 60)),
        on_expiry=event.data.get("on_expiry", "escalate"),
        summary=f"refund of order {order}",
    )
    return {"outcome": decision.outcome, "by": decision.by, "comment": decision.comment}


async def pending(kv: KeyValue, run_id: str, *, timeout: float = 20) -> RunRecord:
    """The run's journal once its approval is pending (requested, its fact kept)."""
    watcher = await kv.watch(run_key(run_id))
    try:
        async with asyncio.timeout(timeout):
            async for entry in watcher:
                if entry is None or not entry.value:
                    continue
                record = DECODER.decode(entry.value)
                step = record.steps.get("ok")
                if step is not None and step.status == "waiting" and step.result is not None:
                    return record
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
    raise AssertionError("the watcher stopped")


async def facts_of(js: JetStreamContext, run_id: str) -> list[Fact]:
    facts = [decode(message.data, Fact) for message in await stream_messages(js, FACTS_STREAM)]
    return [fact for fact in facts if fact.data.get("run") == run_id]


async def start(js: JetStreamContext, engine: Engine, **data: Any) -> tuple[str, RunRecord]:
    order = f"o-{uuid.uuid4().hex[:8]}"
    event = await publish_event(js, "refund_requested", {"order": order, **data}, event_id=f"e-{order}")
    run_id = refund.run_id(event.id)
    return run_id, await pending(engine.kv, run_id)


async def decide(kv: KeyValue, record: RunRecord, signer: Signer, *, approve: bool, comment: str = "") -> str:
    ask = pending_approval(record)
    decision = sign_decision(
        signer, run_id=record.run_id, step=ask.step, approve=approve, comment=comment, valid_until=ask.expires
    )
    await store_decision(kv, decision)
    return decision.id


async def test_an_approved_run_goes_on_and_both_ends_are_facts(nc: NatsClient, js: JetStreamContext) -> None:
    async with Engine(nc=nc, agents=[refund], prefix=PREFIX, settings=FAST, signer=CENTRAL) as engine:
        run_id, record = await start(js, engine)
        ask = pending_approval(record)
        assert (ask.step, ask.route, ask.on_expiry) == ("ok", "finance", "escalate")
        decision_id = await decide(engine.kv, record, CENTRAL, approve=True, comment="fine by me")
        done = await wait_for_run(engine.kv, run_id, timeout=20)
    assert done.state == "done"
    assert done.result == {"outcome": "approved", "by": "central", "comment": "fine by me"}
    assert done.steps["ok"].result["decision"]["decision"] == decision_id
    facts = await facts_of(js, run_id)
    assert [fact.kind for fact in facts] == ["approval_requested", "approved"]
    assert "nerve approve " + run_id in facts[0].summary
    assert facts[1].data["by"] == "central"


async def test_a_rejection_is_returned_to_the_agent(nc: NatsClient, js: JetStreamContext) -> None:
    async with Engine(nc=nc, agents=[refund], prefix=PREFIX, settings=FAST, signer=CENTRAL) as engine:
        run_id, record = await start(js, engine)
        await decide(engine.kv, record, CENTRAL, approve=False, comment="no")
        done = await wait_for_run(engine.kv, run_id, timeout=20)
    assert done.result == {"outcome": "rejected", "by": "central", "comment": "no"}
    assert [fact.kind for fact in await facts_of(js, run_id)] == ["approval_requested", "rejected"]


async def test_a_forged_decision_is_ignored_and_kept_as_a_fact(nc: NatsClient, js: JetStreamContext) -> None:
    stranger = Signer("mallory", SigningKey.generate())
    async with Engine(nc=nc, agents=[refund], prefix=PREFIX, settings=FAST, signer=CENTRAL) as engine:
        run_id, record = await start(js, engine)
        forged = await decide(engine.kv, record, FORGER, approve=True)
        unknown = await decide(engine.kv, record, stranger, approve=True)
        await engine.kv.put(approval_key(run_id, "junk"), b"not a decision")
        # An approval signed right, for another run, replayed here: the signature covers the run id.
        other = sign_decision(
            CENTRAL, run_id="another", step="ok", approve=True, comment="", valid_until=time.time() + 60
        )
        await engine.kv.put(approval_key(run_id, other.id), msgspec.json.encode(other))
        async with asyncio.timeout(20):
            while len([f for f in await facts_of(js, run_id) if f.kind == "approval_refused"]) < 4:
                await asyncio.sleep(0.05)
        still = await engine.record(run_id)
        assert still is not None
        assert still.steps["ok"].status == "waiting"  # none of them decided anything
        genuine = await decide(engine.kv, record, CENTRAL, approve=False)
        done = await wait_for_run(engine.kv, run_id, timeout=20)
    assert done.result["outcome"] == "rejected"
    assert done.steps["ok"].result["decision"]["decision"] == genuine
    refused = {
        f.data["decision"]: f.data["reason"]
        for f in await facts_of(js, run_id)
        if f.kind == "approval_refused"
    }
    assert refused[forged] == "bad signature: the command was altered or forged"
    assert refused[unknown] == "command is signed by unknown key id 'mallory'"
    assert refused["junk"].startswith("not a decision")
    assert refused[other.id] == "it is about run another"


async def test_an_expired_approval_escalates_and_the_run_goes_on(
    nc: NatsClient, js: JetStreamContext
) -> None:
    async with Engine(nc=nc, agents=[refund], prefix=PREFIX, settings=FAST, signer=CENTRAL) as engine:
        run_id, _ = await start(js, engine, expires=1.0)
        done = await wait_for_run(engine.kv, run_id, timeout=20)
    assert done.state == "done"
    assert done.result["outcome"] == "expired"
    order = done.key
    assert effects[order] == ["hold"]
    facts = await facts_of(js, run_id)
    assert [fact.kind for fact in facts] == ["approval_requested", "approval_expired"]
    assert "escalated: finance must look" in facts[1].summary


async def test_an_expired_approval_that_compensates_undoes_the_run(
    nc: NatsClient, js: JetStreamContext
) -> None:
    async with Engine(nc=nc, agents=[refund], prefix=PREFIX, settings=FAST, signer=CENTRAL) as engine:
        run_id, _ = await start(js, engine, expires=1.0, on_expiry="compensate")
        done = await wait_for_run(engine.kv, run_id, timeout=20)
    assert done.state == "compensated"
    assert "the approval expired" in done.error
    assert effects[done.key] == ["hold", "release"]
    kinds = [fact.kind for fact in await facts_of(js, run_id)]
    assert kinds == ["approval_requested", "approval_expired", "compensated", "run_failed"]


async def test_a_decision_stored_after_the_expiry_does_not_count(
    nc: NatsClient, js: JetStreamContext
) -> None:
    async with Engine(nc=nc, agents=[refund], prefix=PREFIX, settings=FAST, signer=CENTRAL) as engine:
        run_id, record = await start(js, engine, expires=1.0)
        ask = pending_approval(record)
        late = sign_decision(
            CENTRAL, run_id=run_id, step="ok", approve=True, comment="", valid_until=ask.expires + 60
        )
        await asyncio.sleep(max(0.0, ask.expires - time.time()) + 0.2)
        await store_decision(engine.kv, late)
        done = await wait_for_run(engine.kv, run_id, timeout=20)
    assert done.result["outcome"] == "expired"


async def test_a_cancel_while_waiting_for_a_decision_compensates(
    nc: NatsClient, js: JetStreamContext
) -> None:
    async with Engine(nc=nc, agents=[refund], prefix=PREFIX, settings=FAST, signer=CENTRAL) as engine:
        run_id, _ = await start(js, engine)
        await engine.cancel(run_id)
        done = await wait_for_run(engine.kv, run_id, timeout=20)
    assert done.state == "compensated"
    assert done.cancelled
    assert effects[done.key] == ["hold", "release"]


async def test_a_decision_survives_a_restart_of_the_engine(nc: NatsClient, js: JetStreamContext) -> None:
    async with Engine(nc=nc, agents=[refund], prefix=PREFIX, settings=FAST, signer=CENTRAL) as engine:
        run_id, record = await start(js, engine)
    # No engine runs: the decision waits in the bucket for the next one.
    kv = await js.key_value("nerve_runs")
    decision_id = await decide(kv, record, CENTRAL, approve=True)
    async with Engine(nc=nc, agents=[refund], prefix=PREFIX, settings=FAST, signer=CENTRAL) as engine:
        done = await wait_for_run(engine.kv, run_id, timeout=20)
    assert done.result["outcome"] == "approved"
    assert done.steps["ok"].result["decision"]["decision"] == decision_id
    assert effects[done.key] == ["hold"]
    assert [fact.kind for fact in await facts_of(js, run_id)] == ["approval_requested", "approved"]


async def test_a_decision_stored_in_time_while_no_engine_ran_counts_though_the_expiry_came_too(
    nc: NatsClient, js: JetStreamContext
) -> None:
    """Both the decision and the expiry timer wait for the next engine: the decision was in time, it wins
    (whichever of the two that engine hears first: at the expiry, what is stored is read first)."""
    async with Engine(nc=nc, agents=[refund], prefix=PREFIX, settings=FAST, signer=CENTRAL) as engine:
        # Long enough to stop the engine and decide in time on a loaded box (1 s was not, once, in CI).
        run_id, record = await start(js, engine, expires=5.0)
    kv = await js.key_value("nerve_runs")
    decision_id = await decide(kv, record, CENTRAL, approve=True)
    await asyncio.sleep(max(0.0, pending_approval(record).expires - time.time()) + 1.0)  # the timer fires
    async with Engine(nc=nc, agents=[refund], prefix=PREFIX, settings=FAST, signer=CENTRAL) as engine:
        done = await wait_for_run(engine.kv, run_id, timeout=20)
    assert done.result["outcome"] == "approved"
    assert done.steps["ok"].result["decision"]["decision"] == decision_id


async def test_at_the_expiry_a_decision_stored_and_not_heard_yet_is_read_from_the_stream(
    nc: NatsClient, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step hears its timer before the decision its subscription has not delivered yet (a decision
    stored while no engine ran, whose expiry came too): it reads what is stored, and the decision counts."""
    stored = asyncio.Event()
    heard: list[str] = []
    hear = Step._next

    async def timer_first(self: Step, queue: Any, waiting: StepRecord) -> Any:
        if waiting.stream == RUNS_STREAM and not heard:
            heard.append("timer")
            await stored.wait()
            return "timer"
        return await hear(self, queue, waiting)

    monkeypatch.setattr(Step, "_next", timer_first)
    async with Engine(nc=nc, agents=[refund], prefix=PREFIX, settings=FAST, signer=CENTRAL) as engine:
        run_id, record = await start(js, engine)
        decision_id = await decide(engine.kv, record, CENTRAL, approve=True)
        stored.set()
        done = await wait_for_run(engine.kv, run_id, timeout=20)
    assert heard == ["timer"]
    assert done.result["outcome"] == "approved"
    assert done.steps["ok"].result["decision"]["decision"] == decision_id


def test_the_operator_key_may_differ_from_the_central_key() -> None:
    operator = Signer("operator", SigningKey.generate())
    trusted = Verifier.from_config({"operator": operator.public_key, "central": CENTRAL.public_key})
    decision = sign_decision(
        operator, run_id="r1", step="ok", approve=True, comment="", valid_until=time.time() + 60
    )
    data = msgspec.json.encode(decision)
    now = decision.time
    _, outcome = check_decision(
        data, run_id="r1", step="ok", due=time.time() + 60, stored=now, operators=trusted
    )
    assert outcome == Decision(outcome="approved", by="operator", decision=decision.id)
    with pytest.raises(DecisionRefused, match="trusts no operator key"):
        check_decision(data, run_id="r1", step="ok", due=time.time() + 60, stored=now, operators=None)
    with pytest.raises(DecisionRefused) as elsewhere:
        check_decision(data, run_id="r1", step="other", due=time.time() + 60, stored=now, operators=trusted)
    assert elsewhere.value.elsewhere


@given(
    field=st.sampled_from(["action", "subject", "data", "expires", "keyid"]),
    text=st.text(min_size=1, max_size=8),
)
def test_any_change_to_a_signed_decision_is_refused(field: str, text: str) -> None:
    decision = sign_decision(
        CENTRAL, run_id="r1", step="ok", approve=False, comment="", valid_until=time.time() + 60
    )
    document = msgspec.to_builtins(decision)
    changes: dict[str, Any] = {
        "action": "approve",
        "subject": "r2" if document["subject"] != "r2" else "r3",
        "data": {"step": "ok", "comment": text},
        "expires": "8999-01-01T00:00:00+00:00",
        "keyid": "central2",
    }
    document[field] = changes[field]
    trusted = Verifier.from_config({"central": CENTRAL.public_key})
    with pytest.raises(DecisionRefused):
        check_decision(
            msgspec.json.encode(document),
            run_id="r1",
            step="ok",
            due=time.time() + 60,
            stored=decision.time,
            operators=trusted,
        )
