"""The lean JetStream reads (`last_sequence`, `next_stored`, `last_stored_seq`) answer as nats-py's own."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from nerve.runtime.harness.memory import MemoryJetStream
from nerve.runtime.jetstream.client import (
    _NOT_DIRECT,
    DIRECT_RETRY_S,
    last_sequence,
    last_stored_seq,
    next_stored,
)

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext

pytestmark = pytest.mark.broker

SUBJECTS = ("lean.a", "lean.b", "lean.c")


async def nats_py_next(
    js: JetStreamContext, stream: str, after: int, subject: str
) -> tuple[int, bytes] | None:
    try:
        raw = await js.get_msg(stream, seq=after + 1, subject=subject, next=True)
    except NotFoundError:
        return None
    assert raw.seq is not None
    return raw.seq, raw.data or b""


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
    name = "LEAN"
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
    assert await next_stored(js, "LEAN_OLD", after=0, subject="old.a") == (1, b"1")
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
    assert await next_stored(js, "LEAN", after=1, subject="lean.a") == (3, b"3")
    assert await next_stored(js, "LEAN", after=3, subject="lean.a") is None
    assert await last_stored_seq(js, "LEAN", "lean.a") == 3
    assert await last_stored_seq(js, "LEAN", "lean.c") is None
