"""`nerve send` end to end: the real command, through NATS, the bridge, mosquitto and an edge agent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from nerve.bridge import Bridge
from nerve.edge.daemon import open_edge
from nerve.runtime.cli.main import EXIT_OF_STATUS
from nerve.runtime.cli.send import parse_args, parse_duration
from nerve.runtime.config.settings import Settings
from nerve.runtime.errors import ConfigError
from nerve.runtime.trust.signing import generate_keypair

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

NERVE = str(Path(sys.executable).parent / "nerve")
DEVICE = "pi-send"
WAIT = 30.0


async def nerve(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        NERVE,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={key: value for key, value in os.environ.items() if not key.startswith("NERVE_")},
    )
    async with asyncio.timeout(timeout):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


# --- no broker: what is checked before anything is sent ------------------------------------------


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        (["older_than_s=3600"], {"older_than_s": 3600}),
        (["unit=nginx.service"], {"unit": "nginx.service"}),
        (["flag=true", "ratio=0.5", 'name="007"'], {"flag": True, "ratio": 0.5, "name": "007"}),
        (["text=a=b"], {"text": "a=b"}),
        (["empty="], {"empty": ""}),
    ],
)
def test_parse_args(pairs: list[str], expected: dict[str, object]) -> None:
    assert parse_args(pairs) == expected


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (["novalue"], "'novalue' is not key=value"),
        (["=3"], "'=3' is not key=value"),
        (["a b=3"], "'a b=3' is not key=value"),
        (["k=1", "k=2"], "'k' is given twice"),
    ],
)
def test_parse_args_refuses(pairs: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_args(pairs)
    assert caught.value.key == "--arg"


@pytest.mark.parametrize(
    ("text", "seconds"), [("60", 60.0), ("60s", 60.0), ("1.5m", 90.0), ("2h", 7200.0), ("500ms", 0.5)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text, flag="--expires-in") == seconds


@pytest.mark.parametrize("text", ["", "0s", "-5s", "5x", "s", "8d", "1e3", "nan"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="is not a duration"):
        parse_duration(text, flag="--expires-in")


def test_every_status_has_its_own_exit_code() -> None:
    codes = list(EXIT_OF_STATUS.values())
    assert len(set(codes)) == len(codes)
    assert EXIT_OF_STATUS["ok"] == 0
    assert 2 not in codes  # usage and settings errors


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arg", "oops"], "nerve send: error: command line: --arg: 'oops' is not key=value"),
        (["--expires-in", "soon"], "nerve send: error: command line: --expires-in: 'soon' is not a duration"),
        (["--timeout", "0"], "nerve send: error: command line: --timeout: '0' is not a duration"),
    ],
)
async def test_bad_flags_are_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    code, out, err = await nerve("send", DEVICE, "clear_temp", *args, "--data-dir", str(tmp_path))
    assert code == 2
    assert err.startswith(message)
    assert err.count("\n") == 1
    assert out == ""


async def test_without_a_key_says_how_to_get_one(tmp_path: Path) -> None:
    code, _, err = await nerve("send", DEVICE, "clear_temp", "--data-dir", str(tmp_path))
    assert code == 2
    assert "no signing key: pass --key" in err
    assert "Traceback" not in err


async def test_help_documents_the_exit_codes() -> None:
    code, out, _ = await nerve("send", "--help")
    assert code == 0
    for line in (
        "0  ok",
        "1  failed",
        "2  bad arguments",
        "3  rejected",
        "4  expired",
        "5  unknown",
        "6  no result",
    ):
        assert line in out


# --- against a real stack: brokers, bridge and edge ----------------------------------------------


@pytest.fixture
def stack_settings(settings: Settings, tmp_path: Path) -> Settings:
    generate_keypair(tmp_path / "keys", "central")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    return Settings.model_validate(
        {
            **settings.model_dump(mode="json"),
            "edge": {
                "device": DEVICE,
                "mounts": [],
                "interval_s": 3600,
                "clear_temp_roots": [str(scratch)],
                "trusted_keys_dir": str(tmp_path / "keys"),
                "actions": {
                    "allow": ["clear_temp", "run"],
                    "scripts": {"fails": {"argv": ["/bin/sh", "-c", "echo broken >&2; exit 4"]}},
                },
            },
        }
    )


@contextlib.asynccontextmanager
async def running_stack(settings: Settings) -> AsyncIterator[None]:
    bridge = Bridge(settings=settings)
    async with open_edge(settings) as edge, asyncio.TaskGroup() as tasks:
        bridge_task = tasks.create_task(bridge.run())
        edge_task = tasks.create_task(edge.run())
        try:
            async with asyncio.timeout(WAIT):
                await bridge.ready.wait()
                await edge.ready.wait()
            yield
        finally:
            bridge_task.cancel()
            edge_task.cancel()


def send_args(settings: Settings, tmp_path: Path, *rest: str) -> list[str]:
    return [
        "send",
        *rest,
        "--nats-url",
        settings.nats.url,
        "--key",
        str(tmp_path / "keys" / "central.key"),
    ]


@pytest.mark.broker
async def test_send_runs_a_command_and_prints_its_result(stack_settings: Settings, tmp_path: Path) -> None:
    old = tmp_path / "scratch" / "old.log"
    old.write_bytes(b"x" * 100)
    then = time.time() - 7200
    os.utime(old, (then, then))
    fresh = tmp_path / "scratch" / "fresh.log"
    fresh.write_bytes(b"y")
    async with running_stack(stack_settings):
        code, out, err = await nerve(
            *send_args(stack_settings, tmp_path, DEVICE, "clear_temp", "--arg", "older_than_s=3600")
        )
    assert code == 0, err
    first, _, rest = out.partition("\n")
    assert first == f"ok: clear_temp on {DEVICE}: deleted 1 file (100 B), skipped 0, 0 errors"
    assert json.loads(rest)["files_deleted"] == 1
    assert not old.exists()
    assert fresh.exists()


@pytest.mark.broker
async def test_send_exit_codes_for_rejected_and_failed(stack_settings: Settings, tmp_path: Path) -> None:
    victim = tmp_path / "scratch" / "victim.log"
    victim.write_bytes(b"x")
    then = time.time() - 7200
    os.utime(victim, (then, then))
    async with running_stack(stack_settings):
        code, out, _ = await nerve(*send_args(stack_settings, tmp_path, DEVICE, "reboot"))
        assert code == 3
        assert out == f"rejected: reboot on {DEVICE}: action 'reboot' is not allow-listed on this device\n"

        code, out, _ = await nerve(
            *send_args(stack_settings, tmp_path, DEVICE, "clear_temp", "--arg", "path=/etc")
        )
        assert code == 3
        assert "argument 'path' is not a known argument" in out

        code, out, _ = await nerve(
            *send_args(stack_settings, tmp_path, DEVICE, "run", "--arg", "script=fails", "--json")
        )
        assert code == 1
        result = json.loads(out)
        assert (result["status"], result["reason"]) == ("failed", "script fails: /bin/sh exited with 4")
        assert result["data"]["stderr"] == "broken\n"
    assert victim.exists()


@pytest.mark.broker
async def test_send_times_out_when_no_device_answers(stack_settings: Settings, tmp_path: Path) -> None:
    async with running_stack(stack_settings):
        code, out, err = await nerve(
            *send_args(stack_settings, tmp_path, "ghost", "clear_temp", "--timeout", "1s")
        )
    assert code == 6
    assert out == ""
    assert err.startswith("nerve send: no result from ghost within 1s (command ")
    assert "it may still run until it expires at" in err


@pytest.mark.broker
async def test_send_with_a_key_the_device_does_not_trust_is_rejected(
    stack_settings: Settings, tmp_path: Path
) -> None:
    generate_keypair(tmp_path / "rogue", "rogue")
    async with running_stack(stack_settings):
        code, out, _ = await nerve(
            "send",
            DEVICE,
            "clear_temp",
            "--nats-url",
            stack_settings.nats.url,
            "--key",
            str(tmp_path / "rogue" / "rogue.key"),
        )
    assert code == 3
    assert "signed by unknown key id 'rogue'" in out
