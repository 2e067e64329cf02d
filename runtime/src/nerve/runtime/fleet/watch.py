"""`nerve simulate`'s command watcher: when mosquitto delivered each command, seen from a process of its own.

`nerve simulate` runs every simulated device on one event loop. At 10,000 devices that loop is about 70 %
busy and handles a command tens of milliseconds after mosquitto sent it: measured on a 2-core box, made
-> handled by the simulated device p50 21 / p99 644 ms, while an independent subscriber (mosquitto_sub)
got the same commands p50 2.6 / p99 46 ms after they were made. A real device is its own machine, so the
simulator's own queue is not the fleet's latency. This process holds one MQTT connection subscribed to
every device's commands (mosquitto sends it each command when it sends the device's connection its copy)
and prints, a line each, `<arrival unix time> <causationid>` (the spike's reading id); the simulator
reports both figures: delivered (here) and handled (by the simulated device).

Started by the simulator as `python` + `ARGV`; it reads one JSON object on stdin (`mqtt`: the MQTT
settings, `client_id`, `filter`), prints `ready` once subscribed, and stops at end of input or SIGTERM.
An error is one line on stderr and exit code 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from typing import TYPE_CHECKING, Final

from pydantic import ValidationError

from nerve.runtime.config.settings import MqttSettings
from nerve.runtime.envelope.codec import decode
from nerve.runtime.envelope.model import Command
from nerve.runtime.errors import DecodeError, NerveError
from nerve.runtime.wire.mqtt import MqttWireError, open_mqtt

if TYPE_CHECKING:
    from nerve.runtime.wire.mqtt import Incoming

READY: Final = "ready"
#: The interpreter's arguments that run `main` (not `-m`: the package imports this module first).
ARGV: Final = ("-c", "import sys; from nerve.runtime.fleet.watch import main; sys.exit(main())")
OPEN_TIMEOUT_S: Final = 10.0
RECEIVE_MAXIMUM: Final = 1000


async def watch(settings: MqttSettings, client_id: str, topic_filter: str) -> None:
    """Print each command's arrival until stdin closes or SIGTERM (module docstring)."""
    out = sys.stdout

    def on_messages(batch: list[Incoming]) -> None:
        arrived = time.time()
        for message in batch:
            with contextlib.suppress(DecodeError):
                command = decode(message.payload, Command)
                if command.causationid:
                    out.write(f"{arrived:.6f} {command.causationid}\n")
        out.flush()
        wire.puback([message.packet_id for message in batch if message.packet_id])

    wire = await open_mqtt(
        settings,
        client_id=client_id,
        on_messages=on_messages,
        clean_start=True,
        session_expiry_s=0,
        receive_maximum=RECEIVE_MAXIMUM,
        timeout_s=OPEN_TIMEOUT_S,
    )
    try:
        await wire.subscribe([topic_filter], timeout_s=OPEN_TIMEOUT_S)
        out.write(f"{READY}\n")
        out.flush()
        loop = asyncio.get_running_loop()
        stop = loop.create_future()

        def stopping() -> None:
            if not stop.done():
                stop.set_result(None)

        loop.add_signal_handler(signal.SIGTERM, stopping)
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        ended = asyncio.ensure_future(stdin.read())  # the simulator closes stdin as it ends
        try:
            await asyncio.wait([stop, ended, wire.closed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
    finally:
        wire.close()


def main() -> int:
    """Entry point: the JSON request on stdin's first line, then watch."""
    try:
        request = json.loads(sys.stdin.readline())
        settings = MqttSettings.model_validate(request["mqtt"])
        asyncio.run(watch(settings, str(request["client_id"]), str(request["filter"])))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        sys.stderr.write(f"nerve simulate's command watcher: mqtt.{where}: {first['msg']}\n")
        return 1
    except (NerveError, MqttWireError, ValueError, KeyError, OSError) as exc:
        sys.stderr.write(f"nerve simulate's command watcher: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
