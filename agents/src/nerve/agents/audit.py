"""The command audit: every command a device refused, or could not run, becomes a fact.

A forged, unsigned, expired or replayed command is a security event even when no runbook sent it
(someone with access to the broker may be probing devices), so it must be in the audit trail.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Final

from nerve.runtime.central.agent import Agent, AgentContext, Subscription
from nerve.runtime.envelope.model import CommandResult
from nerve.runtime.subjects import Kind

if TYPE_CHECKING:
    from nerve.runtime.envelope.model import Envelope

AUDITED: Final = frozenset({"rejected", "expired", "unknown", "failed"})


class CommandAudit(Agent):
    """Keeps a `command_<status>` fact for every result that is not `ok`."""

    name: ClassVar[str] = "audit"
    subscriptions: ClassVar[tuple[Subscription, ...]] = (Subscription(Kind.RESULTS, "*"),)

    async def handle(self, envelope: Envelope, ctx: AgentContext) -> None:
        """Record a refused or failed command."""
        if not isinstance(envelope, CommandResult) or envelope.status not in AUDITED:
            return
        verb = {"rejected": "refused", "expired": "refused (expired)", "unknown": "could not confirm"}.get(
            envelope.status, "failed to run"
        )
        await ctx.fact(
            envelope,
            kind=f"command_{envelope.status}",
            summary=(
                f"{envelope.subject} {verb} {envelope.action} (command {envelope.causationid})"
                + (f": {envelope.reason}" if envelope.reason else "")
            ),
            data={"command_id": envelope.causationid, "action": envelope.action, "status": envelope.status},
            key="audit",
        )
