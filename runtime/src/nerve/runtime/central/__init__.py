"""The central side: the Agent API (`agent`) and the runner that feeds agents from JetStream (`runner`)."""

from nerve.runtime.central.agent import Agent, AgentContext, Reject, Retry, Subscription
from nerve.runtime.central.runner import Central, DurableAgentFactory

__all__ = ["Agent", "AgentContext", "Central", "DurableAgentFactory", "Reject", "Retry", "Subscription"]
