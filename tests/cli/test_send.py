"""`nerve send` end to end: the real command, through NATS, the bridge, mosquitto and an edge agent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import nats
import pytest

from nerve.agents.audit import CommandAudit
from nerve.bridge import Bridge
from nerve.edge.daemon import open_edge
from nerve.runtime.central.runner import Central
from nerve.runtime.cli.main import EXIT_OF_STATUS
from nerve.runtime.cli.send import (
    MAX_EXPIRES_S,
    CommandChannel,
    format_age,
    parse_args,
    parse_duration,
    parse_expires_in,
    presence_notice,
)
from nerve.runtime.config.settings import EdgeSettings, Settings
from nerve.runtime.envelope.codec import decode, to_json
from nerve.runtime.envelope.model import Command, CommandResult, Fact
from nerve.runtime.errors import ConfigError
from nerve.runtime.jetstream.streams import ensure_streams
from nerve.runtime.testing import provision_device, stream_messages, wait_for_count
from nerve.runtime.trust.expiry import EXPIRED_CLAIM_MARGIN_S
from nerve.runtime.trust.signing import Signer, generate_keypair
from nerve.runtime.wire.client import MqttClient

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from nats.aio.client import Client as NatsClient

NERVE = str(Path(sys.executable).parent / "nerve")
DEVICE = "pi-send"
WAIT = 30.0


def clean_env(config_home: Path | None = None, **settings: str) -> dict[str, str]:
    """This environment without NERVE_* settings, plus `settings`; keys under `config_home`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("NERVE_")}
    env["XDG_CONFIG_HOME"] = str(config_home or Path(os.devnull) / "no-config")
    return env | settings


async def start(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        NERVE,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env or clean_env(),
    )


async def nerve(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await start(*args, env=env)
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


def test_expires_in_is_at_most_what_a_device_accepts_by_default() -> None:
    assert MAX_EXPIRES_S == EdgeSettings().max_command_validity_s == 300.0
    assert parse_expires_in("5m") == 300.0
    assert parse_expires_in("90s") == 90.0
    for text in ("301s", "10m", "7d"):
        with pytest.raises(ConfigError, match=f"'{text}' is longer than 300s: devices refuse") as caught:
            parse_expires_in(text)
        assert caught.value.key == "--expires-in"
    # --timeout still takes up to 7 days.
    assert parse_duration("7d", flag="--timeout") == 7 * 86400.0


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
        (
            ["--expires-in", "1h"],
            (
                "nerve send: error: command line: --expires-in: '1h' is longer than 300s: devices refuse a "
                "command valid for longer (edge.max_command_validity_s)"
            ),
        ),
        (["--timeout", "0"], "nerve send: error: command line: --timeout: '0' is not a duration"),
    ],
)
async def test_bad_flags_are_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    code, out, err = await nerve("send", DEVICE, "clear_temp", *args, env=clean_env(tmp_path))
    assert code == 2
    assert err.startswith(message)
    assert err.count("\n") == 1
    assert out == ""


async def test_without_a_key_says_where_it_looked_and_how_to_get_one(tmp_path: Path) -> None:
    code, _, err = await nerve("send", DEVICE, "clear_temp", env=clean_env(tmp_path))
    assert code == 2
    assert err == (
        f"nerve send: error: central.signing_key: no signing key at {tmp_path}/nerve/keys/central.key "
        "(`nerve up` creates it there; or pass --key FILE, or set central.signing_key)\n"
    )


async def test_a_missing_key_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "ops.key"
    code, _, err = await nerve("send", DEVICE, "clear_temp", "--key", str(missing), env=clean_env(tmp_path))
    assert code == 2
    assert err.startswith(
        f"nerve send: error: command line: --key: no signing key at {missing} (check the path"
    )
    assert err.count("\n") == 1


