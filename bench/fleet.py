"""The fleet bench (issue 11): `nerve simulate` against separate processes, 1,000 / 5,000 / 10,000 devices.

Every case gets fresh processes on free ports in a temp dir: mosquitto, nats-server (JetStream), `nerve
bridge`, `nerve central` (the shipped agents), then `nerve simulate --devices N --rate R --spikes S
--duration D --json`. A one-device warm-up run (repeated until everything it sent was stored and its spike
got its command) proves the bridge and central subscribed before the clock starts. While the load runs,
CPU (% of one core, from /proc over the load window) and peak RSS of each process are sampled. Then one
table row per case, with the issue's columns. With `--beyond` it prints the breaking point, the first
fleet size that misses a target (lost > 0, stored < 98 % of offered, lag p99 > 250 ms, spike → command
p99 > 50 ms, a spike without its command): when every case met them, it adds 2,500 devices at a time
past the largest; when one did not, it halves the gap between the largest that passed and the smallest
that failed, down to 500 devices.

    .venv/bin/python bench/fleet.py                                  # 1,000 / 5,000 / 10,000, 150 s each
    .venv/bin/python bench/fleet.py --devices 1000 --seconds 20      # a quick check
    .venv/bin/python bench/fleet.py --beyond                         # and the breaking point
    .venv/bin/python bench/fleet.py --devices 18000 --rate 2 --simulators 2 --seconds 60   # an overload

One `nerve simulate` process offers at most about 17,500 readings/s on this machine; `--simulators N`
splits the devices, spikes and connections between N of them (their CPU and RSS added, each latency
percentile the worst of theirs), to offer more than the stack can store.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from nerve.runtime.config.settings import load_settings
from nerve.runtime.errors import ConfigError
from nerve.runtime.stack.brokers import Mosquitto, NatsServer, die_with_parent, free_port
from nerve.runtime.trust.signing import generate_keypair
from nerve.runtime.wire.client import MqttClient
from nerve.runtime.wire.mqtt import MqttWireError

if TYPE_CHECKING:
    from bench.bridge_throughput import cpu_seconds  # how mypy, run from the repo root, sees it
else:
    from bridge_throughput import cpu_seconds  # next to this script, which is how python runs it

BIN: Final = Path(sys.executable).parent
PAGE: Final = os.sysconf("SC_PAGE_SIZE")
STEP: Final = 2_500
#: Below a failing case, the breaking point is looked for to within this many devices.
BISECT_STEP: Final = 500
BEYOND_LIMIT: Final = 30_000
WARMUP_TRIES: Final = 30
STOP_TIMEOUT_S: Final = 30.0
# The targets.
TARGET_LAG_P99_MS: Final = 250.0
TARGET_COMMAND_P99_MS: Final = 50.0
STORED_SHARE: Final = 0.98
PARTS: Final = ("mosquitto", "nats-server", "bridge", "central", "simulate")


def rss_mib(pid: int | None) -> float:
    """Resident set size of a process in MiB (0 if it is gone)."""
    if pid is None:
        return 0.0
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except OSError:
        return 0.0
    return pages * PAGE / 1048576


@dataclass
class Usage:
    """CPU over the load window and peak RSS, per process."""

    pids: dict[str, int | None]
    began: dict[str, float] = field(default_factory=dict)
    ended: dict[str, float] = field(default_factory=dict)
    peak_rss: dict[str, float] = field(default_factory=dict)
    window: tuple[float, float] = (0.0, 0.0)
    stopped: bool = False
    #: Simulators whose load is not over yet: the window ends with the last one's.
    loads: int = 1
    #: The case's temp dir: the bridges' spools are `<it>/*/bridge/*.spool` (their data dirs).
    root: Path | None = None
    #: The bridges' spools together at their largest, in bytes, while the load lasted.
    peak_spool: int = 0

    def start(self) -> None:
        """The load began (the first of several simulators to say so starts the window)."""
        if self.window[0]:
            return
        self.began = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.window = (time.monotonic(), 0.0)

    def sample(self) -> None:
        """Peak RSS, and CPU so far: a process that exits before `stop` keeps its last sample."""
        for name, pid in self.pids.items():
            if name not in self.began:  # started after the window opened: counted from now
                self.began[name] = cpu_seconds(pid)
            self.peak_rss[name] = max(self.peak_rss.get(name, 0.0), rss_mib(pid))
            used = cpu_seconds(pid)
            if used:
                self.ended[name] = used
        if self.root is not None:
            self.peak_spool = max(self.peak_spool, spool_bytes(self.root))
        self.window = (self.window[0], time.monotonic())

    def stop(self) -> None:
        self.sample()
        self.stopped = True

    def load_over(self) -> None:
        """One simulator's load is over: the window ends once every simulator's is."""
        self.loads -= 1
        if self.loads <= 0 and not self.stopped:
            self.stop()

    def cpu_percent(self, name: str) -> float:
        """% of one core over the window, of `name` and its numbered siblings (`bridge`, `bridge 2`...)."""
        span = max(self.window[1] - self.window[0], 1e-9)
        return sum(
            100 * (self.ended.get(part, 0.0) - self.began.get(part, 0.0)) / span for part in self._named(name)
        )

    def rss(self, name: str) -> float:
        """Peak RSS in MiB of `name`, with its numbered siblings added."""
        return sum(self.peak_rss.get(part, 0.0) for part in self._named(name))

    def _named(self, name: str) -> list[str]:
        return [part for part in self.pids if part == name or part.startswith(f"{name} ")]


def spool_bytes(root: Path) -> int:
    """The bridges' spools under `root` (their data dirs), together, in bytes."""
    total = 0
    for path in root.glob("*/bridge/*.spool"):
        with contextlib.suppress(OSError):  # cut back or gone meanwhile
            total += path.stat().st_size
    return total


