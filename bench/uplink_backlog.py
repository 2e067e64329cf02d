"""A bridge restarted onto a backlog of raw readings: does its uplink hold, and is each reading stored once?

Issue 11: under overload, readings without an id (`{"value": 97}` from `mosquitto_pub`) were stored twice.
mosquitto 2.0.11 writes a persistent session's whole queue ahead of its answer to a PINGREQ, so the
bridge's keep-alive took a backlog for a dead broker and reconnected, and mosquitto sent again what was
stored but not yet acknowledged, which the bridge wrapped with fresh ids.

This starts mosquitto and nats-server, runs `nerve bridge` once (to make its persistent session), stops
it, queues `--count` raw readings for it, starts it again with `--keepalive` and
`--max-in-flight`, waits until NERVE_TELEMETRY stops growing, and prints how many readings were stored
twice (stored - queued) and the uplink's reconnects with their reasons (from the bridge's log). Exit
status 1 if any reading was stored twice or lost.

    .venv/bin/python bench/uplink_backlog.py                       # 200,000 readings, keepalive 5 s
    .venv/bin/python bench/uplink_backlog.py --count 50000 --max-in-flight 1000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

import nats
from nats.js.errors import NotFoundError

from nerve.runtime.config.settings import MqttSettings
from nerve.runtime.stack.brokers import Mosquitto, NatsServer, free_port
from nerve.runtime.wire.mqtt import Incoming, open_mqtt

BIN: Final = Path(sys.executable).parent
PUBLISHERS: Final = 20
SETTLED_POLLS: Final = 4  # stream info polls (2 s apart) without growth: done


def ignore(_batch: list[Incoming]) -> None:
    """The publishers subscribe to nothing."""


async def queue_readings(url: str, count: int) -> None:
    """Publish `count` raw QoS1 cpu readings (0 to 99) on 10,000 devices' topics, PUBACKed by mosquitto."""
    settings = MqttSettings(url=url)
    wires = [
        await open_mqtt(
            settings,
            client_id=f"bench-pub-{n}",
            on_messages=ignore,
            clean_start=True,
            session_expiry_s=0,
            receive_maximum=100,
        )
        for n in range(PUBLISHERS)
    ]
    in_flight: list[set[asyncio.Future[None]]] = [set() for _ in wires]
    for i in range(count):
        wire, waiting = wires[i % PUBLISHERS], in_flight[i % PUBLISHERS]
        while len(waiting) >= wire.receive_maximum:  # the broker's window (mosquitto: 20)
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            waiting -= done
        waiting.add(wire.publish_nowait(f"nerve/d{i % 10_000}/telemetry/cpu", b'{"value": %d}' % (i % 100)))
    await asyncio.gather(*(future for waiting in in_flight for future in waiting))
    for wire in wires:
        wire.close()


async def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--count", type=int, default=200_000, help="raw readings queued (default 200000)")
    parser.add_argument("--keepalive", type=int, default=5, help="mqtt.keepalive_s of the bridge (default 5)")
    parser.add_argument(
        "--max-in-flight", type=int, default=65535, help="bridge.max_in_flight (default 65535)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nerve-backlog-") as tmp:
        work = Path(tmp)
        async with (
            Mosquitto(port=free_port(), data_dir=work / "mosquitto") as mosquitto,
            NatsServer(port=free_port(), data_dir=work / "nats") as nats_server,
        ):
            env = {
                **os.environ,
                "NERVE_MQTT__KEEPALIVE_S": str(args.keepalive),
                "NERVE_BRIDGE__MAX_IN_FLIGHT": str(args.max_in_flight),
                "NERVE_DATA_DIR": str(Path(tmp) / "bridge-data"),  # its id file, kept across its restart
            }

            async def bridge(log: Path) -> asyncio.subprocess.Process:
                with log.open("w") as out:
                    return await asyncio.create_subprocess_exec(
                        str(BIN / "nerve"),
                        "bridge",
                        "--mqtt-url",
                        mosquitto.url,
                        "--nats-url",
                        nats_server.url,
                        "--log-level",
                        "info",
                        stdout=out,
                        stderr=out,
                        env=env,
                    )

            nc = await nats.connect(nats_server.url)
            js = nc.jetstream()
            first = await bridge(work / "first.log")
            await asyncio.sleep(4)  # subscribed: its session now takes what is published
            first.terminate()
            await first.wait()
            began = time.monotonic()
            await queue_readings(mosquitto.url, args.count)
            print(f"{args.count:,} raw readings queued in {time.monotonic() - began:.1f}s", flush=True)
            began = time.monotonic()
            second = await bridge(work / "second.log")
            stored, still = -1, 0
            while still < SETTLED_POLLS:
                await asyncio.sleep(2)
                try:
                    now = (await js.stream_info("NERVE_TELEMETRY")).state.messages
                except NotFoundError:
                    now = 0
                still = still + 1 if now == stored else 0
                stored = now
            took = time.monotonic() - began - 2 * SETTLED_POLLS
            second.terminate()
            await second.wait()
            await nc.close()
            reasons = [
                line for line in (work / "second.log").read_text().splitlines() if "reconnecting" in line
            ]
    twice, missing = max(0, stored - args.count), max(0, args.count - stored)
    print(
        f"bridge (keepalive {args.keepalive}s, max_in_flight {args.max_in_flight}): stored {stored:,} in "
        f"~{took:.0f}s; stored twice {twice:,}, missing {missing:,}; uplink reconnects {len(reasons)}"
    )
    for line in reasons[:5]:
        print(f"  {line}")
    return 0 if stored == args.count else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
