"""Fixtures shared by every test: real brokers on free ports, each with its own data directory.

Tests that use `mosquitto`, `secure_mosquitto` or `nats_server` carry `@pytest.mark.broker`. The wire
protocols' tests also share a fake transport and a fake TCP server (`new_transport`, `tcp_server`); the
edge's tests and its chaos tests a running agent (`running`) and a small tmpfs (`tiny_tmpfs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeAlias

import nats
import pytest
import trustme

from nerve.runtime.config.settings import Settings, load_settings
from nerve.runtime.stack.brokers import Mosquitto, NatsServer, free_port, port_answers

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
    from contextlib import AbstractAsyncContextManager, AbstractContextManager
    from pathlib import Path

    from nats.aio.client import Client as NatsClient

    class Service(Protocol):
        """What `running` runs: an edge agent, a bridge, a central runner."""

        ready: asyncio.Event

        def run(self) -> Coroutine[Any, Any, None]: ...

    class Running(Protocol):
        def __call__(
            self, service: Service, *, wait: float
        ) -> AbstractAsyncContextManager[asyncio.Task[None]]: ...

    TinyTmpfs: TypeAlias = Callable[[Path, str], AbstractContextManager[Path]]
    Serve: TypeAlias = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def mosquitto(tmp_path: Path) -> AsyncIterator[Mosquitto]:
    """A running mosquitto on a free port, stopped (SIGTERM) at teardown."""
    async with Mosquitto(port=free_port(), data_dir=tmp_path / "mosquitto") as broker:
        yield broker


@dataclass(frozen=True)
class SecureMosquitto:
    """A mosquitto with TLS listeners and a password file, and what a client needs to reach it.

    Every listener is on 127.0.0.1 and presents a certificate from `ca_file` unless said otherwise:
    `port` (TLS; clients log in with `username`/`password`, as listed in `password_file`), `mtls_port`
    (wants a client certificate from `ca_file`: `cert_file`/`key_file`, CN `pi-01`, which becomes the user
    name), `wrong_host_port` (a certificate for broker.example only), `expired_port` (an expired one),
    `plain_port` (plain TCP, same logins). `other_ca_file` signed none of them. `password_file` is the
    client's (the password and a newline), `broker_password_file` mosquitto's (made by mosquitto_passwd).
    """

    broker: Mosquitto
    port: int
    mtls_port: int
    wrong_host_port: int
    expired_port: int
    plain_port: int
    ca_file: Path
    other_ca_file: Path
    cert_file: Path
    key_file: Path
    username: str
    password: str
    password_file: Path
    broker_password_file: Path

    def url(self, port: int | None = None, *, scheme: str = "mqtts", userinfo: str = "") -> str:
        """The URL of one listener (default: `port`), with `user:pass@` if given."""
        at = f"{userinfo}@" if userinfo else ""
        return f"{scheme}://{at}127.0.0.1:{port or self.port}"


def _free_ports(count: int) -> list[int]:
    """`count` distinct free ports on 127.0.0.1 (held together while chosen, so never one twice)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _tls_listener(port: int, ca: Path, cert: Path, key: Path, extra: str = "") -> str:
    return f"listener {port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n{extra}\n"


MQTT_USER: Final = "nerve"
MQTT_PASSWORD: Final = "s3cret:pass"  # noqa: S105 - a test broker's, made for the test


@pytest.fixture
def mosquitto_pki(tmp_path: Path) -> dict[str, Path]:
    """Certificates (`trustme`) and a password file (`mosquitto_passwd`) for `secure_mosquitto`."""
    mosquitto_passwd = shutil.which("mosquitto_passwd")
    if mosquitto_passwd is None:
        pytest.skip("mosquitto_passwd is not installed (apt-get install mosquitto)")
    pki = tmp_path / "pki"
    pki.mkdir()
    ca, other_ca = trustme.CA(), trustme.CA()
    files: dict[str, Path] = {name: pki / f"{name}.pem" for name in ("ca", "other-ca")}
    ca.cert_pem.write_to_path(files["ca"])
    other_ca.cert_pem.write_to_path(files["other-ca"])
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    leaves = {
        "server": ca.issue_cert("localhost", "127.0.0.1"),
        "wrong-host": ca.issue_cert("broker.example"),
        "expired": ca.issue_cert(
            "localhost", "127.0.0.1", not_before=past, not_after=past + dt.timedelta(days=1)
        ),
        "client": ca.issue_cert("pi-01", common_name="pi-01"),
    }
    for name, leaf in leaves.items():
        files[name] = pki / f"{name}.crt"
        files[f"{name}-key"] = pki / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(files[name])
        leaf.private_key_pem.write_to_path(files[f"{name}-key"])
    files["passwd"] = tmp_path / "mosquitto.passwd"
    subprocess.run([mosquitto_passwd, "-c", "-b", str(files["passwd"]), MQTT_USER, MQTT_PASSWORD], check=True)
    files["password"] = tmp_path / "mqtt-password"
    files["password"].write_text(MQTT_PASSWORD + "\n")
    return files


