"""NATS with least privilege, on a real nats-server started from the generated configuration.

Each part connects as its own nkey identity and may do its work; what it may not do (reconfigure,
delete or purge a stream, delete a message, publish a fact it does not keep, answer another client's
request) the server refuses, and the streams are as they were.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
import pytest
from nats.errors import Error as NatsError
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from nerve.bridge.natswire import NatsWireError, StoreAck, headers_block, open_nats
from nerve.runtime.cli.history import read_records
from nerve.runtime.config.settings import StreamsSettings, load_settings
from nerve.runtime.engine import Engine, EngineSettings, Step, Trigger, durable_agent, wait_for_run
from nerve.runtime.engine.names import RUNS_BUCKET, TIMERS_STREAM, timer_fired_subject
from nerve.runtime.envelope.codec import decode
from nerve.runtime.envelope.model import Command, Event, Fact
from nerve.runtime.errors import ConfigError
from nerve.runtime.jetstream.client import (
    MSG_ID_HEADER,
    NatsAuthRefused,
    connect,
    publish_envelope,
    publish_fact,
    shared_durable,
)
from nerve.runtime.jetstream.identities import Identity, load_nkey, seed_path, write_seed
from nerve.runtime.jetstream.permissions import NKEYS_FILE, nkey_variables, server_config
from nerve.runtime.jetstream.streams import (
    BUCKETS,
    LIMITS_BUCKET,
    STREAMS,
    StreamsMissing,
    apply_streams,
    open_bucket,
    ready_streams,
)
from nerve.runtime.stack.brokers import NatsServer, find_nats_server, free_port
from nerve.runtime.stack.local import Stack
from nerve.runtime.stack.natsauth import LocalNats, cli_identity
from nerve.runtime.subjects import Kind
from nerve.runtime.testing import stream_messages, wait_for_count
from nerve.runtime.trust.signing import Signer, generate_keypair

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext

    from nerve.runtime.config.settings import Settings
    from nerve.runtime.envelope.model import Envelope

pytestmark = pytest.mark.broker

REPO = Path(__file__).resolve().parents[2]
# How long a refused JetStream request is waited for: the server never answers one (it sends the client
# a permissions violation instead), so this bounds the test, it is not what is tested.
REFUSED_WAIT_S = 0.5


class Secured:
    """A nats-server started from the generated config, and the settings of each identity."""

    def __init__(self, server: NatsServer, local: LocalNats, base: Settings) -> None:
        self.server = server
        self.local = local
        self.base = base

    def settings(self, identity: Identity) -> Settings:
        return self.local.part(self.base, identity)

    async def client(self, identity: Identity) -> NatsClient:
        return await connect(self.settings(identity).nats, name=f"test-{identity.value}")


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Secured]:
    """nats-server with nerve's identities (as `nerve up` starts it), streams applied by admin."""
    data_dir = tmp_path / "data"
    port = free_port()
    server_dir = data_dir / "nats-server"
    local = LocalNats.prepare(data_dir, prefix="nerve", port=port, store_dir=server_dir / "jetstream")
    base = load_settings(overrides={"nats": {"url": f"nats://127.0.0.1:{port}"}, "data_dir": str(data_dir)})
    async with NatsServer(port=port, data_dir=server_dir, config_file=local.config_file) as server:
        await local.apply_streams(base)
        yield Secured(server, local, base)


@pytest.fixture
async def admin_js(secured: Secured) -> AsyncIterator[JetStreamContext]:
    client = await secured.client(Identity.ADMIN)
    yield client.jetstream()
    await client.close()


def a_fact(n: int = 1) -> Fact:
    return Fact(id=f"fact-{n}", source="nerve://test", type="nerve.fact.test", subject="pi-1", kind="tested")


# --- the configuration ------------------------------------------------------------------------------


def test_the_shipped_config_is_the_generators() -> None:
    """configs/nats-server.conf is `nerve nats-config`'s output for the defaults: one source of truth."""
    assert (REPO / "configs" / "nats-server.conf").read_text() == server_config()


