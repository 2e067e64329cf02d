"""nerve.agents: the agents that ship with nerve."""

from typing import TYPE_CHECKING

from nerve.agents import disk, payment
from nerve.agents.audit import CommandAudit, StreamWatch
from nerve.agents.disk import disk_runbook
from nerve.agents.payment import PaymentRecovery, payment_recovery

if TYPE_CHECKING:
    from collections.abc import Callable

    from nerve.runtime.central.agent import Agent
    from nerve.runtime.central.runner import DurableAgentFactory
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


def builtin_durable_agents(settings: "Settings") -> list["DurableAgent | DurableAgentFactory"]:
    """The durable agents `nerve central` runs on its engine: those `central.durable_agents` names.

    Raises `ConfigError` naming the key for a name that is no built-in durable agent, or one named twice.
    """
    from nerve.runtime.central.runner import DurableAgentFactory  # noqa: PLC0415 - central's, at run time
    from nerve.runtime.errors import ConfigError  # noqa: PLC0415

    known: dict[str, Callable[[], DurableAgent | DurableAgentFactory]] = {
        disk.AGENT: lambda: disk_runbook(settings.central.disk),
        payment.AGENT: lambda: DurableAgentFactory(
            payment.AGENT, lambda ctx: payment_recovery(ctx, settings.central.payment)
        ),
    }
    names = settings.central.durable_agents
    for name in names:
        if name not in known:
            msg = f"{name!r} is no built-in durable agent (they are: {', '.join(known)})"
            raise ConfigError(msg, key="central.durable_agents")
        if names.count(name) > 1:
            raise ConfigError(f"{name!r} is named twice", key="central.durable_agents")
    return [known[name]() for name in names]
