"""`bench/fleet.py`: how several simulators share a fleet and how their summaries add up; a short real run.

The figures themselves are not judged here (timing is the bench's business).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pytest
from hypothesis import given
from hypothesis import strategies as st

if TYPE_CHECKING:
    from types import ModuleType

BENCH: Final = Path(__file__).resolve().parents[1] / "bench"


def _fleet() -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # how python runs the script: its neighbours import by name
    return importlib.import_module("fleet")


@given(devices=st.integers(1, 100_000), simulators=st.integers(1, 16))
def test_the_devices_are_shared_as_evenly_as_can_be(devices: int, simulators: int) -> None:
    shares = _fleet().shares(devices, simulators)
    assert len(shares) == simulators
    assert sum(shares) == devices
    assert max(shares) - min(shares) <= 1


def _summary(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "summary",
        "devices": 10,
        "offered": 100,
        "stored": 100,
        "stored_per_s": 10.0,
        "lost": 0,
        "spikes": 3,
        "commands": 3,
        "lag_p50_ms": 5.0,
        "lag_p99_ms": 9.0,
        "delivered_p99_ms": None,
        "rate": 1.0,
    }
    return {**base, **fields}


def test_summaries_add_up_and_each_latency_is_the_worst() -> None:
    fleet = _fleet()
    one = _summary(lost=1, lag_p99_ms=30.0, delivered_p99_ms=7.0)
    two = _summary(devices=11, stored=90, lag_p50_ms=8.0)
    total = fleet.merged([one, two])
    assert (total["devices"], total["offered"], total["stored"], total["lost"]) == (21, 200, 190, 1)
    assert (total["stored_per_s"], total["spikes"], total["commands"]) == (20.0, 6, 6)
    assert (total["lag_p50_ms"], total["lag_p99_ms"], total["delivered_p99_ms"]) == (8.0, 30.0, 7.0)
    assert total["rate"] == 1.0  # the same for each: not added
    assert total["simulators"] == 2


def test_one_failed_simulator_fails_the_case_and_one_alone_is_itself() -> None:
    fleet = _fleet()
    alone = _summary()
    assert fleet.merged([alone]) is alone
    assert fleet.merged([alone, None]) is None
    assert fleet.merged([]) is None


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_simulators_share_a_small_fleet_end_to_end_with_the_downlink_split_off() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "fleet.py"),
            *("--devices", "200", "--seconds", "4", "--rate", "2", "--drain", "10", "--simulators", "2"),
            "--split-downlink",
        ],
        capture_output=True,
        text=True,
        timeout=230,
        check=False,
    )
    assert done.returncode in {0, 1}, done.stdout + done.stderr  # 1: a target missed on a busy machine
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 200 |")]
    assert rows, done.stdout + done.stderr
    cells = [cell.strip() for cell in rows[-1].split("|")]
    assert cells[2] != "failed", done.stdout
    assert cells[3] == "0", done.stdout  # nothing lost, nothing stored twice
    assert "spikes got no command" not in cells[5], done.stdout  # the downlink's own process sent them
    assert "2 simulators" in done.stdout
    assert "the downlink in a process of its own" in done.stdout
    probe = re.search(r"round trip .* p50 / p99 / max ([\d.]+) / ([\d.]+) / ([\d.]+) ms", done.stdout)
    assert probe, done.stdout  # the probe ran through the case's mosquitto
    p50, p99, worst = (float(group) for group in probe.groups())
    assert 0 < p50 <= p99 <= worst


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_bench_killed_outright_leaves_no_part_running(tmp_path: Path) -> None:
    """kill -9 of the script: its bridge and central go with it (they would fight the next run's for their
    MQTT sessions), as its brokers do. (Its temp dir stays: here under tmp_path.)"""
    bench = subprocess.Popen(
        [sys.executable, str(BENCH / "fleet.py"), "--devices", "50", "--seconds", "60"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    try:
        deadline = time.monotonic() + 60
        parts: list[int] = []
        while time.monotonic() < deadline and len(parts) < 2:
            parts = [pid for pid in _children(bench.pid) if b"nerve" in _cmdline(pid)]
            time.sleep(0.2)
        assert len(parts) >= 2, "the bench never started its bridge and central"
    finally:
        bench.kill()
        bench.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(pid) for pid in parts):
        time.sleep(0.2)
    left = [pid for pid in parts if _alive(pid)]
    for pid in left:  # not left behind for the rest of the suite either
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert not left


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for a parent (init reaps orphans; a zombie here is gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _cpu_groups_here() -> bool:
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    with_cpu = Path("/sys/fs/cgroup/cpu/cgroup.procs").exists() or (
        v2.exists() and "cpu" in v2.read_text().split()
    )
    return os.geteuid() == 0 and with_cpu


@pytest.mark.skipif(not _cpu_groups_here(), reason="needs root and a cgroup CPU controller")
def test_cpu_groups_hold_a_part_cap_it_and_are_removed() -> None:
    fleet = _fleet()
    groups = fleet.CpuGroups()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        groups.add("nats-server", sleeper.pid, cap_percent=25)
        membership = Path(f"/proc/{sleeper.pid}/cgroup").read_text()
        assert f"nerve-bench-{os.getpid()}/nats-server" in membership
        root = groups._root
        if (root.parent / "cgroup.controllers").exists() and root.parent == fleet.CpuGroups.V2:
            assert (root / "nats-server" / "cpu.max").read_text().split()[0] == "25000"
        else:
            assert (root / "nats-server" / "cpu.cfs_quota_us").read_text().strip() == "25000"
    finally:
        groups.close()  # a process still inside goes back to the root group first
        sleeper.kill()
        sleeper.wait()
    assert not root.exists()


@pytest.mark.parametrize("value", ["0", "-5", "1000000"])
def test_a_nats_cap_out_of_range_is_one_line(value: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "fleet.py"), "--nats-cpu", value],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--nats-cpu must be between 1 and 100 per core" in done.stderr
    assert "Traceback" not in done.stderr


def test_what_the_bench_saw_itself_is_added_to_the_summary(tmp_path: Path) -> None:
    fleet = _fleet()
    spool = tmp_path / "data" / "bridge" / "nerve-bridge.spool"
    spool.parent.mkdir(parents=True)
    spool.write_bytes(b"x" * 1000)
    other = tmp_path / "bridge-2" / "bridge" / "nerve-bridge-2.spool"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"x" * 24)
    assert fleet.spool_bytes(tmp_path) == 1024  # every bridge's, together
    usage = fleet.Usage(pids={}, root=tmp_path)
    usage.sample()
    trips = [i / 1000 for i in range(1, 201)]  # 1 to 200 ms
    summary = fleet.observed(_summary(), usage, list(reversed(trips)))
    assert summary["spool_peak_bytes"] == 1024
    assert (summary["probe_p50_ms"], summary["probe_p99_ms"], summary["probe_max_ms"]) == pytest.approx(
        (101.0, 199.0, 200.0)
    )
    assert fleet.observed(None, usage, trips) is None
    assert "probe_max_ms" not in fleet.observed(_summary(), usage, None)
