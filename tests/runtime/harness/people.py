"""A person deciding on a run's pending approval in the harness's tests, as `nerve approve` does."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from nacl.signing import SigningKey

from nerve.runtime.engine import EngineError
from nerve.runtime.engine.approval import sign_decision
from nerve.runtime.engine.runs import pending_approval, store_decision
from nerve.runtime.trust.signing import Signer

if TYPE_CHECKING:
    from nerve.runtime.harness import AgentHarness

#: The engine's signer: without operator keys of its own, it trusts decisions signed with it.
OPERATOR = Signer("central", SigningKey.generate())


async def decide(
    h: AgentHarness,
    run_id: str,
    step: str,
    *,
    approve: bool,
    signer: Signer = OPERATOR,
    comment: str = "phoned",
) -> None:
    """Once approval step `step` of run `run_id` waits, decide on it (signed by `signer`)."""
    await h.wait_for_step(run_id, step, status="waiting")
    async with asyncio.timeout(10):  # the pending decision is journalled right after the step's first write
        while True:
            record = await h.run(run_id)
            assert record is not None
            try:
                ask = pending_approval(record)
                break
            except EngineError:  # not pending yet
                await asyncio.sleep(0.02)
    decision = sign_decision(
        signer, run_id=run_id, step=ask.step, approve=approve, comment=comment, valid_until=ask.expires
    )
    await store_decision(h.kv, decision)