class CpuGroups:
    """Each part in a CPU cgroup of its own, all of one weight: how systemd shares the CPU between units.

    Without it every thread of the bench competes with every other (the kernel's fairness is per thread
    within one group): nats-server's many threads and two simulators then take the CPU from a bridge
    that has one busy thread, where on a site box each service is a unit (a cgroup) with the default
    weight, and the devices are other machines. The load generator is one group too (`devices`).
    cgroup v2 (`cpu.weight`) or v1 (`cpu.shares`); needs root. `close` removes the groups.
    """

    V1: Final = Path("/sys/fs/cgroup/cpu")
    V2: Final = Path("/sys/fs/cgroup")

    def __init__(self) -> None:
        name = f"nerve-bench-{os.getpid()}"
        if "cpu" in _read(self.V2 / "cgroup.controllers").split():
            self._root = self.V2 / name
            self._procs = "cgroup.procs"
            (self.V2 / "cgroup.subtree_control").write_text("+cpu")
        elif (self.V1 / "cgroup.procs").exists():
            self._root = self.V1 / name
            self._procs = "cgroup.procs"
        else:
            msg = "no cgroup CPU controller here (/sys/fs/cgroup: neither v2 with cpu nor v1's cpu)"
            raise OSError(msg)
        self._root.mkdir()
        self._groups: list[Path] = []

    def add(self, group: str, pid: int | None, *, cap_percent: float | None = None) -> None:
        """Move process `pid` (every thread of it) into `group`, made on first use; `cap_percent`: the
        group may use at most that much of one core (a stage made slow on purpose)."""
        if pid is None:
            return
        path = self._root / group.replace(" ", "-")
        if not path.exists():
            path.mkdir()
            self._groups.append(path)
        if cap_percent is not None:
            quota = int(cap_percent * 1000)  # of a 100 ms period
            if self._root.parent == self.V2:
                (path / "cpu.max").write_text(f"{quota} 100000")
            else:
                (path / "cpu.cfs_period_us").write_text("100000")
                (path / "cpu.cfs_quota_us").write_text(str(quota))
        with contextlib.suppress(ProcessLookupError):  # gone already
            (path / self._procs).write_text(str(pid))

    def close(self) -> None:
        """Remove the groups; a process still in one (it should have ended) goes back to the root."""
        root_procs = self._root.parent / self._procs
        for path in [*self._groups, self._root]:
            with contextlib.suppress(OSError):
                for pid in _read(path / self._procs).split():
                    with contextlib.suppress(OSError):
                        root_procs.write_text(pid)
                path.rmdir()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


