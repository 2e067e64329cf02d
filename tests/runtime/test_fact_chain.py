"""nerve.runtime.trust.chain: signed, hash-chained facts, and verification naming what was tampered with."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import msgspec
import nats
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.signing import SigningKey
from nats.js.api import StreamConfig

from nerve.runtime.cli.history import read_records
from nerve.runtime.envelope.codec import DEFAULT_CODEC, Codec, decode, encode
from nerve.runtime.envelope.model import Fact
from nerve.runtime.jetstream.client import MSG_ID_HEADER, fact_subject, publish_fact
from nerve.runtime.jetstream.streams import FACTS_STREAM, ensure_streams
from nerve.runtime.trust.chain import Problem, fact_bytes, record_hash, seal, verify_records
from nerve.runtime.trust.signing import Signer, Verifier

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext

    from nerve.runtime.stack.brokers import NatsServer

PREFIX = "nerve"
COPY_PREFIX = "copy"
COPY_STREAM = "FACTS_COPY"


def a_fact(n: int, device: str = "pi-1") -> Fact:
    return Fact(
        id=f"fact-{device}-{n}",
        source="nerve://central/test",
        type="nerve.fact.test",
        subject=device,
        kind="tested",
        summary=f"fact number {n}",
        data={"n": n, "nested": {"b": [1, 2.5, "x"], "a": None}},
    )


@pytest.fixture
def signer() -> Signer:
    return Signer("central", SigningKey.generate())


@pytest.fixture
def verifier(signer: Signer) -> Verifier:
    return Verifier.from_config({signer.keyid: signer.public_key})


@pytest.fixture
async def js(nats_server: NatsServer) -> AsyncIterator[JetStreamContext]:
    client = await nats.connect(nats_server.url)
    context = client.jetstream()
    await ensure_streams(context, PREFIX)
    yield context
    await client.close()


async def chain(js: JetStreamContext, signer: Signer, count: int, *, start: int = 1) -> None:
    for n in range(start, start + count):
        await publish_fact(js, a_fact(n, device=f"pi-{n % 2}"), prefix=PREFIX, signer=signer)


async def problems(js: JetStreamContext, verifier: Verifier, *, copy: bool = False) -> list[Problem]:
    records = await read_records(
        js, prefix=COPY_PREFIX if copy else PREFIX, stream=COPY_STREAM if copy else FACTS_STREAM
    )
    return verify_records(records, verifier)


async def copy_stream(js: JetStreamContext, records: Sequence[bytes]) -> None:
    """Store `records` in a fresh stream, in this order: how a rewritten history would look."""
    await js.add_stream(StreamConfig(name=COPY_STREAM, subjects=[f"{COPY_PREFIX}.*.facts.*"]))
    for n, data in enumerate(records):
        fact = decode(data, Fact)
        await js.publish(
            f"{COPY_PREFIX}.{fact.subject}.facts.{fact.kind}", data, headers={MSG_ID_HEADER: f"c{n}"}
        )


async def stored(js: JetStreamContext) -> list[bytes]:
    return [data for _, data in await read_records(js, prefix=PREFIX)]


# --- a real nats-server -----------------------------------------------------------------------------


@pytest.mark.broker
async def test_an_intact_chain_verifies(js: JetStreamContext, signer: Signer, verifier: Verifier) -> None:
    await chain(js, signer, 5)
    await publish_fact(js, a_fact(6), prefix=PREFIX, signer=signer, codec=Codec.JSON)  # codecs may differ
    records = await read_records(js, prefix=PREFIX)
    assert [seq for seq, _ in records] == [1, 2, 3, 4, 5, 6]
    assert [decode(data, Fact).chainseq for _, data in records] == [1, 2, 3, 4, 5, 6]
    assert verify_records(records, verifier) == []


@pytest.mark.broker
async def test_a_fact_kept_twice_is_stored_once_and_the_chain_holds(
    js: JetStreamContext, signer: Signer, verifier: Verifier
) -> None:
    await chain(js, signer, 2)
    await publish_fact(js, a_fact(1, device="pi-1"), prefix=PREFIX, signer=signer)  # same id as fact 1
    assert len(await stored(js)) == 2
    assert await problems(js, verifier) == []


@pytest.mark.broker
async def test_concurrent_writers_cannot_fork_the_chain(
    nats_server: NatsServer, js: JetStreamContext, signer: Signer, verifier: Verifier
) -> None:
    clients = [await nats.connect(nats_server.url) for _ in range(3)]
    try:

        async def writer(client: NatsClient, name: str) -> None:
            for n in range(8):
                await publish_fact(client.jetstream(), a_fact(n, device=name), prefix=PREFIX, signer=signer)

        async with asyncio.TaskGroup() as group:
            for i, client in enumerate(clients):
                group.create_task(writer(client, f"writer-{i}"), name=f"writer-{i}")
    finally:
        for client in clients:
            await client.close()
    assert len(await stored(js)) == 24
    assert await problems(js, verifier) == []


@pytest.mark.broker
async def test_one_connection_reads_the_head_once_and_its_concurrent_facts_chain(
    nats_server: NatsServer, signer: Signer, verifier: Verifier
) -> None:
    """The head a connection stored last is remembered: read again only after another writer came."""
    client, other = await nats.connect(nats_server.url), await nats.connect(nats_server.url)
    try:
        context = client.jetstream()
        await ensure_streams(context, PREFIX)
        reads = 0
        real_info = context.stream_info

        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal reads
            reads += 1
            return await real_info(*args, **kwargs)

        context.stream_info = counted  # type: ignore[method-assign]
        async with asyncio.TaskGroup() as group:  # all at once: they queue for their places in turn
            for n in range(20):
                group.create_task(
                    publish_fact(context, a_fact(n, device="pi-0"), prefix=PREFIX, signer=signer)
                )
        assert reads == 1
        await publish_fact(other.jetstream(), a_fact(100, device="pi-1"), prefix=PREFIX, signer=signer)
        await publish_fact(context, a_fact(21, device="pi-0"), prefix=PREFIX, signer=signer)
        assert reads == 2  # its remembered head was stale: refused, read again, stored
    finally:
        await client.close()
        await other.close()
    js = (await nats.connect(nats_server.url)).jetstream()
    assert len(await stored(js)) == 22
    assert await problems(js, verifier) == []
    await js._nc.close()


@pytest.mark.broker
async def test_a_forged_fact_is_named_whoever_published_it(
    js: JetStreamContext, signer: Signer, verifier: Verifier
) -> None:
    await chain(js, signer, 2)
    mallory = Signer("central", SigningKey.generate())  # claims central's key id
    await publish_fact(js, a_fact(3), prefix=PREFIX, signer=mallory)
    stranger = Signer("mallory", SigningKey.generate())
    await publish_fact(js, a_fact(4), prefix=PREFIX, signer=stranger)
    unsigned_with_a_fake_sig = msgspec.structs.replace(a_fact(5), chainseq=5, keyid="central", sig="AAAA")
    await js.publish(fact_subject(a_fact(5), PREFIX), encode(unsigned_with_a_fake_sig, DEFAULT_CODEC))
    await chain(js, signer, 1, start=6)  # a genuine fact after them still chains
    assert [str(p) for p in await problems(js, verifier)] == [
        "seq 3: bad signature: the fact was altered or forged",
        "seq 4: fact is signed by unknown key id 'mallory'",
        "seq 5: bad signature: the fact was altered or forged",
    ]


@pytest.mark.broker
async def test_a_changed_field_is_named_first(
    js: JetStreamContext, signer: Signer, verifier: Verifier
) -> None:
    await chain(js, signer, 4)
    records = await stored(js)
    altered = msgspec.structs.replace(decode(records[1], Fact), summary="nothing happened here")
    await copy_stream(js, [records[0], encode(altered, DEFAULT_CODEC), *records[2:]])
    found = await problems(js, verifier, copy=True)
    assert [str(p) for p in found] == [
        "seq 2: bad signature: the fact was altered or forged",
        "seq 3: not chained to the record before it (seq 2): that one was altered or replaced",
    ]


@pytest.mark.broker
async def test_a_gap_is_named(js: JetStreamContext, signer: Signer, verifier: Verifier) -> None:
    await chain(js, signer, 2)
    records = await stored(js)
    skipped = seal(a_fact(9), signer, chainseq=4, previous=records[-1])  # as if seq 3 had been removed
    await js.publish(fact_subject(skipped, PREFIX), encode(skipped, DEFAULT_CODEC))
    assert [str(p) for p in await problems(js, verifier)] == [
        "seq 3: claims place 4: 1 fact(s) before it are missing"
    ]


@pytest.mark.broker
async def test_a_removed_fact_in_a_rewritten_stream_is_named(
    js: JetStreamContext, signer: Signer, verifier: Verifier
) -> None:
    await chain(js, signer, 4)
    records = await stored(js)
    await copy_stream(js, [records[0], *records[2:]])
    found = await problems(js, verifier, copy=True)
    assert found[0] == Problem(2, "claims place 3: 1 fact(s) before it are missing")


@pytest.mark.broker
async def test_reordered_and_replayed_facts_are_named(
    js: JetStreamContext, signer: Signer, verifier: Verifier
) -> None:
    await chain(js, signer, 3)
    records = await stored(js)
    await copy_stream(js, [records[0], records[2], records[1]])
    assert [str(p) for p in await problems(js, verifier, copy=True)] == [
        "seq 2: claims place 3: 1 fact(s) before it are missing",
        "seq 3: claims place 2: moved here (reordered, replayed or copied)",
    ]
    replayed = decode(records[0], Fact)
    await js.publish(fact_subject(replayed, PREFIX), records[0], headers={MSG_ID_HEADER: "replay"})
    assert [str(p) for p in await problems(js, verifier)] == [
        "seq 4: claims place 1: moved here (reordered, replayed or copied)"
    ]


@pytest.mark.broker
async def test_an_unsigned_legacy_fact_says_so(
    js: JetStreamContext, signer: Signer, verifier: Verifier
) -> None:
    await publish_fact(js, a_fact(1), prefix=PREFIX)  # no signer: kept as before facts were signed
    await chain(js, signer, 2, start=2)
    assert [str(p) for p in await problems(js, verifier)] == [
        "seq 1: unsigned legacy fact (kept before facts were signed): cannot be verified"
    ]


@pytest.mark.broker
async def test_a_record_that_is_not_a_fact_is_named(
    js: JetStreamContext, signer: Signer, verifier: Verifier
) -> None:
    await chain(js, signer, 1)
    await js.publish(f"{PREFIX}.pi-1.facts.junk", b"\xc1 not msgpack")
    await chain(js, signer, 1, start=2)
    found = await problems(js, verifier)
    assert [p.seq for p in found] == [2]
    assert found[0].reason.startswith("not a fact: ")


# --- no broker: the chain as a pure function --------------------------------------------------------


def sealed_records(signer: Signer, count: int) -> list[bytes]:
    records: list[bytes] = []
    for n in range(1, count + 1):
        fact = seal(a_fact(n), signer, chainseq=n, previous=records[-1] if records else None)
        records.append(encode(fact, DEFAULT_CODEC))
    return records


def test_the_signature_covers_every_attribute_but_sig(signer: Signer) -> None:
    fact = seal(a_fact(1), signer, chainseq=1, previous=None)
    assert b'"sig"' not in fact_bytes(fact)
    assert b'"prevhash"' not in fact_bytes(fact)  # empty: left out, as in every encoding
    second = seal(a_fact(2), signer, chainseq=2, previous=encode(fact, DEFAULT_CODEC))
    assert second.prevhash == record_hash(encode(fact, DEFAULT_CODEC))
    assert b'"prevhash"' in fact_bytes(second)
    assert b'"chainseq":2' in fact_bytes(second)


@given(order=st.permutations(range(6)))
def test_any_reordering_is_named(order: list[int]) -> None:
    signer = Signer("central", SigningKey.generate())
    verifier = Verifier.from_config({"central": signer.public_key})
    records = sealed_records(signer, 6)
    found = verify_records(enumerate((records[i] for i in order), start=1), verifier)
    assert (found == []) == (list(order) == list(range(6)))


@given(drop=st.sets(st.integers(min_value=0, max_value=5), min_size=1, max_size=5))
def test_any_removal_is_named(drop: set[int]) -> None:
    signer = Signer("central", SigningKey.generate())
    verifier = Verifier.from_config({"central": signer.public_key})
    kept = [r for i, r in enumerate(sealed_records(signer, 6)) if i not in drop]
    found = verify_records(enumerate(kept, start=1), verifier)
    if drop == set(range(len(kept), 6)):  # only the newest ones gone: the tail of a stream (see docs)
        assert found == []
    else:
        assert found
