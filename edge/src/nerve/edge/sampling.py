"""When the edge daemon reads its sensors, and which readings are worth publishing.

Each sensor has its own interval. A reading is published when it moved more than its sensor's
deadband away from the value last published for the same metric and labels, or when the heartbeat
interval passed since that one: a steady device stays quiet but is never silent for longer than a
heartbeat, and the first reading of each series always goes out.

A sensor that raises is logged once (one line naming it, never a traceback) and skipped for that
tick; it is logged again only after it worked in between. A reading that is not fit to publish (a
metric that is not a token, a value that is not a finite number) is refused the same way.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from nerve.edge.sensor_plugins import load_sensor_plugin
from nerve.edge.sensors import (
    BUILTIN_SENSORS,
    DEFAULT_DEADBANDS,
    PROC,
    THERMAL,
    CpuSensor,
    DiskSensor,
    LoadSensor,
    MemorySensor,
    Reading,
    Sensor,
    SensorError,
    TemperatureSensor,
)
from nerve.runtime.subjects import is_token

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path

    from nerve.edge.settings import EdgeView

__all__ = ["Deadband", "Sampler", "ScheduledSensor", "build_sensors"]

_log: Final = logging.getLogger(__name__)


class Deadband:
    """Decides per series (metric and labels) whether a reading is worth publishing.

    `admit(reading, now)` is True for the first reading of a series, for one more than `deadband`
    away from the last admitted value, and for any once `heartbeat_s` passed since the last admitted
    one; an admitted reading becomes the new reference. `now` is any monotonic clock in seconds.
    """

    __slots__ = ("_deadband", "_heartbeat_s", "_last")

    def __init__(self, *, deadband: float, heartbeat_s: float) -> None:
        if not deadband >= 0:
            raise ValueError(f"deadband must be >= 0, not {deadband!r}")
        if not heartbeat_s > 0:
            raise ValueError(f"heartbeat_s must be > 0, not {heartbeat_s!r}")
        self._deadband = deadband
        self._heartbeat_s = heartbeat_s
        self._last: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[float, float]] = {}

    @property
    def deadband(self) -> float:
        """How far (in the reading's unit) a value must move to be published before the heartbeat."""
        return self._deadband

    @property
    def heartbeat_s(self) -> float:
        """The longest a series stays unpublished while it has readings."""
        return self._heartbeat_s

    def admit(self, reading: Reading, now: float) -> bool:
        """Whether to publish `reading` taken at `now`; if so, it becomes the reference."""
        key = (reading.metric, tuple(sorted(reading.labels.items())))
        last = self._last.get(key)
        if (
            last is None
            or abs(reading.value - last[0]) > self._deadband
            or now - last[1] >= self._heartbeat_s
        ):
            self._last[key] = (reading.value, now)
            return True
        return False


@dataclass(slots=True)
class ScheduledSensor:
    """A sensor with its name, its interval, its deadband filter and when it is next due."""

    name: str
    sensor: Sensor
    interval_s: float
    deadband: Deadband
    due: float = 0.0
    failing: bool = field(default=False, compare=False)


def build_sensors(
    edge: EdgeView,
    *,
    proc: Path = PROC,
    thermal: Path = THERMAL,
    load_plugin: Callable[[str, Mapping[str, object]], Sensor | None] = load_sensor_plugin,
) -> list[ScheduledSensor]:
    """The sensors `edge` asks for: the built-ins not disabled, then each configured plugin.

    Built-ins (disk, cpu, memory, load, temperature) run unless `edge.sensors.<name>.enabled` is
    false; any other name under `edge.sensors` is a plugin, loaded by `load_plugin` (entry points;
    a plugin that cannot be loaded is logged and left out). Intervals, deadbands and heartbeats come
    from `edge.sensors.<name>`, else `edge.interval_s`, `DEFAULT_DEADBANDS` (0 for a plugin) and
    `edge.heartbeat_s`.
    """
    builtins: dict[str, Callable[[], Sensor]] = {
        "disk": lambda: DiskSensor(edge.mounts),
        "cpu": lambda: CpuSensor(proc=proc),
        "memory": lambda: MemorySensor(proc=proc),
        "load": lambda: LoadSensor(proc=proc),
        "temperature": lambda: TemperatureSensor(thermal=thermal),
    }
    names = [*BUILTIN_SENSORS, *(name for name in edge.sensors if name not in builtins)]
    scheduled: list[ScheduledSensor] = []
    for name in names:
        config = edge.sensors.get(name)
        if config is not None and not config.enabled:
            continue
        if name in builtins:
            if config is not None and config.options:
                _log.warning("sensor %r takes no options; ignoring edge.sensors.%s.options", name, name)
            sensor: Sensor | None = builtins[name]()
        else:
            sensor = load_plugin(name, config.options if config is not None else {})
        if sensor is None:
            continue
        deadband = config.deadband if config is not None else None
        heartbeat_s = config.heartbeat_s if config is not None else None
        interval_s = config.interval_s if config is not None else None
        scheduled.append(
            ScheduledSensor(
                name=name,
                sensor=sensor,
                interval_s=interval_s or edge.interval_s,
                deadband=Deadband(
                    deadband=DEFAULT_DEADBANDS.get(name, 0.0) if deadband is None else deadband,
                    heartbeat_s=heartbeat_s or edge.heartbeat_s,
                ),
            )
        )
    return scheduled


class Sampler:
    """Reads the sensors that are due and keeps the readings worth publishing.

    Call `poll(now)` whenever `next_due()` has come (`now` on the same monotonic clock); it never
    raises for a sensor's failure. Sensors run in the order given; all are due at the first poll.
    """

    __slots__ = ("_sensors", "_started")

    def __init__(self, sensors: list[ScheduledSensor]) -> None:
        self._sensors = sensors
        self._started = False

    @property
    def sensors(self) -> list[ScheduledSensor]:
        """The scheduled sensors, in polling order."""
        return self._sensors

    def next_due(self) -> float | None:
        """When the next sensor is due (None when there are no sensors)."""
        return min((one.due for one in self._sensors), default=None)

    def poll(self, now: float) -> list[tuple[str, Reading]]:
        """Read every sensor due at `now`; return (sensor name, reading) for those to publish.

        A sensor that fell behind (a slow tick) skips its missed ticks rather than catch up in a
        burst.
        """
        if not self._started:
            self._started = True
            for one in self._sensors:
                one.due = now
        out: list[tuple[str, Reading]] = []
        for one in self._sensors:
            if one.due > now:
                continue
            one.due += one.interval_s
            if one.due <= now:
                one.due += math.ceil((now - one.due) / one.interval_s + 1e-9) * one.interval_s
            out.extend((one.name, reading) for reading in self._read(one) if one.deadband.admit(reading, now))
        return out

    def _read(self, one: ScheduledSensor) -> list[Reading]:
        try:
            readings = list(one.sensor.read())
            problem = next((why for why in map(_unfit, readings) if why), None)
        except SensorError as exc:
            problem = str(exc)  # it names the metric and the file already
        except Exception as exc:  # noqa: BLE001 - one sensor's failure must not stop the others
            problem = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        if problem is not None:
            if not one.failing:
                one.failing = True
                _log.error("sensor %r skipped: %s (logged once until it reads again)", one.name, problem)
            return []
        if one.failing:
            one.failing = False
            _log.info("sensor %r reads again", one.name)
        return readings


def _unfit(reading: object) -> str | None:
    if not isinstance(reading, Reading):
        return f"read() gave a {type(reading).__name__}, not a nerve.edge.sensors.Reading"
    if not is_token(reading.metric):
        return f"metric {reading.metric!r} is not a valid name (1-64 of A-Z a-z 0-9 _ -)"
    value: object = reading.value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return f"{reading.metric}: value {value!r} is not a finite number"
    if not isinstance(reading.unit, str) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in reading.labels.items()
    ):
        return f"{reading.metric}: unit and labels must be text"
    return None
