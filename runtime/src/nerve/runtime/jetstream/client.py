"""NATS connections: reconnect forever, wrap failures, and publish envelopes with dedup ids.

Envelopes are stored as the CloudEvents NATS binding says (structured mode): the event in the body, in
the codec `nats.codec` chooses, and its media type in the `Content-Type` header
(`application/cloudevents+json` or `application/cloudevents+msgpack`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import time
import weakref
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, NamedTuple, NoReturn, cast

import msgspec
from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError, NoServersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

from nerve.runtime.backoff import Backoff
from nerve.runtime.config.settings import host_port
from nerve.runtime.envelope.codec import CONTENT_TYPE_HEADER, DEFAULT_CODEC, Codec, content_type, encode
from nerve.runtime.envelope.model import derived_id, utcnow
from nerve.runtime.errors import BrokerUnavailable, NerveError
from nerve.runtime.jetstream.identities import load_nkey
from nerve.runtime.jetstream.streams import FACTS_STREAM
from nerve.runtime.stack.brokers import port_answers
from nerve.runtime.subjects import Address, Kind, deadletter_subject
from nerve.runtime.trust.chain import (
    EXPECTED_LAST_SEQUENCE_HEADER,
    MAX_CHAIN_ATTEMPTS,
    WRONG_LAST_SEQUENCE_CODE,
    seal,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine, Mapping

    from nats.aio.msg import Msg
    from nats.js.api import PubAck

    from nerve.runtime.config.settings import NatsSettings
    from nerve.runtime.envelope.model import Envelope, Fact
    from nerve.runtime.trust.signing import Signer

log = logging.getLogger(__name__)

MSG_ID_HEADER: Final = "Nats-Msg-Id"
DEFAULT_NATS_PORT: Final = 4222
PUBLISH_TIMEOUT_S: Final = 5.0
DISCARD_TIMEOUT_S: Final = 2.0
# JetStream's error code for a store refused at a stream's limit (`maximum bytes exceeded`, discard new).
STREAM_FULL_CODE: Final = 10077
#: JetStream's error code for "no message found" (a stream that does not exist is another 404).
NO_MESSAGE_CODE: Final = 10037


class StreamFull(NerveError, APIError):
    """JetStream refused a message: its stream is at its byte limit and refuses new ones (discard new).

    Also a nats `APIError`, so code that retries on NATS trouble retries this too. Nothing was stored:
    the publisher must retry later, or say that it could not (docs/streams.md).
    """

    def __init__(self, subject: str, description: str) -> None:
        APIError.__init__(self, code=503, description=description, err_code=STREAM_FULL_CODE)
        self.subject = subject

    def __str__(self) -> str:
        return f"JetStream refused {self.subject}: its stream is full ({self.description})"


async def _store(
    js: JetStreamContext, subject: str, payload: bytes, *, headers: dict[str, str], timeout: float
) -> PubAck:
    """`js.publish`, with a refusal at a stream's limit raised as `StreamFull` (and logged)."""
    try:
        return await js.publish(subject, payload, timeout=timeout, headers=headers)
    except APIError as exc:
        if exc.err_code != STREAM_FULL_CODE:
            raise
        full = StreamFull(subject, exc.description or "full")
        log.warning("%s", full)
        raise full from exc


class NatsAuthRefused(BrokerUnavailable):
    """The server refused this client's identity (or its lack of one): `Authorization Violation`."""

    def __init__(self, url: str, identity: str) -> None:
        self.identity = identity
        super().__init__(url, f"it refused {identity} (Authorization Violation; docs/nats.md)")


def identity_of(settings: NatsSettings) -> str:
    """How a connection's identity is named in messages: its seed file, or `no identity`."""
    return (
        f"the nkey in {settings.nkey_file}" if settings.nkey_file is not None else "a client with no identity"
    )


def is_auth_violation(exc: BaseException) -> bool:
    """Whether `exc` is the server's `Authorization Violation` (nats-py raises a plain `Error` for it)."""
    return "authorization violation" in str(exc).lower()


