"""Redelivered readings keep their first id: which event id each unacknowledged PUBLISH was given.

A reading without an id of its own (`95`, `{"value": 95}`) is wrapped into an Event with a fresh id, its
JetStream dedup id. When the uplink's connection ends with such readings stored but not yet PUBACKed,
mosquitto sends them again on the resumed session (DUP set, same packet id): wrapped again with another
fresh id, each would be stored twice. So the bridge remembers, for every PUBLISH it gave an id and has
not acknowledged, packet id → (topic, payload, id), across its sessions, and a redelivery gets the id of
its first delivery: JetStream's duplicate window (`Nats-Msg-Id`) then stores it once.

Two different readings are never given one id, even with identical payloads (a device that publishes
`95` twice has published two readings):

- an id is reused only for a PUBLISH with DUP set, on a resumed session (Session Present), whose packet
  id, topic and payload are those remembered. While we have not acknowledged a packet id the broker may
  not give it to another message, so on a resumed session that PUBLISH is the same message;
- an entry is forgotten when its PUBACK is written: the broker may then reuse the packet id for another
  message. (If that PUBACK is lost with the connection, the broker sends the reading again and it gets
  a fresh id: stored twice, as before. A PUBACK written to a live connection is rarely lost.)
- a session the broker did not keep (Session Present 0) forgets everything: nothing of it comes again.

The bridge's memory only: a bridge process that is killed forgets, and the readings mosquitto sends its
successor again are stored twice (at-least-once, as the architecture promises).

Bounded: keyed by packet id (16 bits), so at most 65,535 entries, and in practice the bridge's in-flight
window (`bridge.max_in_flight`). An entry holds a digest of the payload, not the payload: a few dozen
bytes each, whatever the payload's size (two payloads of one length and topic under one packet id whose
64-bit hashes collide would be taken for one: about one chance in 10^19, after everything above).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Iterable


class _Given(NamedTuple):
    topic: str
    size: int
    digest: int
    event_id: str


class RedeliveredIds:
    """Packet id → the event id the bridge gave that unacknowledged PUBLISH; see the module docstring."""

    __slots__ = ("_given",)

    def __init__(self) -> None:
        self._given: dict[int, _Given] = {}

    def __len__(self) -> int:
        return len(self._given)

    def session(self, *, present: bool) -> None:
        """A new MQTT session began: without Session Present the broker forgot ours, so do we."""
        if not present:
            self._given.clear()

    def recall(self, packet_id: int, topic: str, payload: bytes, *, dup: bool) -> str | None:
        """The id given to this PUBLISH's first delivery, if it is a redelivery of one we remember."""
        if not dup:
            return None  # a first delivery: even a remembered packet id is then another message
        given = self._given.get(packet_id)
        if (
            given is None
            or given.topic != topic
            or given.size != len(payload)
            or given.digest != hash(payload)
        ):
            return None
        return given.event_id

    def remember(self, packet_id: int, topic: str, payload: bytes, event_id: str) -> None:
        """PUBLISH `packet_id` (`topic`, `payload`) was given `event_id`; no-op at QoS0 (packet id 0)."""
        if packet_id:
            self._given[packet_id] = _Given(topic, len(payload), hash(payload), event_id)

    def forget(self, packet_ids: Iterable[int]) -> None:
        """Their PUBACKs are written: the broker may give these packet ids to other messages now."""
        given = self._given
        if given:
            for packet_id in packet_ids:
                given.pop(packet_id, None)
