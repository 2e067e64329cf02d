"""nerve.edge: the device daemon (sensors, signed command executor, allow-listed actions).

Importing it never imports nats-py: an edge-only install has none.
"""

from nerve.edge.actions import (
    DEFAULT_OLDER_THAN_S,
    MAX_OLDER_THAN_S,
    ActionArgumentError,
    ClearTempResult,
    clear_temp,
    parse_clear_temp_args,
)
from nerve.edge.agent import OFFLINE, ONLINE, EdgeAgent, default_device_id
from nerve.edge.executor import INTERRUPTED_REASON, Executor
from nerve.edge.journal import (
    DEFAULT_RETENTION_S,
    CommandJournal,
    JournalEntry,
    JournalError,
    JournalState,
    journal_path,
)
from nerve.edge.sensors import CpuSampler, Reading, SensorError, disk_usage, memory_usage, read_all

__all__ = [
    "DEFAULT_OLDER_THAN_S",
    "DEFAULT_RETENTION_S",
    "INTERRUPTED_REASON",
    "MAX_OLDER_THAN_S",
    "OFFLINE",
    "ONLINE",
    "ActionArgumentError",
    "ClearTempResult",
    "CommandJournal",
    "CpuSampler",
    "EdgeAgent",
    "Executor",
    "JournalEntry",
    "JournalError",
    "JournalState",
    "Reading",
    "SensorError",
    "clear_temp",
    "default_device_id",
    "disk_usage",
    "journal_path",
    "memory_usage",
    "parse_clear_temp_args",
    "read_all",
]
