"""The central side: the Agent API (`agent`) and the runner that feeds agents from JetStream (`runner`)."""

from nerve.runtime.central.agent import Agent, AgentContext, Reject, Retry, Subscription
from nerve.runtime.central.runner import Central

__all__ = ["Agent", "AgentContext", "Central", "Reject", "Retry", "Subscription"]
