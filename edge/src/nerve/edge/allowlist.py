"""The allow-list: which actions this device runs, built from `edge.actions`, plugins included.

Only what `edge.actions.allow` names runs. A built-in that needs configuration it lacks (`clear_temp`
without roots, `restart_service` without services, `run` without scripts) is disabled with that
reason. Any other name is looked up as a plugin: an entry point of group `nerve.actions` with that
name, a callable that takes the plugin's options (`edge.actions.plugins.<name>`, default `{}`) and
returns an `Action`. Plugins not allowed are never imported.

```
NerveError
└── ConfigError
    └── ActionPluginError    a plugin is missing, cannot be loaded, or is not an Action (names it)
```
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from nerve.edge.actions import Action, ClearTemp
from nerve.edge.diagnostics import CollectDiagnostics
from nerve.edge.system_actions import RestartService, RunScript, VacuumJournal
from nerve.runtime.errors import ConfigError
from nerve.runtime.subjects import is_token

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from nerve.edge.settings import EdgeView

__all__ = ["ACTION_ENTRY_POINT_GROUP", "ActionPluginError", "AllowList", "build_allow_list", "load_plugin"]

ACTION_ENTRY_POINT_GROUP: Final = "nerve.actions"


class ActionPluginError(ConfigError):
    """The action plugin `name` cannot be used; `reason` says why (one line)."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"action plugin {name!r}: {reason}", key="edge.actions.allow")


class AllowList:
    """The actions this device runs, by name, and why the others named in configuration do not."""

    def __init__(self, actions: Mapping[str, Action], disabled: Mapping[str, str]) -> None:
        self.actions: dict[str, Action] = dict(actions)
        self.disabled: dict[str, str] = dict(disabled)


def build_allow_list(edge: EdgeView) -> AllowList:
    """The allow-list `edge.actions` describes.

    Raises:
        ActionPluginError: an allowed name is no built-in and no installed plugin, or its plugin
            fails to load or to build.
    """
    settings = edge.actions
    actions: dict[str, Action] = {}
    disabled: dict[str, str] = {}
    for name in settings.allow:
        builtin = _BUILTINS.get(name)
        made = builtin(edge) if builtin is not None else load_plugin(name, settings.plugins.get(name, {}))
        if isinstance(made, str):
            disabled[name] = made
        else:
            actions[name] = made
    for name in settings.plugins:
        if name not in settings.allow:
            disabled[name] = "configured as a plugin but not in edge.actions.allow"
    return AllowList(actions, disabled)


def _clear_temp(edge: EdgeView) -> Action | str:
    return ClearTemp(edge.clear_temp_roots) if edge.clear_temp_roots else "no clear_temp roots are configured"


def _restart_service(edge: EdgeView) -> Action | str:
    if not edge.actions.services:
        return "no services are configured in edge.actions.services"
    return RestartService(edge.actions)


def _run(edge: EdgeView) -> Action | str:
    return (
        RunScript(edge.actions)
        if edge.actions.scripts
        else "no scripts are configured in edge.actions.scripts"
    )


# Each built-in, from the settings: the action, or why it cannot run here.
_BUILTINS: Final[dict[str, Callable[[EdgeView], Action | str]]] = {
    "clear_temp": _clear_temp,
    "vacuum_journal": lambda edge: VacuumJournal(edge.actions),
    "restart_service": _restart_service,
    "run": _run,
    "collect_diagnostics": lambda edge: CollectDiagnostics(edge.mounts),
}


def load_plugin(name: str, options: Mapping[str, Any]) -> Action:
    """Import the entry point `name` of group `nerve.actions`, build it with `options`, check it.

    Raises:
        ActionPluginError: not installed, fails to import or to build, or what it builds is not an
            `Action` named `name` with a bool `idempotent`.
    """
    # Imported here: importlib.metadata is not light, and a device without plugins never needs it.
    from importlib.metadata import entry_points  # noqa: PLC0415

    found = [entry for entry in entry_points(group=ACTION_ENTRY_POINT_GROUP) if entry.name == name]
    if not found:
        raise ActionPluginError(
            name,
            f"not a built-in action and no installed package provides entry point {ACTION_ENTRY_POINT_GROUP}",
        )
    entry = found[0]
    try:
        factory = entry.load()
        action = factory(dict(options))
    except Exception as exc:  # noqa: BLE001 - any failure of foreign code becomes one clear line
        raise ActionPluginError(name, f"{entry.value} failed to load: {type(exc).__name__}: {exc}") from None
    if not isinstance(action, Action):
        raise ActionPluginError(
            name, f"{entry.value} returned {type(action).__name__}, which lacks name/idempotent/validate/run"
        )
    if action.name != name or not is_token(action.name):
        raise ActionPluginError(name, f"{entry.value} builds an action named {action.name!r}, not {name!r}")
    if not isinstance(action.idempotent, bool):
        raise ActionPluginError(name, f"{entry.value}: idempotent must be True or False")
    return action
