"""The `nerve` command as a user runs it: real processes, real brokers, exit codes and messages."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from nerve.runtime.stack.brokers import free_port, port_answers

if TYPE_CHECKING:
    from nerve.runtime.config.settings import Settings

NERVE = str(Path(sys.executable).parent / "nerve")


async def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        NERVE,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    async with asyncio.timeout(timeout):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_config_typo_is_one_clear_line(tmp_path: Path) -> None:
    config = tmp_path / "central.yaml"
    config.write_text("central:\n  disk:\n    treshold: 80\n")
    code, _, err = await run("central", "--config", str(config))
    assert code == 2
    assert f"{config}: central.disk.treshold: unknown key" in err
    assert "Traceback" not in err


async def test_bad_env_value_names_the_variable_source() -> None:
    code, _, err = await run("facts", env={"NERVE_NATS__URL": "http://nope"})
    assert code == 2
    assert "environment: nats.url" in err
    assert "Traceback" not in err


async def test_unreachable_broker_is_a_clear_error() -> None:
    port = free_port()
    code, _, err = await run(
        "facts", "--nats-url", f"nats://127.0.0.1:{port}", env={"NERVE_NATS__CONNECT_TIMEOUT_S": "1"}
    )
    assert code == 2
    assert f"nats://127.0.0.1:{port} is unavailable" in err
    assert "Traceback" not in err


async def test_bad_log_level_is_refused_by_the_parser() -> None:
    code, _, err = await run("facts", "--log-level", "loud")
    assert code == 2
    assert "invalid choice: 'loud'" in err
    assert "Traceback" not in err


async def test_keys_generate(tmp_path: Path) -> None:
    code, out, _ = await run("keys", "generate", "--dir", str(tmp_path), "--keyid", "ops-1")
    assert code == 0
    assert (tmp_path / "ops-1.key").stat().st_mode & 0o777 == 0o600
    assert "ops-1.pub" in out
    code, _, err = await run("keys", "generate", "--dir", str(tmp_path), "--keyid", "ops-1")
    assert code == 2
    assert "--force" in err


async def test_central_without_key_says_how_to_get_one(settings: Settings) -> None:
    code, _, err = await run("central", "--nats-url", settings.nats.url)
    assert code == 2
    assert "nerve keys generate" in err


@pytest.mark.broker
@pytest.mark.slow
async def test_demo_succeeds() -> None:
    code, out, err = await run("demo", "--device", "cli-demo")
    assert code == 0, out + err
    assert "demo OK" in out
    for step in (
        "spike published",
        "command on device topic",
        "result from device",
        "fact incident_resolved",
    ):
        assert step in out


@pytest.mark.broker
async def test_facts_prints_the_chain(settings: Settings, tmp_path: Path) -> None:
    code, out, _ = await run("facts", "--nats-url", settings.nats.url)
    assert code == 0
    assert "no facts yet" in out


@pytest.mark.broker
@pytest.mark.slow
async def test_up_starts_brokers_and_sigterm_stops_everything(tmp_path: Path) -> None:
    mqtt_port, nats_port = free_port(), free_port()
    # The central key goes where `nerve send` looks by default: here, not the real ~/.config.
    keys_home = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    process = await asyncio.create_subprocess_exec(
        NERVE,
        "up",
        "--device",
        "up-test",
        "--mqtt-port",
        str(mqtt_port),
        "--nats-port",
        str(nats_port),
        "--data-dir",
        str(tmp_path / "data"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, **keys_home},
    )
    assert process.stdout is not None
    async with asyncio.timeout(30):
        ready = (await process.stdout.readline()).decode()
    assert ready.startswith("nerve is up: device up-test; try: ")
    assert f"mosquitto_pub -h 127.0.0.1 -p {mqtt_port} -t nerve/up-test/telemetry/disk" in ready
    details = (await process.stdout.readline()).decode()
    assert "started: mosquitto, nats-server" in details
    # The commands it suggests can be typed here as shown (`make run` puts no nerve on the PATH).
    then = (await process.stdout.readline()).decode()
    assert is_this_nerve(then.split("then: ", 1)[1].split()[0])
    # Its nats-server lets only nerve's identities in: the commands it suggests name the data dir
    # where the cli's is, and without it they are refused in one line.
    data_dir = ("--data-dir", str(tmp_path / "data"))
    assert f"--data-dir {tmp_path / 'data'}" in then
    code, _, err = await run("facts", "--nats-url", f"nats://127.0.0.1:{nats_port}")
    assert code == 2
    assert "refused a client with no identity (Authorization Violation" in err
    # It says its broker is for this host only, and how devices on a network get a site broker.
    await process.stdout.readline()  # clear_temp's scratch folder
    loopback = (await process.stdout.readline()).decode()
    assert "127.0.0.1 only and takes anonymous clients" in loopback
    assert "configs/mosquitto-site.conf" in loopback
    assert is_this_nerve(loopback.split("`", 1)[1].split()[0])
    assert await port_answers("127.0.0.1", mqtt_port)
    assert await port_answers("127.0.0.1", nats_port)

    # A spike typed by a person goes through, and `nerve facts` shows it.
    pub = await asyncio.create_subprocess_exec(
        "mosquitto_pub", "-p", str(mqtt_port), "-q", "1", "-t", "nerve/up-test/telemetry/disk", "-m", "96"
    )
    assert await pub.wait() == 0
    cleared = False
    async with asyncio.timeout(15):
        while True:
            code, out, _ = await run(
                "facts", "--nats-url", f"nats://127.0.0.1:{nats_port}", "--device", "up-test", *data_dir
            )
            assert code == 0
            if "incident_resolved" in out:
                break
            if "command_result" in out and not cleared:  # the runbook now waits for the next reading
                await next_reading(mqtt_port, "up-test")
                cleared = True
            await asyncio.sleep(0.2)

    # `nerve send` without --key signs with the key this `nerve up` trusts (whatever --data-dir says).
    code, out, err = await run(
        "send",
        "up-test",
        "clear_temp",
        "--nats-url",
        f"nats://127.0.0.1:{nats_port}",
        *data_dir,
        env=keys_home,
    )
    assert (code, err) == (0, "")
    assert out.startswith("ok: clear_temp on up-test")

    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(20):
        assert await process.wait() == 0
    assert not await port_answers("127.0.0.1", mqtt_port)
    assert not await port_answers("127.0.0.1", nats_port)


def is_this_nerve(typed: str) -> bool:
    """Whether `typed`, typed in this working directory, runs the nerve under test."""
    found = shutil.which(typed) if "/" not in typed else typed
    return found is not None and Path(found).samefile(NERVE)


async def start_up(data_dir: Path, mqtt_port: int, nats_port: int) -> asyncio.subprocess.Process:
    keys_home = {"XDG_CONFIG_HOME": str(data_dir.parent / "config")}
    process = await asyncio.create_subprocess_exec(
        NERVE,
        "up",
        "--device",
        "k9",
        "--mqtt-port",
        str(mqtt_port),
        "--nats-port",
        str(nats_port),
        "--data-dir",
        str(data_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, **keys_home},
    )
    assert process.stdout is not None
    async with asyncio.timeout(30):
        assert (await process.stdout.readline()).startswith(b"nerve is up")
    return process


async def next_reading(mqtt_port: int, device: str) -> None:
    """The device's next disk reading, below the clear level, as its edge would send once the disk cleared.

    The spike was typed by a person (the disk is not really full), so the edge sees no change to report.
    """
    pub = await asyncio.create_subprocess_exec(
        "mosquitto_pub", "-p", str(mqtt_port), "-q", "1", "-t", f"nerve/{device}/telemetry/disk", "-m", "40"
    )
    assert await pub.wait() == 0


async def wait_closed(port: int) -> None:
    async with asyncio.timeout(10):
        while await port_answers("127.0.0.1", port):
            await asyncio.sleep(0.1)


@pytest.mark.broker
@pytest.mark.slow
async def test_kill_9_of_up_takes_its_brokers_and_keeps_the_facts(tmp_path: Path) -> None:
    mqtt_port, nats_port = free_port(), free_port()
    nats_url = f"nats://127.0.0.1:{nats_port}"
    data_dir = ("--data-dir", str(tmp_path / "data"))  # where the cli's NATS identity is
    process = await start_up(tmp_path / "data", mqtt_port, nats_port)
    pub = await asyncio.create_subprocess_exec(
        "mosquitto_pub", "-p", str(mqtt_port), "-q", "1", "-t", "nerve/k9/telemetry/disk", "-m", "99"
    )
    assert await pub.wait() == 0
    cleared = False
    async with asyncio.timeout(15):
        while "incident_resolved" not in (out := (await run("facts", "--nats-url", nats_url, *data_dir))[1]):
            if "command_result" in out and not cleared:
                await next_reading(mqtt_port, "k9")
                cleared = True
            await asyncio.sleep(0.2)

    process.kill()  # kill -9: no chance to clean up
    await process.wait()
    await wait_closed(mqtt_port)  # the brokers it started went with it
    await wait_closed(nats_port)

    process = await start_up(tmp_path / "data", mqtt_port, nats_port)
    try:
        # A second `nerve up` on the same data dir would fight the first over its MQTT sessions.
        code, _, err = await run("up", "--data-dir", str(tmp_path / "data"), "--mqtt-port", str(mqtt_port))
        assert code == 2
        assert f"in use by a running nerve up (pid {process.pid})" in err
        # With the key `nerve up` made (start_up's XDG_CONFIG_HOME): every fact verified, none marked.
        keys_home = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
        code, out, _ = await run("facts", "--nats-url", nats_url, "--device", "k9", *data_dir, env=keys_home)
        assert code == 0
        assert [line.split()[2] for line in out.splitlines()] == [
            "incident_opened",
            "command_issued",
            "command_result",
            "incident_resolved",
        ]
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await process.wait() == 0


@pytest.mark.broker
async def test_deadletters_shows_reason_origin_and_bytes(settings: Settings) -> None:
    from nerve.bridge import Bridge  # noqa: PLC0415

    bridge = Bridge(settings=settings)
    task = asyncio.create_task(bridge.run())
    try:
        async with asyncio.timeout(10):
            await bridge.ready.wait()
        port = settings.mqtt.url.rsplit(":", 1)[1]
        pub = await asyncio.create_subprocess_exec(
            "mosquitto_pub", "-p", port, "-q", "1", "-t", "nerve/pi-01/telemetry/disk", "-m", "hello"
        )
        assert await pub.wait() == 0
        async with asyncio.timeout(10):
            while bridge.stats.deadlettered == 0:
                await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    code, out, _ = await run("deadletters", "--nats-url", settings.nats.url)
    assert code == 0
    assert "bridge" in out
    assert "nerve/pi-01/telemetry/disk" in out
    assert "must be a number" in out
    assert "b'hello'" in out


@pytest.mark.broker
@pytest.mark.slow
async def test_kill_9_mid_incident_resumes_the_runbook_where_it_was(tmp_path: Path) -> None:
    """`nerve up` killed while the disk runbook waits for the verifying reading: the next one finishes it."""
    mqtt_port, nats_port = free_port(), free_port()
    nats_url = f"nats://127.0.0.1:{nats_port}"
    data_dir = ("--data-dir", str(tmp_path / "data"))
    process = await start_up(tmp_path / "data", mqtt_port, nats_port)
    pub = await asyncio.create_subprocess_exec(
        "mosquitto_pub", "-p", str(mqtt_port), "-q", "1", "-t", "nerve/k9/telemetry/disk", "-m", "99"
    )
    assert await pub.wait() == 0
    async with asyncio.timeout(15):
        while "command_result" not in (await run("facts", "--nats-url", nats_url, *data_dir))[1]:
            await asyncio.sleep(0.2)
    process.kill()  # kill -9 while the run waits for the reading (its lease held by the dead process)
    await process.wait()
    await wait_closed(nats_port)

    process = await start_up(tmp_path / "data", mqtt_port, nats_port)
    # With the key `nerve up` made (start_up's XDG_CONFIG_HOME): every fact verified, none marked.
    keys_home = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    try:
        await next_reading(mqtt_port, "k9")  # read from the journalled position whenever the run resumes
        async with asyncio.timeout(60):  # the lease of the killed process runs out first (15 s)
            while True:
                out = (await run("facts", "--nats-url", nats_url, *data_dir, env=keys_home))[1]
                if "incident_resolved" in out:
                    break
                await asyncio.sleep(0.5)
        kinds = [line.split()[2] for line in out.splitlines()]
        assert kinds == ["incident_opened", "command_issued", "command_result", "incident_resolved"]
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await process.wait() == 0
