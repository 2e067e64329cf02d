"""A lean, pipelined JetStream publisher for the bridge's hot path: one asyncio `Protocol`.

nats-py's `js.publish` is a request/reply with its own inbox message, future and timeout per message;
profiled in the bridge that was ~18% of its time, plus a wake-up of the event loop per message. Here
the bridge writes a whole batch of `HPUB`s (each with its `Nats-Msg-Id` and a reply subject that carries
a token) in one write, and JetStream's acks come back on one wildcard inbox subscription, parsed without
building a message object and handed over per socket read (`on_acks`). An ack is read just far enough to
tell stored / duplicate / error.

Only what the bridge needs: INFO, CONNECT (user/password or token from the URL; TLS when the URL says
`tls://` or the server requires it), PING/PONG, SUB, HPUB, MSG/HMSG. A `-ERR`, a lost connection or a
PING left unanswered ends the connection: `closed` holds the reason and the caller starts over (JetStream
dedup makes a re-publish of what was in flight harmless).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
from typing import TYPE_CHECKING, Any, Final, NamedTuple
from urllib.parse import unquote, urlsplit

from nerve.runtime.errors import shown_url
from nerve.runtime.wire.protocol import WireError, WireProtocol

if TYPE_CHECKING:
    from collections.abc import Callable

DEFAULT_PORT: Final = 4222
CRLF: Final = b"\r\n"
PING: Final = b"PING\r\n"
PONG: Final = b"PONG\r\n"
PING_INTERVAL_S: Final = 10.0
MAX_CONTROL_LINE: Final = 4096
NO_RESPONDERS: Final = "no responders: is JetStream enabled and a stream bound to this subject?"


class NatsWireError(WireError):
    """The NATS connection failed, was refused, or the server reported an error."""


class StoreAck(NamedTuple):
    """JetStream's answer to one publish: `error` is None when stored (`duplicate` if already there).

    A named tuple, not a frozen dataclass: one is made per stored message, and this is cheaper to build.
    """

    token: int
    error: str | None
    duplicate: bool


def header_value(value: str) -> bytes:
    """A header value as bytes; raises `ValueError` for what would break the header block (line breaks)."""
    raw = value.encode()
    if b"\r" in raw or b"\n" in raw:
        raise ValueError(f"header value {value!r} contains a line break")
    return raw


def headers_block(headers: dict[str, str]) -> bytes:
    """`NATS/1.0` headers, ready to go in front of a payload."""
    lines = b"".join(
        name.encode("ascii") + b": " + header_value(value) + CRLF for name, value in headers.items()
    )
    return b"NATS/1.0\r\n" + lines + CRLF


def _ack_of(token: int, data: bytes) -> StoreAck:
    if b'"error"' in data:
        try:
            error = json.loads(data)["error"]
            description = (
                f"{error.get('description', 'error')} "
                f"(code {error.get('code')}, err_code {error.get('err_code')})"
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            description = data.decode(errors="replace")[:200]
        return StoreAck(token, f"JetStream refused it: {description}", duplicate=False)
    return StoreAck(token, None, duplicate=b'"duplicate"' in data)


class NatsWire(WireProtocol[StoreAck]):
    """One NATS connection that publishes to JetStream and collects the acks. Use `open_nats`."""

    error = NatsWireError
    peer = "server"
    batch_name = "JetStream acks"

    def __init__(self, on_acks: Callable[[list[StoreAck]], None]) -> None:
        super().__init__(on_acks)
        self._info: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._pongs: list[asyncio.Future[None]] = []
        self._out: list[bytes] = []
        self._inbox = b"_INBOX." + secrets.token_hex(11).encode() + b"."
        self.max_payload = 1024 * 1024

    def _parse(self, data: bytes) -> list[StoreAck]:
        buf = self._buffer
        buf += data
        pos = 0
        size = len(buf)
        acks: list[StoreAck] = []
        inbox = self._inbox
        token_at = 4 + len(inbox)  # where the token starts in `MSG <inbox><token> ...`
        while True:
            eol = buf.find(CRLF, pos)
            if eol < 0:
                if size - pos > MAX_CONTROL_LINE:
                    raise NatsWireError("protocol error: control line too long")
                break
            if buf.startswith(b"MSG ", pos) and buf.startswith(inbox, pos + 4):
                # The usual case, read in place: MSG <inbox><token> <sid> <#bytes>, then a JSON ack.
                start = eol + 2
                end = start + int(buf[buf.rindex(b" ", pos, eol) + 1 : eol])
                if end < start:
                    raise NatsWireError("protocol error: negative message size")
                if end + 2 > size:
                    break
                token = int(buf[pos + token_at : buf.index(b" ", pos + token_at, eol)])
                if buf.find(b'"error"', start, end) < 0:
                    acks.append(StoreAck(token, None, buf.find(b'"duplicate"', start, end) >= 0))
                else:
                    acks.append(_ack_of(token, bytes(buf[start:end])))
                pos = end + 2
                continue
            after = self._other(buf, pos, eol, acks)
            if after < 0:
                break  # a message not all here yet
            pos = after
        del buf[:pos]
        return acks

    def _other(self, buf: bytearray, pos: int, eol: int, acks: list[StoreAck]) -> int:
        """Read what is not a plain ack at `pos` (its line ends at `eol`); return the next start, or -1."""
        op = bytes(buf[pos : pos + 4]).upper()
        if op not in {b"MSG ", b"HMSG"}:
            self._control(bytes(buf[pos:eol]))
            return eol + 2
        parts = bytes(buf[pos:eol]).split()
        total = int(parts[-1])
        if total < 0:
            raise NatsWireError("protocol error: negative message size")
        after = eol + 2 + total + 2
        if after > len(buf):
            return -1
        subject = parts[1]
        if not subject.startswith(self._inbox):
            return after  # not an ack of ours
        token = int(subject[len(self._inbox) :])
        body = bytes(buf[eol + 2 : eol + 2 + total])
        if op == b"HMSG":
            header_size = int(parts[-2])
            status = body[:header_size].split(CRLF, 1)[0]
            if status.startswith(b"NATS/1.0 503"):
                acks.append(StoreAck(token, NO_RESPONDERS, duplicate=False))
                return after
            body = body[header_size:]
        acks.append(_ack_of(token, body))
        return after

    def _control(self, line: bytes) -> None:
        op = line.split(b" ", 1)[0].upper()
        if op == b"PING":
            self._send(PONG)
        elif op == b"PONG":
            self._pong()
            if self._pongs:
                pong = self._pongs.pop(0)
                if not pong.done():
                    pong.set_result(None)
        elif op == b"INFO":
            info = json.loads(line[5:])
            if not self._info.done():
                self._info.set_result(info)
        elif op == b"-ERR":
            raise NatsWireError(f"server error: {line[5:].decode(errors='replace').strip(chr(39))}")
        elif op != b"+OK":
            raise NatsWireError(f"protocol error: unexpected {line[:40]!r}")

    def _take_waiters(self) -> list[asyncio.Future[Any]]:
        waiters: list[asyncio.Future[Any]] = [self._info, *self._pongs]
        self._pongs.clear()
        return waiters

    # -- requests

    def _send(self, data: bytes) -> None:
        if self._transport is not None and not self.closed.done():
            self._transport.write(data)

    async def handshake(self, url: str, *, name: str) -> None:
        """INFO, (TLS,) CONNECT, PING/PONG, then subscribe the ack inbox."""
        parts = urlsplit(url)
        info = await self._info
        if info.get("headers") is False:
            raise NatsWireError("this NATS server does not support headers (needed for dedup ids)")
        self.max_payload = int(info.get("max_payload", self.max_payload))
        if parts.scheme == "tls" or info.get("tls_required"):
            await self._start_tls(parts.hostname or "")
        connect: dict[str, Any] = {
            "verbose": False,
            "pedantic": False,
            "headers": True,
            "no_responders": True,
            "protocol": 1,
            "lang": "python-nerve",
            "version": "1",
            "name": name,
        }
        if parts.username and parts.password is not None:
            connect["user"], connect["pass"] = unquote(parts.username), unquote(parts.password)
        elif parts.username:
            connect["auth_token"] = unquote(parts.username)
        pong: asyncio.Future[None] = self._loop.create_future()
        self._pongs.append(pong)
        self._send(b"CONNECT " + json.dumps(connect).encode() + CRLF + PING)
        await pong
        self._send(b"SUB " + self._inbox + b"* 1\r\n")
        self._keep_alive(PING_INTERVAL_S, PING)

    async def _start_tls(self, hostname: str) -> None:
        if self._transport is None:  # pragma: no cover - handshake runs on a connected protocol
            raise NatsWireError("not connected")
        context = ssl.create_default_context()
        transport = await self._loop.start_tls(self._transport, self, context, server_hostname=hostname)
        if transport is None:  # pragma: no cover - start_tls returns None only if closed meanwhile
            raise NatsWireError("TLS handshake did not complete")
        self._transport = transport

    def publish(self, subject: str, headers: bytes, body: bytes, token: int) -> None:
        """Queue an HPUB whose JetStream ack comes back to `on_acks` with `token`; `flush` sends it."""
        self._out.append(
            b"HPUB %s %s%d %d %d\r\n%s%s\r\n"
            % (subject.encode(), self._inbox, token, len(headers), len(headers) + len(body), headers, body)
        )

    def flush(self) -> None:
        """Write everything `publish` queued, in one write."""
        if self._out:
            data = b"".join(self._out)
            self._out.clear()
            if self.closed.done():
                return  # the caller learns from `closed`; what was queued is re-sent on the next session
            self._send(data)

    def close(self) -> None:
        """Flush what is queued and close the socket."""
        if self._transport is not None and not self._transport.is_closing():
            self.flush()
            self._transport.close()
        self._fail(NatsWireError("closed"))


async def open_nats(
    url: str, *, name: str, on_acks: Callable[[list[StoreAck]], None], timeout_s: float = 5.0
) -> NatsWire:
    """Connect to the first server of `url` (comma-separated) that answers; raise `NatsWireError`."""
    loop = asyncio.get_running_loop()
    failures: list[str] = []
    for server in (s.strip() for s in url.split(",")):
        parts = urlsplit(server)
        host, port = parts.hostname or "127.0.0.1", parts.port or DEFAULT_PORT
        try:
            async with asyncio.timeout(timeout_s):
                _, wire = await loop.create_connection(lambda: NatsWire(on_acks), host, port)
                try:
                    await wire.handshake(server, name=name)
                except BaseException:
                    wire.close()
                    raise
        except TimeoutError:  # (an OSError too: first)
            failures.append(f"{host}:{port}: no answer within {timeout_s:.0f}s")
        except (OSError, NatsWireError, ssl.SSLError) as exc:
            failures.append(f"{host}:{port}: {exc}")
        else:
            return wire
    raise NatsWireError(f"cannot connect to {shown_url(url)}: {'; '.join(failures)}")