def test_send_and_up_find_the_same_key_by_default(tmp_path: Path) -> None:
    # `nerve up` creates the key where `nerve send` looks, whatever --data-dir or the working directory.
    from nerve.runtime.cli.main import default_keys_dir  # noqa: PLC0415
    from nerve.runtime.cli.send import signing_key_path  # noqa: PLC0415

    keys = default_keys_dir({"XDG_CONFIG_HOME": str(tmp_path)})
    assert keys == tmp_path / "nerve" / "keys"
    assert default_keys_dir({"HOME": "/home/op"}) == Path("/home/op/.config/nerve/keys")
    for data_dir in (".nerve", "/srv/other"):
        settings = Settings.model_validate({"data_dir": data_dir})
        assert signing_key_path(settings, None, keys) == (keys / "central.key", True)
    explicit = Settings.model_validate({"central": {"signing_key": "/etc/nerve/ops.key"}})
    assert signing_key_path(explicit, None, keys) == (Path("/etc/nerve/ops.key"), False)
    assert signing_key_path(explicit, Path("k.key"), keys) == (Path("k.key"), False)


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
    # argparse wraps the help text: compare it as one line.
    assert "at most 300s, the longest a device accepts by default: edge.max_command_validity_s" in " ".join(
        out.split()
    )


# --- against a real stack: brokers, bridge and edge ----------------------------------------------


def device_env(settings: Settings, config_home: Path | None = None, **more: str) -> dict[str, str]:
    """`clean_env` with the data dir of `settings`: `nerve send` finds the device registry there."""
    return clean_env(config_home, NERVE_DATA_DIR=str(settings.data_dir), **more)


@pytest.fixture
def stack_settings(settings: Settings, tmp_path: Path) -> Settings:
    generate_keypair(tmp_path / "keys", "central")
    provision_device(settings.data_dir / "devices", DEVICE)  # the device's key, registered
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    return Settings.model_validate(
        {
            **settings.model_dump(mode="json"),
            "edge": {
                "device": DEVICE,
                "signing_key": str(settings.data_dir / "device-keys" / f"{DEVICE}.key"),
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
            *send_args(stack_settings, tmp_path, DEVICE, "clear_temp", "--arg", "older_than_s=3600"),
            env=device_env(stack_settings),
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
        env = device_env(stack_settings)
        code, out, _ = await nerve(*send_args(stack_settings, tmp_path, DEVICE, "reboot"), env=env)
        assert code == 3
        assert out == f"rejected: reboot on {DEVICE}: action 'reboot' is not allow-listed on this device\n"

        code, out, _ = await nerve(
            *send_args(stack_settings, tmp_path, DEVICE, "clear_temp", "--arg", "path=/etc"), env=env
        )
        assert code == 3
        assert "argument 'path' is not a known argument" in out

        code, out, _ = await nerve(
            *send_args(stack_settings, tmp_path, DEVICE, "run", "--arg", "script=fails", "--json"), env=env
        )
        assert code == 1
        result = json.loads(out)
        assert (result["status"], result["reason"]) == ("failed", "script fails: /bin/sh exited with 4")
        assert result["data"]["stderr"] == "broken\n"
    assert victim.exists()


@pytest.mark.broker
@pytest.mark.parametrize(
    ("ahead", "valid_for", "reason"),
    [
        (timedelta(days=1), timedelta(minutes=1), "future-dated: command time is "),
        (timedelta(), timedelta(days=36500), "validity too long: command is valid for 3153600000 s"),
    ],
)
async def test_a_future_dated_or_over_long_command_is_refused_and_kept_as_a_fact(  # noqa: PLR0917 - fixtures
    stack_settings: Settings,
    tmp_path: Path,
    nc: NatsClient,
    ahead: timedelta,
    valid_for: timedelta,
    reason: str,
) -> None:
    victim = tmp_path / "scratch" / "victim.log"
    victim.write_bytes(b"x")
    then = time.time() - 7200
    os.utime(victim, (then, then))
    signer = Signer.from_file(tmp_path / "keys" / "central.key")
    start = datetime.now(UTC) + ahead
    unsigned = Command.create(
        device=DEVICE, action="clear_temp", args={"older_than_s": 0}, source="t", ttl=timedelta(minutes=1)
    )
    command = signer.sign(msgspec.structs.replace(unsigned, time=start, expires=start + valid_for))
    audit = Central(settings=stack_settings, signer=signer, agents=[CommandAudit()])
    async with running_stack(stack_settings), CommandChannel(stack_settings) as channel:
        audit_task = asyncio.create_task(audit.run())
        try:
            async with asyncio.timeout(WAIT):
                await audit.ready.wait()
            await channel.send(command, device=DEVICE)
            result = await channel.result(command, timeout=WAIT)
            await wait_for_count(nc.jetstream(), "NERVE_FACTS", 1, timeout=WAIT)
        finally:
            audit_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await audit_task
    assert result is not None
    assert (result.status, result.causationid) == ("rejected", command.id)
    assert reason in result.reason
    [fact] = [decode(m.data, Fact) for m in await stream_messages(nc.jetstream(), "NERVE_FACTS")]
    assert (fact.kind, fact.data["command_id"]) == ("command_rejected", command.id)
    assert reason in fact.summary
    assert victim.exists()


@pytest.mark.broker
async def test_send_times_out_when_no_device_answers(stack_settings: Settings, tmp_path: Path) -> None:
    async with running_stack(stack_settings):
        code, out, err = await nerve(
            *send_args(stack_settings, tmp_path, "ghost", "clear_temp", "--timeout", "1s")
        )
    assert code == 6
    assert out == ""
    lines = err.splitlines()
    assert (
        lines[0] == "nerve send: signing with " + str(tmp_path / "keys" / "central.key") + " (key id central)"
    )
    assert lines[-1].startswith("nerve send: no result from ghost within 1s (command ")
    assert "it may still run until it expires at" in lines[-1]


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
            env=device_env(stack_settings),
        )
    assert code == 3
    assert "signed by unknown key id 'rogue'" in out


# --- saying early what is wrong, and Ctrl-C -----------------------------------------------------------

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0, "0s"), (59.9, "59s"), (61, "1m 1s"), (3600 + 120, "1h 2m"), (2 * 86400 + 3 * 3600 + 5, "2d 3h")],
)
def test_format_age(seconds: float, shown: str) -> None:
    assert format_age(seconds) == shown