#: How often the probe publishes to itself through mosquitto (`mosquitto_probe`).
PROBE_INTERVAL_S: Final = 0.01
PROBE_TOPIC: Final = "nerve-bench/probe"


async def mosquitto_probe(url: str, stop: asyncio.Event) -> list[float] | None:
    """Round trips, in seconds, of a message a probe client publishes to itself through mosquitto every
    `PROBE_INTERVAL_S` until `stop` (None if it could not connect).

    What a command goes through in mosquitto, without the bridge or JetStream: mosquitto's own stalls
    (an autosave of a large backlog, a pass over thousands of busy sockets) show up here as they are. QoS0
    on a topic outside the prefix (the bridge does not see it); one that has not come back by the end
    counts with how long it has waited.
    """
    loop = asyncio.get_running_loop()
    sent: dict[bytes, float] = {}
    trips: list[float] = []
    try:
        settings = load_settings(overrides={"mqtt": {"url": url}})
        async with MqttClient(settings.mqtt, client_id="nerve-bench-probe") as client:
            await client.subscribe(PROBE_TOPIC)

            async def receive() -> None:
                async for message in client.messages:
                    at = sent.pop(bytes(message.payload), None)
                    if at is not None:
                        trips.append(loop.time() - at)

            receiving = asyncio.create_task(receive())
            try:
                count = 0
                while not stop.is_set():
                    count += 1
                    key = str(count).encode()
                    sent[key] = loop.time()
                    await client.publish(PROBE_TOPIC, key, qos=0)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(PROBE_INTERVAL_S):
                            await stop.wait()
            finally:
                receiving.cancel()
                with contextlib.suppress(asyncio.CancelledError, MqttWireError):
                    await receiving
    except (MqttWireError, OSError) as exc:
        print(f"  the mosquitto probe stopped: {exc}", flush=True)
        if not trips:
            return None
    now = loop.time()
    return trips + [now - at for at in sent.values()]


def clean_env() -> dict[str, str]:
    # A user's NERVE_* settings must not change what the parts do here.
    return {k: v for k, v in os.environ.items() if not k.startswith("NERVE_")}


async def spawn(
    argv: list[str], log: Path, *, stdout: int | None = None, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout if stdout is not None else out,
            stderr=out,
            env={**clean_env(), **(env or {})},
            limit=1 << 20,
            # This script killed (a timeout, kill -9) must not leave a bridge or central running: with
            # the same client ids, they would fight the next case's for their sessions.
            preexec_fn=die_with_parent,
        )


def bridge_env(index: int, count: int, root: Path, *, split: bool = False) -> dict[str, str]:
    """The settings of bridge `index` of `count`: alone, the defaults; several share a `$share` group, each
    with its own client ids and data dir (docs/devices.md, "Several bridges in a `$share` group"). `split`:
    it runs the uplink only, and the process of `downlink_env` the downlink."""
    part = {"NERVE_BRIDGE__PART": "uplink"} if split else {}
    if count == 1:
        return part
    return {
        **part,
        "NERVE_BRIDGE__SHARED_GROUP": "bench",
        "NERVE_BRIDGE__CLIENT_ID": f"nerve-bridge-{index}",
        "NERVE_DATA_DIR": str(root / f"bridge-{index}"),
    }


def downlink_env() -> dict[str, str]:
    """The settings of the downlink's own process (`--split-downlink`; docs/fleet.md): the default client
    ids, which no uplink-only bridge uses for a downlink."""
    return {"NERVE_BRIDGE__PART": "downlink"}


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


