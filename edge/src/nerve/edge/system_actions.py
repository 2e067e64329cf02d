"""The actions that start a program: `vacuum_journal`, `restart_service` and `run`.

Each builds an argv from its configuration and a validated argument, never from text off the
network: `vacuum_journal` takes a number of MiB within configured bounds, `restart_service` the name
of a unit on the configured list, `run` the name of a configured script. Programs run through
`nerve.edge.processes.run_program` (no shell, timeout, output capped). A program that exits non-zero,
times out or cannot start makes the result `failed`, with its exit code and output in the data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from nerve.edge.actions import ActionArgumentError, ActionFailed
from nerve.edge.processes import ProgramOutcome, run_program

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from nerve.edge.settings import ActionsView, ScriptView

__all__ = ["RestartService", "RunScript", "VacuumJournal"]

_REPR_LIMIT: Final = 40


def check_arguments(action: str, args: Mapping[str, Any], known: Sequence[str]) -> None:
    """Raise `ActionArgumentError` for the first key of `args` that is not in `known`."""
    for key in args:
        if key not in known:
            expected = " or ".join(repr(name) for name in known) if known else "no arguments"
            raise ActionArgumentError(action, str(key)[:_REPR_LIMIT], expected, "is not a known argument")


def _text_argument(action: str, args: Mapping[str, Any], key: str, choices: Sequence[str]) -> str:
    expected = f"one of {list(choices)}" if choices else "nothing: none are configured on this device"
    if key not in args:
        raise ActionArgumentError(action, key, expected, "is missing")
    value = args[key]
    if not isinstance(value, str):
        raise ActionArgumentError(action, key, expected, f"is a {type(value).__name__}")
    if value not in choices:
        shown = value if len(value) <= _REPR_LIMIT else value[: _REPR_LIMIT - 3] + "..."
        raise ActionArgumentError(action, key, expected, f"is {shown!r}, not on this device's list")
    return value


def _outcome(outcome: ProgramOutcome, summary: str) -> dict[str, Any]:
    data = outcome.as_data()
    if not outcome.succeeded:
        raise ActionFailed(outcome.describe(), data)
    data["summary"] = summary
    return data


class VacuumJournal:
    """`vacuum_journal`: `journalctl --vacuum-size=<N>M`, N from `size_mb` within configured bounds.

    With `vacuum_unit` set it runs `systemctl start <vacuum_unit>@<N>M.service` instead (see
    configs/systemd/nerve-journal-vacuum@.service), so the daemon itself needs no root.

    Idempotent: vacuuming down to a size twice leaves what vacuuming once does.
    """

    name: Final = "vacuum_journal"
    idempotent: Final = True

    def __init__(self, settings: ActionsView) -> None:
        self._journalctl = settings.journalctl
        self._systemctl = settings.systemctl
        self._unit = settings.vacuum_unit
        self._timeout_s = settings.timeout_s
        self._max_output = settings.max_output_bytes
        self._default = settings.vacuum_default_mb
        self._min = settings.vacuum_min_mb
        self._max = settings.vacuum_max_mb

    def validate(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        """`size_mb`: a whole number of MiB within the configured bounds; default from configuration."""
        check_arguments(self.name, args, ("size_mb",))
        value = args.get("size_mb", self._default)
        expected = f"a whole number of MiB from {self._min} to {self._max}"
        if isinstance(value, bool) or not isinstance(value, int):
            raise ActionArgumentError(self.name, "size_mb", expected, f"is a {type(value).__name__}")
        if not self._min <= value <= self._max:
            raise ActionArgumentError(self.name, "size_mb", expected, f"is {value}")
        return {"size_mb": value}

    def run(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Vacuum; the data carries journalctl's exit code and output (it reports on stderr)."""
        size = int(args["size_mb"])
        # Deleting journal files needs root: an unprivileged daemon starts a root oneshot unit instead.
        argv = (
            (*self._systemctl, "--no-ask-password", "start", f"{self._unit}@{size}M.service")
            if self._unit
            else (*self._journalctl, f"--vacuum-size={size}M")
        )
        outcome = run_program(
            argv,
            timeout_s=self._timeout_s,
            max_output_bytes=self._max_output,
        )
        return _outcome(outcome, f"journal vacuumed to at most {size} MiB")


class RestartService:
    """`restart_service`: `systemctl restart <unit>` for a unit on the configured list only.

    Not idempotent: a restart run again is a second restart.
    """

    name: Final = "restart_service"
    idempotent: Final = False

    def __init__(self, settings: ActionsView) -> None:
        self._systemctl = settings.systemctl
        self._timeout_s = settings.timeout_s
        self._max_output = settings.max_output_bytes
        self._units = tuple(settings.services)

    def validate(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        """`unit`: exactly one of the configured unit names."""
        check_arguments(self.name, args, ("unit",))
        return {"unit": _text_argument(self.name, args, "unit", self._units)}

    def run(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Restart; the data carries systemctl's exit code and output."""
        unit = str(args["unit"])
        # --no-ask-password: never wait for a password prompt nobody will answer.
        outcome = run_program(
            (*self._systemctl, "--no-ask-password", "restart", unit),
            timeout_s=self._timeout_s,
            max_output_bytes=self._max_output,
        )
        return _outcome(outcome, f"restarted {unit}")


class RunScript:
    """`run`: start a script named in the configuration, by its argv (never a shell), with its timeout.

    Not idempotent (nerve cannot know what a script does).
    """

    name: Final = "run"
    idempotent: Final = False

    def __init__(self, settings: ActionsView) -> None:
        self._scripts: dict[str, ScriptView] = dict(settings.scripts)
        self._max_output = settings.max_output_bytes

    def validate(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        """`script`: the name of one of the configured scripts; nothing else (no extra arguments)."""
        check_arguments(self.name, args, ("script",))
        return {"script": _text_argument(self.name, args, "script", sorted(self._scripts))}

    def run(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Run it; the data carries the script's name, exit code and (capped) output."""
        name = str(args["script"])
        script = self._scripts[name]
        outcome = run_program(script.argv, timeout_s=script.timeout_s, max_output_bytes=self._max_output)
        try:
            data = _outcome(outcome, f"script {name} exited 0")
        except ActionFailed as failed:
            raise ActionFailed(f"script {name}: {failed.reason}", {"script": name, **failed.data}) from None
        return {"script": name, **data}
