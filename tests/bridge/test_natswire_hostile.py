"""The JetStream publisher's parser against a hostile server: mutated frames, split anywhere, bounded.

Fed straight into the protocol object (a fake transport): whatever arrives, in however many reads, the
wire either reads acks or ends the connection with a one-line `NatsWireError`; it never hangs (the
per-test timeout), never lets another exception out, and never buffers more than its documented bound.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.conftest import FakeTransport

from nerve.bridge.natswire import (
    MAX_CONTROL_LINE,
    MAX_HEADERS,
    MAX_INFO_LINE,
    MAX_JSON_DEPTH,
    NO_RESPONDERS,
    NatsWire,
    NatsWireError,
    StoreAck,
    _too_deep,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

INBOX = b"_INBOX.abc."
MAX_PAYLOAD = 512  # small, so that the bound on the buffer is tested, not only stated
# What may stay buffered after a read: an unfinished INFO line, or a whole MSG line with an unfinished body.
BUFFER_BOUND = max(MAX_INFO_LINE, MAX_CONTROL_LINE + 2 + MAX_HEADERS + MAX_PAYLOAD + 2)
REASON_MAX = 400


def msg(subject: bytes, body: bytes, sid: bytes = b"1") -> bytes:
    return b"MSG %s %s %d\r\n%s\r\n" % (subject, sid, len(body), body)


def hmsg(subject: bytes, headers: bytes, body: bytes) -> bytes:
    return b"HMSG %s 1 %d %d\r\n%s%s\r\n" % (subject, len(headers), len(headers) + len(body), headers, body)


def ack(token: int, *, duplicate: bool = False) -> bytes:
    dup = b',"duplicate":true' if duplicate else b""
    return msg(INBOX + str(token).encode(), b'{"stream":"NERVE_TELEMETRY","seq":%d%s}' % (token, dup))


ERROR_ACK = b'{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}'
# Frames a real nats-server sends the bridge, each with the acks it must give.
FRAMES: list[tuple[bytes, list[StoreAck]]] = [
    (ack(1), [StoreAck(1, None, duplicate=False)]),
    (ack(22, duplicate=True), [StoreAck(22, None, duplicate=True)]),
    (
        msg(INBOX + b"3", ERROR_ACK),
        [StoreAck(3, "JetStream refused it: maximum messages exceeded (code 503, err_code 10077)", False)],
    ),
    (hmsg(INBOX + b"4", b"NATS/1.0 503\r\n\r\n", b""), [StoreAck(4, NO_RESPONDERS, duplicate=False)]),
    (hmsg(INBOX + b"5", b"NATS/1.0\r\nX: y\r\n\r\n", b'{"seq":5}'), [StoreAck(5, None, duplicate=False)]),
    (msg(b"_INBOX.someone-else.6", b"{}"), []),
    (b"PING\r\n", []),
    (b"PONG\r\n", []),
    (b"+OK\r\n", []),
    (b'INFO {"server_id":"x","max_payload":512,"headers":true,"connect_urls":["a:4222"]}\r\n', []),
]


def connect() -> tuple[NatsWire, FakeTransport, list[StoreAck]]:
    acks: list[StoreAck] = []
    wire = NatsWire(acks.extend)
    wire._inbox = INBOX
    wire.max_payload = MAX_PAYLOAD
    transport = FakeTransport()
    wire.connection_made(transport)
    return wire, transport, acks


def feed(wire: NatsWire, data: bytes, cuts: Sequence[int]) -> None:
    """`data` in reads cut at `cuts`; after each read the buffer is within the bound."""
    edges = [0, *sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    for start, end in itertools.pairwise(edges):
        wire.data_received(data[start:end])
        assert len(wire._buffer) <= BUFFER_BOUND


def assert_clean_end(wire: NatsWire, transport: FakeTransport) -> None:
    """Open and not aborted, or aborted with one short line that names what was wrong."""
    assert transport.aborted is wire.closed.done()
    if wire.closed.done():
        exc = wire.closed.exception()
        assert isinstance(exc, NatsWireError)
        reason = str(exc)
        assert "\n" not in reason
        assert "\r" not in reason
        assert len(reason) <= REASON_MAX, reason
        assert "internal error" not in reason  # a parser bug, not a refusal
        assert not wire._buffer


frames = st.lists(st.sampled_from(FRAMES), max_size=12)
cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames, cuts)
def test_what_a_real_server_sends_is_read_the_same_however_it_is_split(
    chosen: list[tuple[bytes, list[StoreAck]]], at: list[int]
) -> None:
    async def run() -> None:
        wire, transport, acks = connect()
        feed(wire, b"".join(frame for frame, _ in chosen), at)
        assert not transport.aborted
        assert acks == [a for _, expected in chosen for a in expected]
        assert not wire._buffer

    asyncio.run(run())


# Mutations: what a man in the middle does to a valid stream.
NASTY = [
    b"-1",
    b"-15",
    b"+2",
    b"1_0",
    b" ",
    b"\r\n",
    b"\r",
    b"\n",
    b"99999999999",
    b"100000000000",
    b"9" * 40,
    b"MSG ",
    b"HMSG ",
    b"INFO ",
    b"INFO [",
    b"[" * 2000,
    b'{"error":' + b"[" * 3000,
    b"\x00",
    b"\xff\xfe",
    INBOX,
    b"NATS/1.0 503\r\n",
]
mutation = st.tuples(
    st.integers(min_value=0, max_value=10_000),
    st.sampled_from(["insert", "replace", "delete", "number", "number"]),
    st.one_of(st.sampled_from(NASTY), st.binary(max_size=8)),
)


DIGITS = re.compile(rb"\d+")


def mutate(data: bytes, mutations: list[tuple[int, str, bytes]]) -> bytes:
    """Apply each mutation: insert, replace or delete at a place, or replace one of the numbers."""
    out = bytearray(data)
    for at, how, piece in mutations:
        i = at % (len(out) + 1)
        numbers = list(DIGITS.finditer(out))
        if how == "number" and numbers:
            found = numbers[at % len(numbers)]
            out[found.start() : found.end()] = piece
        elif how == "insert":
            out[i:i] = piece
        elif how == "replace":
            out[i : i + len(piece)] = piece
        else:
            del out[i : i + len(piece) + 1]
    return bytes(out)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames, st.lists(mutation, min_size=1, max_size=6), cuts)
def test_mutated_frames_split_anywhere_end_cleanly_or_parse(
    chosen: list[tuple[bytes, list[StoreAck]]], mutations: list[tuple[int, str, bytes]], at: list[int]
) -> None:
    data = mutate(b"".join(frame for frame, _ in chosen), mutations)

    async def run() -> None:
        wire, transport, acks = connect()
        feed(wire, data, at)
        assert_clean_end(wire, transport)
        assert all(isinstance(a.token, int) and a.token >= 0 for a in acks)
        assert all(a.error is None or ("\n" not in a.error and len(a.error) <= REASON_MAX) for a in acks)

    asyncio.run(run())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), cuts)
def test_random_bytes_end_cleanly_or_parse(data: bytes, at: list[int]) -> None:
    async def run() -> None:
        wire, transport, _ = connect()
        feed(wire, data, at)
        assert_clean_end(wire, transport)

    asyncio.run(run())


async def test_a_message_at_the_limit_is_buffered_as_it_comes_and_read() -> None:
    wire, transport, acks = connect()
    body = b'{"seq":1,"pad":"' + b"x" * (MAX_PAYLOAD - 18) + b'"}'
    assert len(body) == MAX_PAYLOAD
    data = msg(INBOX + b"1", body)
    feed(wire, data, range(0, len(data), 7))
    assert acks == [StoreAck(1, None, duplicate=False)]
    assert not transport.aborted


@pytest.mark.parametrize(
    "header",
    [
        b"MSG %s1 1 %d\r\n" % (INBOX, MAX_PAYLOAD + 1),
        b"MSG elsewhere 1 %d\r\n" % (MAX_PAYLOAD + 1),
        b"MSG %s1 1 100000000000\r\n" % INBOX,  # "100 GB"
        b"HMSG %s1 1 16 %d\r\n" % (INBOX, MAX_PAYLOAD + 17),
    ],
)
async def test_a_message_over_the_limit_is_refused_from_its_header(header: bytes) -> None:
    wire, transport, _ = connect()
    wire.data_received(header)
    assert transport.aborted
    assert not wire._buffer
    with pytest.raises(NatsWireError, match=r"-byte message, over max_payload \(512\)"):
        await wire.closed
    wire.data_received(b"x" * 100_000)  # what was still on its way is neither read nor kept
    assert not wire._buffer


async def test_a_line_without_end_is_refused_once_over_the_limit() -> None:
    wire, transport, _ = connect()
    for _ in range(MAX_CONTROL_LINE // 100):
        wire.data_received(b"MSG " + b"x" * 96)
    assert not wire.closed.done()
    wire.data_received(b"x" * 100)
    assert transport.aborted
    with pytest.raises(NatsWireError, match="control line too long"):
        await wire.closed
    # An INFO may be longer (a cluster lists its members), up to its own bound.
    wire, transport, _ = connect()
    wire.data_received(b'INFO {"connect_urls":["' + b"a" * (MAX_INFO_LINE - 30))
    assert not wire.closed.done()
    wire.data_received(b"a" * 100)
    assert transport.aborted


@pytest.mark.parametrize(
    "body",
    [
        b'{"error":' + b"[" * 5000 + b"]" * 5000 + b"}",  # 10 KB, nested: was a RecursionError
        b'{"error":{"description":' + b'{"a":' * 2000 + b"1" + b"}" * 2000 + b"}}",
        b'{"error":"' + b"e" * 10_000 + b'"}',
        b'{"error":{"description":"' + b"\\n" * 3000 + b'"}}',
    ],
)
async def test_a_hostile_ack_is_a_refusal_and_the_connection_stays(body: bytes) -> None:
    wire, transport, acks = connect()
    wire.max_payload = 64 * 1024
    wire.data_received(msg(INBOX + b"7", body) + ack(8))
    assert not transport.aborted
    assert [a.token for a in acks] == [7, 8]
    error = acks[0].error
    assert error is not None
    assert error.startswith("JetStream refused it: ")
    assert "\n" not in error
    assert len(error) <= REASON_MAX
    assert acks[1] == StoreAck(8, None, duplicate=False)


async def test_a_flood_of_pings_is_answered_once_per_read() -> None:
    wire, transport, _ = connect()
    wire.data_received(b"PING\r\n" * 10_000)
    wire.data_received(b"PING\r\nPI")
    wire.data_received(b"NG\r\n")
    assert bytes(transport.written) == b"PONG\r\n" * 3
    assert not transport.aborted


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab'),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='[]{}"\\ab'), inner, max_size=3)
    ),
    max_leaves=60,
)


def depth_of(value: object) -> int:
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(json_values, st.integers(min_value=0, max_value=40))
def test_the_depth_check_counts_what_json_nests_not_what_strings_hold(value: object, wrap: int) -> None:
    document = ("[" * wrap + json.dumps(value) + "]" * wrap).encode()
    assert _too_deep(document) is (depth_of(value) + wrap > MAX_JSON_DEPTH)


async def test_a_parser_bug_ends_the_connection_with_a_reason_not_an_escaped_exception(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(_: bytes) -> list[StoreAck]:
        raise RuntimeError("a bug")

    wire, transport, _ = connect()
    monkeypatch.setattr(wire, "_read", broken)
    wire.data_received(b"PING\r\n")  # does not raise
    assert transport.aborted
    with pytest.raises(NatsWireError, match="internal error reading from the server: RuntimeError"):
        await wire.closed
    assert "parsing what the server sent failed" in caplog.text
