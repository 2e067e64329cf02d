"""Envelope codecs side by side: decode + validate + encode of one Event per second, in one run.

Cases (each round trip: bytes -> validated Event -> bytes):

- `msgspec msgpack`: `nerve.runtime.envelope` as nerve stores by default (`nats.codec: msgpack`);
- `msgspec json`: the same in CloudEvents structured JSON (`nats.codec: json`);
- `msgspec json + 3 extensions`: a CloudEvent with extension attributes (they take the second pass);
- `pydantic + msgpack (old)`: the pydantic model nerve had before (same fields and constraints, rebuilt
  here since the product no longer has it), `model_validate(msgpack.unpackb(...))` then
  `msgpack.packb(model_dump(mode="json", exclude_none=True))`, as the old codec did.

Then the resident memory of a python that imports `nerve.runtime.envelope`, against one that imports
pydantic and msgpack and builds that old model (each in a fresh process, `ru_maxrss`).

    .venv/bin/python bench/codec.py [--seconds 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field

from nerve.runtime.envelope import Event, decode, to_json, to_msgpack

if TYPE_CHECKING:
    from collections.abc import Callable

EVENT: Final = Event(
    id="0123456789abcdef0123456789abcdef",
    source="nerve://edge/pi-01",
    type="nerve.telemetry.disk",
    subject="pi-01",
    time=datetime(2026, 11, 25, 4, 52, 40, 123456, tzinfo=UTC),
    data={"mount": "/", "value": 95.5, "unit": "%"},
)
WITH_EXTENSIONS: Final = Event(
    id=EVENT.id,
    source=EVENT.source,
    type=EVENT.type,
    subject=EVENT.subject,
    time=EVENT.time,
    data=EVENT.data,
    extensions={"region": "eu", "floor": 3, "critical": True},
)


class OldEvent(BaseModel):
    """The pydantic Event nerve had (runtime/src/nerve/runtime/envelope/model.py before msgspec)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    specversion: Literal["1.0"] = "1.0"
    id: Annotated[str, Field(min_length=1, max_length=128)]
    source: str = Field(min_length=1, max_length=256)
    type: str = Field(min_length=1, max_length=128)
    subject: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    time: datetime
    data: dict[str, Any] = Field(default_factory=dict)
    correlationid: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    causationid: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    hops: int = Field(default=0, ge=0, le=1_000_000)


def old_round_trip(payload: bytes) -> bytes:
    event = OldEvent.model_validate(msgpack.unpackb(payload))
    packed: bytes = msgpack.packb(event.model_dump(mode="json", exclude_none=True))
    return packed


def rate(round_trip: Callable[[bytes], bytes], payload: bytes, seconds: float) -> float:
    """Round trips per second, over about `seconds`."""
    assert round_trip(payload)  # noqa: S101 - warm up, and it must work
    count, batch = 0, 1000
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(batch):
            round_trip(payload)
        count += batch
    return count / elapsed


# VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's, which is this (big) process.
PEAK: Final = "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')))"


def rss_kib(imports: str) -> int:
    """Peak resident memory (KiB) of a fresh python that runs `imports`."""
    code = imports + "\n" + PEAK
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return int(done.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per case (default 2)")
    args = parser.parse_args()
    old = OldEvent.model_validate(msgpack.unpackb(to_msgpack(EVENT), timestamp=3))
    old_payload = msgpack.packb(old.model_dump(mode="json", exclude_none=True))
    cases: list[tuple[str, Callable[[bytes], bytes], bytes]] = [
        ("msgspec msgpack", lambda b: to_msgpack(decode(b, Event)), to_msgpack(EVENT)),
        ("msgspec json", lambda b: to_json(decode(b, Event)), to_json(EVENT)),
        ("msgspec json + 3 extensions", lambda b: to_json(decode(b, Event)), to_json(WITH_EXTENSIONS)),
        (
            "msgspec msgpack + 3 extensions",
            lambda b: to_msgpack(decode(b, Event)),
            to_msgpack(WITH_EXTENSIONS),
        ),
        ("pydantic + msgpack (old)", old_round_trip, old_payload),
    ]
    results = {}
    sizes = f"{len(to_msgpack(EVENT))} B msgpack, {len(to_json(EVENT))} B JSON"
    print(f"decode + validate + encode of one Event ({sizes})", flush=True)
    for name, round_trip, payload in cases:
        results[name] = rate(round_trip, payload, args.seconds)
        print(f"  {name:<32} {results[name]:>12,.0f} /s   ({len(payload)} B)", flush=True)
    baseline = results["pydantic + msgpack (old)"]
    for name in ("msgspec msgpack", "msgspec json"):
        print(f"  {name} / old: {results[name] / baseline:.1f}x")
    faster = "msgpack" if results["msgspec msgpack"] >= results["msgspec json"] else "json"
    ratio = results["msgspec msgpack"] / results["msgspec json"]
    print(f"  msgpack / json: {ratio:.2f}x -> the faster codec here: {faster}")
    empty = rss_kib("")
    nerve = rss_kib("import nerve.runtime.envelope")
    old_code = (
        "import msgpack\n"
        "from datetime import datetime\n"
        "from typing import Any, Literal\n"
        "from pydantic import BaseModel, ConfigDict, Field\n"
        "class E(BaseModel):\n"
        "    model_config = ConfigDict(frozen=True, extra='forbid')\n"
        "    specversion: Literal['1.0'] = '1.0'\n"
        "    id: str = Field(min_length=1)\n"
        "    time: datetime\n"
        "    data: dict[str, Any] = Field(default_factory=dict)\n"
    )
    pydantic = rss_kib(old_code)
    print("peak resident memory of a fresh python after the import (VmHWM)")
    print(f"  python alone                     {empty / 1024:6.1f} MiB")
    print(f"  import nerve.runtime.envelope    {nerve / 1024:6.1f} MiB  (+{(nerve - empty) / 1024:.1f})")
    print(
        f"  pydantic + msgpack + one model   {pydantic / 1024:6.1f} MiB  (+{(pydantic - empty) / 1024:.1f})"
    )


if __name__ == "__main__":
    main()