def write_config(
    root: Path, mqtt_url: str, nats_url: str, *, overrides: dict[str, Any] | None = None
) -> Path:
    """nerve.yaml for a case; `overrides` (`setting_overrides`) are more settings, by section."""
    key, _ = generate_keypair(root / "keys", "central")
    config = root / "nerve.yaml"
    settings: dict[str, Any] = {
        "data_dir": str(root / "data"),
        "mqtt": {"url": mqtt_url},
        "nats": {"url": nats_url},
        "central": {"signing_key": str(key), "device_keys_dir": str(root / "devices")},
    }
    for section, values in (overrides or {}).items():
        settings[section] = {**settings.get(section, {}), **values}
    config.write_text(json.dumps(settings))  # YAML is a superset of JSON
    return config


def setting_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the flags change from nerve's defaults, by section (`write_config`)."""
    overrides: dict[str, Any] = {}
    if args.telemetry_dedup_s is not None:
        overrides["streams"] = {"telemetry": {"duplicate_window_s": args.telemetry_dedup_s}}
    bridge: dict[str, Any] = {}
    if args.downlink_connections is not None:
        bridge["downlink_connections"] = args.downlink_connections
    if args.spool_bytes is not None:
        bridge["spool_bytes"] = args.spool_bytes
    if bridge:
        overrides["bridge"] = bridge
    return overrides


