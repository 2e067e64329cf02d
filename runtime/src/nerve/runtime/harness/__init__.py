"""The agent test harness: durable agents in one process, on an in-memory JetStream or a real nats-server.

`AgentHarness` runs agents, moves time (`advance`), kills and restarts the engine at any journal write,
delivers every message twice, and reads back runs, facts and commands. `MemoryJetStream` and `FakeClock`
are the in-memory binding. How to test an agent with it: docs/testing-agents.md.
"""

from nerve.runtime.harness.crash import CrashWhen
from nerve.runtime.harness.harness import BINDINGS, HARNESS_SETTINGS, AgentHarness, Binding, HarnessError
from nerve.runtime.harness.memory import FakeClock, MemoryJetStream, MemoryNats

__all__ = [
    "BINDINGS",
    "HARNESS_SETTINGS",
    "AgentHarness",
    "Binding",
    "CrashWhen",
    "FakeClock",
    "HarnessError",
    "MemoryJetStream",
    "MemoryNats",
]
