"""Footprint of `nerve edge` on a device: time to first reading, steady-state RSS and CPU, with baselines.

Starts its own mosquitto on a free port in a temp dir, writes a key pair and trusts its public half, gives
the device its own key to sign results with (so the daemon starts without warnings), subscribes to
`nerve/bench-edge/telemetry/#`, then runs `<venv>/bin/nerve edge` as a user would, in a fresh data dir,
with no inherited `NERVE_*` variable.
It times exec -> first reading received (and the CPU the process used by then), then watches the
process for `--duration` seconds of steady state: RSS (VmRSS, peak VmHWM) from /proc/<pid>/status and
CPU (utime + stime) from /proc/<pid>/stat.
In the same window it measures what the memory is made of: a python that imports nothing, a python
with paho-mqtt connected to the same mosquitto, and a python that has imported `nerve.edge.daemon`.
Then it stops the edge with SIGTERM, prints the ten costliest imports of `nerve.edge.daemon`
(`-X importtime`), whether nats-py gets imported, and the verdict for each target of issue 4.

    .venv/bin/python bench/edge_footprint.py [--duration 60] [--interval 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import nerve.edge
import nerve.runtime
from nerve.runtime.config.settings import MqttSettings
from nerve.runtime.stack.brokers import Mosquitto, free_port
from nerve.runtime.subjects import DEFAULT_PREFIX
from nerve.runtime.trust.signing import generate_keypair
from nerve.runtime.wire.client import MqttClient
from nerve.runtime.wire.mqtt import MqttWireError

DEVICE: Final = "bench-edge"
# Issue 8's targets (issue 4's were 30 MiB and 0.5 s).
TARGET_RSS_MIB: Final = 24.0
TARGET_CPU_PERCENT: Final = 1.0
TARGET_START_S: Final = 0.4
FIRST_READING_TIMEOUT_S: Final = 30.0
READY_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 30.0
TOP_IMPORTS: Final = 10
NERVE_SOURCES: Final = [Path(nerve.edge.__file__).parent, Path(nerve.runtime.__file__).parent]
KIB: Final = 1024
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")

# Each baseline prints "ready" once it is where it will stay, then idles until it is stopped.
BARE_PYTHON: Final = "import time; print('ready', flush=True); time.sleep(86400)"
PAHO_CONNECTED: Final = """\
import sys
import paho.mqtt.client as mqtt

def on_connect(client, userdata, flags, reason, properties):
    print("refused: %s" % reason if reason.is_failure else "ready", flush=True)

client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-paho", protocol=mqtt.MQTTv5)
client.on_connect = on_connect
client.connect("127.0.0.1", int(sys.argv[1]))
client.loop_forever()  # sleeps in select(), sending only the keepalive pings
"""
EDGE_IMPORTS: Final = "import time, nerve.edge.daemon; print('ready', flush=True); time.sleep(86400)"
# The same with OpenSSL kept out, as the lean process does for a plain mqtt:// broker (nerve.edge.main).
EDGE_IMPORTS_NO_OPENSSL: Final = (
    "import sys; sys.modules.update(dict.fromkeys(('ssl', '_ssl', '_hashlib'))); " + EDGE_IMPORTS
)
# Everything `nerve edge` imports before it runs: the command line, then the daemon it loads.
NATS_CHECK: Final = (
    "import sys, nerve.runtime.cli.main, nerve.edge.daemon; "
    "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] == 'nats')))"
)
NATS_IN_MAPS: Final = re.compile(r"/nats[-_./]")
IMPORTTIME_LINE: Final = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|\s+(\S+)$")


@dataclass(frozen=True, slots=True)
class Memory:
    """What /proc/<pid>/status says about a process's memory, in KiB."""

    rss: int
    hwm: int
    anon: int
    file: int

    @classmethod
    def of(cls, pid: int) -> Memory:
        values: dict[str, int] = {}
        for raw in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
            key, _, rest = raw.partition(":")
            if key in {"VmRSS", "VmHWM", "RssAnon", "RssFile"}:
                values[key] = int(rest.split()[0])
        return cls(rss=values["VmRSS"], hwm=values["VmHWM"], anon=values["RssAnon"], file=values["RssFile"])

    def line(self, name: str) -> str:
        return (
            f"  {name:<44} {mib(self.rss):6.1f} MiB   peak {mib(self.hwm):6.1f} MiB   "
            f"(anon {mib(self.anon):5.1f}, file-backed {mib(self.file):5.1f})"
        )


