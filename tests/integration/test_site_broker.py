"""The shipped site broker config (configs/mosquitto-site.conf) with the files `nerve devices` writes.

A real mosquitto (Debian's 2.0.11 here) runs the shipped file, with only its paths and port moved into a
temp dir, on TLS with the site CA: each device is held to its own topics, the bridge's uplink login reads
the uplink and writes nothing, its downlink login writes commands and reads nothing, strangers are refused
at CONNECT, and a revoked device is disconnected and refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import pytest

from nerve.bridge import Bridge
from nerve.edge.daemon import open_edge
from nerve.runtime.cli.send import CommandChannel, sign_command
from nerve.runtime.config.settings import MqttSettings, Settings, load_settings
from nerve.runtime.envelope.codec import decode
from nerve.runtime.envelope.model import Event
from nerve.runtime.stack.brokers import Mosquitto, free_port
from nerve.runtime.testing import stream_messages, wait_for_count
from nerve.runtime.trust.signing import Signer, generate_keypair
from nerve.runtime.trust.site import BRIDGE_CONFIG, BUNDLE_CA, BUNDLE_CONFIG, BUNDLE_PASSWORD, Site
from nerve.runtime.wire.client import MqttClient
from nerve.runtime.wire.mqtt import MqttRefused, MqttWireError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from nats.aio.client import Client as NatsClient
    from tests.conftest import Running

    from nerve.runtime.stack.brokers import NatsServer

pytestmark = pytest.mark.broker

SHIPPED = Path(__file__).resolve().parents[2] / "configs" / "mosquitto-site.conf"
WAIT = 10.0
BRIDGE_CLIENT = "nerve-bridge-test"
DOWNLINK_CLIENT = "nerve-bridge-test-down"


def site_config(*, port: int, broker_dir: Path, data_dir: Path, pid_file: Path) -> str:
    """The shipped file, moved into a temp dir: only paths, the port and the user change."""
    text = SHIPPED.read_text()
    user = pwd.getpwuid(os.geteuid()).pw_name
    moves = {
        "/etc/mosquitto/nerve/": f"{broker_dir}/",
        "listener 8883\n": f"listener {port} 127.0.0.1\n",
        "pid_file /run/mosquitto/mosquitto.pid": f"pid_file {pid_file}",
        "persistence_location /var/lib/mosquitto/": f"persistence_location {data_dir}/",
        "log_dest file /var/log/mosquitto/mosquitto.log": "log_dest stderr",
    }
    for old, new in moves.items():
        assert old in text, f"configs/mosquitto-site.conf no longer has {old!r}"
        text = text.replace(old, new)
    # As root, mosquitto would switch to the `mosquitto` user, who cannot read a pytest tmp dir.
    return text + f"user {user}\n"


class SiteMosquitto(Mosquitto):
    """mosquitto on a given config text, instead of the one nerve writes for brokers it starts."""

    name: ClassVar[str] = "mosquitto"

    def __init__(self, *, config: str, port: int, data_dir: Path) -> None:
        super().__init__(port=port, data_dir=data_dir)
        self._config = config

    def _prepare(self) -> list[str]:
        path = self._data_dir / "mosquitto-site.conf"
        path.write_text(self._config)
        return [str(self._binary), "-c", str(path)]


class SiteBroker:
    """The running site broker, the site that wrote its files, and a login for each identity."""

    def __init__(self, settings: Settings, site: Site, broker: SiteMosquitto) -> None:
        self.settings = settings
        self.site = site
        self.broker = broker
        self.url = f"mqtts://127.0.0.1:{broker.port}"

    def device(self, device: str) -> MqttSettings:
        bundle = self.settings.data_dir.parent / "on-device" / device  # copied as to the device
        return MqttSettings(
            url=self.url,
            ca_file=bundle / BUNDLE_CA,
            username=device,
            password_file=bundle / BUNDLE_PASSWORD,
        )

    def bridge(self) -> MqttSettings:
        return MqttSettings.model_validate(self.site.bridge_settings(["127.0.0.1"]) | {"url": self.url})

    def downlink(self) -> MqttSettings:
        login = self.site.downlink_settings()
        return MqttSettings.model_validate(
            self.site.bridge_settings(["127.0.0.1"])
            | {
                "url": self.url,
                "username": login["downlink_username"],
                "password_file": login["downlink_password_file"],
            }
        )


@pytest.fixture
async def site_broker(tmp_path: Path) -> AsyncIterator[SiteBroker]:
    _, central = generate_keypair(tmp_path / "keys", "central")
    port = free_port()
    broker_data = tmp_path / "mosquitto"
    broker_data.mkdir()
    pid_file = broker_data / "mosquitto.pid"
    settings = load_settings(
        overrides={
            "data_dir": str(tmp_path / "data"),
            "site": {"hosts": ["localhost"], "port": port, "broker_pid_file": str(pid_file)},
        }
    )
    site = Site(settings)
    site.setup()
    for device in ("dev1", "dev2"):
        shutil.copytree(site.add(device, central_public_key=central).bundle, tmp_path / "on-device" / device)
    config = site_config(port=port, broker_dir=site.paths.broker, data_dir=broker_data, pid_file=pid_file)
    async with SiteMosquitto(config=config, port=port, data_dir=broker_data) as broker:
        yield SiteBroker(settings, site, broker)


async def next_message(client: MqttClient) -> tuple[str, bytes]:
    async with asyncio.timeout(WAIT):
        message = await anext(client.messages)
    return message.topic, message.payload


async def test_a_device_publishes_its_own_uplink_and_the_bridge_gets_it(site_broker: SiteBroker) -> None:
    own = [
        "nerve/dev1/telemetry/disk",
        "nerve/dev1/events/boot",
        "nerve/dev1/results/clear_temp",
        "nerve/dev1/status",
    ]
    async with MqttClient(site_broker.bridge(), client_id=BRIDGE_CLIENT) as bridge:
        await bridge.subscribe("nerve/#")
        async with MqttClient(site_broker.device("dev1"), client_id="nerve-edge-dev1") as device:
            for topic in own:
                await device.publish(topic, b"95")
        assert [(await next_message(bridge))[0] for _ in own] == own


# What mosquitto 2.0.11 does with a publish the ACL denies, over TLS: PUBACK 0x87 (QoS1), then it drops the
# connection ("Bad socket read/write" in its log); the client sees one or the other first.
DENIED = r"not authorized \(0x87\)|connection closed by the broker|connection lost"


async def test_a_device_cannot_publish_as_another_device(site_broker: SiteBroker) -> None:
    forged = [
        "nerve/dev2/telemetry/disk",
        "nerve/dev2/results/clear_temp",
        "nerve/dev2/status",
        "nerve/dev1/commands/clear_temp",  # nor outside its uplink: a command to itself
        "other/dev1/telemetry/disk",  # or another prefix
    ]
    async with MqttClient(site_broker.bridge(), client_id=BRIDGE_CLIENT) as bridge:
        await bridge.subscribe("#")
        for topic in forged:
            async with MqttClient(site_broker.device("dev1"), client_id="nerve-edge-dev1") as device:
                with pytest.raises(MqttWireError, match=DENIED):
                    await device.publish(topic, b'{"value": 99}')
            # QoS0: no answer to wait for, and dropped all the same (and the connection with it).
            async with MqttClient(site_broker.device("dev1"), client_id="nerve-edge-dev1") as device:
                await device.publish(topic, b'{"value": 99}', qos=0)
            # mosquitto handled that connection's packets before this one's: anything let through would
            # reach the bridge before the marker.
            async with MqttClient(site_broker.device("dev1"), client_id="nerve-edge-dev1") as device:
                await device.publish("nerve/dev1/telemetry/disk", topic.encode())
            assert await next_message(bridge) == ("nerve/dev1/telemetry/disk", topic.encode())


async def test_a_device_reads_only_its_own_commands(site_broker: SiteBroker) -> None:
    # mosquitto 2.0 grants every subscription (SUBACK 0x01) and checks the read ACL on each message it
    # would deliver: a device that subscribes to everything still gets only its own commands.
    async with MqttClient(site_broker.device("dev1"), client_id="nerve-edge-dev1") as device:
        await device.subscribe("nerve/dev2/commands/+", "nerve/+/commands/#", "nerve/#", "#")
        async with MqttClient(site_broker.device("dev2"), client_id="nerve-edge-dev2") as other:
            await other.publish("nerve/dev2/telemetry/disk", b"dev2's reading")
        async with MqttClient(site_broker.downlink(), client_id=DOWNLINK_CLIENT) as bridge:
            await bridge.publish("nerve/dev2/commands/clear_temp", b"for dev2")
            await bridge.publish("nerve/dev1/commands/clear_temp", b"for dev1")
        # Delivered in the order published: dev2's messages would have come first.
        assert await next_message(device) == ("nerve/dev1/commands/clear_temp", b"for dev1")


async def test_the_bridge_writes_commands_but_no_uplink(site_broker: SiteBroker) -> None:
    async with MqttClient(site_broker.bridge(), client_id=BRIDGE_CLIENT) as bridge:
        await bridge.subscribe("$share/bridges/nerve/#")  # bridge.shared_group's form is allowed too
        with pytest.raises(MqttWireError, match=DENIED):
            await bridge.publish("nerve/dev1/telemetry/disk", b"95")
    # The uplink's login writes no command either: that is the downlink's, which reads nothing.
    async with MqttClient(site_broker.bridge(), client_id=BRIDGE_CLIENT) as bridge:
        with pytest.raises(MqttWireError, match=DENIED):
            await bridge.publish("nerve/dev1/commands/clear_temp", b"{}")
    async with MqttClient(site_broker.downlink(), client_id=DOWNLINK_CLIENT) as downlink:
        await downlink.subscribe("nerve/#")
        with pytest.raises(MqttWireError, match=DENIED):
            await downlink.publish("nerve/dev1/telemetry/disk", b"95")
    # What the downlink writes reaches the device (and the uplink, which ignores a command).
    async with (
        MqttClient(site_broker.downlink(), client_id=DOWNLINK_CLIENT) as downlink,
        MqttClient(site_broker.bridge(), client_id=BRIDGE_CLIENT) as bridge,
        MqttClient(site_broker.device("dev1"), client_id="nerve-edge-dev1") as device,
    ):
        await bridge.subscribe("nerve/#")
        await device.subscribe("nerve/dev1/commands/+")
        await downlink.publish("nerve/dev1/commands/clear_temp", b"a command")
        assert await next_message(device) == ("nerve/dev1/commands/clear_temp", b"a command")
        assert await next_message(bridge) == ("nerve/dev1/commands/clear_temp", b"a command")


async def test_strangers_are_refused_at_connect(site_broker: SiteBroker, tmp_path: Path) -> None:
    anonymous = MqttSettings(url=site_broker.url, ca_file=site_broker.site.paths.ca_cert)
    wrong = tmp_path / "wrong-password"
    wrong.write_text("guess\n")
    guessing = site_broker.device("dev1").model_copy(update={"password_file": wrong})
    swapped = site_broker.device("dev1").model_copy(update={"username": "dev2"})  # dev1's password as dev2
    for settings in (anonymous, guessing, swapped):
        with pytest.raises(MqttRefused):
            async with MqttClient(settings, client_id="stranger"):
                pass
    plain = MqttSettings(
        url=f"mqtt://127.0.0.1:{site_broker.broker.port}",
        username="dev1",
        password_file=site_broker.device("dev1").password_file,
    )
    with pytest.raises(MqttWireError, match="TLS listener"):
        async with MqttClient(plain, client_id="plain"):
            pass


async def test_a_device_cannot_take_the_bridges_session_over(site_broker: SiteBroker) -> None:
    # mosquitto lets a client id be taken over across user names; the site config ties it to the login.
    async with MqttClient(site_broker.bridge(), client_id=BRIDGE_CLIENT) as bridge:
        await bridge.subscribe("nerve/#")
        async with MqttClient(site_broker.device("dev1"), client_id=BRIDGE_CLIENT) as device:
            await device.publish("nerve/dev1/telemetry/disk", b"still here")
        assert await next_message(bridge) == ("nerve/dev1/telemetry/disk", b"still here")


async def test_a_revoked_device_is_disconnected_and_refused(site_broker: SiteBroker) -> None:
    async with MqttClient(site_broker.device("dev1"), client_id="nerve-edge-dev1") as device:
        await device.subscribe("nerve/dev1/commands/+")
        async with MqttClient(site_broker.device("dev2"), client_id="nerve-edge-dev2") as other:
            site_broker.site.revoke("dev1")
            reload = site_broker.site.reload_broker()
            assert reload.sent, reload.message
            with pytest.raises(MqttWireError, match="our login was revoked"):
                await next_message(device)  # the broker closes the connection: the iteration raises
            await other.publish("nerve/dev2/telemetry/disk", b"dev2 is still welcome")
    with pytest.raises(MqttRefused):
        async with MqttClient(site_broker.device("dev1"), client_id="nerve-edge-dev1"):
            pass


async def test_new_credentials_end_the_old_ones_connection(site_broker: SiteBroker, tmp_path: Path) -> None:
    # `nerve devices add --force`: the old password no longer matches the file, and the reload says so.
    async with MqttClient(site_broker.device("dev2"), client_id="nerve-edge-dev2") as device:
        await device.subscribe("nerve/dev2/commands/+")
        site_broker.site.add("dev2", central_public_key=tmp_path / "keys" / "central.pub", force=True)
        assert site_broker.site.reload_broker().sent
        with pytest.raises(MqttWireError, match="our login was revoked"):
            await next_message(device)
    with pytest.raises(MqttRefused):
        async with MqttClient(site_broker.device("dev2"), client_id="nerve-edge-dev2"):
            pass


async def test_the_bundle_is_a_working_edge_config(site_broker: SiteBroker, tmp_path: Path) -> None:
    # As on the device: the bundle copied to site.device_dir, and nerve edge --config <it>/edge.yaml.
    device_dir = tmp_path / "etc-nerve"
    settings = site_broker.settings.model_copy(
        update={"site": site_broker.settings.site.model_copy(update={"device_dir": device_dir})}
    )
    site = Site(settings)
    central = site_broker.site.paths.root.parent.parent / "keys" / "central.pub"
    added = site.add("dev3", central_public_key=central)
    shutil.copytree(added.bundle, device_dir)
    edge = load_settings(device_dir / BUNDLE_CONFIG)
    assert edge.edge.device == "dev3"
    assert edge.edge.signing_key == device_dir / "dev3.key"
    assert edge.edge.trusted_keys_dir is not None
    assert [p.name for p in edge.edge.trusted_keys_dir.iterdir()] == ["central.pub"]
    assert edge.mqtt.url == f"mqtts://localhost:{site_broker.broker.port}"
    # The broker's certificate is for localhost: the bundle's URL and CA reach it as they are. (A restart
    # rather than the SIGHUP: it is the moment the broker has read the new login that we wait for.)
    await site_broker.broker.stop()
    await site_broker.broker.start()
    async with MqttClient(edge.mqtt, client_id="nerve-edge-dev3") as client:
        await client.publish("nerve/dev3/telemetry/disk", b"1")


async def test_a_provisioned_edge_and_the_bridge_carry_a_signed_command_and_its_result(
    site_broker: SiteBroker, nats_server: NatsServer, running: Running, tmp_path: Path
) -> None:
    # nerve's own parts on their `nerve devices` logins: the bridge (site settings) and an edge whose
    # settings are the bundle's edge.yaml, copied to site.device_dir as on a device.
    device_dir = tmp_path / "etc-nerve"
    settings = site_broker.settings.model_copy(
        update={"site": site_broker.settings.site.model_copy(update={"device_dir": device_dir})}
    )
    site = Site(settings)
    keys = tmp_path / "keys"
    shutil.copytree(site.add("dev3", central_public_key=keys / "central.pub").bundle, device_dir)
    await site_broker.broker.stop()  # to read the new login now (SIGHUP does it too, a moment later)
    await site_broker.broker.start()
    mqtt = {"url": site_broker.url}  # the bundle says localhost, the test broker listens on 127.0.0.1
    edge_settings = load_settings(
        device_dir / BUNDLE_CONFIG,
        overrides={
            "data_dir": str(tmp_path / "device-data"),
            "mqtt": mqtt,
            "edge": {"mounts": [], "clear_temp_roots": [str(tmp_path)]},
        },
    )
    bridge_settings = load_settings(
        overrides={
            "data_dir": str(tmp_path / "bridge-data"),
            "nats": {"url": nats_server.url},
            "mqtt": site_broker.site.bridge_settings(["127.0.0.1"]) | mqtt,
            "bridge": site_broker.site.downlink_settings(),
        }
    )
    signer = Signer.from_file(keys / "central.key")
    command = sign_command(signer, device="dev3", action="clear_temp", args={}, expires_in=60)
    bridge = Bridge(settings=bridge_settings)
    async with (
        running(bridge, wait=WAIT),
        open_edge(edge_settings, device="dev3") as edge,
        running(edge, wait=WAIT),
        CommandChannel(bridge_settings, registry=site.paths.registry) as channel,  # where dev3 was added
    ):
        await channel.send(command, device="dev3")
        result = await channel.result(command, timeout=WAIT)
        downlink = bridge.downlink
        assert downlink is not None
        window = downlink.window
    assert result is not None
    assert (result.status, result.subject) == ("ok", "dev3")
    # Each of the downlink's connections has its own login (the site broker makes it the client id):
    # none took another's session over, and each was given mosquitto's window.
    assert bridge_settings.bridge.downlink_connections > 1
    assert bridge.stats.downlink_reconnects == 0
    assert window == 20 * bridge_settings.bridge.downlink_connections


# --- several bridges in a $share group, each with its own logins (`nerve devices bridge add`) ---------


def group_of(logins: dict[str, Settings]) -> str:
    """The site's $share group, from the bridges' settings (the same in each)."""
    groups = {settings.bridge.shared_group for settings in logins.values()}
    assert len(groups) == 1
    (group,) = groups
    assert group is not None
    return group


async def add_bridges(site_broker: SiteBroker, tmp_path: Path, *names: str) -> dict[str, Settings]:
    """Add the bridges, each bundle copied aside (as to the bridge's host); the broker reads the logins.

    Each one's settings are its bundle's bridge.yaml, on the test broker's URL.
    """
    logins = {}
    for name in names:
        where = tmp_path / "on-bridge" / name
        added = site_broker.site.add_bridge(name, directory=where)
        shutil.copytree(added.bundle, where)
        logins[name] = load_settings(where / BRIDGE_CONFIG, overrides={"mqtt": {"url": site_broker.url}})
        assert logins[name].bridge.client_id == f"nerve-bridge-{name}"
    await site_broker.broker.stop()  # to read the new logins now (SIGHUP does it too, a moment later)
    await site_broker.broker.start()
    return logins


async def drain(client: MqttClient, into: list[bytes], until: asyncio.Event) -> None:
    """Collect what `client` receives (its payloads) into `into` until `until` is set."""
    while not until.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.05):
                into.append((await anext(client.messages)).payload)


async def readings_to(
    site_broker: SiteBroker, clients: dict[str, MqttClient], count: int, *, tag: str
) -> dict[str, list[bytes]]:
    """dev2 publishes `count` readings; return which client got which, once all arrived (or WAIT passed)."""
    got: dict[str, list[bytes]] = {name: [] for name in clients}
    done = asyncio.Event()
    sent = [f"{tag}-{i}".encode() for i in range(count)]
    async with asyncio.TaskGroup() as tasks:
        for name, client in clients.items():
            tasks.create_task(drain(client, got[name], done), name=f"drain-{name}")
        async with MqttClient(site_broker.device("dev2"), client_id="nerve-edge-dev2") as device:
            for payload in sent:
                await device.publish("nerve/dev2/telemetry/disk", payload)
        try:
            async with asyncio.timeout(WAIT):
                while sum(len(payloads) for payloads in got.values()) < count:
                    await asyncio.sleep(0.01)
        except TimeoutError:
            pass  # the assertions say what is missing
        finally:
            done.set()
    return got


async def test_two_bridges_with_their_own_logins_share_the_uplink(
    site_broker: SiteBroker, tmp_path: Path
) -> None:
    logins = await add_bridges(site_broker, tmp_path, "a", "b")
    group = group_of(logins)
    async with (
        MqttClient(logins["a"].mqtt, client_id="nerve-bridge-a", persistent=True) as a,
        MqttClient(logins["b"].mqtt, client_id="nerve-bridge-b", persistent=True) as b,
    ):
        for client in (a, b):
            await client.subscribe(f"$share/{group}/nerve/#")
        got = await readings_to(site_broker, {"a": a, "b": b}, 20, tag="shared")
    # Each reading reached exactly one of them, and each carried part of the uplink.
    assert sorted(got["a"] + got["b"]) == sorted(f"shared-{i}".encode() for i in range(20))
    assert got["a"]
    assert got["b"]


async def test_a_bridge_cannot_use_another_bridges_login_or_session(
    site_broker: SiteBroker, tmp_path: Path
) -> None:
    logins = await add_bridges(site_broker, tmp_path, "a", "b")
    # a's password with b's user name, and a's user name with b's password: refused at CONNECT.
    a_login, b_login = logins["a"].mqtt, logins["b"].mqtt
    for settings in (
        a_login.model_copy(update={"username": "nerve-bridge-b"}),
        a_login.model_copy(update={"password_file": b_login.password_file}),
        a_login.model_copy(update={"username": "nerve-bridge-b-down"}),  # nor b's downlink
    ):
        with pytest.raises(MqttRefused):
            async with MqttClient(settings, client_id="nerve-bridge-b"):
                pass
    # a asking for b's client id gets its own session (its user name): b keeps its own.
    async with MqttClient(b_login, client_id="nerve-bridge-b", persistent=True) as b:
        await b.subscribe("nerve/#")
        async with MqttClient(a_login, client_id="nerve-bridge-b", persistent=True) as a:
            await a.subscribe("nerve/#")
            got = await readings_to(site_broker, {"a": a, "b": b}, 1, tag="both")
            assert got == {"a": [b"both-0"], "b": [b"both-0"]}
        async with MqttClient(site_broker.device("dev1"), client_id="nerve-edge-dev1") as device:
            await device.publish("nerve/dev1/telemetry/disk", b"b is still connected")
        assert await next_message(b) == ("nerve/dev1/telemetry/disk", b"b is still connected")


async def test_a_named_bridges_downlink_writes_commands_and_its_uplink_does_not(
    site_broker: SiteBroker, tmp_path: Path
) -> None:
    logins = await add_bridges(site_broker, tmp_path, "a")
    bundle = tmp_path / "on-bridge" / "a"
    downlink = logins["a"].mqtt.model_copy(
        update={
            "username": logins["a"].bridge.downlink_username,
            "password_file": logins["a"].bridge.downlink_password_file,
        }
    )
    assert downlink.password_file == bundle / "mqtt-password-down"
    async with MqttClient(logins["a"].mqtt, client_id="nerve-bridge-a") as a:
        with pytest.raises(MqttWireError, match=DENIED):
            await a.publish("nerve/dev1/commands/clear_temp", b"{}")
    async with (
        MqttClient(downlink, client_id="nerve-bridge-a-down") as down,
        MqttClient(site_broker.device("dev1"), client_id="nerve-edge-dev1") as device,
    ):
        await device.subscribe("nerve/dev1/commands/+")
        await down.publish("nerve/dev1/commands/clear_temp", b"from a")
        assert await next_message(device) == ("nerve/dev1/commands/clear_temp", b"from a")
        with pytest.raises(MqttWireError, match=DENIED):
            await down.publish("nerve/dev1/telemetry/disk", b"95")


async def test_a_revoked_bridge_is_dropped_and_the_group_takes_its_share(
    site_broker: SiteBroker, tmp_path: Path
) -> None:
    logins = await add_bridges(site_broker, tmp_path, "a", "b")
    group = group_of(logins)
    async with MqttClient(logins["b"].mqtt, client_id="nerve-bridge-b", persistent=True) as b:
        await b.subscribe(f"$share/{group}/nerve/#")
        async with MqttClient(logins["a"].mqtt, client_id="nerve-bridge-a", persistent=True) as a:
            await a.subscribe(f"$share/{group}/nerve/#")
            revoked = await site_broker.site.revoke_bridge("a")
            assert revoked.session_found
            assert all(reload.sent for reload in revoked.reloads), revoked.reloads
            with pytest.raises(MqttWireError, match="our login was revoked"):
                await next_message(a)  # the broker closed its connection
        # mosquitto would go on queueing a share for a's session, which nobody reads any more: the
        # revocation took it out of the group, so b now gets every reading.
        got = await readings_to(site_broker, {"b": b}, 10, tag="after")
        assert got["b"] == [f"after-{i}".encode() for i in range(10)]
    for settings in (
        logins["a"].mqtt,
        logins["a"].mqtt.model_copy(update={"username": "nerve-bridge-a-down"}),
    ):
        with pytest.raises(MqttRefused):
            async with MqttClient(settings, client_id="nerve-bridge-a"):
                pass
    assert [(info.name, info.revoked is not None, info.left) for info in site_broker.site.bridges()] == [
        ("a", True, True),
        ("b", False, False),
    ]
    assert "nerve-bridge-a" not in site_broker.site.paths.acl.read_text()
    assert not (site_broker.site.paths.bridges / "a").exists()


async def test_a_device_login_cannot_read_the_uplink_nor_join_the_bridges_group(
    site_broker: SiteBroker, tmp_path: Path
) -> None:
    logins = await add_bridges(site_broker, tmp_path, "a")
    group = group_of(logins)
    async with (
        MqttClient(logins["a"].mqtt, client_id="nerve-bridge-a", persistent=True) as a,
        MqttClient(site_broker.device("dev1"), client_id="nerve-edge-dev1", persistent=True) as device,
    ):
        await a.subscribe(f"$share/{group}/nerve/#")
        # Granted in the SUBACK (mosquitto checks reads at delivery); the group's name is not guessable.
        await device.subscribe("nerve/#", "#", "$share/nerve-bridges/nerve/#", "$share/bridges/nerve/#")
        got = await readings_to(site_broker, {"a": a, "device": device}, 10, tag="uplink")
    assert got["device"] == []
    assert got["a"] == [f"uplink-{i}".encode() for i in range(10)]


async def test_a_device_that_knew_the_groups_name_would_swallow_a_share(
    site_broker: SiteBroker, tmp_path: Path
) -> None:
    # Why the group's name is random, and kept to the bridges: mosquitto's file ACL does not check
    # subscriptions, and gives a member of the group its share, then drops what the ACL denies it.
    logins = await add_bridges(site_broker, tmp_path, "a")
    group = group_of(logins)
    assert len(group) >= len("nerve-") + 20  # 16 random bytes
    async with (
        MqttClient(logins["a"].mqtt, client_id="nerve-bridge-a", persistent=True) as a,
        MqttClient(site_broker.device("dev1"), client_id="nerve-edge-dev1", persistent=True) as device,
    ):
        await a.subscribe(f"$share/{group}/nerve/#")
        await device.subscribe(f"$share/{group}/nerve/#")
        got = await readings_to(site_broker, {"a": a, "device": device}, 10, tag="uplink")
    assert got["device"] == []
    assert 0 < len(got["a"]) < 10


async def test_two_bridges_from_their_bundles_store_each_reading_once(
    site_broker: SiteBroker, nats_server: NatsServer, nc: NatsClient, running: Running, tmp_path: Path
) -> None:
    # nerve's own bridges, each run from its bundle's bridge.yaml (plus its NATS side), in one group.
    logins = await add_bridges(site_broker, tmp_path, "a", "b")
    bridges = [
        Bridge(
            settings=load_settings(
                tmp_path / "on-bridge" / name / BRIDGE_CONFIG,
                overrides={
                    "data_dir": str(tmp_path / f"bridge-{name}"),
                    "nats": {"url": nats_server.url},
                    "mqtt": {"url": site_broker.url},
                },
            )
        )
        for name in logins
    ]
    js = nc.jetstream()
    async with (
        running(bridges[0], wait=WAIT),
        running(bridges[1], wait=WAIT),
        MqttClient(site_broker.device("dev2"), client_id="nerve-edge-dev2") as device,
    ):
        for value in range(1, 21):
            await device.publish("nerve/dev2/telemetry/disk", str(value).encode())
        await wait_for_count(js, "NERVE_TELEMETRY", 20, timeout=WAIT)
        await asyncio.sleep(0.2)  # a reading stored twice would show now
    stored = [decode(m.data, Event).data for m in await stream_messages(js, "NERVE_TELEMETRY")]
    assert sorted(data["value"] for data in stored) == list(range(1, 21))
    assert [bridge.stats.stored > 0 for bridge in bridges] == [True, True]
    assert sum(bridge.stats.stored for bridge in bridges) == 20
