"""`nerve facts verify`, and the marks `nerve facts` puts on facts that do not verify (real nats-server)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import nats
import pytest

from nerve.runtime.envelope.codec import DEFAULT_CODEC, encode
from nerve.runtime.envelope.model import Fact
from nerve.runtime.jetstream.client import fact_subject, publish_fact
from nerve.runtime.jetstream.streams import ensure_streams
from nerve.runtime.trust.signing import Signer, generate_keypair

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from nats.js import JetStreamContext

    from nerve.runtime.stack.brokers import NatsServer

NERVE = str(Path(sys.executable).parent / "nerve")


def a_fact(n: int) -> Fact:
    return Fact(
        id=f"fact-{n}",
        source="nerve://central/test",
        type="nerve.fact.test",
        subject="pi-1",
        kind="tested",
        summary=f"fact number {n}",
    )


async def nerve(*args: str, home: Path) -> tuple[int, str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("NERVE_")}
    env["XDG_CONFIG_HOME"] = str(home)
    process = await asyncio.create_subprocess_exec(
        NERVE, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    """The central key where `nerve up` keeps it by default (under $XDG_CONFIG_HOME)."""
    private, _ = generate_keypair(tmp_path / "nerve" / "keys", "central")
    return Signer.from_file(private)


@pytest.fixture
async def js(nats_server: NatsServer) -> AsyncIterator[JetStreamContext]:
    client = await nats.connect(nats_server.url)
    context = client.jetstream()
    await ensure_streams(context, "nerve")
    yield context
    await client.close()


@pytest.mark.broker
async def test_verify_proves_an_intact_chain_and_names_a_forged_fact(
    nats_server: NatsServer, js: JetStreamContext, signer: Signer, tmp_path: Path
) -> None:
    for n in range(1, 4):
        await publish_fact(js, a_fact(n), prefix="nerve", signer=signer)
    code, out, err = await nerve("facts", "verify", "--nats-url", nats_server.url, home=tmp_path)
    assert (code, err) == (0, "")
    assert out == "NERVE_FACTS: 3 fact(s), chain intact\n"

    forged = msgspec.structs.replace(
        a_fact(4), summary="reboot approved", chainseq=4, keyid="central", sig="AA=="
    )
    await js.publish(fact_subject(forged, "nerve"), encode(forged, DEFAULT_CODEC))
    code, out, _ = await nerve("facts", "verify", "--nats-url", nats_server.url, home=tmp_path)
    assert code == 1
    assert out.splitlines() == [
        "seq 4: bad signature: the fact was altered or forged",
        "NERVE_FACTS: 1 of 4 record(s) do not verify",
    ]

    code, out, _ = await nerve("facts", "--nats-url", nats_server.url, home=tmp_path)
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 4
    assert all("NOT VERIFIED" not in line for line in lines[:3])
    assert lines[3].endswith(
        "reboot approved  !! NOT VERIFIED (seq 4): bad signature: the fact was altered or forged"
    )


@pytest.mark.broker
async def test_verify_with_an_explicit_keys_directory_and_an_unknown_key(
    nats_server: NatsServer, js: JetStreamContext, signer: Signer, tmp_path: Path
) -> None:
    await publish_fact(js, a_fact(1), prefix="nerve", signer=signer)
    keys = tmp_path / "nerve" / "keys"
    code, out, _ = await nerve(
        "facts", "verify", "--nats-url", nats_server.url, "--keys", str(keys), home=tmp_path
    )
    assert (code, out) == (0, "NERVE_FACTS: 1 fact(s), chain intact\n")
    other = tmp_path / "other"
    generate_keypair(other, "someone")
    code, out, _ = await nerve(
        "facts", "verify", "--nats-url", nats_server.url, "--keys", str(other), home=tmp_path
    )
    assert code == 1
    assert out.splitlines()[0] == "seq 1: fact is signed by unknown key id 'central'"


@pytest.mark.broker
async def test_a_legacy_fact_is_listed_and_verify_says_it_is_unsigned(
    nats_server: NatsServer, js: JetStreamContext, signer: Signer, tmp_path: Path
) -> None:
    await publish_fact(js, a_fact(1), prefix="nerve")
    await publish_fact(js, a_fact(2), prefix="nerve", signer=signer)
    code, out, _ = await nerve("facts", "verify", "--nats-url", nats_server.url, home=tmp_path)
    assert code == 1
    assert (
        out.splitlines()[0]
        == "seq 1: unsigned legacy fact (kept before facts were signed): cannot be verified"
    )


@pytest.mark.broker
async def test_without_a_trusted_key_verify_is_one_line_and_listing_says_unverified(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    await publish_fact(js, a_fact(1), prefix="nerve")
    empty = tmp_path / "empty-home"
    code, out, err = await nerve("facts", "verify", "--nats-url", nats_server.url, home=empty)
    assert code != 0
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert "central.pub" in err
    code, out, _ = await nerve("facts", "--nats-url", nats_server.url, home=empty)
    assert code == 0
    assert out.splitlines()[-1] == "(not verified: no trusted key; see `nerve facts verify --keys`)"


@pytest.mark.parametrize("flag", [["--device", "pi-1"], ["--limit", "3"]])
async def test_verify_refuses_a_narrowing_flag_in_one_line(flag: list[str], tmp_path: Path) -> None:
    code, out, err = await nerve("facts", "verify", *flag, home=tmp_path)
    assert (code, out) == (2, "")
    assert err == f"nerve facts: error: {flag[0]}: verify checks the whole chain (a link spans devices)\n"
