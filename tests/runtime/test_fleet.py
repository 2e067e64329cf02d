"""`nerve simulate`: simulated devices through mosquitto, the bridge, JetStream and central, measured."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import math
import resource
import struct
import subprocess
import sys
import threading
from typing import TYPE_CHECKING, Any

import nats
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.js import JetStreamContext

from nerve.runtime.cli.main import _parser, main
from nerve.runtime.cli.simulate import run
from nerve.runtime.config.settings import load_settings
from nerve.runtime.errors import BrokerUnavailable, ConfigError
from nerve.runtime.fleet import FleetPlan, Second, Simulation, Summary, percentile
from nerve.runtime.fleet import simulate as simulate_module
from nerve.runtime.fleet.simulate import MAX_QUEUED, readings_due
from nerve.runtime.fleet.watch import ARGV as WATCH_ARGV
from nerve.runtime.jetstream.streams import ensure_streams
from nerve.runtime.stack.brokers import free_port
from nerve.runtime.stack.local import Stack
from nerve.runtime.subjects import Kind
from nerve.runtime.testing import provision_device
from nerve.runtime.wire.mqtt import packet, varint

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractAsyncContextManager
    from pathlib import Path

    from tests.conftest import Serve

    from nerve.runtime.config.settings import Settings
    from nerve.runtime.stack.brokers import NatsServer


def _quiet(settings: Settings) -> Settings:
    # Only the simulated spikes: the host's real disk must not open an incident of its own.
    return settings.model_copy(update={"edge": settings.edge.model_copy(update={"mounts": ()})})


@pytest.mark.broker
async def test_a_small_fleet_is_stored_once_and_every_spike_gets_its_command(settings: Settings) -> None:
    async with Stack(settings=_quiet(settings), device="pi-sim") as stack:
        args = _parser().parse_args(
            ["simulate", "--devices", "20", "--rate", "5", "--spikes", "2", "--duration", "5", "--json"]
        )
        out = io.StringIO()
        status = await run(args, stack.settings, out=out)
        registry = stack.settings.central.device_keys_dir
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["type"] for line in lines[:-1]] == ["second"] * (len(lines) - 1)
    assert len(lines) - 1 >= 4  # a line a second while loaded (the last may race the end)
    assert {key for key in lines[0] if key != "type"} == {field.name for field in dataclasses.fields(Second)}
    summary = lines[-1]
    assert summary["type"] == "summary"
    assert {key for key in summary if key != "type"} == {field.name for field in dataclasses.fields(Summary)}
    assert status == 0
    assert summary["devices"] == 20
    assert summary["connections"] == 20
    assert summary["interrupted"] is False
    # 20 devices x 5 readings/s x 5 s, plus the spikes (each a reading too).
    assert 450 <= summary["offered"] <= 520
    assert summary["stored"] == summary["offered"]
    assert summary["lost"] == 0
    assert summary["unacknowledged"] == 0
    assert summary["duplicates"] == 0
    assert summary["connections_lost"] == 0
    assert summary["lag_p50_ms"] is not None
    assert summary["lag_p50_ms"] <= summary["lag_p99_ms"] <= summary["lag_max_ms"]
    assert 8 <= summary["spikes"] <= 10
    assert summary["commands"] == summary["spikes"]
    assert summary["spikes_without_command"] == 0
    assert summary["duplicate_commands"] == 0
    assert summary["command_p50_ms"] is not None
    assert summary["command_p99_ms"] is not None
    # The command watcher (its own process) saw every command mosquitto delivered.
    assert 0 < summary["delivered_p50_ms"] <= summary["delivered_p99_ms"]
    # Where the time went: every part is a duration, and at the median they add up to about the whole
    # (each part's median is of its own samples, so only about).
    parts = ("spike_stored", "central", "downlink")
    for part in parts:
        assert 0 <= summary[f"{part}_p50_ms"] <= summary[f"{part}_p99_ms"]
    assert sum(summary[f"{part}_p50_ms"] for part in parts) <= 2 * summary["command_p99_ms"]
    assert max(summary[f"{part}_p99_ms"] for part in parts) <= summary["command_p99_ms"] + 1
    # The command's part split where JetStream stored it: central publishing it, then bridge and mosquitto.
    for part in ("command_stored", "sent_down"):
        assert 0 <= summary[f"{part}_p50_ms"] <= summary[f"{part}_p99_ms"] <= summary["downlink_p99_ms"] + 1
    assert summary["command_stored_p50_ms"] + summary["sent_down_p50_ms"] <= 2 * summary["downlink_p99_ms"]
    # Signed by each device's own key, so central believed them and closed every incident.
    assert summary["incidents_resolved"] == summary["spikes"]
    assert summary["incidents_failed"] == 0
    # The simulated devices' registrations are gone; the stack's own device stays.
    assert registry is not None
    assert sorted(path.name for path in registry.iterdir() if path.is_file()) == ["pi-sim.pub"]


@pytest.mark.broker
async def test_devices_multiplexed_over_a_few_connections_still_get_their_commands(
    settings: Settings,
) -> None:
    seconds: list[Second] = []
    async with Stack(settings=_quiet(settings), device="pi-mux") as stack:
        plan = FleetPlan(devices=30, rate=2, spikes=3, duration_s=2, connections=3)
        summary = await Simulation(settings=stack.settings, plan=plan, on_second=seconds.append).run()
    assert summary.connections == 3
    assert summary.stored == summary.offered > 0
    assert summary.lost == 0
    assert summary.commands == summary.spikes >= 5
    assert summary.incidents_resolved == summary.spikes
    assert seconds
    assert seconds[0].offered_per_s > 0


@pytest.mark.broker
async def test_a_stop_by_hand_still_drains_and_says_what_happened(settings: Settings) -> None:
    two_lines: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    seen: list[Second] = []

    def second(line: Second) -> None:
        seen.append(line)
        if len(seen) == 2 and not two_lines.done():
            two_lines.set_result(None)

    async with Stack(settings=_quiet(settings), device="pi-stop") as stack:
        plan = FleetPlan(devices=10, rate=5, spikes=1)  # no duration: until stopped
        run = asyncio.create_task(Simulation(settings=stack.settings, plan=plan, on_second=second).run())
        async with asyncio.timeout(30):
            await two_lines
        run.cancel()  # what Ctrl-C does (nerve.runtime.cancellation.until_signalled)
        summary = await run
        registry = stack.settings.central.device_keys_dir
    assert summary.interrupted
    assert summary.offered > 0
    assert summary.stored + summary.lost + summary.unacknowledged == summary.offered
    assert registry is not None
    assert not [path for path in registry.iterdir() if path.name.startswith("sim-")]


@pytest.mark.broker
def test_an_unreachable_broker_is_one_line(
    nats_server: NatsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(_make_streams(nats_server.url))
    dead = f"mqtt://127.0.0.1:{free_port()}"
    status = main(
        [
            "simulate",
            "--devices",
            "3",
            "--mqtt-url",
            dead,
            "--nats-url",
            nats_server.url,
            "--data-dir",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2  # EXIT_ERROR
    assert len(err) == 1
    assert err[0].startswith(f"nerve simulate: error: cannot connect to {dead}: connection refused")
    assert not (tmp_path / "devices").exists() or not any((tmp_path / "devices").iterdir())


async def _make_streams(url: str) -> None:
    """What the bridge and central make when they start."""
    async with await nats.connect(url) as nc:
        await ensure_streams(nc.jetstream(), "nerve")


def stuck_broker() -> Serve:
    """A fake broker that connects (one publish in flight at most) and subscribes, then never PUBACKs."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await answer(reader, writer)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readexactly(1)
            length = shift = 0
            while True:  # the remaining length, a variable byte integer
                byte = (await reader.readexactly(1))[0]
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            body = await reader.readexactly(length)
            kind = head[0] >> 4
            if kind == 1:  # CONNECT -> CONNACK with Receive Maximum 1
                properties = bytes([0x21]) + struct.pack("!H", 1)
                writer.write(packet(0x20, bytes([0, 0]) + varint(len(properties)) + properties))
            elif kind == 8:
                filters = body[3:].count(b"/+") or 1
                writer.write(packet(0x90, body[:2] + b"\x00" + b"\x01" * filters))
            await writer.drain()

    return serve


