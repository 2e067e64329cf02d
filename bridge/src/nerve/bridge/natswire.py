"""A lean, pipelined JetStream publisher for the bridge's hot path: one asyncio `Protocol`.

nats-py's `js.publish` is a request/reply with its own inbox message, future and timeout per message;
profiled in the bridge that was ~18% of its time, plus a wake-up of the event loop per message. Here
the bridge writes a whole batch of `HPUB`s (each with its `Nats-Msg-Id` and a reply subject that carries
a token) in one write, and JetStream's acks come back on one wildcard inbox subscription, parsed without
building a message object and handed over per socket read (`on_acks`). An ack is read just far enough to
tell stored / duplicate / error.

Only what the bridge needs: INFO, CONNECT (an nkey signing the INFO nonce, or user/password or token
from the URL; TLS when the URL says `tls://` or the server requires it), PING/PONG, SUB, HPUB,
MSG/HMSG. A `-ERR`, a lost connection or a PING left unanswered ends the connection: `closed` holds the
reason and the caller starts over (JetStream dedup makes a re-publish of what was in flight harmless).

A security boundary, fuzzed as one (`tests/bridge/test_natswire_hostile.py`): whatever a server or a man in
the middle sends, the connection either goes on or ends with a one-line `NatsWireError`, never a hang or
another exception. Memory is bounded from the header on: a control line may be `MAX_CONTROL_LINE` bytes
(`INFO`: `MAX_INFO_LINE`), a message `max_payload` bytes of payload (the server's, at most
`MAX_PAYLOAD_CEILING`) plus `MAX_HEADERS` of headers; anything claiming more is refused before its body
arrives, so the read buffer never holds more than that plus one socket read.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import ssl
from typing import TYPE_CHECKING, Annotated, Any, Final, NamedTuple
from urllib.parse import unquote, urlsplit

import msgspec

from nerve.runtime.errors import shown_url
from nerve.runtime.wire.protocol import WireError, WireProtocol

if TYPE_CHECKING:
    from collections.abc import Callable

    from nerve.runtime.jetstream.identities import NKey

DEFAULT_PORT: Final = 4222
CRLF: Final = b"\r\n"
PING: Final = b"PING\r\n"
PONG: Final = b"PONG\r\n"
PING_INTERVAL_S: Final = 10.0
#: The longest control line (`MSG`, `HMSG`, `-ERR`, ...) the server may send, CRLF not counted.
MAX_CONTROL_LINE: Final = 4096
#: The longest `INFO` line: a cluster's INFO lists its members' URLs, and can pass 4 KiB.
MAX_INFO_LINE: Final = 64 * 1024
#: The largest header block an `HMSG` may carry (JetStream's acks carry none, or a status line).
MAX_HEADERS: Final = 64 * 1024
#: The largest `max_payload` an INFO may announce that is believed: nats-server's own ceiling (64 MiB).
MAX_PAYLOAD_CEILING: Final = 64 * 1024 * 1024
#: The `max_payload` assumed until the server's INFO says otherwise: nats-server's default.
DEFAULT_MAX_PAYLOAD: Final = 1024 * 1024
#: Digits of a byte count or reply token; more is not a number this client sends or accepts.
MAX_DIGITS: Final = 12
#: How deep the JSON of an INFO or an error ack may nest; nats-server's nest two or three levels.
MAX_JSON_DEPTH: Final = 32
# A JSON string (skipped whole, escapes included; one left open runs to the end, so that the scan stays
# linear whatever the quotes and backslashes) or a bracket: what `_too_deep` looks at.
_JSON_TOKEN: Final = re.compile(rb'"(?:[^"\\]|\\.?)*+"?|[\[\]{}]', re.DOTALL)
NO_RESPONDERS: Final = "no responders: is JetStream enabled and a stream bound to this subject?"
#: The longest INFO `nonce` that is signed: nats-server's are 22 characters.
MAX_NONCE: Final = 256


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


class ServerInfo(msgspec.Struct, frozen=True):
    """What the bridge reads of the server's INFO; other fields are skipped, wrong types refused."""

    headers: bool | None = None
    max_payload: Annotated[int, msgspec.Meta(gt=0)] = DEFAULT_MAX_PAYLOAD
    tls_required: bool = False
    # What the client signs to prove it holds its nkey seed; sent when the server has nkey users.
    nonce: Annotated[str, msgspec.Meta(max_length=MAX_NONCE)] | None = None


