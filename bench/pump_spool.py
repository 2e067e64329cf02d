"""What the uplink spool costs the bridge's pump, per reading, beside the pump without it (same run).

In process, no broker: the pump (`nerve.bridge.pump.Pump`) is handed batches of `--batch` enveloped
readings (msgpack Events, as the simulator and the edge send them) and every store is acknowledged at
once by a fake NATS wire. "direct": JetStream keeps up, nothing is spooled (the baseline). "spooled":
every reading goes through the spool (written, read back, published), as while a backlog lasts. The
MQTT and NATS wires' own parsing is not in either figure.

    .venv/bin/python bench/pump_spool.py                 # 200 rounds of 1,000 readings, 3 runs each
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Final

from nerve.bridge.natswire import StoreAck
from nerve.bridge.pump import Pump
from nerve.bridge.spool import Spool
from nerve.bridge.stats import BridgeStats
from nerve.runtime.config.settings import DEFAULT_METRICS
from nerve.runtime.envelope.codec import to_msgpack
from nerve.runtime.envelope.model import Event
from nerve.runtime.wire.mqtt import Incoming

WINDOW: Final = 1000  # bridge.max_in_flight's default


class _Nats:
    max_payload = 1 << 20

    def __init__(self) -> None:
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.tokens: list[int] = []

    def publish(self, subject: str, headers: bytes, body: bytes, token: int) -> None:  # noqa: ARG002
        self.tokens.append(token)

    def flush(self) -> None:
        pass


class _Mqtt:
    def __init__(self) -> None:
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def puback(self, packet_ids: list[int]) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def readings(count: int) -> list[Incoming]:
    batch = []
    for index in range(count):
        device = f"sim-{index:05d}"
        event = Event(
            source=f"nerve://edge/{device}",
            type="nerve.telemetry.cpu",
            subject=device,
            data={"value": 42.0, "unit": "%"},
        )
        batch.append(Incoming(f"nerve/{device}/telemetry/cpu", to_msgpack(event), index % 65535 + 1))
    return batch


async def per_reading_us(*, spooled: bool, rounds: int, batch: list[Incoming], where: Path) -> float:
    """µs of the pump's time per reading over `rounds` batches, every store acknowledged at once."""
    spool = None
    if spooled:
        spool = Spool(where / "bench.spool", budget=1 << 40)
        # One record waiting: everything that comes goes in behind it, through the spool.
        spool.append([("nerve.x.telemetry.cpu", b"NATS/1.0\r\n\r\n", b"x", False, "nerve/x/telemetry/cpu")])
    pump = Pump(
        loop=asyncio.get_running_loop(),
        stats=BridgeStats(),
        prefix="nerve",
        metrics=DEFAULT_METRICS,
        max_payload=65536,
        mappings=(),
        store_timeout_s=5.0,
        max_in_flight=WINDOW,
        spool=spool,
    )
    nats = _Nats()
    pump.attach_nats(nats)  # type: ignore[arg-type]
    pump.attach_mqtt(_Mqtt())  # type: ignore[arg-type]
    started = time.perf_counter()
    for _ in range(rounds):
        pump.on_messages(batch)
        while nats.tokens:
            tokens, nats.tokens = nats.tokens, []
            pump.on_acks([StoreAck(token, None, duplicate=False) for token in tokens])
    elapsed = time.perf_counter() - started
    if spool is not None:
        assert spool.empty, "the spool was not emptied"  # noqa: S101 - a bench's own check
        spool.close()
    return elapsed / (rounds * len(batch)) * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200, help="batches per run (default 200)")
    parser.add_argument("--batch", type=int, default=1000, help="readings per batch (default 1000)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each, taking turns (default 3)")
    args = parser.parse_args()
    if min(args.rounds, args.batch, args.runs) < 1:
        parser.error("--rounds, --batch and --runs must be at least 1")
    batch = readings(args.batch)
    direct: list[float] = []
    spooled: list[float] = []
    with tempfile.TemporaryDirectory(prefix="nerve-bench-spool-") as tmp:
        for _ in range(args.runs):
            direct.append(
                await per_reading_us(spooled=False, rounds=args.rounds, batch=batch, where=Path(tmp))
            )
            spooled.append(
                await per_reading_us(spooled=True, rounds=args.rounds, batch=batch, where=Path(tmp))
            )
    print(f"{args.rounds} rounds of {args.batch} enveloped readings, {args.runs} runs each, taking turns")

    def shown(values: list[float]) -> str:
        return f"{' / '.join(f'{v:.2f}' for v in values)} µs a reading (best {min(values):.2f})"

    print(f"direct (baseline):  {shown(direct)}")
    print(f"through the spool:  {shown(spooled)}")
    costs = min(spooled) - min(direct)
    print(f"the spool costs {costs:+.2f} µs a reading ({min(spooled) / min(direct):.2f}x)")


if __name__ == "__main__":
    asyncio.run(main())