@pytest.mark.broker
async def test_a_broker_that_takes_nothing_more_bounds_what_waits(
    nats_server: NatsServer,
    tmp_path: Path,
    tcp_server: Callable[[Serve], AbstractAsyncContextManager[int]],
) -> None:
    await _make_streams(nats_server.url)
    async with tcp_server(stuck_broker()) as port:
        settings = load_settings(
            overrides={
                "mqtt": {"url": f"mqtt://127.0.0.1:{port}"},
                "nats": {"url": nats_server.url},
                "data_dir": str(tmp_path),
            }
        )
        plan = FleetPlan(devices=1, rate=2000, duration_s=1.5, drain_s=0)
        summary = await Simulation(settings=settings, plan=plan).run()
    # One in flight (the broker's Receive Maximum), MAX_QUEUED waiting, the rest skipped.
    assert summary.offered == 1 + MAX_QUEUED
    assert summary.skipped > 0
    assert summary.unacknowledged == summary.offered
    assert summary.stored == summary.lost == 0


@pytest.mark.broker
def test_a_nats_without_the_stack_is_one_line(
    nats_server: NatsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # mosquitto is not even asked: nothing to measure with.
    argv = ["simulate", "--devices", "2", "--mqtt-url", "mqtt://127.0.0.1:9", "--nats-url", nats_server.url]
    status = main([*argv, "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err == [
        (
            f"nerve simulate: error: nats.url: no stream NERVE_TELEMETRY at {nats_server.url}: is the stack "
            "running? (nerve up, or nerve streams apply then nerve bridge and nerve central)"
        )
    ]


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--devices", "0"], "--devices"),
        (["--devices", "-5"], "--devices"),
        (["--devices", "3", "--rate", "0"], "--rate"),
        (["--devices", "3", "--rate", "-1"], "--rate"),
        (["--devices", "3", "--spikes", "-1"], "--spikes"),
        (["--devices", "3", "--duration", "0"], "--duration"),
        (["--devices", "3", "--connections", "-1"], "--connections"),
    ],
)
def test_bad_numbers_are_one_line_naming_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Checked before anything connects: no broker here.
    status = main(["simulate", "--mqtt-url", "mqtt://127.0.0.1:9", "--nats-url", "nats://127.0.0.1:9", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2  # EXIT_ERROR
    assert len(err) == 1
    assert err[0].startswith(f"nerve simulate: error: command line: {flag}: ")


@given(devices=st.integers(max_value=0), rate=st.floats(allow_nan=False))
def test_no_plan_without_devices(devices: int, rate: float) -> None:
    with pytest.raises(ConfigError, match="--devices"):
        FleetPlan(devices=devices, rate=rate)


@given(rate=st.one_of(st.floats(max_value=0), st.just(math.nan), st.just(math.inf)))
def test_no_plan_without_a_rate(rate: float) -> None:
    with pytest.raises(ConfigError, match="--rate"):
        FleetPlan(devices=1, rate=rate)


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1), st.floats(0, 1))
def test_a_percentile_is_a_value_with_that_share_at_or_below_it(values: list[float], q: float) -> None:
    found = percentile(values, q)
    assert found in values
    assert sum(value <= found for value in values) >= q * len(values)