class _Callbacks:
    """nats-py's callbacks for one connection: log outages; while connecting, note a refusal instead."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.client: NatsClient | None = None  # set once connected
        self.refused = asyncio.Event()

    async def on_error(self, exc: Exception) -> None:
        if self.client is None and (self.refused.is_set() or is_auth_violation(exc)):
            self.refused.set()  # said once, by `connect`; nats-py would retry (and log) forever
            return
        log.warning("nats (%s): %s", self.name, exc)

    async def on_disconnected(self) -> None:
        if self.client is None or self.client.is_closed or self.client.is_draining:
            return  # our own close, or a refused connect: not an outage
        log.warning("nats (%s): disconnected, reconnecting", self.name)

    async def on_reconnected(self) -> None:
        log.info("nats (%s): reconnected", self.name)


async def connect(settings: NatsSettings, *, name: str) -> NatsClient:
    """Connect to NATS (as `nats.nkey_file`'s identity, if set); then the client reconnects by itself.

    Raises `BrokerUnavailable` if no server answers within the connect timeout, `NatsAuthRefused` as
    soon as the server refuses the identity, `ConfigError` if the seed file is not a valid nkey seed.
    """
    seed: str | None = None
    if settings.nkey_file is not None:
        load_nkey(settings.nkey_file)  # a bad seed is one clear line now, not nats-py's traceback later
        seed = str(settings.nkey_file)
    callbacks = _Callbacks(name)
    servers = [url.strip() for url in settings.url.split(",")]
    # nats-py retries an initial connect as often as a reconnect (forever, here): ask the sockets first,
    # so that "nothing listens there" is a clear error now rather than a silent wait.
    answers = [await port_answers(*host_port(url, DEFAULT_NATS_PORT)) for url in servers]
    if not any(answers):
        raise BrokerUnavailable(settings.url, "nothing listens there")
    bad_greeting: str | None = None
    connected = NatsClient()
    try:
        async with asyncio.timeout(settings.connect_timeout_s * 2):
            attempt = connected.connect(
                servers=servers,
                name=name,
                # nats-py annotates these as int; it takes seconds as floats (asyncio timeouts).
                connect_timeout=settings.connect_timeout_s,  # type: ignore[arg-type]
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,  # type: ignore[arg-type]
                error_cb=callbacks.on_error,
                disconnected_cb=callbacks.on_disconnected,
                reconnected_cb=callbacks.on_reconnected,
                nkeys_seed=seed,
            )
            accepted = await _unless(attempt, callbacks.refused)
    except (NoServersError, OSError, TimeoutError, NatsError) as exc:
        await _discard(connected)
        raise BrokerUnavailable(settings.url, str(exc) or type(exc).__name__) from exc
    except Exception as exc:  # noqa: BLE001 - nats-py lets a hostile greeting (`INFO []`) raise anything
        bad_greeting = f"not a valid NATS greeting ({type(exc).__name__}: {str(exc)[:200]})"
    if bad_greeting is not None:
        await _discard(connected)
        # Raised out here, not chained: nats-py's traceback holds its half-open client and socket, which
        # would otherwise live as long as this error (in a log record, say) instead of closing now.
        raise BrokerUnavailable(settings.url, bad_greeting)
    if not accepted:
        await _discard(connected)
        raise NatsAuthRefused(settings.url, identity_of(settings))
    callbacks.client = connected
    return connected


async def _discard(client: NatsClient) -> None:
    """Close a client whose connect failed, now: its socket must not wait for the garbage collector."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(DISCARD_TIMEOUT_S):
            await client.close()
    transport = getattr(client, "_transport", None)  # nats-py's; close() leaves a half-open one behind
    if transport is not None:
        with contextlib.suppress(Exception):
            transport.close()


async def _unless(attempt: Coroutine[Any, Any, None], event: asyncio.Event) -> bool:
    """Await `attempt`, unless `event` is set first: then cancel it and return False."""
    task = asyncio.ensure_future(attempt)
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return False
    task.result()  # raises what the attempt raised
    return True


async def connect_forever(settings: NatsSettings, *, name: str) -> NatsClient:
    """Connect to NATS, retrying with jittered backoff for as long as it takes (for daemons)."""
    backoff = Backoff()
    while True:
        try:
            return await connect(settings, name=name)
        except BrokerUnavailable as exc:
            delay = backoff.next_delay()
            log.warning("%s; retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)


async def shared_durable(
    js: JetStreamContext,
    *,
    subject: str,
    stream: str,
    name: str,
    ack_wait_s: float,
    max_ack_pending: int,
    max_deliver: int = -1,
    cb: Callable[[Msg], Awaitable[None]] | None = None,
) -> JetStreamContext.PushSubscription:
    """Bind to (creating if needed) durable push consumer `name`, shared by every process using it.

    The deliver group has the consumer's name, so processes bound to it split the messages between them.
    Explicit acks; a new consumer starts from the beginning of the stream (nothing is skipped). With `cb`,
    nats-py calls it for each message in turn (it must not raise): the acks of a burst then leave in one
    write, where iterating `messages` flushes each on its own.

    `max_deliver` (-1: no limit) is how often JetStream delivers a message before it gives up on it, silently:
    an existing consumer with another one (made by an earlier version) is changed to it. Its other limits
    (the ack wait) are left as they are: an operator may have chosen them.
    """
    await _deliver_at_most(js, stream=stream, name=name, max_deliver=max_deliver)
    return await js.subscribe(
        subject,
        durable=name,
        queue=name,
        stream=stream,
        cb=cb,
        manual_ack=True,
        config=ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait_s,
            max_deliver=max_deliver,
            max_ack_pending=max_ack_pending,
            deliver_policy=DeliverPolicy.ALL,
        ),
    )


async def _deliver_at_most(js: JetStreamContext, *, stream: str, name: str, max_deliver: int) -> None:
    """Give consumer `name` of `stream`, if it exists, `max_deliver` (nats-py binds to it as it finds it)."""
    try:
        found = (await js.consumer_info(stream, name)).config
    except NotFoundError:
        return  # made by the subscribe, as asked
    if (found.max_deliver or -1) == max_deliver:
        return
    log.info("consumer %s of %s: max_deliver %s -> %s", name, stream, found.max_deliver, max_deliver)
    # As it was made (a durable create, not by name), with everything else as it is (its deliver subject).
    await js.add_consumer(stream, config=dataclasses.replace(found, max_deliver=max_deliver, name=None))


def envelope_headers(envelope: Envelope, codec: Codec) -> dict[str, str]:
    """The headers an envelope is stored with: its id (JetStream dedup) and its content type."""
    return {MSG_ID_HEADER: envelope.id, CONTENT_TYPE_HEADER: content_type(codec)}


async def publish_envelope(
    js: JetStreamContext,
    subject: str,
    envelope: Envelope,
    *,
    codec: Codec = DEFAULT_CODEC,
    timeout: float = PUBLISH_TIMEOUT_S,
    headers: Mapping[str, str] | None = None,
) -> PubAck:
    """Store `envelope` on `subject` (with `codec`), deduplicated by its id; return JetStream's ack.

    `headers`: more headers to store it with (the envelope's own, `envelope_headers`, win).

    Raises `StreamFull` if its stream refuses new messages at its limit (commands, results, facts).
    """
    own = envelope_headers(envelope, codec)
    return await _store(
        js, subject, encode(envelope, codec), timeout=timeout, headers={**headers, **own} if headers else own
    )


REASON_HEADER: Final = "Nerve-Reason"
ORIGIN_HEADER: Final = "Nerve-Origin"
_HEADER_VALUE_MAX: Final = 512


def dead_letter_body(
    *, part: str, reason: str, origin: str, payload: bytes, stream: str = "", seq: int = 0
) -> bytes:
    """The msgpack record kept in NERVE_DEADLETTER: why, where it came from, and the original bytes.

    A message taken from a stream also says which one (`stream`, `seq`: its stream sequence).
    """
    record: dict[str, str | int | bytes] = {
        "part": part,
        "reason": reason,
        "origin": origin,
        "time": utcnow().isoformat(),
        "payload": payload,
    }
    if stream:
        record |= {"stream": stream, "seq": seq}
    return msgspec.msgpack.encode(record)


def header_safe(value: str) -> str:
    """`value` fit for a header: no line breaks, at most 512 characters (the full text is in the body)."""
    return " ".join(value.split())[:_HEADER_VALUE_MAX]


async def publish_dead_letter(
    js: JetStreamContext,
    *,
    prefix: str,
    part: str,
    reason: str,
    origin: str,
    payload: bytes,
    timeout: float = PUBLISH_TIMEOUT_S,
    stream: str = "",
    seq: int = 0,
    msg_id: str = "",
) -> PubAck:
    """Keep what `part` could not handle in NERVE_DEADLETTER, with the reason and the original bytes.

    `origin` is the MQTT topic or NATS subject it came from; `stream` and `seq`, the stream message it was
    (`dead_letter_body`). With `msg_id`, it is kept once however often it is dead-lettered (JetStream's
    dedup window, docs/streams.md). The dead-letter stream drops its oldest records at its limit (and
    counts them), so this is never refused for being full.
    """
    headers = {REASON_HEADER: header_safe(reason), ORIGIN_HEADER: header_safe(origin)}
    if msg_id:
        headers[MSG_ID_HEADER] = msg_id
    return await _store(
        js,
        deadletter_subject(part, prefix),
        dead_letter_body(part=part, reason=reason, origin=origin, payload=payload, stream=stream, seq=seq),
        timeout=timeout,
        headers=headers,
    )


async def dead_letter_delivery(
    js: JetStreamContext, msg: Msg, *, prefix: str, part: str, reason: str
) -> None:
    """Keep JetStream delivery `msg` in NERVE_DEADLETTER with `reason`, then drop it (`term`).

    Its id derives from the consumer and the stream sequence: dead-lettered again (the process died
    between the store and the `term`, or two paths gave up on it), it is stored once (JetStream's dedup
    window, 20 minutes).
    """
    meta = msg.metadata
    await publish_dead_letter(
        js,
        prefix=prefix,
        part=part,
        reason=reason,
        origin=msg.subject,
        payload=msg.data,
        stream=meta.stream,
        seq=meta.sequence.stream,
        msg_id=derived_id("deadletter", meta.stream, meta.consumer, str(meta.sequence.stream)),
    )
    await msg.term()


#: Tokens of a JetStream ack subject without a domain: `$JS.ACK.<stream>.<consumer>.<delivered>.<stream
#: seq>.<consumer seq>.<time>.<pending>`.
_ACK_TOKENS: Final = 9


def num_delivered(msg: Msg) -> int:
    """`msg.metadata.num_delivered`, without the rest of nats-py's metadata.

    nats-py builds a datetime and two dataclasses for it, on every delivery (every reading a trigger sees).
    """
    tokens = (msg.reply or "").split(".")
    if len(tokens) == _ACK_TOKENS and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[4])
    return msg.metadata.num_delivered