def test_presence_notice() -> None:
    assert presence_notice("pi", NOW - timedelta(seconds=30), now=NOW, offline_after_s=600) is None
    assert presence_notice("pi", NOW - timedelta(seconds=600), now=NOW, offline_after_s=600) is None
    assert (
        presence_notice("pi", NOW - timedelta(hours=2, minutes=5), now=NOW, offline_after_s=600)
        == "device pi seems offline: its last message is 2h 5m old"
    )
    assert presence_notice("pi", None, now=NOW, offline_after_s=600) == (
        "device pi has never been seen (no message from it in NERVE_TELEMETRY, NERVE_EVENTS, NERVE_RESULTS)"
    )


@pytest.mark.broker
async def test_last_seen_is_the_newest_message_of_the_device(settings: Settings) -> None:
    async with CommandChannel(settings) as channel:
        assert await channel.last_seen("pi-07") is None
        js = channel._client.jetstream()
        await js.publish("nerve.pi-07.telemetry.disk", b"95")
        newest = await js.publish("nerve.pi-07.results.clear_temp", b"{}")
        await js.publish("nerve.pi-070.telemetry.disk", b"95")  # another device, whose name starts alike
        stored = await js.get_msg("NERVE_RESULTS", newest.seq)
        assert await channel.last_seen("pi-07") == stored.time
        assert await channel.last_seen("pi-0") is None


@pytest.mark.broker
async def test_a_device_never_seen_is_said_early_and_ctrl_c_exits_130(
    stack_settings: Settings, tmp_path: Path
) -> None:
    process = await start(*send_args(stack_settings, tmp_path, "ghost", "clear_temp", "--timeout", "5m"))
    assert process.stderr is not None
    async with asyncio.timeout(WAIT):
        assert (await process.stderr.readline()).decode().startswith("nerve send: signing with ")
        notice = (await process.stderr.readline()).decode()
    assert process.returncode is None  # said while it waits, long before the timeout
    assert notice == (
        "nerve send: device ghost has never been seen (no message from it in NERVE_TELEMETRY, NERVE_EVENTS, "
        "NERVE_RESULTS); waiting up to 300s for a result\n"
    )
    process.send_signal(signal.SIGINT)
    async with asyncio.timeout(WAIT):
        out, err = await process.communicate()
        code = await process.wait()
    assert code == 130
    assert out == b""
    assert err.decode().startswith("nerve send: interrupted: command ")
    assert "was sent and may still run until" in err.decode()
    assert err.count(b"\n") == 1


