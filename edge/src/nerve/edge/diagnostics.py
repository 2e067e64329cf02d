"""`collect_diagnostics`: disk, memory, load and the top processes, read from /proc (no psutil).

Read-only and idempotent. The top processes come from two reads of `/proc/<pid>/stat` half a second
apart: CPU % over that half second (100 % is one core busy), RSS from the second read. Processes
that vanish in between, or whose files cannot be read, are left out.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from nerve.edge.actions import ActionArgumentError
from nerve.edge.system_actions import check_arguments

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = ["CollectDiagnostics"]

DEFAULT_TOP: Final = 5
MAX_TOP: Final = 50
_SAMPLE_S: Final = 0.5
_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
_PAGE: Final = os.sysconf("SC_PAGE_SIZE")
_KIB: Final = 1024
_MEMINFO_KEYS: Final = ("MemTotal", "MemAvailable", "MemFree", "Buffers", "Cached", "SwapTotal", "SwapFree")


@dataclass(frozen=True, slots=True)
class ProcessSample:
    """One process at one moment: CPU time used so far (s) and resident memory (bytes)."""

    pid: int
    name: str
    cpu_s: float
    rss_bytes: int


def sample_processes(proc: Path = Path("/proc")) -> dict[int, ProcessSample]:
    """Every process readable in `proc` now, by pid."""
    samples: dict[int, ProcessSample] = {}
    try:
        entries = list(proc.iterdir())
    except OSError:
        return samples
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_bytes()
        except OSError:
            continue  # gone, or not ours to read
        sample = _parse_stat(int(entry.name), raw)
        if sample is not None:
            samples[sample.pid] = sample
    return samples


def _parse_stat(pid: int, raw: bytes) -> ProcessSample | None:
    # The name is in parentheses and may itself hold spaces and ')': split at the last ')'.
    head, _, tail = raw.rpartition(b")")
    name = head.partition(b"(")[2].decode("utf-8", "replace")
    fields = tail.split()
    try:
        # Fields after the name, 0-based: 11 utime, 12 stime, 21 rss (pages) (stat(5), minus 3).
        cpu = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
        rss = int(fields[21]) * _PAGE
    except (IndexError, ValueError):
        return None
    return ProcessSample(pid=pid, name=name, cpu_s=cpu, rss_bytes=rss)


def memory(proc: Path = Path("/proc")) -> dict[str, int]:
    """`/proc/meminfo`'s main lines, in bytes (`MemTotal_bytes`, `MemAvailable_bytes`, …)."""
    found: dict[str, int] = {}
    try:
        lines = (proc / "meminfo").read_text(encoding="ascii").splitlines()
    except OSError:
        return found
    for line in lines:
        key, _, rest = line.partition(":")
        if key in _MEMINFO_KEYS:
            parts = rest.split()
            if parts and parts[0].isdigit():
                found[f"{key}_bytes"] = int(parts[0]) * (_KIB if parts[1:] == ["kB"] else 1)
    return found


def disks(mounts: Sequence[str]) -> list[dict[str, Any]]:
    """Size, used and free bytes of each mount; a mount that cannot be read carries its error."""
    report: list[dict[str, Any]] = []
    for mount in mounts:
        try:
            st = os.statvfs(mount)
        except OSError as exc:
            report.append({"mount": mount, "error": exc.strerror or type(exc).__name__})
            continue
        total = st.f_blocks * st.f_frsize
        free = st.f_bavail * st.f_frsize
        used = total - st.f_bfree * st.f_frsize
        percent = round(100.0 * used / (used + free), 1) if used + free else 0.0
        report.append(
            {
                "mount": mount,
                "total_bytes": total,
                "used_bytes": used,
                "free_bytes": free,
                "used_percent": percent,
            }
        )
    return report


def _row(sample: ProcessSample, cpu_percent: float) -> dict[str, Any]:
    return {"pid": sample.pid, "name": sample.name, "rss_bytes": sample.rss_bytes, "cpu_percent": cpu_percent}


class CollectDiagnostics:
    """`collect_diagnostics`: disks (the configured mounts), memory, load, top processes by RSS and CPU."""

    name: Final = "collect_diagnostics"
    idempotent: Final = True

    def __init__(
        self, mounts: Sequence[str], *, proc: Path = Path("/proc"), sample_s: float = _SAMPLE_S
    ) -> None:
        self._mounts = tuple(mounts)
        self._proc = proc
        self._sample_s = sample_s

    def validate(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        """`top`: how many processes to list in each ranking, 1 to 50 (default 5)."""
        check_arguments(self.name, args, ("top",))
        value = args.get("top", DEFAULT_TOP)
        expected = f"a whole number from 1 to {MAX_TOP}"
        if isinstance(value, bool) or not isinstance(value, int):
            raise ActionArgumentError(self.name, "top", expected, f"is a {type(value).__name__}")
        if not 1 <= value <= MAX_TOP:
            raise ActionArgumentError(self.name, "top", expected, f"is {value}")
        return {"top": value}

    def run(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Collect; blocks for the CPU sample (half a second)."""
        top = int(args["top"])
        before = sample_processes(self._proc)
        started = time.monotonic()
        time.sleep(self._sample_s)
        after = sample_processes(self._proc)
        elapsed = max(time.monotonic() - started, 1e-6)
        rows: list[tuple[ProcessSample, float]] = []
        for pid, now in after.items():
            then = before.get(pid)
            cpu = max(now.cpu_s - then.cpu_s, 0.0) / elapsed * 100 if then is not None else 0.0
            rows.append((now, round(cpu, 1)))
        by_rss = sorted(rows, key=lambda row: (-row[0].rss_bytes, row[0].pid))[:top]
        by_cpu = sorted(rows, key=lambda row: (-row[1], -row[0].rss_bytes, row[0].pid))[:top]
        load = os.getloadavg()
        mem = memory(self._proc)
        return {
            "disks": disks(self._mounts),
            "memory": mem,
            "load": [round(value, 2) for value in load],
            "processes": len(after),
            "top_rss": [_row(*row) for row in by_rss],
            "top_cpu": [_row(*row) for row in by_cpu],
            "summary": (
                f"{len(after)} processes; load {load[0]:.2f}; "
                f"{mem.get('MemAvailable_bytes', 0) // (_KIB * _KIB)} MiB memory available"
            ),
        }