async def simulate(
    config: Path,
    log: Path,
    argv: list[str],
    usage: Usage | None = None,
    *,
    nice: int = 0,
    name: str = "simulate",
    load_s: float = 0.0,
    groups: CpuGroups | None = None,
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Run `nerve simulate --json` (at CPU priority `nice`); its summary (None if it failed) and seconds.

    `name`: the process's name in `usage` (`simulate 2`... for the others of several); `load_s`: its
    `--duration`, after which `usage` stops counting (once every simulator's load is over); `groups`:
    it runs in the `devices` CPU group.
    """
    process = await spawn(
        [
            *(["nice", "-n", str(nice)] if nice else []),
            str(BIN / "nerve"),
            "simulate",
            "--config",
            str(config),
            "--json",
            *argv,
        ],
        log,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None  # noqa: S101 - piped above
    if groups is not None:
        groups.add("devices", process.pid)
    if usage is not None:
        usage.pids[name] = process.pid
    seconds: list[dict[str, Any]] = []
    summary: dict[str, Any] | None = None
    started = over = False
    async for raw in process.stdout:
        line = json.loads(raw)
        if line["type"] == "second":
            seconds.append(line)
            if usage is not None:
                if not started:
                    usage.start()
                    started = True
                if not usage.stopped:
                    usage.sample()
                if not over and line["t"] >= load_s:  # its load is over; draining
                    over = True
                    usage.load_over()
        else:
            summary = line
            if usage is not None and not over:
                over = True
                usage.load_over()
    await process.wait()
    return summary, seconds


async def run_case(devices: int, args: argparse.Namespace) -> tuple[dict[str, Any] | None, Usage]:
    with tempfile.TemporaryDirectory(prefix="nerve-bench-fleet-") as tmp:
        root = Path(tmp)
        log = root / "processes.log"
        async with (
            Mosquitto(port=free_port(), data_dir=root / "mosquitto") as mosquitto,
            NatsServer(port=free_port(), data_dir=root / "nats-server") as nats_server,
        ):
            config = write_config(root, mosquitto.url, nats_server.url, overrides=setting_overrides(args))
            nerve = str(BIN / "nerve")
            bridges = [
                await spawn(
                    [nerve, "bridge", "--config", str(config), "--log-level", "warning"],
                    log,
                    env=bridge_env(index, args.bridges, root, split=args.split_downlink),
                )
                for index in range(1, args.bridges + 1)
            ]
            named = {
                "bridge" if index == 1 else f"bridge {index}": process.pid
                for index, process in enumerate(bridges, start=1)
            }
            if args.split_downlink:
                bridges.append(
                    await spawn(
                        [nerve, "bridge", "--config", str(config), "--log-level", "warning"],
                        log,
                        env=downlink_env(),
                    )
                )
                named["bridge downlink"] = bridges[-1].pid
            parts = [
                *bridges,
                await spawn([nerve, "central", "--config", str(config), "--log-level", "warning"], log),
            ]
            usage = Usage(
                pids={
                    "mosquitto": mosquitto.pid,
                    "nats-server": nats_server.pid,
                    **named,
                    "central": parts[-1].pid,
                },
                loads=args.simulators,
                root=root,
            )
            groups = CpuGroups() if args.cgroups or args.nats_cpu is not None else None
            if groups is not None:
                for part, pid in usage.pids.items():
                    if args.cgroups or part == "nats-server":
                        cap = args.nats_cpu if part == "nats-server" else None
                        groups.add(part, pid, cap_percent=cap)
            try:
                if not await warm_up(config, log):
                    print(f"  {devices}: warm-up never completed; see {log}")
                    print(log.read_text()[-4000:])
                    return None, usage
                probe_stop = asyncio.Event()
                probing = asyncio.create_task(mosquitto_probe(mosquitto.url, probe_stop))
                summaries = await asyncio.gather(
                    *(
                        simulate(
                            config,
                            log,
                            [
                                "--devices",
                                str(share),
                                "--rate",
                                f"{args.rate:g}",
                                "--spikes",
                                f"{args.spikes / args.simulators:g}",
                                "--duration",
                                f"{args.seconds:g}",
                                "--drain",
                                f"{args.drain:g}",
                                "--connections",
                                str(args.connections // args.simulators),
                            ],
                            usage,
                            nice=args.nice,
                            name="simulate" if index == 0 else f"simulate {index + 1}",
                            load_s=args.seconds,
                            groups=groups if args.cgroups else None,
                        )
                        for index, share in enumerate(shares(devices, args.simulators))
                    )
                )
                probe_stop.set()
                trips = await probing
                summary = observed(merged([found for found, _ in summaries]), usage, trips)
                if summary is None:
                    print(f"  {devices}: nerve simulate failed:\n{log.read_text()[-4000:]}")
                return summary, usage
            finally:
                for process in parts:
                    await stop(process)
                if groups is not None:
                    groups.close()


def observed(
    summary: dict[str, Any] | None, usage: Usage, trips: list[float] | None
) -> dict[str, Any] | None:
    """`summary` with what the bench saw itself: the spools' largest size, the probe's round trips."""
    if summary is None:
        return None
    summary["spool_peak_bytes"] = usage.peak_spool
    if trips:
        trips = sorted(trips)
        summary["probe_p50_ms"] = 1000 * trips[len(trips) // 2]
        summary["probe_p99_ms"] = 1000 * trips[min(len(trips) - 1, int(len(trips) * 0.99))]
        summary["probe_max_ms"] = 1000 * trips[-1]
    return summary


def shares(devices: int, simulators: int) -> list[int]:
    """`devices` split between `simulators` processes as evenly as can be."""
    return [devices // simulators + (index < devices % simulators) for index in range(simulators)]


#: Summary fields that add up over several simulators; `*_ms` fields take the worst (largest) of them.
SUMMED: Final = (
    "devices",
    "connections",
    "offered",
    "offered_per_s",
    "stored",
    "stored_per_s",
    "lost",
    "unacknowledged",
    "duplicates",
    "spikes",
    "commands",
    "spikes_without_command",
    "duplicate_commands",
    "incidents_resolved",
    "incidents_failed",
    "connections_lost",
    "skipped",
    "behind",
)


def merged(summaries: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """One summary of several simulators' (None if one failed): counts and rates added; each latency
    percentile the worst of theirs (percentiles of separate samples cannot be combined exactly)."""
    if not summaries or any(summary is None for summary in summaries):
        return None
    found = [summary for summary in summaries if summary is not None]
    if len(found) == 1:
        return found[0]
    total = dict(found[0])
    for key in total:
        values = [summary.get(key) for summary in found]
        if key in SUMMED:
            total[key] = sum(value or 0 for value in values)
        elif key.endswith("_ms"):
            present = [value for value in values if value is not None]
            total[key] = max(present) if present else None
    total["simulators"] = len(found)
    return total


async def warm_up(config: Path, log: Path) -> bool:
    """True once a one-device run stored everything and got its command: bridge and central are up."""
    argv = ["--devices", "1", "--rate", "5", "--spikes", "1", "--duration", "1.5", "--drain", "5"]
    for _ in range(WARMUP_TRIES):
        summary, _ = await simulate(config, log, argv)
        if (
            summary is not None
            and summary["lost"] == 0
            and summary["stored"] == summary["offered"]
            and summary["spikes_without_command"] == 0
        ):
            return True
        await asyncio.sleep(1.0)
    return False


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.1f} s" if value >= 10_000 else f"{value:.1f} ms"


def _pair(p50: float | None, p99: float | None) -> str:
    """`p50 / p99`, in one unit (seconds once either is 10 s or more)."""
    if max(p50 or 0.0, p99 or 0.0) >= 10_000:
        return f"{(p50 or 0.0) / 1000:.1f} / {(p99 or 0.0) / 1000:.1f} s"
    return f"{_ms(p50).removesuffix(' ms')} / {_ms(p99)}"


def row(devices: int, summary: dict[str, Any] | None, usage: Usage) -> str:
    if summary is None:
        return f"| {devices:,} | failed | | | | |"
    stored = f"{summary['stored_per_s']:,.0f}"
    if summary["stored"] < STORED_SHARE * summary["offered"]:
        stored += f" of {summary['offered_per_s']:,.0f} offered"
    if summary.get("skipped"):
        stored += f" ({summary['skipped']:,} readings not offered: a simulator's queue was full)"
    if summary.get("behind"):
        stored += f" ({summary['behind']:,} readings not made: a simulator could not keep up)"
    lost = f"{summary['lost']}"
    if summary["duplicates"]:
        lost += f", {summary['duplicates']:,} stored twice"
    if summary["unacknowledged"]:
        lost += f" ({summary['unacknowledged']:,} unacknowledged)"
    command = _pair(*_command_ms(summary))
    if summary.get("delivered_p99_ms") is not None:
        handled = _pair(summary["command_p50_ms"], summary["command_p99_ms"])
        command += f" (handled by the simulator: {handled})"
    if summary["spikes_without_command"]:
        command += f"; {summary['spikes_without_command']} of {summary['spikes']} spikes got no command"
    if summary["connections_lost"]:
        lost += f" ({summary['connections_lost']} connections lost)"
    cpu = " / ".join(f"{usage.cpu_percent(name):.0f}" for name in PARTS)
    rss = " / ".join(f"{usage.rss(name):.0f}" for name in PARTS)
    return (
        f"| {devices:,} | {stored} | {lost} | {_pair(summary['lag_p50_ms'], summary['lag_p99_ms'])} "
        f"| {command} | {cpu} | {rss} |"
    )


def where(devices: int, summary: dict[str, Any] | None) -> str:
    """Where a spike's command spent its time, p50 / p99 per part (`nerve simulate`'s summary)."""
    if summary is None or summary.get("central_p50_ms") is None:
        return f"  {devices:,}: no command's path measured"
    parts = (
        ("spike stored", "spike_stored"),
        ("central", "central"),
        ("command to device", "downlink"),
        ("of which command stored", "command_stored"),
        ("stored -> device", "sent_down"),
    )
    probe = ""
    if summary.get("spool_peak_bytes") is not None:
        probe += f"; the bridge's spool at its largest {summary['spool_peak_bytes'] / 1e6:,.1f} MB"
    if summary.get("probe_max_ms") is not None:
        trips = " / ".join(f"{summary[f'probe_{p}_ms']:.1f}" for p in ("p50", "p99", "max"))
        probe += (
            f"; mosquitto round trip (a probe's publish to itself every 10 ms) p50 / p99 / max {trips} ms"
        )
    return (
        f"  {devices:,}: spike -> command ({summary['commands']} commands to {summary['spikes']} spikes), "
        "p50 / p99 of each part: "
        + ", ".join(
            f"{name} {_pair(summary[f'{key}_p50_ms'], summary[f'{key}_p99_ms'])}" for name, key in parts
        )
        + probe
    )


def _command_ms(summary: dict[str, Any]) -> tuple[float | None, float | None]:
    """Spike -> command p50 / p99: as mosquitto delivered it (the watcher), else as the simulator handled
    it."""
    if summary.get("delivered_p99_ms") is not None:
        return summary["delivered_p50_ms"], summary["delivered_p99_ms"]
    return summary["command_p50_ms"], summary["command_p99_ms"]


def misses(summary: dict[str, Any] | None) -> list[str]:
    """The targets a run missed."""
    if summary is None:
        return ["the run failed"]
    found = []
    if summary["lost"]:
        found.append(f"lost {summary['lost']}")
    if summary["stored"] < STORED_SHARE * summary["offered"]:
        found.append(f"stored {summary['stored']} of {summary['offered']}")
    if (summary["lag_p99_ms"] or 0) > TARGET_LAG_P99_MS:
        found.append(f"lag p99 {summary['lag_p99_ms']:.0f} ms > {TARGET_LAG_P99_MS:g}")
    command_p99 = _command_ms(summary)[1] or 0
    if command_p99 > TARGET_COMMAND_P99_MS:
        found.append(f"spike -> command p99 {command_p99:.0f} ms > {TARGET_COMMAND_P99_MS:g}")
    if summary["spikes_without_command"]:
        found.append(f"{summary['spikes_without_command']} spikes without a command")
    return found


HEADER: Final = (
    "| devices | stored/s | lost | lag publish → stored p50 / p99 | spike → command at the device p50 / p99 "
    "| CPU % of one core: " + " / ".join(PARTS) + " | peak RSS MiB: " + " / ".join(PARTS) + " |\n"
    "|---|---|---|---|---|---|---|"
)


async def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, nargs="+", default=[1_000, 5_000, 10_000])
    parser.add_argument("--seconds", type=float, default=150.0, help="load per case (default: 150)")
    parser.add_argument("--rate", type=float, default=1.0, help="readings per second per device")
    parser.add_argument("--spikes", type=float, default=2.0, help="disk spikes per second")
    parser.add_argument("--drain", type=float, default=30.0, help="seconds to wait for the backlog")
    parser.add_argument(
        "--connections", type=int, default=0, help="nerve simulate --connections (default 0: one per device)"
    )
    parser.add_argument(
        "--bridges",
        type=int,
        default=1,
        help="bridge processes, several sharing the uplink in a $share group (default 1)",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run the simulator at this CPU priority (nice), so it takes the box's spare time (default 0)",
    )
    parser.add_argument(
        "--simulators",
        type=int,
        default=1,
        help="nerve simulate processes sharing the devices, spikes and connections (default 1): to offer "
        "more than one process can",
    )
    parser.add_argument(
        "--telemetry-dedup-s",
        type=float,
        default=None,
        help="the telemetry stream's dedup window (streams.telemetry.duplicate_window_s; default: nerve's)",
    )
    parser.add_argument(
        "--downlink-connections",
        type=int,
        default=None,
        help="the bridge's MQTT connections for commands (bridge.downlink_connections; default: nerve's)",
    )
    parser.add_argument(
        "--spool-bytes",
        type=int,
        default=None,
        help="the uplink's spool budget (bridge.spool_bytes; 0: no spool, the backlog waits in mosquitto; "
        "default: nerve's)",
    )
    parser.add_argument(
        "--split-downlink",
        action="store_true",
        help="the bridge's downlink in a process of its own (bridge.part: uplink / downlink), its CPU "
        "and RSS added to the bridge's",
    )
    parser.add_argument(
        "--cgroups",
        action="store_true",
        help="each part in a CPU cgroup of its own, one weight each, as systemd units are; the simulators "
        "together in one (root; cgroup v1 or v2 CPU controller)",
    )
    parser.add_argument(
        "--nats-cpu",
        type=float,
        default=None,
        help="cap nats-server at this %% of one core (a cgroup; root): JetStream made the slow stage on "
        "purpose, to see where the backlog waits",
    )
    parser.add_argument("--beyond", action="store_true", help="then find the breaking point past the largest")
    args = parser.parse_args()
    if args.simulators < 1:
        parser.error("--simulators must be at least 1")
    if args.nats_cpu is not None and not 1 <= args.nats_cpu <= 100 * (os.cpu_count() or 1):
        parser.error("--nats-cpu must be between 1 and 100 per core")
    if args.cgroups or args.nats_cpu is not None:
        try:
            CpuGroups().close()
        except OSError as exc:
            parser.error(f"--cgroups / --nats-cpu: {exc.strerror or exc}")
    try:  # refused here in one line, not by every process of every case
        load_settings(overrides=setting_overrides(args))
    except ConfigError as exc:
        parser.error(str(exc))
    print(
        f"{args.seconds:g} s per case, {args.rate:g} reading/s per device, {args.spikes:g} spikes/s, "
        f"{args.connections or 'one'} MQTT connection(s) {'in all' if args.connections else 'per device'}, "
        f"{os.cpu_count()} cores; processes: {', '.join(PARTS)}"
        + (f" ({args.bridges} bridges in a $share group, CPU and RSS added)" if args.bridges > 1 else "")
        + ("; the downlink in a process of its own (bridge CPU and RSS added)" if args.split_downlink else "")
        + (
            f"; {args.simulators} simulators (their CPU and RSS added; each latency the worst of theirs)"
            if args.simulators > 1
            else ""
        ),
        flush=True,
    )
    rows = []
    paths = []
    passed: list[int] = []
    failing: list[int] = []
    for devices in args.devices:
        summary, usage = await run_case(devices, args)
        rows.append(row(devices, summary, usage))
        paths.append(where(devices, summary))
        print(rows[-1], flush=True)
        (failing if misses(summary) else passed).append(devices)
    if args.beyond:
        rows += await breaking_point(args, passed, failing, paths)
    print()
    print(HEADER)
    print("\n".join(rows))
    print()
    print("\n".join(paths))
    return 1 if failing else 0


async def breaking_point(
    args: argparse.Namespace, passed: list[int], failing: list[int], paths: list[str]
) -> list[str]:
    """The first fleet size that misses a target: past the largest case if every case passed, else
    between the largest that passed and the smallest that failed (halved down to `BISECT_STEP`)."""
    rows = []
    if not failing:
        devices = max(passed)
        while devices < BEYOND_LIMIT:
            devices += STEP
            summary, usage = await run_case(devices, args)
            rows.append(row(devices, summary, usage))
            paths.append(where(devices, summary))
            print(rows[-1], flush=True)
            missed = misses(summary)
            if missed:
                print(f"breaking point: {devices:,} devices ({'; '.join(missed)})")
                return rows
        print(f"no breaking point up to {BEYOND_LIMIT:,} devices")
        return rows
    low = max((devices for devices in passed if devices < min(failing)), default=0)
    high = min(failing)
    while high - low > BISECT_STEP:
        devices = (low + high) // 2 // BISECT_STEP * BISECT_STEP or BISECT_STEP
        if devices in {low, high}:
            break
        summary, usage = await run_case(devices, args)
        rows.append(row(devices, summary, usage))
        paths.append(where(devices, summary))
        print(rows[-1], flush=True)
        if misses(summary):
            high = devices
        else:
            low = devices
    print(f"breaking point: {high:,} devices (largest that met every target: {low:,})")
    return rows


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(main()))