def fact_subject(fact: Fact, prefix: str) -> str:
    """The subject a fact is kept under: `<prefix>.<device>.facts.<kind>`."""
    return Address(device=fact.subject, kind=Kind.FACTS, name=fact.kind).subject(prefix)


class FactChainContended(NerveError):
    """Another writer stored a record first, every time, for `attempts` tries: the fact was not kept."""

    def __init__(self, subject: str, attempts: int) -> None:
        super().__init__(subject, attempts)
        self.subject = subject
        self.attempts = attempts

    def __str__(self) -> str:
        return f"could not chain the fact on {self.subject}: other writers came first {self.attempts} times"


async def _chain_head(js: JetStreamContext, stream: str) -> tuple[int, bytes | None]:
    """The last sequence of `stream` and the bytes stored there (None: nothing is)."""
    state = (await js.stream_info(stream)).state
    if state.messages == 0 or state.last_seq == 0:
        return state.last_seq, None
    return state.last_seq, (await js.get_msg(stream, seq=state.last_seq)).data


class _Chain:
    """One process's view of a fact stream's head, on one connection: kept after each fact it stores.

    A fact is chained after the head this process stored last, without reading the stream again (two
    round trips saved per fact); the store's expected-last-sequence check still refuses it if another
    writer came in between, and then the head is read afresh. The lock keeps this process's own facts
    from racing each other for one place in the chain.
    """

    __slots__ = ("head", "lock", "stream")

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.lock = asyncio.Lock()
        self.head: tuple[int, bytes | None] | None = None