def test_nats_server_accepts_the_shipped_config(tmp_path: Path) -> None:
    (tmp_path / "nats-server.conf").write_text((REPO / "configs" / "nats-server.conf").read_text())
    keys = {identity: write_seed(tmp_path / f"{identity.value}.nk").public_key for identity in Identity}
    (tmp_path / NKEYS_FILE).write_text(nkey_variables(keys))
    checked = subprocess.run(
        [str(find_nats_server(None)), "-t", "-c", str(tmp_path / "nats-server.conf")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr + checked.stdout
    assert "is valid" in checked.stdout + checked.stderr


def test_the_shipped_config_listens_on_loopback_and_lets_no_one_in_anonymously() -> None:
    config = (REPO / "configs" / "nats-server.conf").read_text()
    active = [line.strip() for line in config.splitlines() if not line.strip().startswith("#")]
    assert "listen: 127.0.0.1:4222" in active
    assert not any(line.startswith(("no_auth_user", "listen: 0.0.0.0")) for line in active)
    assert active.count("nkey: $NERVE_NKEY_ADMIN") == 1


# --- who gets in -------------------------------------------------------------------------------------


async def test_an_anonymous_client_is_refused_at_connect(secured: Secured) -> None:
    with pytest.raises(NatsAuthRefused, match="no identity"):
        await connect(secured.base.nats, name="anonymous")


async def test_a_wrong_seed_is_refused_at_connect_naming_its_file(secured: Secured, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger.nk"
    write_seed(stranger)
    nats_settings = secured.base.nats.model_copy(update={"nkey_file": stranger})
    with pytest.raises(NatsAuthRefused, match=f"the nkey in {stranger}"):
        await connect(nats_settings, name="stranger")


async def test_the_bridge_wire_authenticates_with_its_nkey_and_names_a_refused_one(
    secured: Secured, tmp_path: Path
) -> None:
    acks: list[StoreAck] = []
    arrived = asyncio.Event()

    def take(batch: list[StoreAck]) -> None:
        acks.extend(batch)
        arrived.set()

    bridge = load_nkey(seed_path(secured.local.directory, Identity.BRIDGE))
    wire = await open_nats(secured.server.url, name="bridge", on_acks=take, nkey=bridge)
    try:
        wire.publish("nerve.pi-1.telemetry.disk", headers_block({MSG_ID_HEADER: "r1"}), b"{}", 1)
        wire.flush()
        async with asyncio.timeout(10):
            while not acks:
                arrived.clear()
                await arrived.wait()
        assert acks == [StoreAck(1, None, duplicate=False)]  # the reading is stored
        # A fact is refused with an -ERR, which ends a natswire session with the server's words (the
        # bridge starts over): the fact is not in.
        wire.publish("nerve.pi-1.facts.forged", headers_block({MSG_ID_HEADER: "f1"}), b"{}", 2)
        wire.flush()
        with pytest.raises(NatsWireError, match=r'Permissions Violation for Publish to "nerve\.pi-1\.facts'):
            await asyncio.wait_for(wire.closed, 10)
        assert len(acks) == 1
    finally:
        wire.close()
    stranger = write_seed(tmp_path / "stranger.nk")
    with pytest.raises(NatsWireError, match=f"refused the nkey in {stranger.path}"):
        await open_nats(secured.server.url, name="bridge", on_acks=take, nkey=stranger)
    with pytest.raises(NatsWireError, match="refused a client with no identity"):
        await open_nats(secured.server.url, name="bridge", on_acks=take)
    admin = await secured.client(Identity.ADMIN)
    try:
        assert (await admin.jetstream().stream_info("NERVE_TELEMETRY")).state.messages == 1
        assert (await admin.jetstream().stream_info("NERVE_FACTS")).state.messages == 0
    finally:
        await admin.close()


# --- what the parts may not do -----------------------------------------------------------------------

REFUSED_OPERATIONS = ("update_stream", "delete_stream", "purge_stream", "delete_msg")


async def _attempt(js: JetStreamContext, operation: str, stream: str) -> None:
    if operation == "update_stream":
        await js.update_stream(StreamConfig(name=stream, max_msgs=1, max_age=1.0))
    elif operation == "delete_stream":
        await js.delete_stream(stream)
    elif operation == "purge_stream":
        await js.purge_stream(stream)
    else:
        await js.delete_msg(stream, 1)


@pytest.mark.parametrize("identity", [Identity.BRIDGE, Identity.CENTRAL, Identity.CLI])
async def test_no_part_but_admin_may_reconfigure_delete_or_purge_facts_or_telemetry(
    secured: Secured, admin_js: JetStreamContext, identity: Identity
) -> None:
    await admin_js.publish("nerve.pi-1.telemetry.disk", b"{}")
    await publish_fact(admin_js, a_fact(), prefix="nerve")
    before = {name: await admin_js.stream_info(name) for name in ("NERVE_FACTS", "NERVE_TELEMETRY")}
    violations: list[str] = []

    async def on_error(exc: Exception) -> None:
        violations.append(str(exc))

    client = await nats.connect(
        secured.server.url,
        nkeys_seed=str(seed_path(secured.local.directory, identity)),
        error_cb=on_error,
        allow_reconnect=False,
    )
    try:
        js = client.jetstream(timeout=REFUSED_WAIT_S)
        for stream in before:
            for operation in REFUSED_OPERATIONS:
                with pytest.raises(NatsError):  # the server does not answer: nats-py times out
                    await _attempt(js, operation, stream)
    finally:
        await client.close()
    assert len([v for v in violations if "permissions violation" in v.lower()]) == 2 * len(REFUSED_OPERATIONS)
    for name, info in before.items():
        after = await admin_js.stream_info(name)
        assert after.config == info.config, name
        assert after.state.messages == info.state.messages == 1, name


@pytest.mark.parametrize("identity", [Identity.BRIDGE, Identity.CLI])
async def test_only_central_may_publish_a_fact(secured: Secured, identity: Identity) -> None:
    client = await secured.client(identity)
    try:
        with pytest.raises(NatsError):
            await publish_fact(client.jetstream(timeout=REFUSED_WAIT_S), a_fact(), prefix="nerve")
        await client.publish("nerve.pi-1.facts.forged", b"{}")  # core publish: dropped by the server
        await client.flush()
    finally:
        await client.close()
    central = await secured.client(Identity.CENTRAL)
    try:
        assert (await central.jetstream().stream_info("NERVE_FACTS")).state.messages == 0
    finally:
        await central.close()


@pytest.mark.parametrize("identity", [Identity.BRIDGE, Identity.CENTRAL, Identity.CLI])
async def test_no_part_may_answer_another_clients_request(secured: Secured, identity: Identity) -> None:
    """A fake JetStream ack to the bridge's inbox (the attack on the uplink) cannot be sent."""
    listener = await secured.client(Identity.ADMIN)
    heard: list[bytes] = []

    async def hear(msg: Any) -> None:
        heard.append(msg.data)

    await listener.subscribe("_INBOX.victim.*", cb=hear)
    await listener.flush()
    client = await secured.client(identity)
    try:
        await client.publish("_INBOX.victim.1", b'{"stream":"NERVE_TELEMETRY","seq":1}')
        await client.flush()
        await listener.publish("_INBOX.victim.2", b"admin may")  # the same path works for admin
        await listener.flush()
        async with asyncio.timeout(5):
            while not heard:
                await asyncio.sleep(0.01)
    finally:
        await client.close()
        await listener.close()
    assert heard == [b"admin may"]


async def test_a_part_with_an_identity_names_missing_streams_instead_of_creating_them(
    secured: Secured, admin_js: JetStreamContext
) -> None:
    await admin_js.delete_stream("NERVE_FACTS")
    await admin_js.delete_key_value(LIMITS_BUCKET)
    central = await secured.client(Identity.CENTRAL)
    try:
        with pytest.raises(StreamsMissing) as missing:
            await ready_streams(central.jetstream(), "nerve", configure=False)
        with pytest.raises(StreamsMissing, match="KV_nerve_limits"):
            await open_bucket(central.jetstream(), LIMITS_BUCKET)
    finally:
        await central.close()
    assert missing.value.names == ["NERVE_FACTS", "KV_nerve_limits"]
    assert "run `nerve streams apply` with the admin identity" in str(missing.value)
    with pytest.raises(NotFoundError):
        await admin_js.stream_info("NERVE_FACTS")  # nothing was created behind admin's back


# --- what each part does, as itself -------------------------------------------------------------------


async def test_central_publishes_commands_and_signed_facts_and_uses_its_bucket(
    secured: Secured, tmp_path: Path
) -> None:
    private, _ = generate_keypair(tmp_path / "keys", "central")
    signer = Signer.from_file(private)
    central = await secured.client(Identity.CENTRAL)
    try:
        js = central.jetstream()
        await ready_streams(js, "nerve", configure=False)
        await publish_fact(js, a_fact(), prefix="nerve", signer=signer)
        command = signer.sign(
            Command.create(
                device="pi-1", action="clear_temp", args={}, source="test", ttl=timedelta(minutes=1)
            )
        )
        await publish_envelope(js, "nerve.pi-1.commands.clear_temp", command)
        kv = await open_bucket(js, LIMITS_BUCKET)
        await kv.put("pi-1", b"open")
        assert (await kv.get("pi-1")).value == b"open"
        assert await kv.keys() == ["pi-1"]
        reading = await shared_durable(
            js,
            subject="nerve.*.telemetry.*",
            stream="NERVE_TELEMETRY",
            name="nerve-agent-test-telemetry",
            ack_wait_s=30,
            max_ack_pending=10,
        )
        await reading.unsubscribe()
    finally:
        await central.close()
    cli = await secured.client(Identity.CLI)
    try:
        records = await read_records(cli.jetstream(), prefix="nerve")
        assert [sequence for sequence, _ in records] == [1]
        last = await cli.jetstream().get_last_msg("NERVE_COMMANDS", "nerve.pi-1.commands.*")
        assert last.data is not None
    finally:
        await cli.close()


async def test_the_bridge_reads_commands_through_its_consumer_and_acks_them(secured: Secured) -> None:
    central = await secured.client(Identity.CENTRAL)
    bridge = await secured.client(Identity.BRIDGE)
    try:
        await central.jetstream().publish("nerve.pi-1.commands.clear_temp", b"a command")
        downlink = await shared_durable(
            bridge.jetstream(),
            subject="nerve.*.commands.*",
            stream="NERVE_COMMANDS",
            name="nerve-bridge-downlink",
            ack_wait_s=30,
            max_ack_pending=10,
        )
        message = await downlink.next_msg(timeout=10)
        assert message.data == b"a command"
        await message.ack_sync(timeout=10)
        info = await bridge.jetstream().consumer_info("NERVE_COMMANDS", "nerve-bridge-downlink")
        assert info.num_ack_pending == 0
    finally:
        await bridge.close()
        await central.close()


async def test_the_cli_may_send_a_command_but_not_store_a_reading(secured: Secured) -> None:
    cli = await secured.client(Identity.CLI)
    try:
        js = cli.jetstream(timeout=REFUSED_WAIT_S)
        await js.publish("nerve.pi-1.commands.clear_temp", b"signed elsewhere", timeout=10)
        with pytest.raises(NatsError):
            await js.publish("nerve.pi-1.telemetry.disk", b'{"value": 99}')
    finally:
        await cli.close()


async def test_admin_applies_stream_limits(secured: Secured, admin_js: JetStreamContext) -> None:
    limits = StreamsSettings().model_dump()
    limits["telemetry"] = {"disk_budget": 4 * 1024 * 1024, "max_age_s": 7200.0}
    await apply_streams(admin_js, "nerve", StreamsSettings.model_validate(limits))
    info = await admin_js.stream_info("NERVE_TELEMETRY")
    # JetStream counts before compression: it is told the disk budget x the compression credit.
    assert (info.config.max_bytes, info.config.max_age) == (10 * 1024 * 1024, 7200.0)
    assert info.config.compression == "s2"
    names = {spec.name for spec in STREAMS} | {bucket.stream for bucket in BUCKETS}
    assert {name for name in names if await admin_js.stream_info(name)} == names


async def test_the_cli_commands_find_the_cli_identity_in_the_data_dir(secured: Secured) -> None:
    settings = cli_identity(secured.base)
    assert settings.nats.nkey_file == seed_path(secured.local.directory, Identity.CLI)
    client = await connect(settings.nats, name="cli")
    await client.close()
    explicit = secured.base.nats.model_copy(
        update={"nkey_file": seed_path(secured.local.directory, Identity.CENTRAL)}
    )
    chosen = cli_identity(secured.base.model_copy(update={"nats": explicit}))
    assert chosen.nats.nkey_file == explicit.nkey_file  # a setting wins over the default


def test_a_seed_others_can_read_is_refused(tmp_path: Path) -> None:
    key = write_seed(tmp_path / "cli.nk")
    assert (tmp_path / "cli.nk").stat().st_mode & 0o777 == 0o600
    (tmp_path / "cli.nk").chmod(0o644)
    with pytest.raises(ConfigError, match=r"readable by others \(mode 0644\)"):
        load_nkey(key.path)


def test_the_nats_server_binary_is_there() -> None:
    assert shutil.which(str(find_nats_server(None)))


# --- nerve up ---------------------------------------------------------------------------------------


async def test_nerve_up_runs_its_own_nats_server_with_an_identity_per_part(tmp_path: Path) -> None:
    """The whole arc on the stack's own brokers, each part as itself; an anonymous client is refused."""
    mosquitto_pub = shutil.which("mosquitto_pub")
    if mosquitto_pub is None:
        pytest.fail("mosquitto_pub is not installed (make setup installs mosquitto-clients)")
    mqtt_port, nats_port = free_port(), free_port()
    settings = load_settings(
        overrides={
            "data_dir": str(tmp_path / "data"),
            "mqtt": {"url": f"mqtt://127.0.0.1:{mqtt_port}"},
            "nats": {"url": f"nats://127.0.0.1:{nats_port}"},
            "edge": {"mounts": []},
            "central": {"signing_key": str(tmp_path / "keys" / "central.key")},
        }
    )
    async with Stack(settings=settings, device="pi-auth") as stack:
        assert stack.info is not None
        assert set(stack.info.started_brokers) == {"mosquitto", "nats-server"}
        identities = tmp_path / "data" / "nats"
        assert stack.settings.nats.nkey_file == seed_path(identities, Identity.CLI)
        for identity in Identity:
            assert seed_path(identities, identity).stat().st_mode & 0o777 == 0o600
        with pytest.raises(NatsAuthRefused):
            await connect(settings.nats, name="anonymous")
        process = await asyncio.create_subprocess_exec(
            mosquitto_pub, "-p", str(mqtt_port), "-q", "1", "-t", "nerve/pi-auth/telemetry/disk", "-m", "97"
        )
        assert await process.wait() == 0
        cli = await connect(stack.settings.nats, name="cli")
        try:
            js = cli.jetstream()
            await wait_for_count(js, "NERVE_FACTS", 3, timeout=20)  # opened, issued, the result
            # The runbook (a durable agent on the engine, as central) verifies by the next reading.
            process = await asyncio.create_subprocess_exec(
                mosquitto_pub,
                "-p",
                str(mqtt_port),
                "-q",
                "1",
                "-t",
                "nerve/pi-auth/telemetry/disk",
                "-m",
                "40",
            )
            assert await process.wait() == 0
            await wait_for_count(js, "NERVE_FACTS", 4, timeout=20)
            facts = [decode(m.data, Fact) for m in await stream_messages(js, "NERVE_FACTS")]
        finally:
            await cli.close()
    assert [fact.kind for fact in facts][-1] == "incident_resolved"


# --- the engine, as central ----------------------------------------------------------------------------


@durable_agent("dozer", trigger=Trigger(Kind.EVENTS, "doze"), key=lambda event: str(event.subject))
async def dozer(event: Envelope, step: Step) -> str:
    await step.sleep("doze", 0.2)
    return "rested"


async def test_central_runs_the_engine_as_itself(secured: Secured, admin_js: JetStreamContext) -> None:
    """Storage made by admin; central only checks it, then journals, schedules and deletes fired timers."""
    await apply_streams(admin_js, "nerve")
    central = await secured.client(Identity.CENTRAL)
    try:
        engine = Engine(nc=central, agents=[dozer], settings=EngineSettings(lease_s=1.0), configure=False)
        async with engine:
            event = Event(source="t", type="doze", subject="pi-1")
            await publish_envelope(admin_js, "nerve.pi-1.events.doze", event)
            record = await wait_for_run(engine.kv, dozer.run_id(event.id), timeout=20)
    finally:
        await central.close()
    assert (record.state, record.result) == ("done", "rested")
    timer = record.steps["doze"].timer
    with pytest.raises(NotFoundError):  # central deleted the fired timer's message: it may, there only
        await admin_js.get_last_msg(TIMERS_STREAM, timer_fired_subject("nerve", timer))


async def test_an_engine_with_an_identity_names_its_missing_storage(
    secured: Secured, admin_js: JetStreamContext
) -> None:
    await apply_streams(admin_js, "nerve")
    await admin_js.delete_stream(TIMERS_STREAM)
    await admin_js.delete_key_value(RUNS_BUCKET)
    central = await secured.client(Identity.CENTRAL)
    try:
        with pytest.raises(StreamsMissing) as missing:
            async with Engine(nc=central, agents=[dozer], configure=False):
                pass
    finally:
        await central.close()
    assert missing.value.names == ["KV_nerve_runs", "NERVE_TIMERS"]
    with pytest.raises(NotFoundError):
        await admin_js.stream_info(TIMERS_STREAM)  # nothing was created behind admin's back
