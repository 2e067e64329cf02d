"""The uplink pump against fake wires: PUBACK order, retries, timeouts, dead letters, bounds, draining."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

import msgpack
import pytest

from nerve.bridge.natswire import StoreAck, headers_block
from nerve.bridge.pump import Pump
from nerve.bridge.redelivery import RedeliveredIds
from nerve.bridge.spool import Spool
from nerve.bridge.stats import BridgeStats
from nerve.runtime.config.settings import DEFAULT_METRICS
from nerve.runtime.envelope.codec import (
    CONTENT_TYPE_HEADER,
    Codec,
    decode,
    is_msgpack_map,
    to_json,
    to_msgpack,
)
from nerve.runtime.envelope.model import Event
from nerve.runtime.jetstream.client import MSG_ID_HEADER
from nerve.runtime.wire.mqtt import Incoming

if TYPE_CHECKING:
    from pathlib import Path

    from nerve.bridge.natswire import NatsWire
    from nerve.runtime.wire.mqtt import MqttWire


class FakeNats:
    def __init__(self, max_payload: int = 1024 * 1024) -> None:
        self.max_payload = max_payload
        self.published: list[tuple[str, bytes, bytes, int]] = []
        self.flushes = 0
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def publish(self, subject: str, headers: bytes, body: bytes, token: int) -> None:
        self.published.append((subject, headers, body, token))

    def flush(self) -> None:
        self.flushes += 1

    def tokens(self) -> list[int]:
        return [token for *_, token in self.published]


class FakeMqtt:
    def __init__(self) -> None:
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pubacks: list[list[int]] = []
        self.paused = False
        self.pauses = 0

    def puback(self, packet_ids: list[int]) -> None:
        self.pubacks.append(list(packet_ids))

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False


def make_pump(
    *,
    max_in_flight: int = 100,
    store_timeout_s: float = 5.0,
    max_payload: int = 65536,
    nats_max: int = 1 << 20,
    attach_mqtt: bool = True,
    codec: Codec = Codec.MSGPACK,
    ids: RedeliveredIds | None = None,
    spool: Spool | None = None,
) -> tuple[Pump, FakeNats, FakeMqtt, BridgeStats]:
    stats = BridgeStats()
    pump = Pump(
        loop=asyncio.get_running_loop(),
        stats=stats,
        prefix="nerve",
        metrics=DEFAULT_METRICS,
        max_payload=max_payload,
        mappings=(),
        store_timeout_s=store_timeout_s,
        max_in_flight=max_in_flight,
        codec=codec,
        ids=ids,
        spool=spool,
    )
    nats, mqtt = FakeNats(nats_max), FakeMqtt()
    pump.attach_nats(cast("NatsWire", nats))
    if attach_mqtt:
        pump.attach_mqtt(cast("MqttWire", mqtt))
    return pump, nats, mqtt, stats


def is_paused(mqtt: FakeMqtt) -> bool:
    return mqtt.paused


def reading(device: str, value: int, packet_id: int) -> Incoming:
    return Incoming(f"nerve/{device}/telemetry/cpu", str(value).encode(), packet_id)


def ok(token: int, *, duplicate: bool = False) -> StoreAck:
    return StoreAck(token, None, duplicate=duplicate)


async def test_pubacks_follow_receive_order_whatever_order_the_stores_finish_in() -> None:
    pump, nats, mqtt, stats = make_pump()
    pump.on_messages([reading("a", 1, 11), reading("b", 2, 0), reading("c", 3, 13)])
    assert nats.flushes == 1  # one write for the batch
    assert [subject for subject, *_ in nats.published] == [
        "nerve.a.telemetry.cpu",
        "nerve.b.telemetry.cpu",
        "nerve.c.telemetry.cpu",
    ]
    t1, t2, t3 = nats.tokens()
    pump.on_acks([ok(t3)])
    assert mqtt.pubacks == []  # 11 is not stored yet: nothing behind it may be acknowledged
    assert stats.in_flight == 3
    pump.on_acks([ok(t1)])
    assert mqtt.pubacks == [[11]]
    pump.on_acks([ok(t2, duplicate=True)])
    assert mqtt.pubacks == [[11], [13]]  # the QoS0 message (packet id 0) needs no PUBACK
    assert (stats.received, stats.stored, stats.duplicates, stats.in_flight) == (3, 3, 1, 0)


async def test_a_refused_store_is_retried_and_holds_back_what_follows() -> None:
    pump, nats, mqtt, stats = make_pump()
    pump.on_messages([reading("a", 1, 1), reading("a", 2, 2)])
    t1, t2 = nats.tokens()
    pump.on_acks([StoreAck(t1, "JetStream refused it: insufficient resources", duplicate=False), ok(t2)])
    assert mqtt.pubacks == []
    async with asyncio.timeout(5):
        while len(nats.published) < 3:
            await asyncio.sleep(0.01)
    subject, headers, body, retry = nats.published[2]
    assert (subject, headers, body) == nats.published[0][:3]  # the same message, same dedup id
    pump.on_acks([ok(t1)])  # the first attempt's token is no longer awaited: ignored
    assert mqtt.pubacks == []
    pump.on_acks([ok(retry)])
    assert mqtt.pubacks == [[1, 2]]
    assert stats.stored == 2


async def test_a_store_left_unanswered_is_published_again() -> None:
    pump, nats, mqtt, _ = make_pump(store_timeout_s=0.05)
    pump.on_messages([reading("a", 1, 1)])
    pump.check_timeouts()
    assert len(nats.published) == 1  # not late yet
    await asyncio.sleep(0.1)
    pump.check_timeouts()
    assert len(nats.published) == 2
    assert nats.published[0][:3] == nats.published[1][:3]
    pump.on_acks([ok(nats.tokens()[1])])
    assert mqtt.pubacks == [[1]]


@pytest.mark.parametrize("codec", list(Codec))
async def test_stores_carry_the_cloudevents_content_type_of_the_codec(codec: Codec) -> None:
    pump, nats, _, _ = make_pump(codec=codec)
    event = Event(source="t", type="nerve.telemetry.cpu", subject="pi", data={"value": 1})
    pump.on_messages(
        [
            Incoming("nerve/pi/telemetry/cpu", to_msgpack(event), 1),
            Incoming("nerve/pi/telemetry/cpu", to_json(event), 2),
            Incoming("nerve/pi/telemetry/cpu", b"12.5", 3),
        ]
    )
    for _, headers, body, _ in nats.published:
        stored = decode(body, Event)
        # The pump builds the constant part once: byte for byte what headers_block makes.
        assert headers == headers_block(
            {MSG_ID_HEADER: stored.id, CONTENT_TYPE_HEADER: f"application/cloudevents+{codec.value}"}
        )
        assert is_msgpack_map(body) is (codec is Codec.MSGPACK)
        assert stored.subject == "pi"
    assert [decode(body, Event) for _, _, body, _ in nats.published[:2]] == [event, event]


async def test_bad_input_is_dead_lettered_with_reason_and_bytes() -> None:
    pump, nats, mqtt, stats = make_pump()
    bad_id = Event(id="x\r\nNats-Expected-Stream: X", source="t", type="t", subject="pi", data={"value": 1})
    pump.on_messages(
        [
            Incoming("nerve/pi/telemetry/nope", b"1", 1),
            Incoming("elsewhere/pi", b"2", 2),
            Incoming("nerve/pi/telemetry/cpu", to_msgpack(bad_id), 3),
        ]
    )
    records = [msgpack.unpackb(body) for _, _, body, _ in nats.published]
    assert [subject for subject, *_ in nats.published] == ["nerve.deadletter.bridge"] * 3
    assert "unknown metric 'nope'" in records[0]["reason"]
    assert "matches no mapping" in records[1]["reason"]
    assert "line break" in records[2]["reason"]
    assert [r["origin"] for r in records] == [
        "nerve/pi/telemetry/nope",
        "elsewhere/pi",
        "nerve/pi/telemetry/cpu",
    ]
    assert records[0]["payload"] == b"1"
    assert all(
        b"Nerve-Reason: " in headers and b"\r\nNats-Expected" not in headers
        for _, headers, _, _ in nats.published
    )
    pump.on_acks([ok(t) for t in nats.tokens()])
    assert mqtt.pubacks == [[1, 2, 3]]
    assert (stats.deadlettered, stats.stored) == (3, 0)


async def test_what_nats_cannot_take_is_dead_lettered_and_cut_to_fit() -> None:
    pump, nats, _, _ = make_pump(max_payload=60_000, nats_max=8192)
    big = Event(source="t", type="t", subject="pi", data={"value": 1, "blob": "x" * 10_000})
    pump.on_messages([Incoming("nerve/pi/events/big", to_msgpack(big), 1)])
    subject, _, body, _ = nats.published[0]
    record = msgpack.unpackb(body)
    assert subject == "nerve.deadletter.bridge"
    assert "more than the NATS server accepts (max_payload 8192)" in record["reason"]
    assert "first 4096 kept" in record["reason"]
    assert record["payload"] == to_msgpack(big)[:4096]


async def test_reading_pauses_at_the_bound_and_resumes_at_half() -> None:
    pump, nats, mqtt, _ = make_pump(max_in_flight=4)
    pump.on_messages([reading("a", i, i + 1) for i in range(3)])
    assert mqtt.pauses == 0
    pump.on_messages([reading("a", 3, 4)])
    assert is_paused(mqtt)
    tokens = nats.tokens()
    pump.on_acks([ok(tokens[0])])
    assert is_paused(mqtt)  # 3 in flight: above half
    pump.on_acks([ok(tokens[1])])
    assert not is_paused(mqtt)
    assert mqtt.pauses == 1


async def test_stop_accepting_leaves_new_messages_with_the_broker_and_waits_for_the_rest() -> None:
    pump, nats, mqtt, stats = make_pump()
    pump.on_messages([reading("a", 1, 1)])
    drained = pump.stop_accepting()
    pump.on_messages([reading("a", 2, 2)])
    assert len(nats.published) == 1
    assert stats.received == 1
    assert not drained.done()
    pump.on_acks([ok(nats.tokens()[0])])
    assert drained.done()
    assert mqtt.pubacks == [[1]]  # 2 was never taken: mosquitto sends it again


async def test_pubacks_earned_before_mqtt_is_attached_go_out_on_attach() -> None:
    pump, nats, mqtt, _ = make_pump(attach_mqtt=False)
    pump.on_messages([reading("a", 1, 5)])
    pump.on_acks([ok(nats.tokens()[0])])
    assert mqtt.pubacks == []
    pump.attach_mqtt(cast("MqttWire", mqtt))
    assert mqtt.pubacks == [[5]]


@pytest.mark.parametrize("closed", [True, False])
async def test_retries_stop_when_the_session_is_over(closed: bool) -> None:
    pump, nats, _, _ = make_pump(store_timeout_s=0.01)
    pump.on_messages([reading("a", 1, 1)])
    if closed:
        nats.closed.set_result(None)
    await asyncio.sleep(0.05)
    pump.check_timeouts()
    assert len(nats.published) == (1 if closed else 2)


def stored_ids(nats: FakeNats) -> list[str]:
    """The `Nats-Msg-Id` of every publish, and check it is the id inside the stored event too."""
    found = []
    for _, headers, body, _ in nats.published:
        line = next(h for h in headers.split(b"\r\n") if h.startswith(MSG_ID_HEADER.encode()))
        msg_id = line.split(b": ", 1)[1].decode()
        assert decode(body, Event).id == msg_id
        found.append(msg_id)
    return found


async def test_a_raw_reading_sent_again_after_a_reconnect_keeps_the_id_of_its_first_delivery() -> None:
    ids = RedeliveredIds()
    first, nats1, mqtt1, _ = make_pump(ids=ids)
    first.on_connack(False)
    # Two readings with the same payload are two readings; the third is acknowledged before the end.
    first.on_messages([reading("a", 95, 1), reading("a", 95, 2), reading("b", 7, 3)])
    a1, a2, b1 = stored_ids(nats1)
    assert len({a1, a2, b1}) == 3
    t1, t2, _t3 = nats1.tokens()
    first.on_acks([ok(t1), ok(t2)])  # stored; their PUBACKs went. 3 is stored but not acknowledged:
    assert mqtt1.pubacks == [[1, 2]]
    # the connection ends; on the resumed session mosquitto sends 3 again (DUP), then new ones that
    # reuse the acknowledged packet ids 1 and 2 (first deliveries: new readings, even with equal payloads).
    second, nats2, _, _ = make_pump(ids=ids)
    second.on_connack(True)
    second.on_messages(
        [
            reading("b", 7, 3)._replace(dup=True),
            reading("a", 95, 1),
            reading("a", 95, 2)._replace(dup=True),  # not remembered (acknowledged): a fresh id
        ]
    )
    b2, a3, a4 = stored_ids(nats2)
    assert b2 == b1
    assert len({a1, a2, b1, a3, a4}) == 5


async def test_a_store_answered_after_the_connection_dropped_keeps_its_id_for_the_redelivery() -> None:
    """Its PUBACK could not go: mosquitto sends the reading again, and it must not get a second id."""
    ids = RedeliveredIds()
    first, nats1, mqtt1, _ = make_pump(ids=ids)
    first.on_messages([reading("a", 95, 1), reading("a", 96, 2)])
    t1, t2 = nats1.tokens()
    first.on_acks([ok(t1)])  # acknowledged while connected: forgotten
    mqtt1.closed.set_exception(ConnectionResetError())
    mqtt1.closed.exception()
    first.on_acks([ok(t2)])  # stored after the drop: no PUBACK went
    assert mqtt1.pubacks == [[1]]
    second, nats2, _, _ = make_pump(ids=ids)
    second.on_connack(True)
    second.on_messages([reading("a", 96, 2)._replace(dup=True)])
    assert stored_ids(nats2) == stored_ids(nats1)[1:]


async def test_a_session_the_broker_forgot_gives_fresh_ids() -> None:
    ids = RedeliveredIds()
    first, nats1, _, _ = make_pump(ids=ids)
    first.on_messages([reading("a", 95, 1)])
    second, nats2, _, _ = make_pump(ids=ids)
    second.on_connack(False)
    second.on_messages([reading("a", 95, 1)._replace(dup=True)])
    assert stored_ids(nats2) != stored_ids(nats1)


async def test_an_enveloped_reading_keeps_its_own_id_and_is_not_remembered() -> None:
    ids = RedeliveredIds()
    pump, nats, _, _ = make_pump(ids=ids)
    event = Event(id="own-1", source="s", type="nerve.telemetry.cpu", subject="a", data={"value": 1})
    pump.on_messages([Incoming("nerve/a/telemetry/cpu", to_msgpack(event), 5, dup=True)])
    assert stored_ids(nats) == ["own-1"]
    assert len(ids) == 0


# -- with a spool


def values_of(nats: FakeNats, start: int = 0) -> list[int]:
    return [decode(body, Event).data["value"] for _, _, body, _ in nats.published[start:]]


async def test_what_finds_the_window_full_is_spooled_acknowledged_and_stored_from_the_spool_in_order(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "b.spool", budget=1 << 30)
    pump, nats, mqtt, stats = make_pump(max_in_flight=4, spool=spool)
    pump.on_messages([reading("a", v, v) for v in range(1, 11)])
    # Half the window direct (then JetStream is behind), the rest to the spool, and from it what the
    # window has room for.
    assert values_of(nats) == [1, 2, 3, 4]
    assert stats.spooled == 8
    assert mqtt.pubacks == []  # 1 and 2 not stored yet: what is behind them waits its turn
    pump.on_acks([ok(t) for t in nats.tokens()])
    assert mqtt.pubacks == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]  # the spooled ones too: they are on disk
    assert not mqtt.paused  # mosquitto may send more: behind the spool's records, into it
    assert values_of(nats, 4) == [5, 6, 7, 8]  # from the spool, the whole window
    pump.on_messages([reading("a", 11, 11)])
    assert values_of(nats, 8) == []  # behind the spooled 9 and 10, never past them
    while len(nats.published) < 11:
        before = len(nats.published)
        pump.on_acks([ok(t) for t in nats.tokens()[before - 4 if before > 4 else 0 :]])
        assert len(nats.published) > before
    assert values_of(nats) == list(range(1, 12))
    pump.on_acks([ok(t) for t in nats.tokens()[-3:]])
    assert spool.empty
    assert (tmp_path / "b.spool").stat().st_size == 16
    assert stats.stored == 11
    spool.close()


async def test_a_new_session_publishes_again_what_the_spool_gave_the_last_one(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "b.spool", budget=1 << 30)
    pump, nats, _, _ = make_pump(max_in_flight=4, spool=spool)
    pump.on_messages([reading("a", v, v) for v in range(1, 5)])
    pump.on_acks([ok(t) for t in nats.tokens()[:2]])
    assert values_of(nats) == [1, 2, 3, 4]  # 3 and 4 from the spool, unanswered: the session ends
    sent_before = nats.published[2:]
    again, nats2, _, _ = make_pump(max_in_flight=4, spool=spool)
    again.check_timeouts()  # what the bridge's watch does every second: feeds the spool
    assert [p[:3] for p in nats2.published] == [p[:3] for p in sent_before]  # same dedup ids
    spool.close()


async def test_a_full_spool_stops_reading_until_everything_in_it_is_stored(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "b.spool", budget=200)
    pump, nats, mqtt, _ = make_pump(max_in_flight=2, spool=spool)
    pump.on_messages([reading("a", v, v) for v in range(1, 8)])
    assert spool.holding
    assert is_paused(mqtt)  # the backlog waits with mosquitto again
    while not spool.empty:
        pump.on_acks([ok(t) for t in nats.tokens()[-2:]])
        if not spool.empty:
            assert is_paused(mqtt)
    assert not is_paused(mqtt)
    assert values_of(nats) == list(range(1, 8))
    spool.close()


async def test_a_spool_that_cannot_be_written_sends_to_jetstream_directly(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "b.spool", budget=1 << 30)
    spool.close()  # its descriptor is gone: every write fails
    pump, nats, mqtt, stats = make_pump(max_in_flight=2, spool=spool)
    pump.on_messages([reading("a", v, v) for v in range(1, 5)])
    assert values_of(nats) == [1, 2, 3, 4]  # nothing lost, nothing spooled
    assert stats.spooled == 0
    pump.on_acks([ok(t) for t in nats.tokens()])
    assert mqtt.pubacks == [[1, 2, 3, 4]]
