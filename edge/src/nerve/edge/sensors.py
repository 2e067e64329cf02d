"""The device's own health as readings: disk, CPU and memory use in percent, load, temperature.

Light enough for a Raspberry Pi: the numbers come from `os.statvfs`, from `/proc/stat`,
`/proc/meminfo` and `/proc/loadavg`, and from `/sys/class/thermal`, parsed by hand (no psutil).
Every function here is synchronous and cheap (one syscall or a few small file reads), so the edge
daemon may call it straight from its event loop.

Each built-in sensor is also a `Sensor` (the protocol plugins implement, see docs/sensors.md):
`DiskSensor`, `CpuSensor`, `MemorySensor`, `LoadSensor`, `TemperatureSensor`.

```
NerveError
└── SensorError    a sensor could not be read (carries the metric and the source path)
```
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, Protocol, runtime_checkable

from nerve.runtime.errors import NerveError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

__all__ = [
    "BUILTIN_SENSORS",
    "DEFAULT_DEADBANDS",
    "CpuSampler",
    "CpuSensor",
    "DiskSensor",
    "LoadSensor",
    "MemorySensor",
    "Reading",
    "Sensor",
    "SensorError",
    "TemperatureSensor",
    "disk_usage",
    "load_average",
    "memory_usage",
    "read_all",
    "temperatures",
]

_log: Final = logging.getLogger(__name__)

PROC: Final = Path("/proc")
THERMAL: Final = Path("/sys/class/thermal")
PERCENT: Final = "%"
CELSIUS: Final = "°C"
# A load average has no unit: it is a number of runnable (or uninterruptible) tasks.
TASKS: Final = "tasks"

BUILTIN_SENSORS: Final = ("disk", "cpu", "memory", "load", "temperature")
# How far a value may move (in its unit) before it is published again without waiting for the
# heartbeat. Chosen so that a steady device publishes little and a real change shows at once.
DEFAULT_DEADBANDS: Final[Mapping[str, float]] = MappingProxyType(
    {"disk": 1.0, "cpu": 5.0, "memory": 2.0, "load": 0.25, "temperature": 1.0}
)
_MILLI: Final = 1000.0

# The aggregate "cpu" line of /proc/stat holds, in clock ticks:
#   user nice system idle iowait irq softirq steal guest guest_nice
# guest and guest_nice are already counted inside user and nice, so only the first eight make the
# total; idle and iowait are the time the CPUs were not busy.
_STAT_FIELDS: Final = 8
_IDLE: Final = 3
_IOWAIT: Final = 4


class SensorError(NerveError):
    """A sensor could not be read: `metric` is what was asked for, `source` the path read."""

    def __init__(self, metric: str, source: str, reason: str) -> None:
        self.metric = metric
        self.source = source
        self.reason = reason
        super().__init__(f"{metric} sensor, {source}: {reason}")


@dataclass(frozen=True, slots=True)
class Reading:
    """One measured value, ready to publish on `nerve/<device>/telemetry/<metric>`.

    `labels` tell apart readings of the same metric (disk has `{"mount": "/"}`). They are copied
    into a read-only mapping, so a reading never changes after it is made. A reading is not
    hashable (its labels are a mapping).
    """

    metric: str
    value: float
    unit: str
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Frozen: the copy must go through object.__setattr__.
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))


def disk_usage(mount: str) -> Reading:
    """Percent of `mount` in use, computed as `df` does: used / (used + available to users).

    Blocks reserved for root count neither as used nor as available, so a disk that only root can
    still write to reads 100. Any existing path is accepted and reports the filesystem that holds
    it; a pseudo filesystem without blocks (`/proc`) reads 0.

    Raises:
        SensorError: `mount` does not exist or cannot be examined.
    """
    try:
        st = os.statvfs(mount)
    except OSError as exc:
        raise SensorError("disk", mount, exc.strerror or type(exc).__name__) from exc
    used = st.f_blocks - st.f_bfree
    total = used + st.f_bavail
    value = used / total * 100.0 if total > 0 else 0.0
    return Reading(metric="disk", value=value, unit=PERCENT, labels={"mount": mount})


class CpuSampler:
    """Percent of time all CPUs together were busy between two samples, from `/proc/stat`.

    It keeps the previous counters, so keep one sampler for the life of the daemon and call
    `sample()` on each tick. The first call only takes the baseline and returns None: a percentage
    needs two points in time, and a sampler that slept for a baseline would block the event loop.
    """

    __slots__ = ("_path", "_previous")

    def __init__(self, *, proc: Path = PROC) -> None:
        self._path = proc / "stat"
        self._previous: tuple[int, int] | None = None

    def sample(self) -> Reading | None:
        """Read the counters and return the busy percent since the previous call.

        Returns None on the first call, and when no clock tick passed or the counters went
        backwards (a CPU taken offline) since the previous call; the next call measures from now.

        Raises:
            SensorError: `/proc/stat` cannot be read or has no aggregate `cpu` line.
        """
        total, idle = self._read()
        previous, self._previous = self._previous, (total, idle)
        if previous is None:
            return None
        d_total = total - previous[0]
        d_idle = idle - previous[1]
        if d_total <= 0 or d_idle < 0:
            return None
        busy = (d_total - d_idle) / d_total * 100.0
        return Reading(metric="cpu", value=min(max(busy, 0.0), 100.0), unit=PERCENT)

    def _read(self) -> tuple[int, int]:
        source = str(self._path)
        try:
            text = self._path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise SensorError("cpu", source, _reason(exc)) from exc
        for line in text.splitlines():
            fields = line.split()
            if fields and fields[0] == "cpu":
                break
        else:
            raise SensorError("cpu", source, "no aggregate 'cpu' line")
        try:
            ticks = [int(tick) for tick in fields[1 : 1 + _STAT_FIELDS]]
        except ValueError as exc:
            raise SensorError("cpu", source, f"malformed 'cpu' line: {line!r}") from exc
        if len(ticks) <= _IDLE:
            raise SensorError("cpu", source, f"malformed 'cpu' line: {line!r}")
        # Old kernels had fewer columns (iowait came in 2.6): what is missing counts as zero.
        ticks += [0] * (_STAT_FIELDS - len(ticks))
        return sum(ticks), ticks[_IDLE] + ticks[_IOWAIT]


def memory_usage(*, proc: Path = PROC) -> Reading:
    """Percent of memory in use from `/proc/meminfo`: (MemTotal - MemAvailable) / MemTotal.

    MemAvailable (Linux 3.14 and later) counts page cache that can be dropped as available, so a
    busy cache does not look like memory pressure.

    Raises:
        SensorError: the file cannot be read, lacks MemTotal or MemAvailable, or says 0 total.
    """
    path = proc / "meminfo"
    source = str(path)
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise SensorError("memory", source, _reason(exc)) from exc
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if sep and key in {"MemTotal", "MemAvailable"}:
            try:
                values[key] = int(rest.split()[0])
            except (IndexError, ValueError) as exc:
                raise SensorError("memory", source, f"malformed line: {line!r}") from exc
    missing = [key for key in ("MemTotal", "MemAvailable") if key not in values]
    if missing:
        raise SensorError("memory", source, f"no {' or '.join(missing)}")
    total, available = values["MemTotal"], values["MemAvailable"]
    if total <= 0:
        raise SensorError("memory", source, f"MemTotal is {total}")
    value = (total - available) / total * 100.0
    return Reading(metric="memory", value=min(max(value, 0.0), 100.0), unit=PERCENT)


def load_average(*, proc: Path = PROC) -> Reading:
    """The 1-minute load average from `/proc/loadavg` (runnable plus uninterruptible tasks).

    Raises:
        SensorError: the file cannot be read or does not start with a number.
    """
    path = proc / "loadavg"
    source = str(path)
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise SensorError("load", source, _reason(exc)) from exc
    fields = text.split()
    try:
        value = float(fields[0])
    except (IndexError, ValueError) as exc:
        raise SensorError("load", source, f"malformed: {text.strip()[:40]!r}") from exc
    if not 0.0 <= value < float("inf"):
        raise SensorError("load", source, f"malformed: {text.strip()[:40]!r}")
    return Reading(metric="load", value=value, unit=TASKS)


def temperatures(*, thermal: Path = THERMAL) -> list[Reading]:
    """One reading in °C per thermal zone under `thermal` (`thermal_zone*/temp`, millidegrees).

    Each is labelled with its zone (`thermal_zone0`) and, when the zone says it, its type
    (`cpu-thermal`). No zones (a VM, a container without /sys) is no readings and no error.

    Raises:
        SensorError: a zone exists but its temperature cannot be read or is not a number (the
            first such zone; a caller that wants the others uses `TemperatureSensor`).
    """
    return [_zone_temperature(zone) for zone in _zones(thermal)]


def _zones(thermal: Path) -> list[Path]:
    try:
        zones = [entry for entry in thermal.iterdir() if entry.name.startswith("thermal_zone")]
    except OSError:
        return []
    # thermal_zone10 after thermal_zone9.
    return sorted(zones, key=lambda zone: (len(zone.name), zone.name))


def _zone_temperature(zone: Path) -> Reading:
    path = zone / "temp"
    source = str(path)
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SensorError("temperature", source, _reason(exc)) from exc
    try:
        value = int(text) / _MILLI
    except ValueError as exc:
        raise SensorError("temperature", source, f"malformed: {text[:40]!r}") from exc
    labels = {"zone": zone.name}
    try:
        kind = (zone / "type").read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        kind = ""
    if kind:
        labels["type"] = kind
    return Reading(metric="temperature", value=value, unit=CELSIUS, labels=labels)


@runtime_checkable
class Sensor(Protocol):
    """What the edge daemon polls: built-in sensors and plugins (entry point group `nerve.sensors`).

    `read()` is called from the daemon's event loop every interval: it must be quick and must not
    block (a file read is fine; a network call is not). It returns the readings of this tick, maybe
    none. Raising `SensorError` (or any exception) skips this tick's readings of this sensor only:
    the daemon logs one line and goes on polling it.
    """

    def read(self) -> Iterable[Reading]:
        """The readings of this tick."""
        ...


class DiskSensor:
    """`disk`: percent in use of each mount (see `disk_usage`), in the order given.

    A mount that cannot be examined is left out, so one bad mount never hides the others; it is
    logged once at warning, and again only after it was readable in between.
    """

    __slots__ = ("_failing", "_mounts")

    def __init__(self, mounts: Sequence[str]) -> None:
        self._mounts = tuple(mounts)
        self._failing: set[str] = set()

    def read(self) -> list[Reading]:
        """One reading per mount that could be examined."""
        readings: list[Reading] = []
        for mount in self._mounts:
            try:
                readings.append(disk_usage(mount))
            except SensorError as exc:
                _warn_once(self._failing, mount, exc)
                continue
            self._failing.discard(mount)
        return readings


class CpuSensor:
    """`cpu`: percent busy since the previous tick (see `CpuSampler`; nothing on the first)."""

    __slots__ = ("_sampler",)

    def __init__(self, *, proc: Path = PROC) -> None:
        self._sampler = CpuSampler(proc=proc)

    def read(self) -> list[Reading]:
        """The busy percent, or nothing on the first call."""
        reading = self._sampler.sample()
        return [] if reading is None else [reading]


class MemorySensor:
    """`memory`: percent in use (see `memory_usage`)."""

    __slots__ = ("_proc",)

    def __init__(self, *, proc: Path = PROC) -> None:
        self._proc = proc

    def read(self) -> list[Reading]:
        """The memory reading."""
        return [memory_usage(proc=self._proc)]


class LoadSensor:
    """`load`: the 1-minute load average (see `load_average`)."""

    __slots__ = ("_proc",)

    def __init__(self, *, proc: Path = PROC) -> None:
        self._proc = proc

    def read(self) -> list[Reading]:
        """The load reading."""
        return [load_average(proc=self._proc)]


class TemperatureSensor:
    """`temperature`: one reading per thermal zone; a device without zones publishes nothing.

    Zones are looked up on every read (cheap: one directory listing), so a zone that appears later
    is picked up. A zone that cannot be read is left out; it is logged once at warning, and again
    only after it was readable in between, so a flaky sensor does not fill the log.
    """

    __slots__ = ("_failing", "_thermal")

    def __init__(self, *, thermal: Path = THERMAL) -> None:
        self._thermal = thermal
        self._failing: set[str] = set()

    def read(self) -> list[Reading]:
        """The readable zones' temperatures."""
        readings: list[Reading] = []
        for zone in _zones(self._thermal):
            try:
                readings.append(_zone_temperature(zone))
            except SensorError as exc:
                _warn_once(self._failing, zone.name, exc)
                continue
            self._failing.discard(zone.name)
        return readings


def read_all(mounts: Sequence[str], cpu: CpuSampler, *, proc: Path = PROC) -> list[Reading]:
    """Read every sensor once: one disk reading per mount, in order, then cpu, then memory.

    A sensor that fails (a mount that does not exist, an unreadable /proc file) is logged at
    warning and left out, so one bad mount never hides the others. The cpu reading is left out on
    the sampler's first call (see `CpuSampler.sample`). `proc` is used for memory; the sampler
    has its own.
    """
    readings: list[Reading] = []
    for mount in mounts:
        _keep(readings, partial(disk_usage, mount))
    _keep(readings, cpu.sample)
    _keep(readings, partial(memory_usage, proc=proc))
    return readings


def _keep(readings: list[Reading], read: Callable[[], Reading | None]) -> None:
    try:
        reading = read()
    except SensorError as exc:
        _log.warning("sensor skipped: %s", exc)
        return
    if reading is not None:
        readings.append(reading)


def _warn_once(failing: set[str], key: str, exc: SensorError) -> None:
    if key not in failing:
        failing.add(key)
        _log.warning("sensor skipped: %s (logged once until it reads again)", exc)


def _reason(exc: OSError | UnicodeDecodeError) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
