"""Sensor plugins: `Sensor` factories other distributions declare in the entry point group `nerve.sensors`.

A plugin runs only when `edge.sensors.<name>` names it (and does not say `enabled: false`); its
`options` mapping is handed to the factory. A plugin that cannot be found, imported or created is
reported in one line naming it and left out: the other sensors run on. See docs/sensors.md.

`importlib.metadata` is imported only when a plugin is configured: it costs memory a device without
plugins should not pay.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

from nerve.edge.sensors import Sensor

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from importlib.metadata import EntryPoint

__all__ = ["SENSOR_ENTRY_POINT_GROUP", "load_sensor_plugin"]

SENSOR_ENTRY_POINT_GROUP: Final = "nerve.sensors"

_log: Final = logging.getLogger(__name__)


def _installed(group: str) -> Iterable[EntryPoint]:
    from importlib.metadata import entry_points  # noqa: PLC0415 - only when a plugin is configured

    return entry_points(group=group)


def load_sensor_plugin(
    name: str,
    options: Mapping[str, Any],
    *,
    installed: Callable[[str], Iterable[EntryPoint]] = _installed,
) -> Sensor | None:
    """The sensor the entry point `name` of group `nerve.sensors` makes from `options`, or None.

    None means it could not be had: no such entry point, an import error, a factory that raised or
    returned something without a `read()` method. Each case is logged as one error line that names
    the plugin and says why (never a traceback); nothing is raised.
    """
    found = [point for point in installed(SENSOR_ENTRY_POINT_GROUP) if point.name == name]
    if not found:
        _log.error(
            "sensor plugin %r: no built-in sensor and no installed plugin (entry point group %r) has "
            "this name; check edge.sensors.%s",
            name,
            SENSOR_ENTRY_POINT_GROUP,
            name,
        )
        return None
    point = found[0]
    if len(found) > 1:
        _log.warning(
            "sensor plugin %r: %d installed entry points have this name; using %s",
            name,
            len(found),
            point.value,
        )
    try:
        factory = point.load()
    except Exception as exc:  # noqa: BLE001 - any import failure of foreign code is reported, not raised
        _log.error("sensor plugin %r (%s) cannot be loaded: %s", name, point.value, _one_line(exc))
        return None
    if not callable(factory):
        _log.error("sensor plugin %r (%s) is not a factory: %s", name, point.value, type(factory).__name__)
        return None
    try:
        sensor = factory(dict(options))
    except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop the daemon
        _log.error("sensor plugin %r (%s) cannot be created: %s", name, point.value, _one_line(exc))
        return None
    if not isinstance(sensor, Sensor):
        _log.error(
            "sensor plugin %r (%s) made a %s, which has no read() method",
            name,
            point.value,
            type(sensor).__name__,
        )
        return None
    _log.info("sensor plugin %r loaded from %s", name, point.value)
    return sensor


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