@pytest.mark.broker
async def test_a_device_silent_for_two_heartbeats_seems_offline(
    stack_settings: Settings, tmp_path: Path
) -> None:
    nc = await nats.connect(stack_settings.nats.url)
    try:
        await ensure_streams(nc.jetstream(), "nerve")
        await nc.jetstream().publish("nerve.sleepy.telemetry.disk", b"42")
    finally:
        await nc.close()
    await asyncio.sleep(1.5)  # older than two heartbeats of 0.5 s (a fact set up, not a timing asserted)
    code, _, err = await nerve(
        *send_args(stack_settings, tmp_path, "sleepy", "clear_temp", "--timeout", "1s"),
        env=clean_env(tmp_path, NERVE_EDGE__HEARTBEAT_S="0.5"),
    )
    assert code == 6
    assert re.search(
        r"^nerve send: device sleepy seems offline: its last message is \ds old; waiting", err, re.MULTILINE
    )


@pytest.mark.broker
async def test_a_key_the_device_does_not_trust_is_named(stack_settings: Settings, tmp_path: Path) -> None:
    generate_keypair(tmp_path / "other", "central")  # the right key id, the wrong key
    async with running_stack(stack_settings):
        code, out, err = await nerve(
            "send",
            DEVICE,
            "clear_temp",
            "--nats-url",
            stack_settings.nats.url,
            env=device_env(
                stack_settings,
                tmp_path / "config",
                NERVE_CENTRAL__SIGNING_KEY=str(tmp_path / "other" / "central.key"),
            ),
        )
    assert code == 3
    assert "bad signature" in out
    assert err.splitlines()[-1] == (
        f"nerve send: it was signed with {tmp_path}/other/central.key (key id central); "
        f"is that the key {DEVICE} trusts?"
    )


@pytest.mark.broker
async def test_the_default_key_is_the_one_nerve_up_trusts(stack_settings: Settings, tmp_path: Path) -> None:
    # What `nerve up` does with no key in its settings: the key pair lives in the per-user keys dir.
    config = tmp_path / "config"
    generate_keypair(config / "nerve" / "keys", "central")
    trusting = stack_settings.model_copy(
        update={
            "edge": stack_settings.edge.model_copy(update={"trusted_keys_dir": config / "nerve" / "keys"})
        }
    )
    async with running_stack(trusting):
        code, out, err = await nerve(
            "send", DEVICE, "clear_temp", "--nats-url", trusting.nats.url, env=device_env(trusting, config)
        )
    assert code == 0, out + err
    assert out.startswith(f"ok: clear_temp on {DEVICE}")
    assert "signing with" not in err


