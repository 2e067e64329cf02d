"""The all-in-one local stack behind `nerve up` and `nerve demo`.

Brokers: if nothing answers at the configured MQTT / NATS address, mosquitto and nats-server are started
as child processes with their data under the data dir, and stopped on the way out. Then central, bridge
and edge run in this process, in one TaskGroup, in that order (so no reading reaches JetStream before
its consumer exists). Dev mode: the edge's `clear_temp` works on `<data dir>/scratch`, never /tmp, and
trusts the central key (the `.pub` beside the signing key, which the stack generates if it is missing).
The edge signs its results with the device's own key (generated if missing) and the stack registers its
public half in central's device registry (`<registry>/<device>.pub`) unless that device is registered or
revoked there. By default both are under the data dir; `nerve up` keeps them per user instead, beside the
central key (`$XDG_CONFIG_HOME/nerve/edge-keys/`, `$XDG_CONFIG_HOME/nerve/devices/`), where `nerve send`
finds the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, NoReturn, Self, TextIO

from nerve.runtime.config.settings import Settings, host_port
from nerve.runtime.errors import ConfigError, shown_url
from nerve.runtime.stack.brokers import ManagedBroker, Mosquitto, NatsServer, port_answers
from nerve.runtime.trust.devices import REVOKED_DIR, registry_dir
from nerve.runtime.trust.signing import PRIVATE_SUFFIX, PUBLIC_SUFFIX, Signer, generate_keypair
from nerve.runtime.wire.endpoint import default_mqtt_port

if TYPE_CHECKING:
    from pathlib import Path
    from types import TracebackType

    from nerve.runtime.stack.natsauth import LocalNats

log = logging.getLogger(__name__)

READY_TIMEOUT_S: Final = 30.0
SHUTDOWN_TIMEOUT_S: Final = 15.0
LOOPBACK: Final = {"127.0.0.1", "localhost", "::1"}
# Not the central key's folder: the edge trusts every `.pub` there, and must not trust its own key.
DEVICE_KEYS_DIR: Final = "edge-keys"
CLIENT_ID_SUFFIX_LEN: Final = 8


def client_ids(settings: Settings, *, device: str, data_dir: Path) -> tuple[str, str]:
    """The MQTT client ids of a stack's bridge and edge: unique per data dir, stable across restarts.

    Two `nerve up` on one broker with the same ids would take each other's sessions over, again and
    again. A short hash of the (absolute) data dir tells them apart and stays the same from one start to
    the next, so the persistent sessions survive a restart. `bridge.client_id` and `edge.client_id`,
    when set, win.
    """
    suffix = hashlib.sha256(str(data_dir).encode()).hexdigest()[:CLIENT_ID_SUFFIX_LEN]
    explicit_bridge = "client_id" in settings.bridge.model_fields_set
    bridge = settings.bridge.client_id if explicit_bridge else f"{settings.bridge.client_id}-{suffix}"
    edge = settings.edge.client_id or f"nerve-edge-{device}-{suffix}"
    return bridge, edge


@dataclass(frozen=True, slots=True)
class StackInfo:
    """What a started stack looks like, for the ready line."""

    device: str
    mqtt_host: str
    mqtt_port: int
    nats_url: str
    data_dir: Path
    scratch: Path
    started_brokers: tuple[str, ...]

    def try_command(self, prefix: str) -> str:
        """The `mosquitto_pub` line a person can paste to inject a disk spike."""
        return (
            f"mosquitto_pub -h {self.mqtt_host} -p {self.mqtt_port} "
            f"-t {prefix}/{self.device}/telemetry/disk -m '{{\"value\": 95}}'"
        )


class Stack:
    """Brokers (when needed), central, bridge and edge, as one async context manager."""

    def __init__(
        self,
        *,
        settings: Settings,
        device: str,
        signing_key: Path | None = None,
        device_key: Path | None = None,
        device_keys_dir: Path | None = None,
    ) -> None:
        """A stack on `settings` whose edge is `device`.

        `signing_key`: central's private key, created with its `.pub` if missing (default:
        `central.signing_key`, else `<data dir>/keys/<keyid>.key`, private to this stack).
        `device_key`: the edge's own key, created if missing (default: `edge.signing_key`, else
        `<data dir>/edge-keys/<device>.key`); `device_keys_dir`: central's device registry, where its public
        half is registered (default: `central.device_keys_dir`, else `<data dir>/devices`).
        """
        self._device = device
        data_dir = settings.data_dir.resolve()
        self._data_dir = data_dir
        self._scratch = data_dir / "scratch"
        keyid = settings.central.keyid
        key = (
            signing_key or settings.central.signing_key or data_dir / "keys" / f"{keyid}{PRIVATE_SUFFIX}"
        ).absolute()
        self._signing_key = key
        self._device_key = (
            device_key
            or settings.edge.signing_key
            or data_dir / DEVICE_KEYS_DIR / f"{device}{PRIVATE_SUFFIX}"
        ).absolute()
        self._registry = (
            device_keys_dir or registry_dir(settings.central.device_keys_dir, data_dir)
        ).absolute()
        keys = key.parent
        bridge_id, edge_id = client_ids(settings, device=device, data_dir=data_dir)
        self._settings = settings.model_copy(
            update={
                "data_dir": data_dir,
                # The whole bridge, uplink and downlink: `bridge.part` splits `nerve bridge` processes.
                "bridge": settings.bridge.model_copy(update={"client_id": bridge_id, "part": "both"}),
                "edge": settings.edge.model_copy(
                    update={
                        "device": device,
                        "client_id": edge_id,
                        "clear_temp_roots": (self._scratch,),
                        "trusted_keys_dir": keys,
                        "journal": data_dir / "edge-journal.sqlite3",
                        "signing_key": self._device_key,
                    }
                ),
                "central": settings.central.model_copy(
                    update={"signing_key": key, "device_keys_dir": self._registry}
                ),
            }
        )
        self._brokers: list[ManagedBroker] = []
        self._local_nats: LocalNats | None = None  # identities, when the stack runs its own nats-server
        self._tasks: asyncio.TaskGroup | None = None
        self._stack_task: asyncio.Task[None] | None = None
        self.info: StackInfo | None = None
        self._lock: TextIO | None = None

    @property
    def settings(self) -> Settings:
        """The settings every part runs with (brokers' URLs, scratch root, keys filled in)."""
        return self._settings

    async def _ensure_broker(self, url: str, default_port: int, kind: type[ManagedBroker]) -> None:
        host, port = host_port(url, default_port)
        if await port_answers(host, port):
            log.info("using the %s already answering at %s:%d", kind.name, host, port)
            return
        if host not in LOOPBACK:
            raise ConfigError(
                f"nothing answers at {shown_url(url)}, "
                "and nerve only starts brokers on this machine (127.0.0.1)",
                key=f"{'mqtt' if kind is Mosquitto else 'nats'}.url",
            )
        data_dir = self._data_dir / kind.name
        broker: ManagedBroker
        if kind is Mosquitto:  # it refuses what nerve's clients could not take (mqtt.max_packet_size)
            broker = Mosquitto(
                port=port, data_dir=data_dir, max_packet_size=self._settings.mqtt.max_packet_size
            )
        elif kind is NatsServer:  # least privilege: one identity per part (docs/nats.md)
            from nerve.runtime.stack.natsauth import LocalNats  # noqa: PLC0415 - needs nats-py

            store = data_dir / "jetstream"
            self._local_nats = LocalNats.prepare(
                self._data_dir, prefix=self._settings.prefix, port=port, store_dir=store
            )
            broker = NatsServer(port=port, data_dir=data_dir, config_file=self._local_nats.config_file)
        else:
            broker = kind(port=port, data_dir=data_dir)
        await broker.start()
        self._brokers.append(broker)
        log.info("started %s on 127.0.0.1:%d (data in %s)", kind.name, port, broker.data_dir)
        if self._local_nats is not None and kind is NatsServer:
            await self._local_nats.apply_streams(self._settings)
            self._settings = self._local_nats.part(self._settings, "cli")  # for the operator

    def _ensure_keys(self) -> Signer:
        private = self._signing_key
        if not private.exists():
            generate_keypair(private.parent, private.stem)
            log.info("created the central key pair %s (and .pub)", private)
        elif not private.with_suffix(PUBLIC_SUFFIX).exists():
            raise ConfigError("private key without its .pub beside it", source=str(private))
        return Signer.from_file(private, self._settings.central.keyid)

    def _ensure_device_key(self) -> None:
        """Create the edge's key pair if missing, and register its public key unless the device is known."""
        private, device = self._device_key, self._device
        public = private.with_suffix(PUBLIC_SUFFIX)
        if not private.exists():
            generate_keypair(private.parent, private.stem)
            log.info("created the key pair of device %s: %s (and .pub)", device, private)
        elif not public.exists():
            raise ConfigError("private key without its .pub beside it", source=str(private))
        registered = self._registry / f"{device}{PUBLIC_SUFFIX}"
        if (self._registry / REVOKED_DIR / registered.name).exists():
            log.warning("device %s is revoked in %s: central will refuse its results", device, self._registry)
        elif not registered.exists():
            self._registry.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(public, registered)
            log.info("registered device %s in %s", device, self._registry)
        elif registered.read_bytes().strip() != public.read_bytes().strip():
            log.warning(
                "device %s is registered in %s with another key than %s: central will refuse its results",
                device,
                self._registry,
                private,
            )

    def _lock_data_dir(self) -> None:
        # Two stacks on one data dir would share client ids and fight over the MQTT sessions.
        path = self._data_dir / "nerve-up.lock"
        handle = path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(
                f"{self._data_dir} is in use by a running nerve up (pid {holder}); "
                "stop it or pass another --data-dir",
                key="data_dir",
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock = handle

    async def __aenter__(self) -> Self:
        self._data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_data_dir()
        self._scratch.mkdir(exist_ok=True)
        try:
            await self._ensure_broker(
                self._settings.mqtt.url, default_mqtt_port(self._settings.mqtt.url), Mosquitto
            )
            await self._ensure_broker(self._settings.nats.url, 4222, NatsServer)
            signer = self._ensure_keys()
            self._ensure_device_key()
            ready = asyncio.Event()
            self._stack_task = asyncio.create_task(self._run_parts(signer, ready), name="nerve-stack")
            ready_wait = asyncio.create_task(ready.wait())
            done, _ = await asyncio.wait(
                {self._stack_task, ready_wait}, timeout=READY_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
            )
            ready_wait.cancel()
            if self._stack_task in done:
                self._stack_task.result()  # raises what stopped it
            if not ready.is_set():
                _not_ready("the stack")
        except BaseException:
            await self._shutdown()
            raise
        host, port = host_port(self._settings.mqtt.url, default_mqtt_port(self._settings.mqtt.url))
        self.info = StackInfo(
            device=self._device,
            mqtt_host=host,
            mqtt_port=port,
            nats_url=self._settings.nats.url,
            data_dir=self._data_dir,
            scratch=self._scratch,
            started_brokers=tuple(b.name for b in self._brokers),
        )
        return self

    async def _run_parts(self, signer: Signer, ready: asyncio.Event) -> None:
        # Imported here: an edge-only install has no bridge or agents, and `nerve edge` must not need them.
        from nerve.agents import builtin_agents, builtin_durable_agents  # noqa: PLC0415
        from nerve.bridge import Bridge  # noqa: PLC0415
        from nerve.edge.daemon import open_edge  # noqa: PLC0415
        from nerve.runtime.central.runner import Central  # noqa: PLC0415

        settings = self._settings
        central_settings, bridge_settings = settings, settings
        if self._local_nats is not None:
            central_settings = self._local_nats.part(settings, "central")
            bridge_settings = self._local_nats.part(settings, "bridge")
        central = Central(
            settings=central_settings,
            signer=signer,
            agents=builtin_agents(settings),
            durable=builtin_durable_agents(settings),
        )
        bridge = Bridge(settings=bridge_settings)
        async with open_edge(settings, device=self._device) as edge, asyncio.TaskGroup() as tasks:
            tasks.create_task(central.run(), name="central")
            await _wait_ready(central.ready, "central")
            tasks.create_task(bridge.run(), name="bridge")
            await _wait_ready(bridge.ready, "bridge")
            tasks.create_task(edge.run(), name="edge")
            await _wait_ready(edge.ready, "edge")
            ready.set()

    async def wait(self) -> None:
        """Run until cancelled, or until a part fails (its error is raised)."""
        if self._stack_task is not None:
            await asyncio.shield(self._stack_task)

    async def _shutdown(self) -> None:
        if self._stack_task is not None and not self._stack_task.done():
            self._stack_task.cancel()
            try:
                async with asyncio.timeout(SHUTDOWN_TIMEOUT_S):
                    with contextlib.suppress(asyncio.CancelledError):
                        await self._stack_task
            except TimeoutError:
                # Still stop the brokers: a part that hangs must not leave them running behind us.
                log.error(  # noqa: TRY400 - a timeout: its traceback says nothing
                    "the parts did not stop within %gs; stopping the brokers anyway", SHUTDOWN_TIMEOUT_S
                )
        for broker in reversed(self._brokers):
            await broker.stop()
        self._brokers.clear()
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._shutdown()


async def _wait_ready(event: asyncio.Event, part: str) -> None:
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            await event.wait()
    except TimeoutError:
        _not_ready(part)


def _not_ready(part: str) -> NoReturn:
    msg = f"{part} was not ready within {READY_TIMEOUT_S:g}s (is the broker reachable?)"
    raise ConfigError(msg)