_CHAINS: weakref.WeakKeyDictionary[NatsClient, dict[str, _Chain]] = weakref.WeakKeyDictionary()


def _chain_of(js: JetStreamContext, stream: str) -> _Chain:
    per_client = _CHAINS.setdefault(js._nc, {})  # noqa: SLF001 - the connection a context publishes on
    chain = per_client.get(stream)
    if chain is None:
        chain = per_client[stream] = _Chain(stream)
    return chain


async def publish_fact(
    js: JetStreamContext,
    fact: Fact,
    *,
    prefix: str,
    signer: Signer | None = None,
    codec: Codec = DEFAULT_CODEC,
    timeout: float = PUBLISH_TIMEOUT_S,
    stream: str = FACTS_STREAM,
) -> PubAck:
    """Keep `fact` in NERVE_FACTS, once (deduplicated by its id); signed and chained if `signer` is given.

    A signed fact is placed after the record last stored in `stream` and stored only if nothing came in
    between (`nerve.runtime.trust.chain`); if something did, it is chained again, at most
    `MAX_CHAIN_ATTEMPTS` times. Without `signer` it is stored as a legacy, unsigned fact. The head is
    remembered per connection (`_Chain`), so a process that writes most facts reads it only after
    another writer came in between.

    Raises:
        StreamFull: the stream is full.
        FactChainContended: other writers came first every time.
    """
    subject = fact_subject(fact, prefix)
    if signer is None:
        return await publish_envelope(js, subject, fact, codec=codec, timeout=timeout)
    chain = _chain_of(js, stream)
    try:
        return await _chain_and_store(js, fact, subject, chain, signer, codec, timeout)
    except TimeoutError as exc:
        if isinstance(exc, NatsTimeoutError):
            raise
        # Waited for this process's earlier facts that long: NATS is slow, as for a publish's own timeout.
        raise NatsTimeoutError from exc


