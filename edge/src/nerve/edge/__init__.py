"""nerve.edge: the device daemon (sensors, signed command executor, allow-listed actions).

Importing it never imports nats-py: an edge-only install has none.
"""

from nerve.edge.actions import (
    DEFAULT_OLDER_THAN_S,
    MAX_OLDER_THAN_S,
    Action,
    ActionArgumentError,
    ActionFailed,
    ClearTemp,
    ClearTempResult,
    clear_temp,
    parse_clear_temp_args,
)
from nerve.edge.agent import OFFLINE, ONLINE, EdgeAgent, default_device_id
from nerve.edge.allowlist import (
    ENTRY_POINT_GROUP,
    ActionPluginError,
    AllowList,
    build_allow_list,
    load_plugin,
)
from nerve.edge.diagnostics import CollectDiagnostics
from nerve.edge.executor import (
    DEFAULT_MAX_ARGS_BYTES,
    INTERRUPTED_REASON,
    RERUN_REASON,
    Executor,
    command_digest,
)
from nerve.edge.journal import (
    DEFAULT_RETENTION_S,
    CommandJournal,
    JournalEntry,
    JournalError,
    JournalState,
    journal_path,
)
from nerve.edge.processes import ProgramOutcome, run_program
from nerve.edge.sensors import CpuSampler, Reading, SensorError, disk_usage, memory_usage, read_all
from nerve.edge.system_actions import RestartService, RunScript, VacuumJournal

__all__ = [
    "DEFAULT_MAX_ARGS_BYTES",
    "DEFAULT_OLDER_THAN_S",
    "DEFAULT_RETENTION_S",
    "ENTRY_POINT_GROUP",
    "INTERRUPTED_REASON",
    "MAX_OLDER_THAN_S",
    "OFFLINE",
    "ONLINE",
    "RERUN_REASON",
    "Action",
    "ActionArgumentError",
    "ActionFailed",
    "ActionPluginError",
    "AllowList",
    "ClearTemp",
    "ClearTempResult",
    "CollectDiagnostics",
    "CommandJournal",
    "CpuSampler",
    "EdgeAgent",
    "Executor",
    "JournalEntry",
    "JournalError",
    "JournalState",
    "ProgramOutcome",
    "Reading",
    "RestartService",
    "RunScript",
    "SensorError",
    "VacuumJournal",
    "build_allow_list",
    "clear_temp",
    "command_digest",
    "default_device_id",
    "disk_usage",
    "journal_path",
    "load_plugin",
    "memory_usage",
    "parse_clear_temp_args",
    "read_all",
    "run_program",
]