@pytest.mark.broker
async def test_a_forged_ok_for_an_offline_device_is_ignored_and_send_does_not_exit_0(
    stack_settings: Settings, tmp_path: Path
) -> None:
    """Issue 9: an attacker answers for an offline device; `nerve send` waits on and exits 6, not 0."""
    offline = "pi-offline"
    provision_device(stack_settings.data_dir / "devices", offline)  # registered, but not running
    rogue = Signer.from_file(generate_keypair(tmp_path / "rogue", offline)[0])  # its id, not its key
    forged: list[str] = []

    async def attacker(client: MqttClient) -> None:
        async for message in client.messages:
            command = decode(message.payload, Command)
            for status in ("ok", "failed"):
                result = CommandResult.for_command(
                    command, source=f"nerve://edge/{offline}", status=status, data={"files_deleted": 4242}
                )
                for fake in (result, rogue.sign(result)):
                    await client.publish(f"nerve/{offline}/results/{command.action}", to_json(fake), qos=1)
                    forged.append(fake.id)

    async with (
        running_stack(stack_settings),
        MqttClient(stack_settings.mqtt, client_id="attacker") as client,
        asyncio.TaskGroup() as tasks,
    ):
        await client.subscribe(f"nerve/{offline}/commands/+")
        listening = tasks.create_task(attacker(client))
        code, out, err = await nerve(
            *send_args(stack_settings, tmp_path, offline, "clear_temp", "--timeout", "3s"),
            env=device_env(stack_settings),
        )
        listening.cancel()
    assert len(forged) == 4  # the forgeries were sent while it waited
    assert code == 6, err
    assert out == ""
    ignored = [line for line in err.splitlines() if "unverified result" in line]
    assert len(ignored) == 4
    assert "ignored: result from pi-offline is not signed" in ignored[0]
    assert "ignored: result from pi-offline: bad signature: the result was altered or forged" in ignored[1]
    assert err.splitlines()[-1].startswith(f"nerve send: no result from {offline} within 3s")


# --- the bridge's unsigned `expired` (nerve.runtime.trust.expiry) ---------------------------------


@pytest.mark.broker
async def test_a_command_the_bridge_expired_exits_4(
    stack_settings: Settings, nc: NatsClient, tmp_path: Path
) -> None:
    """The bridge is away until the command expired; back, it stores `expired` (unsigned): exit 4, not 6."""
    js = nc.jetstream()
    await ensure_streams(js, stack_settings.prefix)
    process = await start(
        *send_args(stack_settings, tmp_path, DEVICE, "clear_temp", "--expires-in", "1s", "--timeout", "20s"),
        env=device_env(stack_settings),
    )
    await wait_for_count(js, "NERVE_COMMANDS", 1)
    (stored,) = await stream_messages(js, "NERVE_COMMANDS")
    command = decode(stored.data, Command)
    left = (command.expires - datetime.now(UTC)).total_seconds() + EXPIRED_CLAIM_MARGIN_S
    await asyncio.sleep(max(0.0, left) + 0.05)
    async with running_stack(stack_settings), asyncio.timeout(WAIT):
        out, err = await process.communicate()
    assert process.returncode == 4, err.decode()
    assert out.decode().startswith(f"expired: clear_temp on {DEVICE}: expired at ")
    assert "before the bridge could send it" in out.decode()
    assert "unverified" not in err.decode()


@pytest.mark.broker
async def test_a_forged_expired_before_the_command_expired_is_ignored_and_send_does_not_exit_4(
    stack_settings: Settings, tmp_path: Path
) -> None:
    """Someone answers `expired` (unsigned, dated an hour on) at once: it is too early to be believed."""
    offline = "pi-away"
    provision_device(stack_settings.data_dir / "devices", offline)  # registered, but not running
    forged: list[CommandResult] = []

    async def attacker(client: MqttClient) -> None:
        async for message in client.messages:
            command = decode(message.payload, Command)
            result = CommandResult.for_command(command, source="nerve://bridge", status="expired")
            late = msgspec.structs.replace(result, time=command.expires + timedelta(hours=1))
            await client.publish(f"nerve/{offline}/results/{command.action}", to_json(late), qos=1)
            forged.append(late)

    async with (
        running_stack(stack_settings),
        MqttClient(stack_settings.mqtt, client_id="attacker") as client,
        asyncio.TaskGroup() as tasks,
    ):
        await client.subscribe(f"nerve/{offline}/commands/+")
        listening = tasks.create_task(attacker(client))
        code, out, err = await nerve(
            *send_args(
                stack_settings, tmp_path, offline, "clear_temp", "--expires-in", "30s", "--timeout", "3s"
            ),
            env=device_env(stack_settings),
        )
        listening.cancel()
    assert len(forged) == 1
    assert code == 6, err
    assert out == ""
    [ignored] = [line for line in err.splitlines() if "unverified result" in line]
    expected = f"unverified result {forged[0].id} (expired) ignored: result from {offline} is not signed, and"
    assert f"{expected} it came at " in ignored
    assert "before the command expired" in ignored