@dataclass(frozen=True, slots=True)
class ImportCost:
    """One line of `python -X importtime`: microseconds for the module alone and with what it imported."""

    module: str
    self_us: int
    cumulative_us: int


def mib(kib: int) -> float:
    return kib / KIB


def cpu_ticks(pid: int) -> int:
    """utime + stime of every thread of `pid`, in clock ticks."""
    stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    # The command name (field 2) may hold spaces and parentheses: count fields after its last ")".
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def python_env() -> dict[str, str]:
    """The environment of every child: ours, without any NERVE_* setting the caller's shell may carry."""
    return {key: value for key, value in os.environ.items() if not key.startswith("NERVE_")}


async def start_baseline(code: str, *argv: str) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        env=python_env(),
    )
    if process.stdout is None:
        msg = "no stdout pipe"
        raise RuntimeError(msg)
    async with asyncio.timeout(READY_TIMEOUT_S):
        said = (await process.stdout.readline()).decode().strip()
    if said != "ready":
        msg = f"baseline exited with {await process.wait()} saying {said!r}: {code.splitlines()[0]}"
        raise RuntimeError(msg)
    return process


async def stop(process: asyncio.subprocess.Process) -> tuple[int, float]:
    """SIGTERM, then SIGKILL if it hangs; returns the exit code and how long the stop took."""
    started = time.perf_counter()
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(STOP_TIMEOUT_S):
            code = await process.wait()
    except TimeoutError:
        process.kill()
        code = await process.wait()
    return code, time.perf_counter() - started


async def run_python(*argv: str) -> tuple[str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=python_env(),
    )
    async with asyncio.timeout(READY_TIMEOUT_S):
        out, err = await process.communicate()
    if process.returncode != 0:
        msg = f"python {' '.join(argv)} exited with {process.returncode}: {err.decode()[-500:]}"
        raise RuntimeError(msg)
    return out.decode(), err.decode()


async def import_costs() -> list[ImportCost]:
    """`-X importtime` of `import nerve.edge.daemon`, run twice: the second, warm run is kept."""
    costs: list[ImportCost] = []
    for _ in range(2):
        _, err = await run_python("-X", "importtime", "-c", "import nerve.edge.daemon")
        costs = []
        for raw in err.splitlines():
            match = IMPORTTIME_LINE.match(raw)
            if match is not None:
                self_us, cumulative_us, module = match.groups()
                costs.append(ImportCost(module, int(self_us), int(cumulative_us)))
    return costs


def print_import_costs(costs: list[ImportCost]) -> None:
    def row(cost: ImportCost) -> str:
        return f"  {cost.cumulative_us / 1000:7.1f} ms  (self {cost.self_us / 1000:5.1f} ms)  {cost.module}"

    total = max((cost.cumulative_us for cost in costs), default=0)
    print(
        f"\nimport nerve.edge.daemon (python -X importtime, warm run): "
        f"{total / 1000:.1f} ms, {len(costs)} modules"
    )
    print(f"top {TOP_IMPORTS} by cumulative time (modules nest: a parent's time includes its children's):")
    for cost in sorted(costs, key=lambda c: c.cumulative_us, reverse=True)[:TOP_IMPORTS]:
        print(row(cost))
    # The first import of each top-level package outside nerve: what it costs to depend on it.
    packages = [cost for cost in costs if "." not in cost.module and cost.module != "nerve"]
    print(f"top {TOP_IMPORTS} packages outside nerve (first import, with what it pulls in):")
    for cost in sorted(packages, key=lambda c: c.cumulative_us, reverse=True)[:TOP_IMPORTS]:
        print(row(cost))


