"""Deadband, heartbeat, per-sensor intervals, and sensor plugins (entry points), without brokers."""

from __future__ import annotations

import importlib
import logging
import sys
from importlib.metadata import EntryPoint
from typing import TYPE_CHECKING, Any

import pytest

from nerve.edge.sampling import Deadband, Sampler, ScheduledSensor, build_sensors
from nerve.edge.sensor_plugins import SENSOR_ENTRY_POINT_GROUP, load_sensor_plugin
from nerve.edge.sensors import Reading, SensorError
from nerve.runtime.config.settings import EdgeSettings

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from pathlib import Path


def cpu(value: float) -> Reading:
    return Reading(metric="cpu", value=value, unit="%")


# --- deadband and heartbeat -----------------------------------------------------------------------


def test_deadband_publishes_the_first_then_only_moves_beyond_it() -> None:
    band = Deadband(deadband=5.0, heartbeat_s=60.0)
    assert band.admit(cpu(10.0), 0.0)
    assert not band.admit(cpu(14.9), 1.0)
    assert not band.admit(cpu(15.0), 2.0)  # exactly the deadband is not beyond it
    assert not band.admit(cpu(5.0), 3.0)
    assert band.admit(cpu(15.1), 4.0)
    # The reference is the last published value, not the last read one: slow drift is caught.
    assert not band.admit(cpu(18.0), 5.0)
    assert not band.admit(cpu(20.0), 6.0)
    assert band.admit(cpu(20.2), 7.0)
    assert band.admit(cpu(9.0), 8.0)  # downwards too


def test_heartbeat_publishes_an_unchanged_value() -> None:
    band = Deadband(deadband=1.0, heartbeat_s=10.0)
    assert band.admit(cpu(50.0), 100.0)
    assert not band.admit(cpu(50.0), 109.9)
    assert band.admit(cpu(50.0), 110.0)
    assert not band.admit(cpu(50.5), 115.0)
    assert band.admit(cpu(50.5), 120.0)


def test_deadband_zero_publishes_every_change_and_no_repeat() -> None:
    band = Deadband(deadband=0.0, heartbeat_s=10.0)
    assert band.admit(cpu(1.0), 0.0)
    assert not band.admit(cpu(1.0), 1.0)
    assert band.admit(cpu(1.0001), 2.0)


def test_each_series_has_its_own_reference() -> None:
    band = Deadband(deadband=1.0, heartbeat_s=10.0)
    root = Reading(metric="disk", value=50.0, unit="%", labels={"mount": "/"})
    data = Reading(metric="disk", value=50.0, unit="%", labels={"mount": "/data"})
    assert band.admit(root, 0.0)
    assert band.admit(data, 0.0)
    assert not band.admit(root, 1.0)
    assert band.admit(cpu(50.0), 1.0)