class _ApiError(msgspec.Struct, frozen=True):
    description: str = "error"
    code: int | None = None
    err_code: int | None = None


class _ErrorAck(msgspec.Struct, frozen=True):
    error: _ApiError


_info_decoder: Final = msgspec.json.Decoder(ServerInfo)
_error_decoder: Final = msgspec.json.Decoder(_ErrorAck)


def shown(raw: bytes | bytearray, limit: int = 80) -> str:
    """`raw` as one printable line of at most `limit` characters (for reasons and logs)."""
    text = bytes(raw[: limit + 1]).decode(errors="replace")
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _too_deep(document: bytes | bytearray) -> bool:
    """Whether `document` nests deeper than `MAX_JSON_DEPTH`, found without recursion.

    Checked before decoding, so that a hostile document never reaches a RecursionError (which CPython
    3.11 does not always recover from cleanly: a later `ast.parse` has failed with a SystemError).
    """
    depth = 0
    for token in _JSON_TOKEN.finditer(document):
        bracket = token[0]
        if bracket in {b"[", b"{"}:
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return True
        elif bracket in {b"]", b"}"}:
            depth -= 1
    return False


def parse_info(document: bytes | bytearray) -> ServerInfo:
    """Read an INFO document; raise `NatsWireError` naming what is wrong (never another exception)."""
    if _too_deep(document):
        raise NatsWireError(f"protocol error: bad INFO from the server: nested deeper than {MAX_JSON_DEPTH}")
    try:
        return _info_decoder.decode(document)
    except msgspec.DecodeError as exc:  # ValidationError too: it names the field, as in `$.max_payload`
        raise NatsWireError(
            f"protocol error: bad INFO from the server: {shown(str(exc).encode(), 120)}"
        ) from None
    except RecursionError:  # pragma: no cover - `_too_deep` refuses such documents first
        raise NatsWireError("protocol error: bad INFO from the server: nested too deeply") from None


def _count(field: bytes | bytearray, what: str) -> int:
    """A byte count or token of a MSG line: ASCII digits only (`int` would take `-1`, `+1`, `1_0`)."""
    if not field.isdigit() or len(field) > MAX_DIGITS:
        raise _not_a_count(field, what)
    return int(field)


def _not_a_count(field: bytes | bytearray, what: str) -> NatsWireError:
    return NatsWireError(f"protocol error: {what} {shown(field, 24)!r} is not a count")


def _ack_of(token: int, data: bytes) -> StoreAck:
    if b'"error"' in data:
        return StoreAck(token, f"JetStream refused it: {_error_description(data)}", duplicate=False)
    return StoreAck(token, None, duplicate=b'"duplicate"' in data)


def _error_description(data: bytes) -> str:
    """JetStream's words for an error ack, in one short line; its raw text if it is not the usual JSON."""
    if not _too_deep(data):
        try:
            error = _error_decoder.decode(data).error
        except (msgspec.DecodeError, RecursionError):
            pass
        else:
            return f"{shown(error.description.encode(), 200)} (code {error.code}, err_code {error.err_code})"
    return shown(data, 200)


def _check_partial_line(buf: bytearray, pos: int, size: int) -> None:
    """Refuse a control line that has not ended (no CRLF yet) and is already longer than allowed."""
    if size - pos > MAX_CONTROL_LINE and (size - pos > MAX_INFO_LINE or not buf.startswith(b"INFO", pos)):
        raise NatsWireError(f"protocol error: control line too long ({size - pos} bytes and no end yet)")