async def _chain_and_store(  # noqa: PLR0917 - publish_fact's, passed on
    js: JetStreamContext,
    fact: Fact,
    subject: str,
    chain: _Chain,
    signer: Signer,
    codec: Codec,
    timeout: float,
) -> PubAck:
    async with asyncio.timeout(timeout * MAX_CHAIN_ATTEMPTS), chain.lock:
        for _ in range(MAX_CHAIN_ATTEMPTS):
            if chain.head is None:
                async with asyncio.timeout(timeout):
                    chain.head = await _chain_head(js, chain.stream)
            last_seq, previous = chain.head
            sealed = seal(fact, signer, chainseq=last_seq + 1, previous=previous)
            headers = envelope_headers(sealed, codec) | {EXPECTED_LAST_SEQUENCE_HEADER: str(last_seq)}
            payload = encode(sealed, codec)
            try:
                ack = await _store(js, subject, payload, headers=headers, timeout=timeout)
            except APIError as exc:
                chain.head = None
                if exc.err_code != WRONG_LAST_SEQUENCE_CODE:
                    raise
                continue
            except BaseException:
                chain.head = None  # stored or not: read it again next time
                raise
            # A duplicate stored nothing now: the head is unknown (the first copy is further back).
            chain.head = None if ack.duplicate else (ack.seq, payload)
            return ack
    raise FactChainContended(subject, MAX_CHAIN_ATTEMPTS)


