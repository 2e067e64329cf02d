"""nerve.agents: the agents that ship with nerve."""

from typing import TYPE_CHECKING

from nerve.agents.audit import CommandAudit, StreamWatch
from nerve.agents.disk import disk_runbook
from nerve.agents.payment import PaymentRecovery, payment_recovery

if TYPE_CHECKING:
    from nerve.runtime.central.agent import Agent
    from nerve.runtime.config.settings import Settings
    from nerve.runtime.engine import DurableAgent

__all__ = [
    "CommandAudit",
    "PaymentRecovery",
    "StreamWatch",
    "builtin_agents",
    "builtin_durable_agents",
    "disk_runbook",
    "payment_recovery",
]


def builtin_agents(settings: "Settings") -> list["Agent"]:
    """The agents `nerve central` runs on its runner."""
    return [CommandAudit(settings.streams), StreamWatch(settings.streams)]


def builtin_durable_agents(settings: "Settings") -> list["DurableAgent"]:
    """The durable agents `nerve central` runs on its engine (`central.engine`)."""
    return [disk_runbook(settings.central.disk)]
