"""Arguments that end up in a subject or a topic are tokens: else one line naming the flag, exit 2."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nerve.runtime.cli.main import check_arguments
from nerve.runtime.errors import ConfigError
from nerve.runtime.subjects import is_token

NERVE = str(Path(sys.executable).parent / "nerve")
NOT_TOKENS = ["bad dev", "a.b", ">", "*", "", "x" * 65, "pi/01", "é"]


async def nerve(*args: str) -> tuple[int, str, str]:
    # No broker is needed: every one of these must stop before connecting to anything. The URLs point
    # nowhere, so a check that let one through would fail on the connection, not hang on a real broker.
    env = {key: value for key, value in os.environ.items() if not key.startswith("NERVE_")}
    env |= {
        "NERVE_NATS__URL": "nats://nowhere.invalid:4222",
        "NERVE_MQTT__URL": "mqtt://nowhere.invalid:1883",
    }
    process = await asyncio.create_subprocess_exec(
        NERVE, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("device", NOT_TOKENS)
async def test_facts_device_must_be_a_device_id(device: str) -> None:
    code, out, err = await nerve("facts", "--device", device)
    assert code == 2
    assert out == ""
    assert err == (
        f"nerve facts: error: command line: --device: {device!r} is not a valid device id: "
        "use 1 to 64 of A-Z a-z 0-9 _ - (no wildcards, no dots)\n"
    )


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["send", "a.b", "clear_temp"], "DEVICE"),
        (["send", ">", "clear_temp"], "DEVICE"),
        (["send", "pi-01", "clear.temp"], "ACTION"),
        (["send", "pi-01", "*"], "ACTION"),
        (["up", "--device", "a b"], "--device"),
        (["demo", "--device", "a.b"], "--device"),
        (["edge", "--device", ">"], "--device"),
        (["keys", "generate", "--keyid", "../central"], "--keyid"),
        (["facts", "--limit", "-1"], "--limit"),
        (["deadletters", "--limit", "-5"], "--limit"),
    ],
)
async def test_every_flag_that_names_something_is_checked_first(args: list[str], flag: str) -> None:
    code, out, err = await nerve(*args)
    assert code == 2
    assert out == ""
    assert err.startswith(f"nerve {args[0]}: error: command line: {flag}: ")
    assert err.count("\n") == 1


@given(value=st.text(max_size=70))
def testcheck_arguments_lets_through_exactly_the_tokens(value: str) -> None:
    args = argparse.Namespace(command="facts", device=value, limit=0)
    if is_token(value):
        check_arguments(args)
    else:
        with pytest.raises(ConfigError) as caught:
            check_arguments(args)
        assert caught.value.key == "--device"


@pytest.mark.parametrize("device", ["*", ">", "a.b"])
async def test_read_facts_never_widens_its_subject(device: str) -> None:
    from nerve.runtime.cli.history import read_facts  # noqa: PLC0415 - imports nats-py

    with pytest.raises(ConfigError, match="is not a valid device id"):
        await read_facts(None, prefix="nerve", device=device)  # type: ignore[arg-type] # never reached