# --- lean reads ------------------------------------------------------------------------------------
# The engine asks a stream's last sequence at most steps and reads stored messages one by one in its
# waits. nats-py answers both with its full objects (the stream's whole configuration, the message's
# headers through the email parser): 16 % of central's CPU in back-to-back disk incidents (py-spy,
# bench/central.py's reaction). These read only the fields asked for, with msgspec; on anything else than
# nats-py's JetStreamContext (the harness's in-memory JetStream) they fall back to its API.


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _State(msgspec.Struct):
    last_seq: int = 0


class _InfoReply(msgspec.Struct):
    state: _State | None = None
    error: _ApiError | None = None


class _Stored(msgspec.Struct):
    seq: int = 0
    subject: str = ""
    data: str = ""  # base64
    time: str = ""  # RFC 3339


class Stored(NamedTuple):
    """A message as `stream` holds it: its sequence, subject, data, and when JetStream stored it."""

    seq: int
    subject: str
    data: bytes
    time: datetime


class _MsgReply(msgspec.Struct):
    message: _Stored | None = None
    error: _ApiError | None = None


_INFO_REPLY: Final = msgspec.json.Decoder(_InfoReply)
_MSG_REPLY: Final = msgspec.json.Decoder(_MsgReply)


def _raise_api_error(error: _ApiError) -> NoReturn:
    APIError.from_error({"code": error.code, "err_code": error.err_code, "description": error.description})
    raise APIError(code=error.code, err_code=error.err_code, description=error.description)


def _unreadable(what: str, exc: Exception) -> APIError:
    """A reply nats-server would never send (a hostile or broken server): a NATS error, said in one line.

    Callers already retry or give up on NATS errors; a decode error would escape them as a traceback.
    """
    return APIError(code=0, description=f"unreadable reply to {what}: {exc}")


def _is_nats_py(js: object) -> bool:
    """Whether `js` is nats-py's JetStreamContext (not a double with its API)."""
    return isinstance(js, JetStreamContext)


async def _api(js: JetStreamContext, subject: str, body: bytes) -> bytes:
    prefix: str = js._prefix  # noqa: SLF001 - nats-py's API prefix ($JS.API, or a domain's)
    try:
        reply = await js._nc.request(f"{prefix}.{subject}", body, timeout=PUBLISH_TIMEOUT_S)  # noqa: SLF001
    except NoRespondersError:
        raise ServiceUnavailableError from None
    return reply.data


async def last_sequence(js: JetStreamContext, stream: str) -> int:
    """The last sequence of `stream` (0: empty). Raises nats-py's errors (`NotFoundError`: no such stream)."""
    if not _is_nats_py(js):
        return int((await js.stream_info(stream)).state.last_seq)
    try:
        reply = _INFO_REPLY.decode(await _api(js, f"STREAM.INFO.{stream}", b""))
    except msgspec.DecodeError as exc:  # ValidationError is one too
        raise _unreadable(f"STREAM.INFO.{stream}", exc) from None
    if reply.error is not None:
        _raise_api_error(reply.error)
    return reply.state.last_seq if reply.state is not None else 0


async def sequence_before(js: JetStreamContext, stream: str, when: datetime) -> int:
    """The last sequence `stream` had stored before time `when` (0: none): all after it were stored later.

    Reads the stream's last sequence first, then the first message stored at or after `when`: whatever is
    stored in between is after `when` either way. Raises nats-py's errors.
    """
    last = await last_sequence(js, stream)
    if not _is_nats_py(js):  # the in-memory JetStream of `nerve.testing`, which takes a start time
        try:
            raw = await cast("Any", js).get_msg(stream, start_time=when)
        except NotFoundError:
            return last
        return min(last, int(raw.seq) - 1)
    found = await _get(js, stream, {"start_time": when.isoformat()})
    return last if found is None else min(last, found.seq - 1)