def test_no_percentile_of_nothing() -> None:
    assert percentile([], 0.5) is None


def test_more_connections_than_open_files_is_one_line_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    devices = str(hard + 1)
    status = main(
        ["simulate", "--devices", devices, "--nats-url", "nats://127.0.0.1:9", "--data-dir", str(tmp_path)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1
    assert "--connections" in err[0]
    assert f"{hard + 1} connections need as many open files" in err[0]


@pytest.mark.broker
async def test_a_server_slow_to_say_how_far_the_stream_is_skips_a_line_not_the_run(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """At 10,000 devices nats-server once took over 5 s to answer: the run ended in a traceback."""
    real = Simulation._stream_last_seq
    calls = 0

    async def slow(self: Simulation, nc: Any) -> int:
        nonlocal calls
        calls += 1
        if calls in {2, 3}:  # the first is the start; then two seconds without an answer
            raise TimeoutError
        return await real(self, nc)

    monkeypatch.setattr(Simulation, "_stream_last_seq", slow)
    async with Stack(settings=_quiet(settings), device="pi-sim") as stack:
        args = _parser().parse_args(
            ["simulate", "--devices", "10", "--rate", "5", "--duration", "5", "--json"]
        )
        out = io.StringIO()
        with caplog.at_level(logging.WARNING):
            status = await run(args, stack.settings, out=out)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    summary = lines[-1]
    assert status == 0
    assert summary["type"] == "summary"
    assert summary["stored"] == summary["offered"] > 0
    assert calls >= 4
    assert "no answer to how far NERVE_TELEMETRY is (TimeoutError)" in caplog.text


def _watch(request: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, *WATCH_ARGV],
        input=request,
        capture_output=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "request_line", [b"", b"not json\n", b'{"mqtt": {}}\n', b'{"mqtt": {"url": "ftp://x"}}\n']
)
def test_the_command_watcher_refuses_a_bad_request_in_one_line(request_line: bytes) -> None:
    done = _watch(request_line)
    assert done.returncode == 1
    assert done.stdout == b""
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("nerve simulate's command watcher: ")


def test_the_command_watcher_says_in_one_line_that_no_broker_answers() -> None:
    request = {
        "mqtt": {"url": f"mqtt://127.0.0.1:{free_port()}"},
        "client_id": "w",
        "filter": "nerve/+/commands/+",
    }
    done = _watch(json.dumps(request).encode() + b"\n")
    assert done.returncode == 1
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert "127.0.0.1" in lines[0]


@pytest.mark.broker
async def test_a_fleet_without_its_command_watcher_still_times_commands_as_the_devices_handle_them(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A watcher that cannot start is one warning, not a failed run: the summary has no delivered figures,
    and the handled ones as before."""
    monkeypatch.setattr(simulate_module, "WATCH_ARGV", ("-c", "raise SystemExit('no watcher here')"))
    async with Stack(settings=_quiet(settings), device="pi-nowatch") as stack:
        plan = FleetPlan(devices=5, rate=2, spikes=2, duration_s=2)
        with caplog.at_level(logging.WARNING, logger="nerve.runtime.fleet.simulate"):
            summary = await Simulation(settings=stack.settings, plan=plan).run()
    assert summary.delivered_p50_ms is None
    assert summary.commands == summary.spikes > 0
    assert summary.command_p50_ms is not None
    assert any("no command watcher" in record.getMessage() for record in caplog.records)


@pytest.mark.broker
async def test_a_sampled_live_lag_and_a_short_drain_still_account_for_every_reading(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Live, only every k-th device's readings are read (here k = 5); at the end every reading is read
    back from where the run began, even after a drain window too short to wait for it: each is stored
    once, none lost, and the lag covers all of them."""
    monkeypatch.setattr(simulate_module, "LIVE_SAMPLE_PER_S", 20)  # 20 devices x 5/s: every 5th device
    seconds: list[Second] = []
    async with Stack(settings=_quiet(settings), device="pi-sample") as stack:
        plan = FleetPlan(devices=20, rate=5, spikes=1, duration_s=3, drain_s=0.05)
        simulation = Simulation(settings=stack.settings, plan=plan, on_second=seconds.append)
        summary = await simulation.run()
        filters = simulation._sampled_filters()
    assert len(filters) == 4
    assert all(f".{Kind.TELEMETRY}.*" in subject for subject in filters)
    assert summary.offered > 0
    assert summary.stored == summary.offered
    assert summary.lost == summary.unacknowledged == summary.duplicates == 0
    assert summary.lag_p50_ms is not None
    assert any(line.lag_p50_ms is not None for line in seconds)  # the sample's lags, live


def _slow_read_back(monkeypatch: pytest.MonkeyPatch, fails: int) -> list[int]:
    """nats-server too busy to make the simulator's read-back consumer: its first `fails` requests time out.

    Only the simulator's headers-only consumers of telemetry are touched, and its first (the live sample)
    never.
    """
    real = JetStreamContext.subscribe
    calls: list[int] = []

    async def subscribe(self: JetStreamContext, subject: str, *args: Any, **kwargs: Any) -> Any:
        config = kwargs.get("config")
        if config is not None and config.headers_only and kwargs.get("stream") == "NERVE_TELEMETRY":
            calls.append(1)
            if 1 < len(calls) <= 1 + fails:
                raise nats.errors.TimeoutError
        return await real(self, subject, *args, **kwargs)

    monkeypatch.setattr(JetStreamContext, "subscribe", subscribe)
    return calls


@pytest.mark.broker
async def test_a_nats_too_busy_to_make_the_read_back_consumer_is_asked_again(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Under an overload nats-server's API requests time out: the read-back waits, it does not crash."""
    calls = _slow_read_back(monkeypatch, fails=2)
    async with Stack(settings=_quiet(settings), device="pi-busy") as stack:
        plan = FleetPlan(devices=5, rate=5, duration_s=2)
        with caplog.at_level(logging.WARNING, logger="nerve.runtime.fleet.simulate"):
            summary = await Simulation(settings=stack.settings, plan=plan).run()
    assert len(calls) == 4  # the sample, two timeouts, the read-back
    assert summary.stored == summary.offered > 0
    assert summary.lost == 0
    assert sum("too busy to make a consumer" in record.getMessage() for record in caplog.records) == 2


@pytest.mark.broker
async def test_a_nats_that_never_makes_the_read_back_consumer_is_one_error_not_a_traceback(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(simulate_module, "CONSUMER_PATIENCE_S", 1.5)
    _slow_read_back(monkeypatch, fails=1_000)
    async with Stack(settings=_quiet(settings), device="pi-stuck") as stack:
        plan = FleetPlan(devices=5, rate=5, duration_s=1)
        with pytest.raises(BrokerUnavailable) as raised:  # an ExceptionGroup would not be caught here
            await Simulation(settings=stack.settings, plan=plan).run()
    assert "no consumer of NERVE_TELEMETRY made in 1.5s" in str(raised.value)


@pytest.mark.broker
async def test_devices_are_provisioned_off_the_loop_while_their_connections_stay_open(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Provisioning takes about 2 ms a device: on the loop, 9,000 of them kept the connections opened
    before from pinging for longer than mosquitto's keep-alive (45 s), and it dropped them."""
    threads: set[str] = set()

    def provision(*args: Any, **kwargs: Any) -> Any:
        threads.add(threading.current_thread().name)
        return provision_device(*args, **kwargs)

    monkeypatch.setattr(simulate_module, "provision_device", provision)
    async with Stack(settings=_quiet(settings), device="pi-keys") as stack:
        plan = FleetPlan(devices=5, rate=2, duration_s=1)
        summary = await Simulation(settings=stack.settings, plan=plan).run()
    assert threads
    assert threading.current_thread().name not in threads
    assert summary.stored == summary.offered > 0


@pytest.mark.broker
async def test_a_read_back_that_stalls_reads_on_from_where_it_stopped(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The first read-back consumer goes quiet after 10 readings (as one of nats-py's that lost its place
    and could not make its replacement): a new one reads on from there, and every reading is counted
    stored once, none lost, none twice."""
    monkeypatch.setattr(simulate_module, "READ_BACK_STALL_S", 0.5)
    real = Simulation._read_stored
    read_backs: list[int] = []

    async def read_stored(
        self: Simulation, js: Any, start_seq: int, filters: list[str], cb: Any, *more: Any
    ) -> Any:
        if getattr(cb, "__func__", None) is not Simulation._on_stored:
            return await real(self, js, start_seq, filters, cb, *more)
        read_backs.append(start_seq)
        if len(read_backs) > 1:
            return await real(self, js, start_seq, filters, cb)
        seen = 0

        async def goes_quiet(msg: Any) -> None:
            nonlocal seen
            seen += 1
            if seen <= 10:
                await cb(msg)

        return await real(self, js, start_seq, filters, goes_quiet)

    monkeypatch.setattr(Simulation, "_read_stored", read_stored)
    async with Stack(settings=_quiet(settings), device="pi-stall") as stack:
        plan = FleetPlan(devices=5, rate=10, duration_s=2, drain_s=0.05)
        with caplog.at_level(logging.WARNING, logger="nerve.runtime.fleet.simulate"):
            summary = await Simulation(settings=stack.settings, plan=plan).run()
    assert len(read_backs) == 2
    assert read_backs[1] > read_backs[0]  # on from the last reading seen, not from the start
    assert summary.offered > 10
    assert summary.stored == summary.offered
    assert summary.lost == summary.duplicates == 0
    assert sum("reading back what was stored stalled" in r.getMessage() for r in caplog.records) == 1


@given(
    due=st.integers(min_value=0, max_value=10**9),
    made=st.integers(min_value=0, max_value=10**9),
    burst=st.integers(min_value=1, max_value=10**6),
)
def test_a_simulator_behind_makes_one_burst_and_gives_up_the_rest(due: int, made: int, burst: int) -> None:
    """Never more than `burst` readings in one go (the loop is not held); what is due is either made
    now or given up, never both, never lost from the count."""
    target, behind = readings_due(due, made, burst)
    assert target - made <= burst
    assert behind >= 0
    assert target + behind == max(due, target)
    if due - made <= burst:
        assert (target, behind) == (due, 0)
