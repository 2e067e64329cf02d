"""The bridge's pipelined JetStream publisher: the protocol, split reads, errors, and a real nats-server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import socket
import subprocess
from typing import TYPE_CHECKING, Protocol

import nats
import nkeys
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import VerifyKey
from tests.conftest import FakeTransport

from nerve.bridge.natswire import NO_RESPONDERS, NatsWire, NatsWireError, StoreAck, headers_block, open_nats
from nerve.runtime.jetstream.client import MSG_ID_HEADER
from nerve.runtime.jetstream.identities import write_seed
from nerve.runtime.jetstream.streams import ensure_streams
from nerve.runtime.stack.brokers import NatsServer, free_port
from nerve.runtime.testing import stream_messages

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from contextlib import AbstractAsyncContextManager
    from pathlib import Path

    from nats.aio.client import Client as NatsClient
    from tests.conftest import Serve

    class Connect(Protocol):
        def __call__(
            self, acks: list[StoreAck], inbox: bytes | None = None
        ) -> tuple[NatsWire, FakeTransport, bytes]: ...

    class FakeServer(Protocol):
        def __call__(
            self, info: dict[str, object], answer: bytes = b"PONG\r\n"
        ) -> AbstractAsyncContextManager[tuple[int, list[bytes]]]: ...


@pytest.fixture
def connected(new_transport: Callable[[], FakeTransport]) -> Connect:
    """Makes a wire that appends its acks to `acks` (on `inbox`, if given), on a fresh fake transport."""

    def connect(acks: list[StoreAck], inbox: bytes | None = None) -> tuple[NatsWire, FakeTransport, bytes]:
        wire = NatsWire(acks.extend)
        if inbox is not None:
            wire._inbox = inbox
        transport = new_transport()
        wire.connection_made(transport)
        return wire, transport, wire._inbox

    return connect


def msg(subject: bytes, body: bytes) -> bytes:
    return b"MSG %s 1 %d\r\n%s\r\n" % (subject, len(body), body)


def test_headers_refuse_line_breaks() -> None:
    assert headers_block({MSG_ID_HEADER: "abc-1"}) == b"NATS/1.0\r\nNats-Msg-Id: abc-1\r\n\r\n"
    with pytest.raises(ValueError, match="line break"):
        headers_block({MSG_ID_HEADER: "x\r\nNats-Expected-Stream: other"})


async def test_acks_split_at_every_byte_are_all_read(connected: Connect) -> None:
    probe, _, _ = connected([])
    inbox = probe._inbox
    hdr = b"NATS/1.0 503\r\n\r\n"
    stream = (
        b"INFO {}\r\n"
        + msg(inbox + b"1", b'{"stream":"NERVE_TELEMETRY","seq":1}')
        + b"PING\r\n"
        + msg(inbox + b"2", b'{"stream":"NERVE_TELEMETRY","seq":1,"duplicate":true}')
        + b"+OK\r\n"
        + msg(
            inbox + b"3",
            b'{"error":{"code":400,"err_code":10060,"description":"expected stream does not match"}}',
        )
        + b"HMSG %s3 1 %d %d\r\n%s\r\n" % (inbox + b"4", len(hdr), len(hdr), hdr)
        + msg(b"_INBOX.someone-else.5", b"{}")
    )
    for cut in range(1, len(stream)):
        acks: list[StoreAck] = []
        wire, transport, _ = connected(acks, inbox)
        wire.data_received(stream[:cut])
        wire.data_received(stream[cut:])
        assert acks == [
            StoreAck(1, None, duplicate=False),
            StoreAck(2, None, duplicate=True),
            StoreAck(
                3,
                "JetStream refused it: expected stream does not match (code 400, err_code 10060)",
                duplicate=False,
            ),
            StoreAck(43, NO_RESPONDERS, duplicate=False),
        ], cut
        assert bytes(transport.written) == b"PONG\r\n"
        assert not transport.aborted


async def test_publishes_go_out_in_one_write_with_their_reply_tokens(connected: Connect) -> None:
    wire, transport, inbox = connected([])
    head = headers_block({MSG_ID_HEADER: "id-1"})
    wire.publish("nerve.a.telemetry.cpu", head, b"body", 7)
    wire.publish("nerve.b.telemetry.cpu", head, b"", 8)
    assert transport.written == b""
    wire.flush()
    assert bytes(transport.written) == (
        b"HPUB nerve.a.telemetry.cpu %s7 %d %d\r\n%sbody\r\n" % (inbox, len(head), len(head) + 4, head)
        + b"HPUB nerve.b.telemetry.cpu %s8 %d %d\r\n%s\r\n" % (inbox, len(head), len(head), head)
    )


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"-ERR 'Maximum Payload Violation'\r\n", "server error: Maximum Payload Violation"),
        (b"BOGUS\r\n", "unexpected"),
        (b"MSG x 1 notanumber\r\n", "message size 'notanumber' is not a count"),
        # Every numeric field is ASCII digits only (`int()` takes -1, +1, 1_0 and spaces).
        (b"MSG x 1 -15\r\n", "message size '-15' is not a count"),
        (b"MSG x 1 -5\r\nabc\r\n", "message size '-5' is not a count"),
        (b"MSG INBOX1 1 -50\r\n" + b"x" * 60 + b"\r\n", "message size '-50' is not a count"),
        (b"MSG INBOX1 1 +2\r\n{}\r\n", "message size '\\+2' is not a count"),
        (b"MSG INBOX1 1 1_0\r\n{}\r\n", "message size '1_0' is not a count"),
        (b"MSG x -1 2\r\n{}\r\n", "subscription id '-1' is not a count"),
        (b"MSG INBOX-7 1 2\r\n{}\r\n", "reply token '-7' is not a count"),
        (b"MSG INBOX 1 2\r\n{}\r\n", "reply token '' is not a count"),
        (b"MSG INBOXnotatoken 1 2\r\n{}\r\n", "reply token 'notatoken' is not a count"),
        (b"MSG INBOX1 1 " + b"9" * 40 + b"\r\n", "is not a count"),
        (b"HMSG INBOX1 1 -5 10\r\n0123456789\r\n", "header size '-5' is not a count"),
        (b"HMSG INBOX1 1 50 10\r\n0123456789\r\n", "header size 50 is over the message size 10"),
        (b"HMSG INBOX1 1 70000 70000\r\n", "70000 bytes of headers, over 65536"),
        (b"HMSG INBOX1 10\r\n", "malformed message line"),
        (b"MSG other  1 2\r\n{}\r\n", "malformed message line"),
        (b"MSG a b c d e\r\n", "malformed message line"),
        # Refused from the header, before the body is buffered.
        (b"MSG INBOX1 1 100000000000\r\n", "100000000000-byte message, over max_payload \\(1048576\\)"),
        (b"MSG other 1 1048577\r\n", "1048577-byte message, over max_payload"),
        (b"HMSG INBOX1 1 10 1048587\r\n", "1048577-byte message, over max_payload"),
        # The payload must end with CRLF where the size says.
        (b"MSG INBOX1 1 2\r\n{}}\r\n", "not followed by CRLF"),
        (b"MSG other 1 2\r\n{}xx", "not followed by CRLF"),
        (b"INFO []\r\n", "bad INFO from the server: Expected `object`, got `array`"),
        (b'INFO {"max_payload": -1}\r\n', r"bad INFO from the server: .*\$.max_payload"),
        (b'INFO {"max_payload": "big"}\r\n', r"bad INFO from the server: .*\$.max_payload"),
        (b'INFO {"headers": "yes"}\r\n', r"bad INFO from the server: .*\$.headers"),
        (b"INFO {\xff}\r\n", "bad INFO from the server"),
        (b'INFO {"x":' + b"[" * 30000 + b"\r\n", "bad INFO from the server: nested deeper than 32"),
        (b"INFO " + b"{" * 70000 + b"\r\n", "control line too long"),
        (b"INFO " + b"{" * 70000, "control line too long"),
        (b"-ERR " + b"x" * 5000 + b"\r\n", "control line too long"),
        (b"MSG INBOX1 1 " + b" " * 5000 + b"2\r\n{}\r\n", "control line too long"),
        (b"x" * 5000, "control line too long"),
    ],
)
async def test_errors_end_the_connection_with_the_reason(
    data: bytes, reason: str, connected: Connect
) -> None:
    wire, transport, _ = connected([], b"INBOX")
    wire.data_received(data)
    assert transport.aborted
    with pytest.raises(NatsWireError, match=reason):
        await wire.closed


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.sampled_from([b"MSG INBOX", b"MSG ", b"HMSG ", b" ", b"\r\n", b"-1", b"7", b"1 ", b"INBOX"]),
        ),
        max_size=30,
    ),
    st.integers(min_value=0, max_value=400),
)
def test_hostile_bytes_from_the_server_end_the_connection_or_parse(pieces: list[bytes], cut: int) -> None:
    """Whatever the server sends, split anywhere: acks, or the connection ends with a reason; never a hang."""
    data = b"".join(pieces)

    async def feed() -> None:
        acks: list[StoreAck] = []
        wire = NatsWire(acks.extend)
        wire._inbox = b"INBOX"
        transport = FakeTransport()
        wire.connection_made(transport)
        wire.data_received(data[:cut])
        wire.data_received(data[cut:])
        assert transport.aborted is wire.closed.done()
        assert all(isinstance(ack.token, int) for ack in acks)
        if wire.closed.done():
            assert isinstance(wire.closed.exception(), NatsWireError)

    asyncio.run(feed())


@pytest.fixture
def fake_server(
    tcp_server: Callable[[Serve], AbstractAsyncContextManager[int]],
) -> FakeServer:
    """Makes a fake nats-server: `async with fake_server(info, answer) as (port, lines)`."""

    @contextlib.asynccontextmanager
    async def start(
        info: dict[str, object], answer: bytes = b"PONG\r\n"
    ) -> AsyncIterator[tuple[int, list[bytes]]]:
        """Says INFO, records the client's first line (CONNECT), answers; yields (port, lines)."""
        lines: list[bytes] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"INFO " + json.dumps(info).encode() + b"\r\n")
            lines.append(await reader.readline())
            writer.write(answer)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
                await reader.read(1024)

        async with tcp_server(serve) as port:
            yield port, lines

    return start