async def next_stored(js: JetStreamContext, stream: str, *, after: int, subject: str) -> Stored | None:
    """The first message on `subject` (wildcards: any) stored in `stream` after sequence `after`, or None."""
    if not _is_nats_py(js):
        try:
            raw = await js.get_msg(stream, seq=after + 1, subject=subject, next=True)
        except NotFoundError:
            return None
        if raw.seq is None or raw.time is None:
            return None
        return Stored(raw.seq, raw.subject or "", raw.data or b"", raw.time)
    return await _get(js, stream, {"seq": after + 1, "next_by_subj": subject})


async def last_stored_seq(js: JetStreamContext, stream: str, subject: str) -> int | None:
    """The sequence of the last message on `subject` in `stream`, or None if there is none."""
    if not _is_nats_py(js):
        try:
            return (await js.get_last_msg(stream, subject)).seq
        except NotFoundError:
            return None
    found = await _get(js, stream, {"last_by_subj": subject})
    return None if found is None else found.seq


#: Streams that answered no direct get (made before nerve set `allow_direct`, and not applied since),
#: with when: asked through the JetStream API instead, and directly again after `DIRECT_RETRY_S`.
_NOT_DIRECT: Final[dict[str, float]] = {}
DIRECT_RETRY_S: Final = 60.0
SEQUENCE_HEADER: Final = "Nats-Sequence"
SUBJECT_HEADER: Final = "Nats-Subject"
TIME_HEADER: Final = "Nats-Time-Stamp"


def _direct_answer(msg: Msg) -> Stored | None:
    """A direct get's reply: the message, None for 404, or APIError for anything else."""
    headers = msg.headers or {}
    status = headers.get("Status")
    if status == "404":
        return None
    sequence = headers.get(SEQUENCE_HEADER, "")
    if status is not None or not sequence.isdigit():
        code = int(status) if status is not None and status.isdigit() else 0
        raise APIError(code=code, description=headers.get("Description", f"no sequence in {sequence!r}"))
    what = "a direct get"
    return Stored(
        int(sequence),
        headers.get(SUBJECT_HEADER, ""),
        msg.data,
        _stored_time(headers.get(TIME_HEADER, ""), what),
    )


def _stored_time(text: str, what: str) -> datetime:
    """When a message was stored, from nats-server's RFC 3339 time (nanoseconds cut to microseconds)."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise _unreadable(what, exc) from None
    if when.tzinfo is None:
        raise _unreadable(what, ValueError(f"time {text[:64]!r} has no zone"))
    return when


async def _get(js: JetStreamContext, stream: str, request: dict[str, Any]) -> Stored | None:
    """The stored message `request` names, or None if there is none.

    A direct get where the stream allows it (nerve's streams do: `allow_direct`): served without the
    JetStream API's routing and advisory (7 % of nats-server's CPU per disk incident, side by side).
    """
    body = msgspec.json.encode(request)
    failed = _NOT_DIRECT.get(stream)
    if failed is None or time.monotonic() - failed > DIRECT_RETRY_S:
        prefix: str = js._prefix  # noqa: SLF001
        try:
            msg = await js._nc.request(f"{prefix}.DIRECT.GET.{stream}", body, timeout=PUBLISH_TIMEOUT_S)  # noqa: SLF001
        except NoRespondersError:
            _NOT_DIRECT[stream] = time.monotonic()
        else:
            _NOT_DIRECT.pop(stream, None)
            return _direct_answer(msg)
    what = f"STREAM.MSG.GET.{stream}"
    try:
        reply = _MSG_REPLY.decode(await _api(js, what, body))
    except msgspec.DecodeError as exc:
        raise _unreadable(what, exc) from None
    if reply.error is not None:
        if reply.error.err_code == NO_MESSAGE_CODE:
            return None
        _raise_api_error(reply.error)
    if reply.message is None:
        return None
    try:
        data = base64.b64decode(reply.message.data, validate=True)
    except ValueError as exc:  # binascii.Error
        raise _unreadable(what, exc) from None
    return Stored(reply.message.seq, reply.message.subject, data, _stored_time(reply.message.time, what))