@pytest.mark.parametrize(("deadband", "heartbeat_s"), [(-1.0, 1.0), (1.0, 0.0), (float("nan"), 1.0)])
def test_deadband_refuses_bad_numbers(deadband: float, heartbeat_s: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        Deadband(deadband=deadband, heartbeat_s=heartbeat_s)


# --- the sampler ----------------------------------------------------------------------------------


class Fixed:
    """A sensor that returns what it is told, and counts its reads."""

    def __init__(self, *readings: Reading) -> None:
        self.readings: list[Any] = list(readings)
        self.reads = 0
        self.error: Exception | None = None

    def read(self) -> Iterable[Reading]:
        self.reads += 1
        if self.error is not None:
            raise self.error
        return list(self.readings)


def scheduled(name: str, sensor: Fixed, interval_s: float, *, heartbeat_s: float = 1e-9) -> ScheduledSensor:
    return ScheduledSensor(
        name=name,
        sensor=sensor,
        interval_s=interval_s,
        deadband=Deadband(deadband=0.0, heartbeat_s=heartbeat_s),
    )


def test_sampler_reads_each_sensor_at_its_own_interval() -> None:
    fast, slow = Fixed(cpu(1.0)), Fixed(Reading(metric="disk", value=1.0, unit="%"))
    sampler = Sampler([scheduled("cpu", fast, 1.0), scheduled("disk", slow, 3.0)])
    assert sampler.next_due() == 0.0
    names = [[name for name, _ in sampler.poll(now)] for now in (100.0, 101.0, 102.0, 103.0, 104.0)]
    assert names == [["cpu", "disk"], ["cpu"], ["cpu"], ["cpu", "disk"], ["cpu"]]
    assert sampler.next_due() == 105.0
    assert (fast.reads, slow.reads) == (5, 2)


def test_sampler_skips_missed_ticks() -> None:
    sensor = Fixed(cpu(1.0))
    sampler = Sampler([scheduled("cpu", sensor, 0.1)])
    sampler.poll(0.0)
    sampler.poll(0.45)  # late: ticks at 0.1 .. 0.4 were missed
    assert sensor.reads == 2
    assert sampler.next_due() == pytest.approx(0.5)
    assert sampler.poll(0.46) == []


def test_sampler_keeps_only_what_the_deadband_admits() -> None:
    sensor = Fixed(cpu(10.0))
    one = ScheduledSensor(
        name="cpu", sensor=sensor, interval_s=1.0, deadband=Deadband(deadband=5, heartbeat_s=3)
    )
    sampler = Sampler([one])
    published = []
    for now, value in enumerate([10.0, 12.0, 11.0, 20.0, 21.0, 21.0, 21.0, 21.0]):
        sensor.readings = [cpu(value)]
        published += [(now, r.value) for _, r in sampler.poll(float(now))]
    assert published == [(0, 10.0), (3, 20.0), (6, 21.0)]


def test_a_failing_sensor_is_logged_once_and_the_others_go_on(caplog: pytest.LogCaptureFixture) -> None:
    broken, fine = Fixed(cpu(1.0)), Fixed(Reading(metric="memory", value=2.0, unit="%"))
    broken.error = SensorError("cpu", "/proc/stat", "gone")
    sampler = Sampler([scheduled("cpu", broken, 1.0), scheduled("memory", fine, 1.0)])
    with caplog.at_level(logging.INFO, logger="nerve.edge.sampling"):
        for now in range(3):
            assert [name for name, _ in sampler.poll(float(now))] == ["memory"]
        broken.error = None
        assert [name for name, _ in sampler.poll(3.0)] == ["cpu", "memory"]
        broken.error = RuntimeError("plugin bug\nsecond line")
        sampler.poll(4.0)
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert messages == [
        (
            logging.ERROR,
            "sensor 'cpu' skipped: cpu sensor, /proc/stat: gone (logged once until it reads again)",
        ),
        (logging.INFO, "sensor 'cpu' reads again"),
        (
            logging.ERROR,
            "sensor 'cpu' skipped: RuntimeError: plugin bug second line (logged once until it reads again)",
        ),
    ]
    assert all(record.exc_info is None for record in caplog.records)  # never a traceback


@pytest.mark.parametrize(
    ("reading", "problem"),
    [
        ("42", "gave a str"),
        (Reading(metric="bad metric", value=1.0, unit=""), "'bad metric' is not a valid name"),
        (Reading(metric="x", value=float("inf"), unit=""), "value inf is not a finite number"),
        (Reading(metric="x", value=True, unit=""), "value True is not a finite number"),
        (Reading(metric="x", value=1.0, unit=""), None),
    ],
)
def test_unfit_readings_are_refused_with_the_reason(
    reading: object, problem: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    sampler = Sampler([scheduled("plug", Fixed(reading), 1.0)])  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="nerve.edge.sampling"):
        out = sampler.poll(0.0)
    if problem is None:
        assert len(out) == 1
        assert not caplog.records
    else:
        assert out == []
        assert problem in caplog.text
        assert "'plug'" in caplog.text


# --- building the sensors from settings -----------------------------------------------------------


def test_build_sensors_defaults_to_every_builtin(tmp_path: Path) -> None:
    edge = EdgeSettings(interval_s=7, heartbeat_s=70)
    built = build_sensors(edge, proc=tmp_path, thermal=tmp_path)
    assert [one.name for one in built] == ["disk", "cpu", "memory", "load", "temperature"]
    assert {one.interval_s for one in built} == {7}
    assert {one.deadband.heartbeat_s for one in built} == {70}
    assert [one.deadband.deadband for one in built] == [1.0, 5.0, 2.0, 0.25, 1.0]


def test_build_sensors_follows_edge_sensors(tmp_path: Path) -> None:
    asked: list[tuple[str, Mapping[str, object]]] = []

    def load_plugin(name: str, options: Mapping[str, object]) -> Fixed | None:
        asked.append((name, options))
        return Fixed() if name == "good" else None

    edge = EdgeSettings.model_validate(
        {
            "sensors": {
                "load": {"enabled": False},
                "cpu": {"interval_s": 2, "deadband": 0.5, "heartbeat_s": 9},
                "good": {"options": {"port": "/dev/ttyUSB0"}},
                "broken": {},
                "off": {"enabled": False},
            }
        }
    )
    built = build_sensors(edge, proc=tmp_path, thermal=tmp_path, load_plugin=load_plugin)
    assert [one.name for one in built] == ["disk", "cpu", "memory", "temperature", "good"]
    cpu_one = built[1]
    assert (cpu_one.interval_s, cpu_one.deadband.deadband, cpu_one.deadband.heartbeat_s) == (2, 0.5, 9)
    assert built[-1].deadband.deadband == 0.0
    assert asked == [("good", {"port": "/dev/ttyUSB0"}), ("broken", {})]


# --- plugins through entry points -----------------------------------------------------------------


class Thermometer:
    """A plugin sensor: options in, one reading out."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.offset = float(options.get("offset", 0))

    def read(self) -> list[Reading]:
        return [Reading(metric="water", value=12.5 + self.offset, unit="°C")]


def explode(options: Mapping[str, Any]) -> Thermometer:
    raise OSError(f"no device at {options['port']}")


NOT_A_SENSOR = 42


def points(*pairs: tuple[str, str]) -> list[EntryPoint]:
    return [EntryPoint(name=name, value=value, group=SENSOR_ENTRY_POINT_GROUP) for name, value in pairs]


def installed_with(*pairs: tuple[str, str]) -> Any:
    def installed(group: str) -> list[EntryPoint]:
        assert group == SENSOR_ENTRY_POINT_GROUP
        return points(*pairs)

    return installed


HERE = __name__


@pytest.mark.parametrize(
    ("value", "options", "problem"),
    [
        (f"{HERE}:Thermometer", {"offset": 1}, None),
        ("nerve_no_such_module:Sensor", {}, "cannot be loaded: ModuleNotFoundError: No module named"),
        (f"{HERE}:Missing", {}, "cannot be loaded: AttributeError"),
        (f"{HERE}:explode", {"port": "/dev/ttyX"}, "cannot be created: OSError: no device at /dev/ttyX"),
        (f"{HERE}:NOT_A_SENSOR", {}, "is not a factory: int"),
        (f"{HERE}:cpu", {}, "made a Reading, which has no read() method"),
    ],
)
def test_load_sensor_plugin(
    value: str, options: dict[str, Any], problem: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    installed = installed_with(("other", "x:y"), ("water", value))
    with caplog.at_level(logging.INFO, logger="nerve.edge.sensor_plugins"):
        sensor = load_sensor_plugin("water", options, installed=installed)
    assert len(caplog.records) == 1
    record = caplog.records[0]
    assert record.exc_info is None
    assert "\n" not in record.getMessage()
    if problem is None:
        assert sensor is not None
        assert [r.value for r in sensor.read()] == [13.5]
        assert record.levelno == logging.INFO
    else:
        assert sensor is None
        assert record.levelno == logging.ERROR
        assert record.getMessage().startswith(f"sensor plugin 'water' ({value}) ")
        assert problem in record.getMessage()


def test_a_plugin_that_is_not_installed_is_named(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="nerve.edge.sensor_plugins"):
        assert load_sensor_plugin("water", {}, installed=installed_with()) is None
    assert "sensor plugin 'water': no built-in sensor and no installed plugin" in caplog.text
    assert "edge.sensors.water" in caplog.text


def test_a_real_entry_point_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A tiny installed distribution: a module and its .dist-info with an entry_points.txt, found on
    # sys.path by importlib.metadata exactly as a pip-installed plugin is.
    (tmp_path / "nerve_test_water.py").write_text(
        "from nerve.edge.sensors import Reading\n"
        "class Water:\n"
        "    def __init__(self, options):\n"
        "        self.level = options['level']\n"
        "    def read(self):\n"
        "        return [Reading(metric='water', value=self.level, unit='cm')]\n"
    )
    info = tmp_path / "nerve_test_water-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: nerve-test-water\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{SENSOR_ENTRY_POINT_GROUP}]\nwater = nerve_test_water:Water\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    try:
        edge = EdgeSettings.model_validate({"sensors": {"water": {"options": {"level": 42}}}})
        built = build_sensors(edge, proc=tmp_path, thermal=tmp_path)
        assert built[-1].name == "water"
        assert [r.value for r in built[-1].sensor.read()] == [42]
    finally:
        sys.modules.pop("nerve_test_water", None)
