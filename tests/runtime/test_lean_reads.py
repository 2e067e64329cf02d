"""The lean JetStream reads (`last_sequence`, `next_stored`, `last_stored_seq`) answer as nats-py's own."""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.js.api import StreamConfig
from nats.js.errors import APIError, NotFoundError

from nerve.runtime.harness.memory import MemoryJetStream
from nerve.runtime.jetstream.client import (
    _NOT_DIRECT,
    DIRECT_RETRY_S,
    Stored,
    last_sequence,
    last_stored_seq,
    next_stored,
)

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext

pytestmark = pytest.mark.broker

SUBJECTS = ("lean.a", "lean.b", "lean.c")
EXAMPLES = itertools.count()


async def nats_py_next(js: JetStreamContext, stream: str, after: int, subject: str) -> Stored | None:
    try:
        raw = await js.get_msg(stream, seq=after + 1, subject=subject, next=True)
    except NotFoundError:
        return None
    assert raw.seq is not None
    assert raw.time is not None
    return Stored(raw.seq, raw.subject or "", raw.data or b"", raw.time)


def seq_data(found: Stored | None) -> tuple[int, bytes] | None:
    return None if found is None else (found.seq, found.data)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    published=st.lists(st.tuples(st.sampled_from(SUBJECTS), st.binary(max_size=64)), max_size=12),
    after=st.integers(min_value=0, max_value=14),
    subject=st.sampled_from((*SUBJECTS, "lean.*", "lean.>")),
    direct=st.booleans(),
)
async def test_they_answer_as_nats_py_does(
    nc: NatsClient, published: list[tuple[str, bytes]], after: int, subject: str, direct: bool
) -> None:
    """Direct gets where the stream allows them, the JetStream API where it does not (a stream made by an
    older nerve): the same answers."""
    js = nc.jetstream()
    # A new name each example: a stream deleted and made again under one name read once as the old one
    # (12 messages where 2 were published), once in about 25 runs.
    name = f"LEAN_{next(EXAMPLES)}"
    await js.add_stream(StreamConfig(name=name, subjects=["lean.>"], allow_direct=direct))
    try:
        for where, data in published:
            await js.publish(where, data)
        assert await last_sequence(js, name) == (await js.stream_info(name)).state.last_seq == len(published)
        assert await next_stored(js, name, after=after, subject=subject) == await nats_py_next(
            js, name, after, subject
        )
        if "*" not in subject and ">" not in subject:
            mine = [seq for seq, (where, _data) in enumerate(published, start=1) if where == subject]
            assert await last_stored_seq(js, name, subject) == (mine[-1] if mine else None)
    finally:
        await js.delete_stream(name)
        _NOT_DIRECT.clear()  # the next example's stream has the same name


async def test_a_stream_without_direct_gets_is_asked_through_the_api_then_directly_again(
    nc: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="LEAN_OLD", subjects=["old.>"]))
    await js.publish("old.a", b"1")
    assert await last_stored_seq(js, "LEAN_OLD", "old.a") == 1
    assert "LEAN_OLD" in _NOT_DIRECT
    await js.update_stream(StreamConfig(name="LEAN_OLD", subjects=["old.>"], allow_direct=True))  # applied
    monkeypatch.setitem(_NOT_DIRECT, "LEAN_OLD", time.monotonic() - DIRECT_RETRY_S - 1)
    assert seq_data(await next_stored(js, "LEAN_OLD", after=0, subject="old.a")) == (1, b"1")
    assert "LEAN_OLD" not in _NOT_DIRECT


async def test_a_missing_stream_is_nats_py_not_found(nc: NatsClient) -> None:
    js = nc.jetstream()
    with pytest.raises(NotFoundError):
        await last_sequence(js, "NO_SUCH_STREAM")
    with pytest.raises(NotFoundError):
        await next_stored(js, "NO_SUCH_STREAM", after=0, subject="x")
    with pytest.raises(NotFoundError):
        await last_stored_seq(js, "NO_SUCH_STREAM", "x")


async def test_the_in_memory_jetstream_answers_the_same() -> None:
    js = cast("JetStreamContext", MemoryJetStream().connect().jetstream())
    await js.add_stream(StreamConfig(name="LEAN", subjects=["lean.>"]))
    await js.publish("lean.a", b"1")
    await js.publish("lean.b", b"2")
    await js.publish("lean.a", b"3")
    assert await last_sequence(js, "LEAN") == 3
    found = await next_stored(js, "LEAN", after=1, subject="lean.a")
    assert found is not None
    assert (found.seq, found.subject, found.data) == (3, "lean.a", b"3")
    assert found.time.tzinfo is not None
    assert await next_stored(js, "LEAN", after=3, subject="lean.a") is None
    assert await last_stored_seq(js, "LEAN", "lean.a") == 3
    assert await last_stored_seq(js, "LEAN", "lean.c") is None


HOSTILE_PREFIX = "hostile.api"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.one_of(
        st.binary(max_size=64),
        st.sampled_from(
            [
                b"",
                b"null",
                b'{"state": {"last_seq": "many"}}',
                b'{"state": {"last_seq": -1.5}}',
                b'{"message": {"seq": 3, "data": "***not base64***"}}',
                b'{"message": {"seq": "x"}}',
                b'{"message": {"seq": 3, "data": "", "time": "soon"}}',
                b'{"message": {"seq": 3, "data": "", "time": "2026-12-02T01:13:43"}}',
                b'{"message": {"seq": 3, "subject": "x", "data": "", "time": "2026-12-02T01:13:43.5Z"}}',
                b'{"error": {"code": "x"}}',
            ]
        ),
    ),
    status=st.one_of(st.none(), st.sampled_from(["404", "408", "abc", ""])),
    sequence=st.one_of(st.none(), st.sampled_from(["7", "", "-1", "seven", "1e3"])),
    stamp=st.one_of(
        st.none(), st.sampled_from(["2026-12-02T01:13:43.644430123Z", "", "yesterday", "2026-12-02T01:13:43"])
    ),
)
async def test_a_hostile_server_s_replies_are_a_nats_error_or_an_answer(
    nc: NatsClient, body: bytes, status: str | None, sequence: str | None, stamp: str | None
) -> None:
    """Whatever answers the API (a broken or hostile server), the reads raise nats-py's APIError, never a
    decode error: their callers retry or give up on NATS errors, anything else would escape as a traceback.
    """
    given_headers = (("Status", status), ("Nats-Sequence", sequence), ("Nats-Time-Stamp", stamp))
    headers = {key: value for key, value in given_headers if value is not None}

    async def answer(msg: Msg) -> None:
        await nc.publish(msg.reply, body, headers=headers or None)

    sub = await nc.subscribe(f"{HOSTILE_PREFIX}.>", cb=answer)
    _NOT_DIRECT.pop("HOSTILE", None)
    try:
        js = nc.jetstream(prefix=HOSTILE_PREFIX)
        for read in (
            lambda: last_sequence(js, "HOSTILE"),
            lambda: next_stored(js, "HOSTILE", after=0, subject="x"),
            lambda: last_stored_seq(js, "HOSTILE", "x"),
        ):
            try:
                answered = await read()
            except APIError:
                continue
            assert answered is None or isinstance(answered, (int, tuple))
    finally:
        await sub.unsubscribe()
