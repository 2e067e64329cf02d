"""`nerve simulate`: N simulated devices through the real MQTT path, measured live (docs/fleet.md).

The parser is built without importing nats-py (an edge-only install has none); the run imports
`nerve.runtime.fleet` when it starts.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Final, TextIO

if TYPE_CHECKING:
    import argparse

    from nerve.runtime.config.settings import Settings
    from nerve.runtime.fleet import Second, Summary

EXIT_OK: Final = 0
EXIT_LOST: Final = 1  # something acknowledged by mosquitto was never stored
EXIT_INTERRUPTED: Final = 130


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add `nerve simulate` to the `nerve` command's subcommands."""
    simulate = sub.add_parser(
        "simulate",
        parents=[common],
        help="drive N simulated devices through mosquitto, the bridge and central; print rates and latencies",
        description="Each simulated device (sim-<run>-00000, ...) has its own MQTT client id and "
        "publishes one QoS1 reading every 1/RATE s (cpu, memory, disk in turn); SPIKES times a second a "
        "distinct device reports its disk above the runbook's threshold and answers central's clear_temp "
        "with a signed result. Prints a line a second and a summary; exit 1 if a reading mosquitto "
        "acknowledged was never stored. See docs/fleet.md.",
    )
    simulate.add_argument("--devices", type=int, required=True, help="how many devices")
    simulate.add_argument(
        "--rate", type=float, default=1.0, help="readings per second per device (default: 1)"
    )
    simulate.add_argument("--spikes", type=float, default=0.0, help="disk spikes per second (default: 0)")
    simulate.add_argument("--duration", type=float, help="seconds of load (default: until Ctrl-C)")
    simulate.add_argument(
        "--connections",
        type=int,
        default=0,
        help="share this many MQTT connections between the devices (default 0: one per device)",
    )
    simulate.add_argument(
        "--drain", type=float, default=10.0, help="seconds to wait at the end for what was sent (default: 10)"
    )
    simulate.add_argument(
        "--json", action="store_true", help="one JSON object a line: each second, then the summary"
    )
    simulate.add_argument(
        "--data-dir",
        type=Path,
        help="where nerve up keeps the NATS identities and the device registry (default: .nerve)",
    )


async def run(args: argparse.Namespace, settings: Settings, *, out: TextIO | None = None) -> int:
    """Run the simulation of `args` against `settings`; print each second and the summary to `out`."""
    from nerve.runtime.fleet import FleetPlan, Simulation  # noqa: PLC0415 - needs nats-py
    from nerve.runtime.pauses import freeze_survivors, rarer_full_collections  # noqa: PLC0415

    out = out or sys.stdout
    plan = FleetPlan(
        devices=args.devices,
        rate=args.rate,
        spikes=args.spikes,
        duration_s=args.duration,
        connections=args.connections,
        drain_s=args.drain,
    )

    def second(line: Second) -> None:
        print(_json("second", asdict(line)) if args.json else format_second(line), file=out, flush=True)

    if not args.json:
        links = "one connection each" if plan.connections == 0 else f"{plan.links} shared connections"
        print(
            f"simulating {plan.devices} devices ({links}) at {plan.rate:g} readings/s each, "
            f"{plan.spikes:g} disk spikes/s; connecting ...",
            file=out,
            flush=True,
        )

    def ready(line: str) -> None:
        freeze_survivors()  # the fleet is up: shorter collector pauses from here on (nerve.runtime.pauses)
        rarer_full_collections()  # and fewer of them: they are in what the simulator measures
        if not args.json:
            print(line, file=out, flush=True)

    summary = await Simulation(settings=settings, plan=plan, on_second=second, on_ready=ready).run()
    print(_json("summary", asdict(summary)) if args.json else format_summary(summary), file=out, flush=True)
    if summary.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_LOST if summary.lost else EXIT_OK


def _json(kind: str, fields: dict[str, object]) -> str:
    return json.dumps({"type": kind, **fields}, separators=(",", ":"))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_second(line: Second) -> str:
    """One live line a person reads."""
    return (
        f"{line.t:6.1f}s  offered {line.offered_per_s:8.1f}/s  stored {line.stored_per_s:8.1f}/s  "
        f"lag p50/p99 {_ms(line.lag_p50_ms)}/{_ms(line.lag_p99_ms)} ms  "
        f"spikes {line.spikes} commands {line.commands} p50/p99 {_ms(line.command_p50_ms)}/"
        f"{_ms(line.command_p99_ms)} ms  dup {line.duplicates}  queued {line.queued}"
    )


def format_summary(summary: Summary) -> str:
    """The summary, a few lines."""
    lines = [
        (
            f"summary{' (interrupted)' if summary.interrupted else ''}: {summary.devices} devices on "
            f"{summary.connections} connections (connected in {summary.connect_s:.1f}s), "
            f"{summary.seconds:.1f}s of load"
        ),
        (
            f"  offered {summary.offered} ({summary.offered_per_s:.1f}/s), stored {summary.stored} "
            f"({summary.stored_per_s:.1f}/s), lost {summary.lost}, unacknowledged {summary.unacknowledged}, "
            f"duplicates {summary.duplicates}"
            + (f", skipped {summary.skipped} (mosquitto took nothing more)" if summary.skipped else "")
            + (f", behind {summary.behind} (not made: could not keep up)" if summary.behind else "")
            + (f", connections lost {summary.connections_lost}" if summary.connections_lost else "")
        ),
        (
            f"  lag publish -> stored p50 {_ms(summary.lag_p50_ms)} ms, p99 {_ms(summary.lag_p99_ms)} ms, "
            f"max {_ms(summary.lag_max_ms)} ms"
        ),
        (
            f"  spikes {summary.spikes}, commands {summary.commands} (without command: "
            f"{summary.spikes_without_command}, repeated: {summary.duplicate_commands}); "
            f"spike -> command p50 {_ms(summary.command_p50_ms)} ms, p99 {_ms(summary.command_p99_ms)} ms; "
            "incidents resolved "
            f"{summary.incidents_resolved}, failed {summary.incidents_failed}"
        ),
    ]
    if summary.delivered_p50_ms is not None:
        lines.append(
            f"  spike -> command delivered by mosquitto (the watcher's connection) p50 "
            f"{_ms(summary.delivered_p50_ms)} ms, p99 {_ms(summary.delivered_p99_ms)} ms"
        )
    if summary.central_p50_ms is not None:
        lines.append(
            f"  of which, p50/p99: spike stored {_ms(summary.spike_stored_p50_ms)}/"
            f"{_ms(summary.spike_stored_p99_ms)} ms, central {_ms(summary.central_p50_ms)}/"
            f"{_ms(summary.central_p99_ms)} ms, command to device {_ms(summary.downlink_p50_ms)}/"
            f"{_ms(summary.downlink_p99_ms)} ms"
        )
    if summary.command_stored_p50_ms is not None:
        lines.append(
            f"  command to device, p50/p99: made -> stored in JetStream {_ms(summary.command_stored_p50_ms)}/"
            f"{_ms(summary.command_stored_p99_ms)} ms, stored -> device {_ms(summary.sent_down_p50_ms)}/"
            f"{_ms(summary.sent_down_p99_ms)} ms"
        )
    return "\n".join(lines)