@pytest.mark.parametrize(
    ("userinfo", "expected"),
    [
        ("alice:s%40cret@", {"user": "alice", "pass": "s@cret"}),
        ("tok3n@", {"auth_token": "tok3n"}),
        ("", {}),
    ],
)
async def test_credentials_from_the_url_go_into_connect(
    userinfo: str, expected: dict[str, str], fake_server: FakeServer
) -> None:
    async with fake_server({"headers": True, "max_payload": 2048}) as (port, lines):
        wire = await open_nats(f"nats://{userinfo}127.0.0.1:{port}", name="t", on_acks=lambda _: None)
        wire.close()
    connect = json.loads(lines[0].removeprefix(b"CONNECT ").split(b"\r\n")[0])
    assert {k: connect[k] for k in ("user", "pass", "auth_token") if k in connect} == expected
    assert connect["headers"] is True
    assert connect["no_responders"] is True
    assert wire.max_payload == 2048


async def test_an_nkey_signs_the_servers_nonce_in_connect(fake_server: FakeServer, tmp_path: Path) -> None:
    """CONNECT carries the public key and the Ed25519 signature of INFO's nonce (base64url, no padding)."""
    key = write_seed(tmp_path / "bridge.nk")
    async with fake_server({"headers": True, "nonce": "b4nWvCj3Rr0Y9Qo"}) as (port, lines):
        wire = await open_nats(f"nats://127.0.0.1:{port}", name="t", on_acks=lambda _: None, nkey=key)
        wire.close()
    connect = json.loads(lines[0].removeprefix(b"CONNECT ").split(b"\r\n")[0])
    assert connect["nkey"] == key.public_key
    assert "=" not in connect["sig"]
    signature = base64.urlsafe_b64decode(connect["sig"] + "==")
    public = base64.b32decode(key.public_key)  # a prefix byte, the 32-byte key, a CRC16
    assert public[0] == nkeys.PREFIX_BYTE_USER
    VerifyKey(public[1:33]).verify(b"b4nWvCj3Rr0Y9Qo", signature)  # raises if it does not verify
    # No nonce: the server has no nkey users, and is sent no key.
    async with fake_server({"headers": True}) as (port, lines):
        wire = await open_nats(f"nats://127.0.0.1:{port}", name="t", on_acks=lambda _: None, nkey=key)
        wire.close()
    assert "nkey" not in json.loads(lines[0].removeprefix(b"CONNECT ").split(b"\r\n")[0])


