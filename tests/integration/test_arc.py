"""The whole reflex arc on real brokers, driven the way a person would: `mosquitto_pub`."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from datetime import timedelta
from typing import TYPE_CHECKING

import msgspec
import pytest

from nerve.runtime.envelope.codec import (
    CONTENT_TYPE_HEADER,
    Codec,
    content_type,
    decode,
    is_msgpack_map,
    to_json,
)
from nerve.runtime.envelope.model import Command, CommandResult, Fact
from nerve.runtime.stack.local import Stack
from nerve.runtime.testing import stream_messages, wait_for_count
from nerve.runtime.trust.devices import DeviceKeys
from nerve.runtime.trust.signing import Signer, generate_keypair

if TYPE_CHECKING:
    from pathlib import Path

    from nats.aio.client import Client as NatsClient

    from nerve.runtime.config.settings import Settings
    from nerve.runtime.stack.brokers import Mosquitto

pytestmark = pytest.mark.broker

MOSQUITTO_PUB = shutil.which("mosquitto_pub")


async def mosquitto_pub(broker: Mosquitto, topic: str, message: str) -> None:
    if MOSQUITTO_PUB is None:
        pytest.fail("mosquitto_pub is not installed (make setup installs mosquitto-clients)")
    process = await asyncio.create_subprocess_exec(
        MOSQUITTO_PUB, "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-t", topic, "-m", message
    )
    assert await process.wait() == 0


@pytest.mark.parametrize("codec", list(Codec))
async def test_spike_clears_old_files_and_keeps_facts(
    settings: Settings, mosquitto: Mosquitto, nc: NatsClient, codec: Codec
) -> None:
    js = nc.jetstream()
    quiet = settings.model_copy(
        update={
            "edge": settings.edge.model_copy(update={"mounts": ()}),
            "nats": settings.nats.model_copy(update={"codec": codec}),
        }
    )
    async with Stack(settings=quiet, device="pi-01") as stack:
        assert stack.info is not None
        assert stack.info.started_brokers == ()  # the test's brokers answered: none started
        scratch = stack.info.scratch
        old = scratch / "old.log"
        old.write_bytes(b"x" * 4096)
        past = time.time() - 2 * 86400
        os.utime(old, (past, past))
        fresh = scratch / "fresh.log"
        fresh.write_bytes(b"keep")
        outside = scratch.parent / "outside.log"
        outside.write_bytes(b"never")
        os.utime(outside, (past, past))

        await mosquitto_pub(mosquitto, "nerve/pi-01/telemetry/disk", '{"value": 97}')
        await wait_for_count(js, "NERVE_FACTS", 3, timeout=15)  # opened, issued, the result
        # The edge sends no readings here (no mounts): the next one, below the clear level, as it would.
        await mosquitto_pub(mosquitto, "nerve/pi-01/telemetry/disk", '{"value": 40}')
        await wait_for_count(js, "NERVE_FACTS", 4, timeout=15)

    facts = [decode(m.data, Fact) for m in await stream_messages(js, "NERVE_FACTS")]
    assert [f.kind for f in facts] == [
        "incident_opened",
        "command_issued",
        "command_result",
        "incident_resolved",
    ]
    assert len({f.correlationid for f in facts}) == 1  # one chain
    assert "deleted 1 files" in facts[-1].summary
    (result_msg,) = await stream_messages(js, "NERVE_RESULTS")
    result = decode(result_msg.data, CommandResult)
    assert result.status == "ok"
    assert result.data["files_deleted"] == 1
    assert result.data["bytes_freed"] == 4096
    # Signed by the device's own key, which the stack made (0600) and registered for central.
    data_dir = settings.data_dir.resolve()
    assert result.keyid == "pi-01"
    assert DeviceKeys(data_dir / "devices").refusal(result) is None
    private = data_dir / "edge-keys" / "pi-01.key"
    assert private.stat().st_mode & 0o777 == 0o600
    assert (data_dir / "devices" / "pi-01.pub").read_text() == private.with_suffix(".pub").read_text()
    assert not old.exists()
    assert fresh.exists()
    # Every part stored in the codec the setting names, and said so (CloudEvents NATS binding).
    for stream in ("NERVE_TELEMETRY", "NERVE_COMMANDS", "NERVE_RESULTS", "NERVE_FACTS"):
        for message in await stream_messages(js, stream):
            assert message.headers[CONTENT_TYPE_HEADER] == content_type(codec), stream
            assert is_msgpack_map(message.data) is (codec is Codec.MSGPACK), stream
    assert outside.exists()


async def test_plain_number_spike_and_bad_input_together(
    settings: Settings, mosquitto: Mosquitto, nc: NatsClient
) -> None:
    js = nc.jetstream()
    quiet = settings.model_copy(update={"edge": settings.edge.model_copy(update={"mounts": ()})})
    async with Stack(settings=quiet, device="pi-02"):
        await mosquitto_pub(mosquitto, "nerve/pi-02/telemetry/disk", "abc")
        await mosquitto_pub(mosquitto, "nerve/pi 02/telemetry/disk", "95")
        await mosquitto_pub(mosquitto, "nerve/pi-02/telemetry/disk", "95")
        await wait_for_count(js, "NERVE_FACTS", 3, timeout=15)
        await mosquitto_pub(mosquitto, "nerve/pi-02/telemetry/disk", "40")
        await wait_for_count(js, "NERVE_FACTS", 4, timeout=15)
        await wait_for_count(js, "NERVE_DEADLETTER", 2)
    facts = [decode(m.data, Fact) for m in await stream_messages(js, "NERVE_FACTS")]
    assert facts[-1].kind == "incident_resolved"


async def test_forged_command_is_refused_and_audited(
    settings: Settings, mosquitto: Mosquitto, nc: NatsClient, tmp_path: Path
) -> None:
    """A command signed by a key the device does not trust: nothing deleted, refusal kept as a fact."""
    js = nc.jetstream()
    quiet = settings.model_copy(
        update={
            "edge": settings.edge.model_copy(update={"mounts": ()}),
            # The audit counts a device's refusals after the first into one fact per window: a short one.
            "streams": settings.streams.model_copy(update={"sample_window_s": 0.5}),
        }
    )
    private, _ = generate_keypair(tmp_path / "attacker", "central")  # same key id, different key
    forged = Signer.from_file(private).sign(
        Command.create(
            device="pi-03",
            action="clear_temp",
            args={"older_than_s": 0},
            source="evil",
            ttl=timedelta(minutes=1),
        )
    )
    async with Stack(settings=quiet, device="pi-03") as stack:
        assert stack.info is not None
        victim = stack.info.scratch / "precious.db"
        victim.write_bytes(b"data")
        await mosquitto_pub(mosquitto, "nerve/pi-03/commands/clear_temp", to_json(forged).decode())
        await wait_for_count(js, "NERVE_FACTS", 1, timeout=15)
        unsigned = msgspec.structs.replace(forged, sig="", id="unsigned-1")
        await mosquitto_pub(mosquitto, "nerve/pi-03/commands/clear_temp", to_json(unsigned).decode())
        await wait_for_count(js, "NERVE_FACTS", 2, timeout=15)
    assert victim.exists()
    facts = [decode(m.data, Fact) for m in await stream_messages(js, "NERVE_FACTS")]
    assert [f.kind for f in facts] == ["command_rejected", "command_rejected"]
    assert "bad signature" in facts[0].summary
    assert "not signed" in facts[1].summary
    results = [decode(m.data, CommandResult) for m in await stream_messages(js, "NERVE_RESULTS")]
    assert {r.status for r in results} == {"rejected"}
