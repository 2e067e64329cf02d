"""SIGKILL of `nerve edge` while a command runs: after the restart the command is `unknown`, never re-run.

The command runs a script that records its pid in a marker file and then sleeps. The edge process is
killed with SIGKILL while the script sleeps, so the command is journalled `started` and never
acknowledged to mosquitto. The restarted edge gets it again from its persistent session, and must
answer `unknown` without running the script a second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from nerve.edge import INTERRUPTED_REASON
from nerve.runtime.config.settings import MqttSettings
from nerve.runtime.envelope.codec import decode, to_msgpack
from nerve.runtime.envelope.model import Command, CommandResult
from nerve.runtime.trust.signing import Signer, generate_keypair
from nerve.runtime.wire.client import MqttClient

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.edge.conftest import StartEdge

    from nerve.runtime.stack.brokers import Mosquitto
    from nerve.runtime.wire.mqtt import Incoming

DEVICE = "pi-kill"
WAIT = 30.0  # a fresh interpreter imports pydantic, paho and nacl: generous for a loaded machine
STATUS = f"nerve/{DEVICE}/status"
RESULTS = f"nerve/{DEVICE}/results/+"
COMMAND = f"nerve/{DEVICE}/commands/run"


async def next_message(client: MqttClient, wanted: Callable[[Incoming], bool]) -> Incoming:
    async with asyncio.timeout(WAIT):
        async for message in client.messages:
            if wanted(message):
                return message
    raise AssertionError("the message stream ended")  # pragma: no cover - the loop only ends by timeout


def status_is(payload: bytes) -> Callable[[Incoming], bool]:
    return lambda message: message.topic == STATUS and message.payload == payload


def is_result(message: Incoming) -> bool:
    return message.topic.startswith(f"nerve/{DEVICE}/results/")


def assert_lean(pid: int) -> None:
    """`nerve edge` became the lean process (same PID), without pydantic: its native core is not mapped."""
    assert b"nerve.edge.main" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    maps = Path(f"/proc/{pid}/maps").read_text(errors="replace")
    assert "pydantic_core" not in maps
    assert "_yaml" not in maps
    # Plain mqtt:// and no plugin: OpenSSL is never loaded, the command's digest is Python's own SHA-256.
    assert "libcrypto" not in maps
    assert "libssl" not in maps


def has_a_line(path: Path) -> bool:
    return path.exists() and path.read_text().endswith("\n")


async def wait_for_file(path: Path) -> None:
    async with asyncio.timeout(WAIT):
        while not has_a_line(path):
            await asyncio.sleep(0.02)


@pytest.mark.broker
@pytest.mark.slow
async def test_sigkill_during_a_command_it_is_unknown_after_restart_and_never_re_run(
    mosquitto: Mosquitto, tmp_path: Path, start_edge: StartEdge
) -> None:
    generate_keypair(tmp_path / "keys", "central")
    signer = Signer.from_file(tmp_path / "keys" / "central.key")
    marker = tmp_path / "marker"
    config = tmp_path / "edge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "mqtt": {"url": mosquitto.url},
                "data_dir": str(tmp_path / "data"),
                "edge": {
                    "device": DEVICE,
                    "interval_s": 3600,
                    "mounts": [],
                    "trusted_keys_dir": str(tmp_path / "keys"),
                    "journal": str(tmp_path / "data" / "journal.sqlite3"),
                    "actions": {
                        "allow": ["run"],
                        "scripts": {
                            "slow": {
                                "argv": ["/bin/sh", "-c", f'echo $$ >> "{marker}"; exec sleep 60'],
                                "timeout_s": 120,
                            }
                        },
                    },
                },
            }
        )
    )
    command = signer.sign(
        Command.create(
            device=DEVICE,
            action="run",
            args={"script": "slow"},
            source="nerve://test",
            ttl=timedelta(minutes=5),
        )
    )
    observer = MqttClient(MqttSettings(url=mosquitto.url), client_id="kill-observer")
    edge = await start_edge(config)
    try:
        async with observer:
            await observer.subscribe(STATUS, RESULTS)
            await next_message(observer, status_is(b"online"))
            assert_lean(edge.pid)
            await observer.publish(COMMAND, to_msgpack(command), qos=1)
            await wait_for_file(marker)  # the script runs: the command is journalled `started`

            edge.send_signal(signal.SIGKILL)
            await edge.wait()
            await next_message(observer, status_is(b"offline"))  # the broker saw it die (its will)

            edge = await start_edge(config)
            await next_message(observer, status_is(b"online"))
            # mosquitto redelivers the unacknowledged command to the restarted edge by itself.
            message = await next_message(observer, is_result)
            assert isinstance(message.payload, bytes)
            result = decode(message.payload, CommandResult)
            assert message.topic == f"nerve/{DEVICE}/results/run"
            assert (result.causationid, result.status, result.reason) == (
                command.id,
                "unknown",
                INTERRUPTED_REASON,
            )

            # A replay of the captured bytes gets the same recorded answer, and runs nothing either.
            await observer.publish(COMMAND, to_msgpack(command), qos=1)
            again = await next_message(observer, is_result)
            assert isinstance(again.payload, bytes)
            assert decode(again.payload, CommandResult) == result
        assert len(marker.read_text().splitlines()) == 1
    finally:
        if edge.returncode is None:
            edge.send_signal(signal.SIGTERM)
            async with asyncio.timeout(WAIT):
                await edge.wait()
        # The script outlived the killed edge (systemd's control group would take it; a test has none).
        for line in marker.read_text().splitlines() if marker.exists() else []:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(line), signal.SIGKILL)
