"""nerve.edge: the device daemon (sensors, signed command executor, allow-listed actions).

Importing it never imports nats-py: an edge-only install has none.

The names are imported on first use (PEP 562): the lean process (`nerve.edge.main`) must be able to decide
what to load (OpenSSL only when it needs it) before asyncio and the daemon's modules come in.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
    from nerve.edge.agent import DROPPED_EVENT, OFFLINE, ONLINE, EdgeAgent, default_device_id
    from nerve.edge.allowlist import (
        ACTION_ENTRY_POINT_GROUP,
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
    from nerve.edge.outbox import (
        BOOT_ID_PATH,
        DEFAULT_MAX_BYTES,
        Outbox,
        OutboxEntry,
        OutboxError,
        OutboxKind,
        outbox_path,
        read_boot_id,
    )
    from nerve.edge.processes import ProgramOutcome, run_program
    from nerve.edge.sampling import Deadband, Sampler, ScheduledSensor, build_sensors
    from nerve.edge.sensor_plugins import SENSOR_ENTRY_POINT_GROUP, load_sensor_plugin
    from nerve.edge.sensors import (
        BUILTIN_SENSORS,
        DEFAULT_DEADBANDS,
        CpuSampler,
        CpuSensor,
        DiskSensor,
        LoadSensor,
        MemorySensor,
        Reading,
        Sensor,
        SensorError,
        TemperatureSensor,
        disk_usage,
        load_average,
        memory_usage,
        read_all,
        temperatures,
    )
    from nerve.edge.system_actions import RestartService, RunScript, VacuumJournal

_MODULE_OF: dict[str, str] = {
    "ACTION_ENTRY_POINT_GROUP": "nerve.edge.allowlist",
    "Action": "nerve.edge.actions",
    "ActionArgumentError": "nerve.edge.actions",
    "ActionFailed": "nerve.edge.actions",
    "ActionPluginError": "nerve.edge.allowlist",
    "AllowList": "nerve.edge.allowlist",
    "BOOT_ID_PATH": "nerve.edge.outbox",
    "BUILTIN_SENSORS": "nerve.edge.sensors",
    "ClearTemp": "nerve.edge.actions",
    "ClearTempResult": "nerve.edge.actions",
    "CollectDiagnostics": "nerve.edge.diagnostics",
    "CommandJournal": "nerve.edge.journal",
    "CpuSampler": "nerve.edge.sensors",
    "CpuSensor": "nerve.edge.sensors",
    "DEFAULT_DEADBANDS": "nerve.edge.sensors",
    "DEFAULT_MAX_ARGS_BYTES": "nerve.edge.executor",
    "DEFAULT_MAX_BYTES": "nerve.edge.outbox",
    "DEFAULT_OLDER_THAN_S": "nerve.edge.actions",
    "DEFAULT_RETENTION_S": "nerve.edge.journal",
    "DROPPED_EVENT": "nerve.edge.agent",
    "Deadband": "nerve.edge.sampling",
    "DiskSensor": "nerve.edge.sensors",
    "EdgeAgent": "nerve.edge.agent",
    "Executor": "nerve.edge.executor",
    "INTERRUPTED_REASON": "nerve.edge.executor",
    "JournalEntry": "nerve.edge.journal",
    "JournalError": "nerve.edge.journal",
    "JournalState": "nerve.edge.journal",
    "LoadSensor": "nerve.edge.sensors",
    "MAX_OLDER_THAN_S": "nerve.edge.actions",
    "MemorySensor": "nerve.edge.sensors",
    "OFFLINE": "nerve.edge.agent",
    "ONLINE": "nerve.edge.agent",
    "Outbox": "nerve.edge.outbox",
    "OutboxEntry": "nerve.edge.outbox",
    "OutboxError": "nerve.edge.outbox",
    "OutboxKind": "nerve.edge.outbox",
    "ProgramOutcome": "nerve.edge.processes",
    "RERUN_REASON": "nerve.edge.executor",
    "Reading": "nerve.edge.sensors",
    "RestartService": "nerve.edge.system_actions",
    "RunScript": "nerve.edge.system_actions",
    "SENSOR_ENTRY_POINT_GROUP": "nerve.edge.sensor_plugins",
    "Sampler": "nerve.edge.sampling",
    "ScheduledSensor": "nerve.edge.sampling",
    "Sensor": "nerve.edge.sensors",
    "SensorError": "nerve.edge.sensors",
    "TemperatureSensor": "nerve.edge.sensors",
    "VacuumJournal": "nerve.edge.system_actions",
    "build_allow_list": "nerve.edge.allowlist",
    "build_sensors": "nerve.edge.sampling",
    "clear_temp": "nerve.edge.actions",
    "command_digest": "nerve.edge.executor",
    "default_device_id": "nerve.edge.agent",
    "disk_usage": "nerve.edge.sensors",
    "journal_path": "nerve.edge.journal",
    "load_average": "nerve.edge.sensors",
    "load_plugin": "nerve.edge.allowlist",
    "load_sensor_plugin": "nerve.edge.sensor_plugins",
    "memory_usage": "nerve.edge.sensors",
    "outbox_path": "nerve.edge.outbox",
    "parse_clear_temp_args": "nerve.edge.actions",
    "read_all": "nerve.edge.sensors",
    "read_boot_id": "nerve.edge.outbox",
    "run_program": "nerve.edge.processes",
    "temperatures": "nerve.edge.sensors",
}

__all__ = [
    "ACTION_ENTRY_POINT_GROUP",
    "BOOT_ID_PATH",
    "BUILTIN_SENSORS",
    "DEFAULT_DEADBANDS",
    "DEFAULT_MAX_ARGS_BYTES",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_OLDER_THAN_S",
    "DEFAULT_RETENTION_S",
    "DROPPED_EVENT",
    "INTERRUPTED_REASON",
    "MAX_OLDER_THAN_S",
    "OFFLINE",
    "ONLINE",
    "RERUN_REASON",
    "SENSOR_ENTRY_POINT_GROUP",
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
    "CpuSensor",
    "Deadband",
    "DiskSensor",
    "EdgeAgent",
    "Executor",
    "JournalEntry",
    "JournalError",
    "JournalState",
    "LoadSensor",
    "MemorySensor",
    "Outbox",
    "OutboxEntry",
    "OutboxError",
    "OutboxKind",
    "ProgramOutcome",
    "Reading",
    "RestartService",
    "RunScript",
    "Sampler",
    "ScheduledSensor",
    "Sensor",
    "SensorError",
    "TemperatureSensor",
    "VacuumJournal",
    "build_allow_list",
    "build_sensors",
    "clear_temp",
    "command_digest",
    "default_device_id",
    "disk_usage",
    "journal_path",
    "load_average",
    "load_plugin",
    "load_sensor_plugin",
    "memory_usage",
    "outbox_path",
    "parse_clear_temp_args",
    "read_all",
    "read_boot_id",
    "run_program",
    "temperatures",
]


def __getattr__(name: str) -> object:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
