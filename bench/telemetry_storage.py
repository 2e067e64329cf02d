"""Bytes per stored reading in NERVE_TELEMETRY, before and after s2 compression (issue 11, "Storage").

Readings are made exactly as the bridge stores them (`nerve.bridge.uplink.Translator`: a JSON reading
`{"value": 97}` wrapped into an Event with a fresh id, or a CloudEvents binary-mode reading with an id of
its own; the body in the `nats.codec`; the pump's `Nats-Msg-Id` and `Content-Type` headers) and published
into a fresh nats-server's telemetry stream, configured as nerve configured it before (no compression) and
as it does now (`streams.telemetry`, s2). Per case, side by side:

- `counted B`: `state.bytes / state.messages` from stream info: what JetStream counts against the
  stream's `max_bytes` (and reserves against its `max_file_store`): nats-server counts before compression;
- `disk B`: the bytes of the stream's files on disk (`st_blocks`, after the server stopped, so that the
  last block is written and compressed) over the messages held: what the site box's disk pays.

Then what a week costs: one reading a second for 604,800 s needs `max(disk B, counted B / credit)` x
604,800 bytes of `streams.telemetry.disk_budget` (credit: `COMPRESSION_CREDIT` with s2, 1 without), and
how many readings a second the default budget keeps for a week.

    .venv/bin/python bench/telemetry_storage.py                 # 200,000 readings per case (~1 min)
    .venv/bin/python bench/telemetry_storage.py --count 50000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Final

import nats

from nerve.bridge.uplink import Forward, Translator
from nerve.runtime.config.settings import (
    COMPRESSION_CREDIT,
    DEFAULT_METRICS,
    GIB,
    StreamsSettings,
    TelemetryLimits,
)
from nerve.runtime.envelope.codec import CONTENT_TYPE_HEADER, Codec, content_type
from nerve.runtime.jetstream.client import MSG_ID_HEADER
from nerve.runtime.jetstream.streams import SPEC_OF_STREAM
from nerve.runtime.stack.brokers import NatsServer, free_port

WEEK_S: Final = 604_800
DEVICES: Final = 10_000
BATCH: Final = 5_000
CASES: Final = (
    ('JSON {"value": 97}, msgpack body', False, Codec.MSGPACK),
    ("binary mode, own id, msgpack body", True, Codec.MSGPACK),
    ('JSON {"value": 97}, JSON body', False, Codec.JSON),
)


def readings(count: int, *, binary: bool, codec: Codec) -> list[tuple[str, dict[str, str], bytes]]:
    """(subject, headers, body) of `count` readings as the bridge would store them."""
    translator = Translator(prefix="nerve", metrics=DEFAULT_METRICS, max_payload=65536, codec=codec)
    out = []
    for i in range(count):
        device = f"pi-{i % DEVICES:05d}"
        topic = f"nerve/{device}/telemetry/cpu"
        if binary:
            properties = (
                ("specversion", "1.0"),
                ("id", f"{device}.{i:010d}"),
                ("source", f"nerve://edge/{device}"),
                ("type", "nerve.telemetry.cpu"),
                ("time", "2026-12-01T12:00:00.123456Z"),
            )
            outcome = translator.translate(topic, b"%d" % (i % 100), properties, "application/json")
        else:
            outcome = translator.translate(topic, b'{"value": %d}' % (i % 100))
        assert isinstance(outcome, Forward), outcome  # noqa: S101 - a bench's own input
        headers = {MSG_ID_HEADER: outcome.msg_id, CONTENT_TYPE_HEADER: content_type(codec)}
        out.append((outcome.subject, headers, outcome.body))
    return out


def disk_bytes(directory: Path) -> int:
    """Bytes the files under `directory` take on disk (blocks, as `du` counts them)."""
    return sum(p.stat().st_blocks * 512 for p in directory.rglob("*") if p.is_file())


async def measure(
    messages: list[tuple[str, dict[str, str], bytes]], *, compressed: bool, workdir: Path
) -> tuple[float, float]:
    """(logical, disk) bytes per reading in a fresh server's telemetry stream."""
    data_dir = workdir / ("s2" if compressed else "none")
    server = NatsServer(port=free_port(), data_dir=data_dir)
    async with server:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        limits = TelemetryLimits(compression="s2" if compressed else "none")
        config = SPEC_OF_STREAM["NERVE_TELEMETRY"].config("nerve", StreamsSettings(telemetry=limits))
        await js.add_stream(config)
        for start in range(0, len(messages), BATCH):
            acks = [
                js.publish(subject, body, headers=headers)
                for subject, headers, body in messages[start : start + BATCH]
            ]
            await asyncio.gather(*acks)
        state = (await js.stream_info("NERVE_TELEMETRY")).state
        await nc.close()
    stored = disk_bytes(data_dir / "jetstream")
    return state.bytes / state.messages, stored / state.messages


async def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--count", type=int, default=200_000, help="readings per case")
    args = parser.parse_args()
    budget = TelemetryLimits().disk_budget
    print(
        f"{args.count:,} readings per case on {DEVICES:,} devices; default disk budget {budget / GIB:g} GiB"
    )
    print(
        f"{'readings':<36} {'before: counted B':>17} {'disk B':>7}   {'s2: counted B':>13} {'disk B':>7}"
        f"   {'a week of 1/s needs, before / s2':>33}   {'default budget keeps a week of':>30}"
    )
    with tempfile.TemporaryDirectory(prefix="nerve-storage-") as tmp:
        for n, (label, binary, codec) in enumerate(CASES):
            messages = readings(args.count, binary=binary, codec=codec)
            before = await measure(messages, compressed=False, workdir=Path(tmp) / f"{n}-none")
            after = await measure(messages, compressed=True, workdir=Path(tmp) / f"{n}-s2")
            need_before = max(before[1], before[0]) * WEEK_S
            need_after = max(after[1], after[0] / COMPRESSION_CREDIT) * WEEK_S
            print(
                f"{label:<36} {before[0]:>17.1f} {before[1]:>7.1f}   {after[0]:>13.1f} {after[1]:>7.1f}"
                f"   {need_before / 1e6:>15.1f} MB / {need_after / 1e6:>6.1f} MB"
                f"   {budget / need_before:>8.1f} -> {budget / need_after:>5.1f} readings/s",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
