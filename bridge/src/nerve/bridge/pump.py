"""The uplink's hot path: MQTT PUBLISHes in, JetStream stores pipelined, PUBACKs out in receive order.

Per session (one MQTT connection, one NATS connection), everything runs in the two sockets' read
callbacks, with no task per message:

1. `on_messages` gets every PUBLISH one MQTT read brought. Each is translated by one `Translator` per
   session (CloudEvents in structured or binary mode checked, raw values wrapped, encoded in the stored
   codec) and queued as an `HPUB` to its subject with its `Nats-Msg-Id` and `Content-Type` (the
   CloudEvents NATS binding, structured mode), or as a dead letter with the reason; the whole batch
   leaves in one write.
2. `on_acks` gets every JetStream ack one NATS read brought and marks those messages stored. Then the
   PUBACKs of the stored head of the receive-order queue go back to mosquitto in one write: a message is
   acknowledged only once it, and every message received before it, is in JetStream.

What is not acknowledged stays mosquitto's: a bridge killed at any moment loses nothing, mosquitto sends
it again on the next session, and JetStream's dedup (the event id) keeps it once. The queue is bounded by
the Receive Maximum the bridge asks for when it connects: mosquitto sends no more unacknowledged
messages than that, so when JetStream is slow or away the bridge simply stops getting new ones.

mosquitto (2.0.11, measured) honours the Receive Maximum until the first PUBACK and then sends up to that
many more for every PUBACK, so the pump keeps its own bound as well: at `max_in_flight` messages in flight
it stops reading the MQTT socket, and reads again once half of them are stored.

A store JetStream refuses (an error ack, no responders) is retried with backoff, holding back the PUBACKs
behind it; one that gets no ack within `store_timeout_s` is published again (same id: stored once).

A raw reading (no id of its own) redelivered by mosquitto after a reconnect gets the id its first
delivery got (`RedeliveredIds`, kept by the bridge across its sessions), so it too is stored once.

With a spool (`nerve.bridge.spool`, `bridge.spool_bytes`), what arrives while half of `max_in_flight`
stores are already on their way to JetStream is not left with mosquitto: it is appended to the spool and
acknowledged (in its turn) once written, and the spool's records are published as acks make room, in
order (while records wait there, new messages go behind them). mosquitto then holds no backlog for the
bridge, and a command never waits behind one (mosquitto's autosave writes its whole backlog in its only
thread). At the spool's budget the pump stops reading mosquitto until the spool is empty.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from nerve.bridge.natswire import StoreAck, headers_block
from nerve.bridge.redelivery import RedeliveredIds
from nerve.bridge.uplink import Forward, Ignore, Reject, Translator
from nerve.runtime.backoff import Backoff
from nerve.runtime.config.settings import DEFAULT_ROUTE_CACHE
from nerve.runtime.envelope.codec import CONTENT_TYPE_HEADER, DEFAULT_CODEC, Codec, content_type
from nerve.runtime.jetstream.client import (
    MSG_ID_HEADER,
    ORIGIN_HEADER,
    REASON_HEADER,
    dead_letter_body,
    header_safe,
)
from nerve.runtime.subjects import deadletter_subject

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Collection, Mapping, Sequence

    from nerve.bridge.natswire import NatsWire
    from nerve.bridge.spool import Spool
    from nerve.bridge.stats import BridgeStats
    from nerve.runtime.config.settings import TopicMapping
    from nerve.runtime.wire.mqtt import Incoming, MqttWire

log = logging.getLogger(__name__)

PART: Final = "bridge"
# Room for the dead-letter record around a payload and for the HPUB headers, under the server's limit.
DEAD_LETTER_OVERHEAD: Final = 4096


@dataclass(slots=True)
class InFlight:
    """One received message on its way into JetStream."""

    packet_id: int  # 0: QoS0, nothing to acknowledge
    subject: str
    headers: bytes
    body: bytes
    dead_letter: bool
    origin: str
    token: int = 0
    sent_at: float = 0.0
    attempts: int = 0
    stored: bool = False
    spool_end: int = 0  # > 0: taken from the spool; stored means the spool may drop it up to here


class Pump:
    """Moves one session's uplink; `attach` the NATS side before MQTT messages can arrive."""

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        stats: BridgeStats,
        prefix: str,
        metrics: Collection[str],
        max_payload: int,
        mappings: Sequence[TopicMapping],
        ranges: Mapping[str, tuple[float, float]] | None = None,
        store_timeout_s: float,
        max_in_flight: int,
        codec: Codec = DEFAULT_CODEC,
        ids: RedeliveredIds | None = None,
        route_cache: int = DEFAULT_ROUTE_CACHE,
        spool: Spool | None = None,
    ) -> None:
        self._loop = loop
        # The bridge's, across its sessions; a new session sends again what the last one took from it.
        self._spool = spool
        if spool is not None:
            spool.rewind()
        self._from_spool: deque[InFlight] = deque()
        # The bridge's, across its sessions (a redelivery comes on the next one); else this pump's own.
        self._ids = ids if ids is not None else RedeliveredIds()
        self._translator = Translator(
            prefix=prefix,
            metrics=metrics,
            max_payload=max_payload,
            mappings=mappings,
            codec=codec,
            ranges=ranges,
            route_cache=route_cache,
        )
        # Every stored message's headers are these two with its id in between: built once.
        self._headers_head = b"NATS/1.0\r\n" + MSG_ID_HEADER.encode() + b": "
        self._headers_tail = (
            b"\r\n" + CONTENT_TYPE_HEADER.encode() + b": " + content_type(codec).encode() + b"\r\n\r\n"
        )
        self._stats = stats
        self._store_timeout_s = store_timeout_s
        self._high_water = max_in_flight
        self._low_water = max_in_flight // 2
        # Stores on their way to JetStream at once, at most (records from the spool included).
        self._window = max_in_flight
        # With this many direct stores unanswered, new messages go to the spool: below max_in_flight, the
        # Receive Maximum, since mosquitto sends no more than that many unacknowledged (a window that
        # has to be full would let the spool start only by chance, measured: after 60 s of a backlog).
        self._spill_at = max(1, max_in_flight // 2)
        self._deadletter_subject = deadletter_subject(PART, prefix)
        self._queue: deque[InFlight] = deque()
        self._by_token: dict[int, InFlight] = {}
        self._next_token = 0
        self._backoff = Backoff(maximum=2.0)
        self._nats: NatsWire | None = None
        self._mqtt: MqttWire | None = None
        self._unsent_pubacks: list[int] = []
        self._accepting = True
        self._drained: asyncio.Future[None] | None = None

    def attach_nats(self, nats: NatsWire) -> None:
        """Publish through `nats` (before any MQTT message can arrive)."""
        self._nats = nats

    def on_connack(self, session_present: bool) -> None:  # noqa: FBT001 - the MQTT wire's callback
        """The MQTT session began; a broker that did not keep ours will send nothing of it again."""
        self._ids.session(present=session_present)

    def attach_mqtt(self, mqtt: MqttWire) -> None:
        """Acknowledge through `mqtt` (PUBACKs earned before this go out now)."""
        self._mqtt = mqtt
        if self._unsent_pubacks and not mqtt.closed.done():
            self._ids.forget(self._unsent_pubacks)  # before the PUBACKs leave
            mqtt.puback(self._unsent_pubacks)
            self._unsent_pubacks = []

    @property
    def in_flight(self) -> int:
        """Messages received and not yet acknowledged."""
        return len(self._queue)

    # -- MQTT side

    def on_messages(self, batch: list[Incoming]) -> None:
        """Queue a store for every message of `batch` and send them in one write."""
        nats = self._nats
        if not self._accepting or nats is None:
            return  # left unacknowledged: mosquitto sends them again on the next session
        stats = self._stats
        queue = self._queue
        by_token = self._by_token
        token = self._next_token
        now = self._loop.time()
        limit = nats.max_payload
        publish = nats.publish
        entry_of = self._entry
        ignored = False
        spool = self._spool
        # Into the spool: everything behind a record not yet taken from it, else what finds the window full.
        spooling = spool is not None and spool.pending
        can_spool = spool is not None and spool.accepts
        spill_at = self._spill_at
        spilled: list[InFlight] = []
        for message in batch:
            entry = entry_of(message, limit)
            queue.append(entry)
            if entry.stored:
                ignored = True  # nothing to store; acknowledged in its turn
            elif spooling or (can_spool and len(by_token) >= spill_at):
                spooling = True
                spilled.append(entry)
            else:
                token += 1
                entry.token = token
                entry.sent_at = now
                by_token[token] = entry
                publish(entry.subject, entry.headers, entry.body, token)
        self._next_token = token
        stats.received += len(batch)
        self._ids.write()  # the ids given, on disk before their readings leave (or are spooled)
        if spilled:
            ignored |= self._spill(spilled)
        stats.in_flight = len(queue)
        nats.flush()
        if ignored:
            self._release()
        if self._mqtt is not None and (
            len(queue) >= self._high_water or (spool is not None and spool.holding)
        ):
            self._mqtt.pause_reading()

    def _spill(self, entries: list[InFlight]) -> bool:
        """Append `entries` to the spool (then each is acknowledged in its turn); True if written.

        When the spool cannot be written (disk full, say) the entries are published at once, as without
        a spool; a spool that holds nothing then is not used again by this session (one warning).
        """
        spool = self._spool
        assert spool is not None  # noqa: S101 - only called with a spool
        try:
            spool.append([(e.subject, e.headers, e.body, e.dead_letter, e.origin) for e in entries])
        except OSError as exc:
            log.warning(
                "bridge: cannot write the spool (%s); sending to JetStream directly, the backlog waits "
                "with mosquitto",
                exc.strerror or exc,
            )
            self._spool_failed()
            nats = self._nats
            assert nats is not None  # noqa: S101 - on_messages checked
            for entry in entries:
                self._send(nats, entry)
            return False
        for entry in entries:
            entry.stored = True  # for its PUBACK: it is on disk; JetStream gets it from the spool
        self._stats.spooled += len(entries)
        self._feed()
        return True

    def _spool_failed(self) -> None:
        spool = self._spool
        if spool is not None and not spool.pending and spool.empty:
            self._spool = None  # nothing in it to keep in order behind

    def _feed(self) -> None:
        """Publish records from the spool while the window has room (a quarter of it, or all of it)."""
        spool, nats = self._spool, self._nats
        if spool is None or nats is None or nats.closed.done() or not spool.pending:
            return
        room = self._window - len(self._by_token)
        if room <= 0 or (room < self._window // 4 and self._by_token):
            return
        try:
            records = spool.take(room)
        except OSError as exc:
            log.warning("bridge: cannot read the spool (%s); trying again later", exc.strerror or exc)
            return
        from_spool = self._from_spool
        for record in records:
            entry = InFlight(
                0,
                record.subject,
                record.headers,
                record.body,
                record.dead_letter,
                record.origin,
                spool_end=record.end,
            )
            from_spool.append(entry)
            self._send(nats, entry)
        if records:
            nats.flush()
        self._stats.spool_bytes = spool.size

    def _entry(self, message: Incoming, limit: int) -> InFlight:
        """What to publish for one message; `limit` is the NATS server's max_payload."""
        topic, payload, packet_id = message.topic, message.payload, message.packet_id
        given = self._ids.recall(packet_id, topic, payload, dup=True) if message.dup else None
        try:
            outcome = self._translator.translate(
                topic, payload, message.user_properties, message.content_type, event_id=given
            )
        except Exception as exc:
            log.exception("bridge: translating a message from %s failed", topic)
            outcome = Reject(f"internal error while translating: {type(exc).__name__}: {exc}")
        if isinstance(outcome, Forward):
            msg_id = outcome.msg_id
            if outcome.minted:
                self._ids.remember(packet_id, topic, payload, msg_id)
            if "\r" in msg_id or "\n" in msg_id:
                reason = f"event id {msg_id!r} cannot be a dedup id (it has a line break)"
            else:
                # The constant headers around the id, built once (as `headers_block` would build them).
                headers = self._headers_head + msg_id.encode() + self._headers_tail
                if len(headers) + len(outcome.body) <= limit:
                    return InFlight(packet_id, outcome.subject, headers, outcome.body, False, topic)  # noqa: FBT003
                reason = (
                    f"{len(outcome.body)} bytes is more than the NATS server accepts (max_payload {limit})"
                )
        elif isinstance(outcome, Ignore):
            log.debug("bridge: ignoring %s (%s)", topic, outcome.reason)
            return InFlight(packet_id, "", b"", b"", dead_letter=False, origin=topic, stored=True)
        else:
            reason = outcome.reason
        return self._dead_letter_entry(topic, payload, packet_id, reason, limit - DEAD_LETTER_OVERHEAD)

    def _dead_letter_entry(
        self, topic: str, payload: bytes, packet_id: int, reason: str, limit: int
    ) -> InFlight:
        if len(payload) > limit:
            reason = f"{reason} [original {len(payload)} bytes, first {limit} kept]"
            payload = payload[:limit]
        headers = headers_block({REASON_HEADER: header_safe(reason), ORIGIN_HEADER: header_safe(topic)})
        body = dead_letter_body(part=PART, reason=reason, origin=topic, payload=payload)
        log.warning("bridge: dead-lettering a message from %s: %s", topic, reason)
        return InFlight(packet_id, self._deadletter_subject, headers, body, dead_letter=True, origin=topic)

    def _send(self, nats: NatsWire, entry: InFlight) -> None:
        self._next_token += 1
        entry.token = self._next_token
        entry.sent_at = self._loop.time()
        self._by_token[entry.token] = entry
        nats.publish(entry.subject, entry.headers, entry.body, entry.token)

    # -- NATS side

    def on_acks(self, acks: list[StoreAck]) -> None:
        """Mark stored what JetStream acknowledged; PUBACK the stored head of the queue."""
        stats = self._stats
        by_token = self._by_token
        for ack in acks:
            entry = by_token.pop(ack.token, None)
            if entry is None:
                continue  # the answer to an attempt that was re-sent since: the newer one counts
            if ack.error is not None:
                self._refused(entry, ack.error)
                continue
            entry.stored = True
            if ack.duplicate:
                stats.duplicates += 1
            if entry.dead_letter:
                stats.deadlettered += 1
            else:
                stats.stored += 1
        if self._spool is not None:
            self._commit_spool()
        self._release()

    def _commit_spool(self) -> None:
        """Let the spool drop what is stored, up to the first record that is not; feed it on."""
        spool = self._spool
        if spool is None:
            return
        from_spool = self._from_spool
        end = 0
        while from_spool and from_spool[0].stored:
            end = from_spool.popleft().spool_end
        if end:
            try:
                spool.commit(end)
            except OSError as exc:
                log.warning("bridge: cannot update the spool (%s)", exc.strerror or exc)
            self._stats.spool_bytes = spool.size
        self._feed()

    def _release(self) -> None:
        queue = self._queue
        packet_ids: list[int] = []
        while queue and queue[0].stored:
            packet_id = queue.popleft().packet_id
            if packet_id:
                packet_ids.append(packet_id)
        if packet_ids:
            self._backoff.reset()
            mqtt = self._mqtt
            if mqtt is None:
                self._unsent_pubacks += packet_ids
            elif not mqtt.closed.done():
                self._ids.forget(packet_ids)  # before the PUBACKs leave (the id file says so first)
                mqtt.puback(packet_ids)
            # Else the connection is gone and these PUBACKs with it (stores answered after it dropped):
            # mosquitto sends the messages again, and a raw reading must get its id again then.
        self._stats.in_flight = len(queue)
        spool = self._spool
        if len(queue) <= self._low_water and self._mqtt is not None and not (spool and spool.holding):
            self._mqtt.resume_reading()  # a no-op unless paused
        if not queue and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _refused(self, entry: InFlight, error: str) -> None:
        entry.attempts += 1
        delay = self._backoff.next_delay()
        log.warning(
            "bridge: storing a message from %s on %s failed (%s); retrying in %.1fs (attempt %d)",
            entry.origin,
            entry.subject,
            error,
            delay,
            entry.attempts,
        )
        self._loop.call_later(delay, self._retry, entry)

    def _retry(self, entry: InFlight) -> None:
        nats = self._nats
        if entry.stored or nats is None or nats.closed.done():
            return  # stored meanwhile, or this session is over (mosquitto sends it again)
        self._send(nats, entry)
        nats.flush()

    def check_timeouts(self) -> None:
        """Publish again what got no answer within `store_timeout_s` (same dedup id: stored once)."""
        nats = self._nats
        if nats is None or nats.closed.done():
            return
        self._feed()  # records an earlier run left in the spool, once the session is up
        deadline = self._loop.time() - self._store_timeout_s
        late = [entry for entry in self._by_token.values() if entry.sent_at < deadline]
        for entry in late:
            del self._by_token[entry.token]
            entry.attempts += 1
            log.warning(
                "bridge: no JetStream ack for a message from %s within %.0fs; publishing it again",
                entry.origin,
                self._store_timeout_s,
            )
            self._send(nats, entry)
        if late:
            nats.flush()

    # -- shutdown

    def stop_accepting(self) -> asyncio.Future[None]:
        """Take no new messages (they stay with mosquitto); the future is done once nothing is in flight."""
        self._accepting = False
        self._drained = self._loop.create_future()
        if not self._queue:
            self._drained.set_result(None)
        return self._drained