def _check_long_line(buf: bytearray, pos: int, eol: int) -> None:
    """Refuse a whole control line over `MAX_CONTROL_LINE` (an `INFO` over `MAX_INFO_LINE`)."""
    if eol - pos > MAX_INFO_LINE or not buf.startswith(b"INFO", pos):
        raise NatsWireError(f"protocol error: control line too long ({eol - pos} bytes)")


def _message_sizes(op: bytes, parts: list[bytes], max_payload: int) -> tuple[int, int]:
    """Check a MSG/HMSG line's fields (split at spaces); return its header size and total size."""
    # MSG <subject> <sid> [reply] <#bytes>; HMSG <subject> <sid> [reply] <#header bytes> <#total bytes>
    arity = (4, 5) if op == b"MSG " else (5, 6)
    if len(parts) not in arity or not all(parts):
        raise NatsWireError(f"protocol error: malformed message line {shown(b' '.join(parts), 60)!r}")
    total = _count(parts[-1], "message size")
    header_size = _count(parts[-2], "header size") if op == b"HMSG" else 0
    _count(parts[2], "subscription id")
    if header_size > total:
        raise NatsWireError(f"protocol error: header size {header_size} is over the message size {total}")
    if header_size > MAX_HEADERS:
        raise NatsWireError(
            f"protocol error: the server announced {header_size} bytes of headers, over {MAX_HEADERS}"
        )
    if total - header_size > max_payload:
        raise _too_big(total - header_size, max_payload)
    return header_size, total


def _too_big(size: int, max_payload: int) -> NatsWireError:
    return NatsWireError(
        f"protocol error: the server announced a {size}-byte message, over max_payload ({max_payload})"
    )