def nats_mapped(pid: int) -> list[str]:
    """The files mapped into `pid` whose path names nats (a /proc read: it never blocks)."""
    maps = Path(f"/proc/{pid}/maps").read_text(encoding="ascii", errors="replace")
    return sorted({raw.split()[-1] for raw in maps.splitlines() if NATS_IN_MAPS.search(raw)})


async def nats_imported(pid: int) -> tuple[bool, str]:
    """Whether the edge has nats-py loaded: its memory maps, then a child doing the edge's imports."""
    mapped = nats_mapped(pid)
    out, _ = await run_python("-c", NATS_CHECK)
    modules = out.split()
    installed = importlib.util.find_spec("nats") is not None
    detail = (
        f"/proc/{pid}/maps: {', '.join(mapped) or 'no nats path'} (nats-py is pure Python: only a native "
        f"part would show there); `import nerve.runtime.cli.main, nerve.edge.daemon` loads "
        f"{', '.join(modules) or 'no nats module'} (nats-py {'is' if installed else 'is NOT'} installed here)"
    )
    return bool(mapped or modules), detail


async def start_edge(tmp: Path, broker_url: str, interval: float) -> tuple[asyncio.subprocess.Process, float]:
    """Start `nerve edge`; returns it and the perf_counter() taken just before the exec."""
    keys = tmp / "keys"
    generate_keypair(keys, "central")
    device_key, _ = generate_keypair(tmp / "device-keys", DEVICE)  # the device signs its results
    env = {
        **python_env(),
        "NERVE_DATA_DIR": str(tmp / "data"),
        "NERVE_EDGE__INTERVAL_S": f"{interval:g}",
        "NERVE_EDGE__TRUSTED_KEYS_DIR": str(keys),
        "NERVE_EDGE__SIGNING_KEY": str(device_key),
    }
    nerve = Path(sys.executable).parent / "nerve"
    # A file, not a pipe: nobody reads the daemon's log while it runs.
    with (tmp / "edge.log").open("wb") as log:
        exec_at = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            str(nerve),
            "edge",
            "--device",
            DEVICE,
            "--mqtt-url",
            broker_url,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
    return process, exec_at