async def test_a_nonce_too_long_to_sign_is_a_bad_info(fake_server: FakeServer, tmp_path: Path) -> None:
    key = write_seed(tmp_path / "bridge.nk")
    async with fake_server({"headers": True, "nonce": "n" * 10_000}) as (port, _):
        with pytest.raises(NatsWireError, match=r"bad INFO .*nonce"):
            await open_nats(f"nats://127.0.0.1:{port}", name="t", on_acks=lambda _: None, nkey=key)


async def test_a_refused_nkey_is_named_by_its_file(fake_server: FakeServer, tmp_path: Path) -> None:
    key = write_seed(tmp_path / "bridge.nk")
    async with fake_server({"headers": True, "nonce": "x"}, b"-ERR 'Authorization Violation'\r\n") as (
        port,
        _,
    ):
        with pytest.raises(NatsWireError, match=f"refused the nkey in {key.path}"):
            await open_nats(f"nats://127.0.0.1:{port}", name="t", on_acks=lambda _: None, nkey=key)


async def test_refusals_and_absent_servers_are_named(fake_server: FakeServer) -> None:
    async with fake_server({"headers": True}, b"-ERR 'Authorization Violation'\r\n") as (port, _):
        with pytest.raises(NatsWireError, match="Authorization Violation"):
            await open_nats(f"nats://127.0.0.1:{port}", name="t", on_acks=lambda _: None)
    async with fake_server({"headers": False}) as (port, _):
        with pytest.raises(NatsWireError, match="does not support headers"):
            await open_nats(f"nats://127.0.0.1:{port}", name="t", on_acks=lambda _: None)
    with pytest.raises(
        NatsWireError, match=rf"cannot connect to nats://127.0.0.1:{port}: .*Connect call failed"
    ):
        await open_nats(f"nats://127.0.0.1:{port}", name="t", on_acks=lambda _: None, timeout_s=1)
    with pytest.raises(NatsWireError) as refused:
        await open_nats(
            f"nats://alice:s3cret@127.0.0.1:{port}", name="t", on_acks=lambda _: None, timeout_s=1
        )
    assert "s3cret" not in str(refused.value)
    assert f"nats://alice:***@127.0.0.1:{port}" in str(refused.value)


