"""nerve.agents: the agents that ship with nerve."""

from typing import TYPE_CHECKING

from nerve.agents.audit import CommandAudit, StreamWatch
from nerve.agents.disk import DiskRunbook
from nerve.agents.payment import PaymentRecovery, payment_recovery

if TYPE_CHECKING:
    from nerve.runtime.central.agent import Agent
    from nerve.runtime.config.settings import Settings

__all__ = [
    "CommandAudit",
    "DiskRunbook",
    "PaymentRecovery",
    "StreamWatch",
    "builtin_agents",
    "payment_recovery",
]


def builtin_agents(settings: "Settings") -> list["Agent"]:
    """The agents `nerve central` runs."""
    return [DiskRunbook(settings.central.disk), CommandAudit(settings.streams), StreamWatch(settings.streams)]
