"""Unit tests of nerve.edge.sensors: statvfs and fixture /proc files, no brokers."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest

from nerve.edge.sensors import (
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
from nerve.runtime.errors import NerveError

if TYPE_CHECKING:
    from pathlib import Path

# total 1000 ticks, idle + iowait 800
STAT_BEFORE = """\
cpu  100 0 100 700 100 0 0 0 0 0
cpu0 50 0 50 350 50 0 0 0 0 0
cpu1 50 0 50 350 50 0 0 0 0 0
intr 12345
ctxt 67890
"""
# total 2000 ticks, idle + iowait 1400; guest (100) is already inside user and must not count
STAT_AFTER = """\
cpu  400 0 200 1200 200 0 0 0 100 0
cpu0 200 0 100 600 100 0 0 0 50 0
cpu1 200 0 100 600 100 0 0 0 50 0
intr 23456
ctxt 78901
"""
MEMINFO = """\
MemTotal:        4000000 kB
MemFree:          500000 kB
MemAvailable:    3000000 kB
Buffers:           10000 kB
Cached:          2000000 kB
"""


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    (tmp_path / "stat").write_text(STAT_BEFORE)
    (tmp_path / "meminfo").write_text(MEMINFO)
    return tmp_path


def test_disk_usage_of_root_is_a_percentage() -> None:
    reading = disk_usage("/")
    assert reading.metric == "disk"
    assert reading.unit == "%"
    assert reading.labels == {"mount": "/"}
    assert 0.0 <= reading.value <= 100.0


def test_disk_usage_computes_like_df(monkeypatch: pytest.MonkeyPatch) -> None:
    # 700 used, 200 available to users, 100 reserved for root: 700 / 900, not 700 / 1000.
    fake = SimpleNamespace(f_blocks=1000, f_bfree=300, f_bavail=200)
    monkeypatch.setattr(os, "statvfs", lambda _path: fake)
    assert disk_usage("/data").value == pytest.approx(700 / 900 * 100)


def test_disk_usage_of_a_filesystem_without_blocks_is_zero(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "statvfs", lambda _path: SimpleNamespace(f_blocks=0, f_bfree=0, f_bavail=0))
    assert disk_usage("/proc").value == 0.0


def test_disk_usage_of_a_missing_mount_raises(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-mount")
    with pytest.raises(SensorError, match="no-such-mount") as info:
        disk_usage(missing)
    assert isinstance(info.value, NerveError)
    assert info.value.metric == "disk"
    assert info.value.source == missing


def test_cpu_first_sample_is_a_baseline_then_the_busy_percent(proc: Path) -> None:
    sampler = CpuSampler(proc=proc)
    assert sampler.sample() is None
    (proc / "stat").write_text(STAT_AFTER)
    reading = sampler.sample()
    assert reading is not None
    assert reading.metric == "cpu"
    assert reading.unit == "%"
    assert reading.labels == {}
    # 1000 ticks passed, 600 of them idle or iowait.
    assert reading.value == pytest.approx(40.0)


def test_cpu_without_ticks_or_with_counters_going_back_is_none(proc: Path) -> None:
    sampler = CpuSampler(proc=proc)
    sampler.sample()
    assert sampler.sample() is None  # no tick passed
    (proc / "stat").write_text(STAT_AFTER)
    sampler.sample()
    (proc / "stat").write_text(STAT_BEFORE)
    assert sampler.sample() is None  # counters went back: a new baseline
    (proc / "stat").write_text(STAT_AFTER)
    reading = sampler.sample()
    assert reading is not None
    assert reading.value == pytest.approx(40.0)


def test_cpu_with_few_columns_counts_the_missing_as_zero(proc: Path) -> None:
    sampler = CpuSampler(proc=proc)
    (proc / "stat").write_text("cpu 100 0 100 800\n")
    sampler.sample()
    (proc / "stat").write_text("cpu 200 0 200 1600\n")
    reading = sampler.sample()
    assert reading is not None
    assert reading.value == pytest.approx(20.0)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("intr 1\nctxt 2\n", "no aggregate 'cpu' line"),
        ("cpu 1 2 x 4\n", "malformed"),
        ("cpu 1 2\n", "malformed"),
        ("cpu\n", "malformed"),
    ],
)
def test_cpu_with_a_bad_stat_file_raises(proc: Path, content: str, reason: str) -> None:
    (proc / "stat").write_text(content)
    with pytest.raises(SensorError, match=reason) as info:
        CpuSampler(proc=proc).sample()
    assert info.value.metric == "cpu"


def test_cpu_without_a_stat_file_raises(tmp_path: Path) -> None:
    with pytest.raises(SensorError) as info:
        CpuSampler(proc=tmp_path).sample()
    assert info.value.source == str(tmp_path / "stat")


def test_memory_from_meminfo(proc: Path) -> None:
    reading = memory_usage(proc=proc)
    assert reading.metric == "memory"
    assert reading.unit == "%"
    assert reading.labels == {}
    assert reading.value == pytest.approx(25.0)  # (4000000 - 3000000) / 4000000


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("MemTotal: 4000000 kB\nMemFree: 1 kB\n", "no MemAvailable"),
        ("MemFree: 1 kB\n", "no MemTotal or MemAvailable"),
        ("MemTotal: 0 kB\nMemAvailable: 0 kB\n", "MemTotal is 0"),
        ("MemTotal: lots\nMemAvailable: 1 kB\n", "malformed"),
        ("MemTotal:\nMemAvailable: 1 kB\n", "malformed"),
    ],
)
def test_memory_with_a_bad_meminfo_raises(proc: Path, content: str, reason: str) -> None:
    (proc / "meminfo").write_text(content)
    with pytest.raises(SensorError, match=reason) as info:
        memory_usage(proc=proc)
    assert info.value.metric == "memory"


def test_memory_without_meminfo_raises(tmp_path: Path) -> None:
    with pytest.raises(SensorError, match="meminfo"):
        memory_usage(proc=tmp_path)


def test_the_real_proc_gives_percentages() -> None:
    assert 0.0 <= memory_usage().value <= 100.0
    sampler = CpuSampler()
    assert sampler.sample() is None
    reading = sampler.sample()  # None when no clock tick passed in between
    assert reading is None or 0.0 <= reading.value <= 100.0


def test_read_all_skips_a_missing_mount_and_logs_it(
    proc: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = str(tmp_path / "gone")
    sampler = CpuSampler(proc=proc)
    with caplog.at_level(logging.WARNING, logger="nerve.edge.sensors"):
        readings = read_all(["/", missing], sampler, proc=proc)
    # The cpu sampler's first call is only a baseline.
    assert [(r.metric, dict(r.labels)) for r in readings] == [
        ("disk", {"mount": "/"}),
        ("memory", {}),
    ]
    assert [record.levelno for record in caplog.records] == [logging.WARNING]
    assert missing in caplog.text

    (proc / "stat").write_text(STAT_AFTER)
    readings = read_all(["/"], sampler, proc=proc)
    assert [r.metric for r in readings] == ["disk", "cpu", "memory"]


def test_read_all_skips_a_broken_proc_file(proc: Path, caplog: pytest.LogCaptureFixture) -> None:
    (proc / "meminfo").unlink()
    with caplog.at_level(logging.WARNING, logger="nerve.edge.sensors"):
        readings = read_all([], CpuSampler(proc=proc), proc=proc)
    assert readings == []
    assert "memory sensor" in caplog.text


def test_a_reading_is_read_only() -> None:
    labels = {"mount": "/"}
    reading = Reading(metric="disk", value=1.0, unit="%", labels=labels)
    labels["mount"] = "/changed"
    assert reading.labels == {"mount": "/"}
    with pytest.raises(TypeError):
        reading.labels["mount"] = "/x"  # type: ignore[index]
    assert reading == Reading(metric="disk", value=1.0, unit="%", labels={"mount": "/"})
    assert Reading(metric="cpu", value=1.0, unit="%").labels == {}


# --- load and temperature -------------------------------------------------------------------------


def test_load_from_loadavg(proc: Path) -> None:
    (proc / "loadavg").write_text("0.45 0.28 0.12 2/144 7055\n")
    reading = load_average(proc=proc)
    assert (reading.metric, reading.value, reading.unit, dict(reading.labels)) == ("load", 0.45, "tasks", {})
    assert LoadSensor(proc=proc).read() == [reading]


@pytest.mark.parametrize("content", ["", "high 0.2 0.1\n", "-1 0 0 1/1 1\n", "nan 0 0\n"])
def test_load_with_a_bad_loadavg_raises(proc: Path, content: str) -> None:
    (proc / "loadavg").write_text(content)
    with pytest.raises(SensorError, match="malformed") as info:
        load_average(proc=proc)
    assert info.value.metric == "load"
    assert info.value.source == str(proc / "loadavg")


def test_load_without_loadavg_raises(tmp_path: Path) -> None:
    with pytest.raises(SensorError, match="loadavg"):
        load_average(proc=tmp_path)


def zone(thermal: Path, name: str, temp: str | None, kind: str | None = None) -> Path:
    path = thermal / name
    path.mkdir(parents=True)
    if temp is not None:
        (path / "temp").write_text(temp)
    if kind is not None:
        (path / "type").write_text(kind + "\n")
    return path


def test_temperature_per_zone_in_celsius(tmp_path: Path) -> None:
    thermal = tmp_path / "thermal"
    zone(thermal, "thermal_zone10", "30000\n")
    zone(thermal, "thermal_zone0", "48312\n", kind="cpu-thermal")
    zone(thermal, "thermal_zone2", "-5000\n")
    (thermal / "cooling_device0").mkdir()  # not a zone
    readings = temperatures(thermal=thermal)
    assert [(r.metric, r.value, r.unit, dict(r.labels)) for r in readings] == [
        ("temperature", 48.312, "°C", {"zone": "thermal_zone0", "type": "cpu-thermal"}),
        ("temperature", -5.0, "°C", {"zone": "thermal_zone2"}),
        ("temperature", 30.0, "°C", {"zone": "thermal_zone10"}),
    ]


def test_no_thermal_zones_is_no_readings_and_no_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        assert temperatures(thermal=tmp_path / "absent") == []
        assert TemperatureSensor(thermal=tmp_path / "absent").read() == []
        (tmp_path / "empty").mkdir()
        assert TemperatureSensor(thermal=tmp_path / "empty").read() == []
    assert caplog.records == []


def test_a_bad_zone_is_skipped_and_logged_once_until_it_reads_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    thermal = tmp_path / "thermal"
    zone(thermal, "thermal_zone0", "41000")
    bad = zone(thermal, "thermal_zone1", "garbage")
    zone(thermal, "thermal_zone2", None)  # no temp file (EIO-like)
    with pytest.raises(SensorError, match="malformed"):
        temperatures(thermal=thermal)
    sensor = TemperatureSensor(thermal=thermal)
    with caplog.at_level(logging.WARNING, logger="nerve.edge.sensors"):
        for _ in range(3):
            assert [r.labels["zone"] for r in sensor.read()] == ["thermal_zone0"]
    assert len(caplog.records) == 2  # one per bad zone, not one per read
    assert "thermal_zone1" in caplog.records[0].getMessage()
    caplog.clear()
    (bad / "temp").write_text("42000")
    with caplog.at_level(logging.WARNING, logger="nerve.edge.sensors"):
        assert len(sensor.read()) == 2
        (bad / "temp").write_text("broken again")
        sensor.read()
        sensor.read()
    assert len(caplog.records) == 1


def test_disk_sensor_skips_a_missing_mount_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = str(tmp_path / "gone")
    sensor = DiskSensor(["/", missing])
    with caplog.at_level(logging.WARNING, logger="nerve.edge.sensors"):
        for _ in range(3):
            assert [r.labels["mount"] for r in sensor.read()] == ["/"]
    assert len(caplog.records) == 1
    assert missing in caplog.text


def test_builtin_sensors_are_sensors(proc: Path) -> None:
    (proc / "loadavg").write_text("1.5 1 1 1/1 1\n")
    for sensor in (DiskSensor(["/"]), CpuSensor(proc=proc), MemorySensor(proc=proc), LoadSensor(proc=proc)):
        assert isinstance(sensor, Sensor)
    cpu = CpuSensor(proc=proc)
    assert cpu.read() == []  # the baseline
    (proc / "stat").write_text(STAT_AFTER)
    assert [r.value for r in cpu.read()] == [pytest.approx(40.0)]
    assert [r.value for r in MemorySensor(proc=proc).read()] == [pytest.approx(25.0)]