# --- against a real nats-server --------------------------------------------------------------------


@pytest.mark.broker
async def test_stored_duplicate_no_responders_and_a_killed_server(
    nats_server: NatsServer, nc: NatsClient
) -> None:
    js = nc.jetstream()
    await ensure_streams(js, "nerve")
    acks: list[StoreAck] = []
    arrived = asyncio.Event()

    def take(batch: list[StoreAck]) -> None:
        acks.extend(batch)
        arrived.set()

    # Two servers in the URL: the first does not answer, the second does.
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    wire = await open_nats(f"nats://127.0.0.1:{dead_port},{nats_server.url}", name="t", on_acks=take)
    sock = wire._transport.get_extra_info("socket")  # type: ignore[union-attr]
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    for token, (subject, msg_id) in enumerate(
        [("nerve.pi.telemetry.cpu", "a"), ("nerve.pi.telemetry.cpu", "a"), ("nowhere.at.all", "b")], start=1
    ):
        wire.publish(subject, headers_block({MSG_ID_HEADER: msg_id}), b"payload", token)
    wire.flush()
    async with asyncio.timeout(5):
        while len(acks) < 3:
            arrived.clear()
            await arrived.wait()
    # No responders comes from the server at once, ahead of JetStream's acks: order is by token.
    assert sorted(acks, key=lambda ack: ack.token) == [
        StoreAck(1, None, duplicate=False),
        StoreAck(2, None, duplicate=True),
        StoreAck(3, NO_RESPONDERS, duplicate=False),
    ]
    stored = await stream_messages(js, "NERVE_TELEMETRY")
    assert [(m.data, (m.headers or {}).get(MSG_ID_HEADER)) for m in stored] == [(b"payload", "a")]
    await nats_server.kill()
    with pytest.raises(NatsWireError, match="connection"):
        await asyncio.wait_for(wire.closed, 5)


class SecuredNatsServer(NatsServer):
    """nats-server with JetStream, TLS (self-signed for 127.0.0.1) and a user/password."""

    def _prepare(self) -> list[str]:
        cert, key = self.data_dir / "cert.pem", self.data_dir / "key.pem"
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                "-keyout",
                str(key),
                "-out",
                str(cert),
            ],
            check=True,
            capture_output=True,
        )
        tls = ["--tls", "--tlscert", str(cert), "--tlskey", str(key)]
        return [*super()._prepare(), *tls, "--user", "alice", "--pass", "s3cret"]


@pytest.mark.broker
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
async def test_tls_and_credentials_against_a_real_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with SecuredNatsServer(port=free_port(), data_dir=tmp_path / "nats") as server:
        # The default context trusts what SSL_CERT_FILE names, as it would a site's own CA.
        monkeypatch.setenv("SSL_CERT_FILE", str(server.data_dir / "cert.pem"))
        host_port = server.url.removeprefix("nats://")
        with pytest.raises(NatsWireError, match="Authorization Violation"):
            await open_nats(f"tls://alice:wrong@{host_port}", name="t", on_acks=lambda _: None)
        acks: list[StoreAck] = []
        wire = await open_nats(f"tls://alice:s3cret@{host_port}", name="t", on_acks=acks.extend)
        nc = await nats.connect(f"tls://alice:s3cret@{host_port}")
        try:
            await ensure_streams(nc.jetstream(), "nerve")
            wire.publish("nerve.pi.telemetry.cpu", headers_block({MSG_ID_HEADER: "x"}), b"over tls", 1)
            wire.flush()
            async with asyncio.timeout(5):
                while not acks:
                    await asyncio.sleep(0.01)
            assert acks == [StoreAck(1, None, duplicate=False)]
            stored = await stream_messages(nc.jetstream(), "NERVE_TELEMETRY")
            assert [m.data for m in stored] == [b"over tls"]
        finally:
            wire.close()
            await nc.close()