class NatsWire(WireProtocol[StoreAck]):
    """One NATS connection that publishes to JetStream and collects the acks. Use `open_nats`."""

    error = NatsWireError
    peer = "server"
    batch_name = "JetStream acks"

    def __init__(self, on_acks: Callable[[list[StoreAck]], None]) -> None:
        super().__init__(on_acks)
        self._info: asyncio.Future[ServerInfo] = self._loop.create_future()
        self._pongs: list[asyncio.Future[None]] = []
        self._out: list[bytes] = []
        self._pong_due = False
        self._inbox = b"_INBOX." + secrets.token_hex(11).encode() + b"."
        self.max_payload = DEFAULT_MAX_PAYLOAD

    def _parse(self, data: bytes) -> list[StoreAck]:
        acks = self._read(data)
        if self._pong_due:
            self._pong_due = False
            self._send(PONG)
        return acks

    def _read(self, data: bytes) -> list[StoreAck]:  # noqa: C901 - the hot path, inlined on purpose (measured)
        buf = self._buffer
        buf += data
        pos = 0
        size = len(buf)
        acks: list[StoreAck] = []
        inbox = self._inbox
        token_at = 4 + len(inbox)  # where the token starts in `MSG <inbox><token> ...`
        max_payload = self.max_payload
        while True:
            eol = buf.find(CRLF, pos)
            if eol < 0:
                _check_partial_line(buf, pos, size)
                break
            if eol - pos > MAX_CONTROL_LINE:
                _check_long_line(buf, pos, eol)
            if buf.startswith(b"MSG ", pos) and buf.startswith(inbox, pos + 4):
                # The usual case, read in place: MSG <inbox><token> <sid> <#bytes>, then a JSON ack.
                field = buf[buf.rindex(b" ", pos, eol) + 1 : eol]
                if not field.isdigit() or len(field) > MAX_DIGITS:  # `_count`, inlined: the hot path
                    raise _not_a_count(field, "message size")
                total = int(field)
                if total > max_payload:
                    raise _too_big(total, max_payload)
                start = eol + 2
                end = start + total
                if end + 2 > size:
                    break
                if not buf.startswith(CRLF, end):
                    raise NatsWireError("protocol error: a message's payload is not followed by CRLF")
                field = buf[pos + token_at : buf.index(b" ", pos + token_at, eol)]
                if not field.isdigit() or len(field) > MAX_DIGITS:
                    raise _not_a_count(field, "reply token")
                token = int(field)
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
        parts = bytes(buf[pos:eol]).split(b" ")
        header_size, total = _message_sizes(op, parts, self.max_payload)
        after = eol + 2 + total + 2
        if after > len(buf):
            return -1
        if not buf.startswith(CRLF, after - 2):
            raise NatsWireError("protocol error: a message's payload is not followed by CRLF")
        subject = parts[1]
        if not subject.startswith(self._inbox):
            return after  # not an ack of ours
        token = _count(subject[len(self._inbox) :], "reply token")
        body = bytes(buf[eol + 2 : eol + 2 + total])
        if op == b"HMSG":
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
            # Answered once per read however many came: a server that floods PINGs and reads nothing
            # back cannot make our unsent output grow with them.
            self._pong_due = True
        elif op == b"PONG":
            self._pong()
            if self._pongs:
                pong = self._pongs.pop(0)
                if not pong.done():
                    pong.set_result(None)
        elif op == b"INFO":
            info = parse_info(line[5:])
            if not self._info.done():
                self._info.set_result(info)
        elif op == b"-ERR":
            raise NatsWireError(f"server error: {shown(line[5:], 200).strip(chr(39))}")
        elif op != b"+OK":
            raise NatsWireError(f"protocol error: unexpected {shown(line, 40)!r}")

    def _take_waiters(self) -> list[asyncio.Future[Any]]:
        waiters: list[asyncio.Future[Any]] = [self._info, *self._pongs]
        self._pongs.clear()
        return waiters

    # -- requests

    def _send(self, data: bytes) -> None:
        if self._transport is not None and not self.closed.done():
            self._transport.write(data)

    async def handshake(self, url: str, *, name: str, nkey: NKey | None = None) -> None:
        """INFO, (TLS,) CONNECT (signing the nonce with `nkey`), PING/PONG, then subscribe the ack inbox."""
        parts = urlsplit(url)
        info = await self._info
        if info.headers is False:
            raise NatsWireError("this NATS server does not support headers (needed for dedup ids)")
        self.max_payload = min(info.max_payload, MAX_PAYLOAD_CEILING)
        if parts.scheme == "tls" or info.tls_required:
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
        if nkey is not None and info.nonce is not None:  # no nonce: the server asks for no nkey
            connect["nkey"], connect["sig"] = nkey.public_key, nkey.sign_nonce(info.nonce)
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
    url: str,
    *,
    name: str,
    on_acks: Callable[[list[StoreAck]], None],
    timeout_s: float = 5.0,
    nkey: NKey | None = None,
) -> NatsWire:
    """Connect to the first server of `url` (comma-separated) that answers; raise `NatsWireError`.

    With `nkey`, the client authenticates as that identity (docs/nats.md); a refusal names its file.
    """
    loop = asyncio.get_running_loop()
    failures: list[str] = []
    for server in (s.strip() for s in url.split(",")):
        parts = urlsplit(server)
        host, port = parts.hostname or "127.0.0.1", parts.port or DEFAULT_PORT
        try:
            async with asyncio.timeout(timeout_s):
                _, wire = await loop.create_connection(lambda: NatsWire(on_acks), host, port)
                try:
                    await wire.handshake(server, name=name, nkey=nkey)
                except BaseException:
                    wire.close()
                    raise
        except TimeoutError:  # (an OSError too: first)
            failures.append(f"{host}:{port}: no answer within {timeout_s:.0f}s")
        except (OSError, NatsWireError, ssl.SSLError) as exc:
            if "authorization violation" in str(exc).lower():
                who = f"the nkey in {nkey.path}" if nkey is not None else "a client with no identity"
                failures.append(f"{host}:{port}: it refused {who} (Authorization Violation; docs/nats.md)")
            else:
                failures.append(f"{host}:{port}: {exc}")
        else:
            return wire
    raise NatsWireError(f"cannot connect to {shown_url(url)}: {'; '.join(failures)}")