@pytest.fixture
async def secure_mosquitto(tmp_path: Path, mosquitto_pki: dict[str, Path]) -> AsyncIterator[SecureMosquitto]:
    """A mosquitto with TLS listeners (certificates made by `trustme`) and a password file."""
    files = mosquitto_pki
    password_file = files["passwd"]
    port, mtls, wrong_host, expired, plain = _free_ports(5)
    server = (files["ca"], files["server"], files["server-key"])
    options = (
        _tls_listener(mtls, *server, "require_certificate true\nuse_identity_as_username true")
        + _tls_listener(wrong_host, files["ca"], files["wrong-host"], files["wrong-host-key"])
        + _tls_listener(expired, files["ca"], files["expired"], files["expired-key"])
        + f"listener {plain} 127.0.0.1\n"
    )
    # The first listener's own options come first: they must follow its `listener` line.
    first = f"cafile {server[0]}\ncertfile {server[1]}\nkeyfile {server[2]}\n"
    broker = Mosquitto(
        port=port,
        data_dir=tmp_path / "mosquitto",
        listener_options=first + options,
        password_file=password_file,
    )
    async with broker:
        # mosquitto opens its listeners one after the other; the broker is ready once it answers on the
        # first, the others may follow a moment later on a busy machine.
        async with asyncio.timeout(10):
            for listener in (mtls, wrong_host, expired, plain):
                while not await port_answers("127.0.0.1", listener):
                    await asyncio.sleep(0.02)
        yield SecureMosquitto(
            broker=broker,
            port=port,
            mtls_port=mtls,
            wrong_host_port=wrong_host,
            expired_port=expired,
            plain_port=plain,
            ca_file=files["ca"],
            other_ca_file=files["other-ca"],
            cert_file=files["client"],
            key_file=files["client-key"],
            username=MQTT_USER,
            password=MQTT_PASSWORD,
            password_file=files["password"],
            broker_password_file=password_file,
        )


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A running nats-server with JetStream on a free port, stopped (SIGTERM) at teardown."""
    async with NatsServer(port=free_port(), data_dir=tmp_path / "nats-server") as broker:
        yield broker


@pytest.fixture
def settings(mosquitto: Mosquitto, nats_server: NatsServer, tmp_path: Path) -> Settings:
    """Settings pointing at this test's brokers, with data under tmp_path."""
    return load_settings(
        overrides={
            "mqtt": {"url": mosquitto.url},
            "nats": {"url": nats_server.url},
            "data_dir": str(tmp_path / "data"),
        }
    )


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NatsClient]:
    """A NATS client on this test's server, closed at teardown."""
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


# --- fakes for the wire protocols' tests -----------------------------------------------------------


class FakeTransport(asyncio.Transport):
    """Records what the protocol writes, and whether it closed or aborted the connection."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


@pytest.fixture
def new_transport() -> Callable[[], FakeTransport]:
    """Makes a fresh `FakeTransport` at each call."""
    return FakeTransport


@contextlib.asynccontextmanager
async def _tcp_server(serve: Serve) -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1 that hands each connection to `serve`; yields its port.

    On the way out the server stops and every connection it took is closed.
    """
    writers: list[asyncio.StreamWriter] = []

    async def track(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await serve(reader, writer)

    server = await asyncio.start_server(track, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await server.wait_closed()


@pytest.fixture
def tcp_server() -> Callable[[Serve], AbstractAsyncContextManager[int]]:
    """Starts a fake server: `async with tcp_server(serve) as port`, `serve(reader, writer)` per client."""
    return _tcp_server


# --- the edge agent and its disk -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _running(service: Service, *, wait: float) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(service.run(), name=type(service).__name__)
    try:
        async with asyncio.timeout(wait):
            await service.ready.wait()
        yield task
    finally:
        task.cancel()
        async with asyncio.timeout(wait):
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.fixture
def running() -> Running:
    """`async with running(service, wait=s) as task`: an agent's, bridge's or central runner's `run()` as
    a task, ready (connected and subscribed) within `wait` seconds; cancelled and awaited (again within
    `wait`) after."""
    return _running


@contextlib.contextmanager
def _tiny_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def tiny_tmpfs() -> TinyTmpfs:
    """`with tiny_tmpfs(where, "512k") as disk`: a tmpfs of that size mounted at the new directory
    `where`, unmounted after (needs root; the test is skipped where mounting is not allowed)."""
    return _tiny_tmpfs