async def main() -> int:  # noqa: PLR0915 - one straight measurement script, clearer unsplit
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="steady-state seconds (default: 60)")
    parser.add_argument("--interval", type=float, default=10.0, help="edge.interval_s (default: 10)")
    args = parser.parse_args()
    # As an installed device has them (pip compiles them at install): compiling at import costs RSS too.
    await run_python("-m", "compileall", "-q", *(str(path) for path in NERVE_SOURCES))
    with tempfile.TemporaryDirectory(prefix="nerve-bench-") as name:
        tmp = Path(name)
        async with Mosquitto(port=free_port(), data_dir=tmp / "mosquitto") as broker:
            settings = MqttSettings(url=broker.url)
            arrivals: list[float] = []
            first = asyncio.Event()
            async with MqttClient(settings, client_id="bench-footprint") as client:
                await client.subscribe(f"{DEFAULT_PREFIX}/{DEVICE}/telemetry/#")

                async def receive() -> None:
                    async for _ in client.messages:
                        arrivals.append(time.perf_counter())
                        first.set()

                receiver = asyncio.create_task(receive())
                baselines: list[asyncio.subprocess.Process] = []
                edge, exec_at = await start_edge(tmp, broker.url, args.interval)
                try:
                    try:
                        async with asyncio.timeout(FIRST_READING_TIMEOUT_S):
                            await first.wait()
                    except TimeoutError:
                        log = (tmp / "edge.log").read_text(errors="replace")[-2000:]
                        print(f"no reading within {FIRST_READING_TIMEOUT_S:g}s; the edge's log:\n{log}")
                        return 1
                    start_s = arrivals[0] - exec_at
                    # CPU by then, both processes of `nerve edge` (an exec keeps the counts): a figure that a
                    # loaded (shared) box stretches far less than the wall-clock time above.
                    start_cpu_s = cpu_ticks(edge.pid) / CLOCK_TICKS
                    window_start, ticks_start = time.perf_counter(), cpu_ticks(edge.pid)
                    readings_before = len(arrivals)
                    # The baselines settle while the edge runs: read side by side at the window's end.
                    baselines.append(await start_baseline(BARE_PYTHON))
                    baselines.append(await start_baseline(PAHO_CONNECTED, str(broker.port)))
                    baselines.append(await start_baseline(EDGE_IMPORTS))
                    baselines.append(await start_baseline(EDGE_IMPORTS_NO_OPENSSL))
                    await asyncio.sleep(args.duration - (time.perf_counter() - window_start))
                    ticks_end, window_end = cpu_ticks(edge.pid), time.perf_counter()
                    edge_memory = Memory.of(edge.pid)
                    bare, paho, imports, lean = (Memory.of(process.pid) for process in baselines)
                    readings = len(arrivals) - readings_before
                    nats, nats_detail = await nats_imported(edge.pid)
                finally:
                    for process in baselines:
                        await stop(process)
                    code, stop_s = await stop(edge)
                    receiver.cancel()
                    with contextlib.suppress(asyncio.CancelledError, MqttWireError):
                        await receiver
        log_lines = (tmp / "edge.log").read_text(errors="replace").splitlines()
    costs = await import_costs()

    window_s = window_end - window_start
    cpu_percent = (ticks_end - ticks_start) / CLOCK_TICKS / window_s * 100
    complaints = [raw for raw in log_lines if " WARNING " in raw or " ERROR " in raw or "Traceback" in raw]
    bytecode = "; nerve's bytecode compiled first, as pip does at install"
    print(
        f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}; "
        f"interval {args.interval:g} s; window {window_s:.1f} s{bytecode}"
    )
    print(
        f"nerve edge: first reading {start_s:.3f} s after exec ({start_cpu_s:.2f} s of CPU by then, "
        f"1/{CLOCK_TICKS} s ticks); {readings} readings in the window"
    )
    print(f"nerve edge: {len(complaints)} warnings or errors in its log")
    for raw in complaints:
        print(f"  {raw}")
    print(f"\nmemory after {window_s:.0f} s (VmRSS; peak is VmHWM):")
    print(bare.line("baseline: python, nothing imported"))
    print(paho.line("baseline: python + paho-mqtt, connected"))
    print(imports.line("baseline: python + import nerve.edge.daemon"))
    print(lean.line("baseline: the same, OpenSSL kept out"))
    print(edge_memory.line("nerve edge (plain mqtt://: no OpenSSL)"))
    print(
        f"  where it goes: interpreter {mib(bare.rss):.1f} MiB, + nerve.edge's imports without OpenSSL "
        f"{mib(lean.rss - bare.rss):+.1f}, + running (settings, session, outbox, journal) "
        f"{mib(edge_memory.rss - lean.rss):+.1f}; OpenSSL (an mqtts:// broker or a plugin) would add "
        f"{mib(imports.rss - lean.rss):+.1f}"
    )
    print(
        f"\nCPU: {cpu_percent:.3f} % of one core over {window_s:.1f} s "
        f"({ticks_end - ticks_start} ticks of 1/{CLOCK_TICKS} s, utime + stime)"
    )
    print_import_costs(costs)
    print(f"\nnerve edge stopped by SIGTERM in {stop_s:.2f}s with exit code {code}")
    rss_mib = mib(edge_memory.rss)
    checks = {
        f"target RSS <= {TARGET_RSS_MIB:g} MiB": (rss_mib <= TARGET_RSS_MIB, f"{rss_mib:.1f} MiB"),
        f"target CPU <= {TARGET_CPU_PERCENT:g} %": (
            cpu_percent <= TARGET_CPU_PERCENT,
            f"{cpu_percent:.3f} %",
        ),
        f"target start <= {TARGET_START_S:g} s": (start_s <= TARGET_START_S, f"{start_s:.3f} s"),
        "nats-py not imported by the edge": (not nats, nats_detail),
        "quiet run, clean stop": (
            code == 0 and not complaints,
            f"exit code {code}, {len(complaints)} warnings or errors logged",
        ),
    }
    for name, (ok, detail) in checks.items():
        print(f"{name}: {'PASS' if ok else 'FAIL'} ({detail})")
    return 0 if all(ok for ok, _ in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
