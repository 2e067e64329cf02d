"""A redelivered reading keeps its first id; two readings never share one (`nerve.bridge.redelivery`)."""

from __future__ import annotations

import itertools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hypothesis import example, given, settings
from hypothesis import strategies as st

from nerve.bridge import redelivery
from nerve.bridge.redelivery import RedeliveredIds

if TYPE_CHECKING:
    import pytest

TOPICS = ("nerve/a/telemetry/cpu", "nerve/b/telemetry/cpu")
PAYLOADS = (b"95", b'{"value": 95}', b"96")


def test_a_redelivery_of_a_remembered_publish_gets_its_id() -> None:
    ids = RedeliveredIds()
    ids.remember(7, TOPICS[0], b"95", "first")
    ids.session(present=True)
    assert ids.recall(7, TOPICS[0], b"95", dup=True) == "first"


def test_only_the_same_publish_redelivered_gets_the_id() -> None:
    ids = RedeliveredIds()
    ids.remember(7, TOPICS[0], b"95", "first")
    assert ids.recall(7, TOPICS[0], b"95", dup=False) is None  # a first delivery is a new message
    assert ids.recall(7, TOPICS[1], b"95", dup=True) is None  # another topic
    assert ids.recall(7, TOPICS[0], b"96", dup=True) is None  # another payload
    assert ids.recall(7, TOPICS[0], b"955", dup=True) is None  # another length
    assert ids.recall(8, TOPICS[0], b"95", dup=True) is None  # another packet id


def test_an_acknowledged_publish_is_forgotten() -> None:
    ids = RedeliveredIds()
    ids.remember(7, TOPICS[0], b"95", "first")
    ids.remember(8, TOPICS[0], b"95", "second")
    ids.forget([7])
    assert ids.recall(7, TOPICS[0], b"95", dup=True) is None
    assert ids.recall(8, TOPICS[0], b"95", dup=True) == "second"
    assert len(ids) == 1


def test_a_session_the_broker_did_not_keep_forgets_everything() -> None:
    ids = RedeliveredIds()
    ids.remember(7, TOPICS[0], b"95", "first")
    ids.session(present=False)
    assert ids.recall(7, TOPICS[0], b"95", dup=True) is None
    assert len(ids) == 0


def test_qos0_is_not_remembered_and_the_memory_is_bounded_by_packet_ids() -> None:
    ids = RedeliveredIds()
    ids.remember(0, TOPICS[0], b"95", "qos0")
    assert len(ids) == 0
    for n in range(3 * 65535):
        ids.remember(n % 65535 + 1, TOPICS[0], b"%d" % n, f"id-{n}")
    assert len(ids) == 65535


def test_the_ids_are_read_back_from_the_file_a_killed_bridge_left(tmp_path: Path) -> None:
    path = tmp_path / "bridge" / "b.ids"
    ids = RedeliveredIds(path)
    ids.remember(7, TOPICS[0], b"95", "first")
    ids.remember(8, TOPICS[1], b"96", "second")
    ids.write()
    ids.forget([8])
    again = RedeliveredIds(path)  # no close: as after kill -9
    assert again.recall(7, TOPICS[0], b"95", dup=True) == "first"
    assert again.recall(8, TOPICS[1], b"96", dup=True) is None
    again.session(present=False)  # the broker forgot the session: so does the file
    assert len(RedeliveredIds(path)) == 0


def test_the_file_holds_a_descriptor_only_between_a_write_and_close(tmp_path: Path) -> None:
    """A descriptor per bridge, not per instance made: the suite's processes make thousands (paho-mqtt's
    select() cannot take a descriptor numbered 1024 or more)."""
    path = tmp_path / "b.ids"
    before = len(list(Path("/proc/self/fd").iterdir()))
    for n in range(200):
        ids = RedeliveredIds(path)
        ids.remember(n % 10 + 1, TOPICS[0], b"95", f"id-{n}")
        ids.write()
        ids.close()
        RedeliveredIds(path)  # read back, never written: no descriptor kept
    assert len(list(Path("/proc/self/fd").iterdir())) == before
    assert len(RedeliveredIds(path)) == 10


def test_lines_that_do_not_read_back_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "b.ids"
    ids = RedeliveredIds(path)
    ids.remember(7, TOPICS[0], b"95", "first")
    ids.write()
    with path.open("ab") as file:
        file.write(b'[8,"nerve/a/telemetry/cpu",2,12\n[9,"x"]\n{"a": 1}\n\xff\n[10,"nerve/a/tel')  # cut short
    again = RedeliveredIds(path)
    assert len(again) == 1
    assert again.recall(7, TOPICS[0], b"95", dup=True) == "first"
    assert "5 line(s) that do not read back skipped" in caplog.text


def test_the_file_is_rewritten_with_what_is_remembered_once_it_is_large(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redelivery, "LOG_REWRITE_BYTES", 2_000)
    path = tmp_path / "b.ids"
    ids = RedeliveredIds(path)
    for n in range(1, 1_000):
        ids.remember(n % 20 + 1, TOPICS[0], b"%d" % n, f"id-{n}")
        ids.write()
        if n % 3 == 0:
            ids.forget([n % 20 + 1])
    assert path.stat().st_size <= 2_000 + 200
    again = RedeliveredIds(path)
    assert len(again) == len(ids)
    for n in range(980, 1_000):
        packet_id = n % 20 + 1
        assert again.recall(packet_id, TOPICS[0], b"%d" % n, dup=True) == ids.recall(
            packet_id, TOPICS[0], b"%d" % n, dup=True
        )


def test_a_data_dir_it_cannot_write_leaves_the_ids_in_memory_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "bridge").write_text("a file where the directory would be")
    ids = RedeliveredIds(tmp_path / "bridge" / "b.ids")
    ids.remember(7, TOPICS[0], b"95", "first")
    ids.write()
    ids.forget([8])
    ids.session(present=True)
    assert ids.recall(7, TOPICS[0], b"95", dup=True) == "first"
    assert "cannot keep reading ids in" in caplog.text


# -- a model of an MQTT v5 broker's persistent session and of the bridge, driven by random steps --------


@dataclass
class Broker:
    """Packet ids from the lowest free one (reused as soon as acknowledged: the hardest case)."""

    queued: list[int] = field(default_factory=list)  # message numbers not yet sent
    inflight: dict[int, int] = field(default_factory=dict)  # packet id -> message number, unacknowledged
    resend: list[int] = field(default_factory=list)  # packet ids to send again (DUP) on this connection

    def free_id(self) -> int:
        return next(n for n in itertools.count(1) if n not in self.inflight)


@dataclass
class World:
    broker: Broker = field(default_factory=Broker)
    ids: RedeliveredIds = field(default_factory=RedeliveredIds)
    messages: list[tuple[str, bytes]] = field(default_factory=list)  # by message number
    read_unacked: list[int] = field(default_factory=list)  # packet ids the bridge read, in order
    given: dict[int, set[str]] = field(default_factory=dict)  # message number -> ids it was stored with
    lost_puback: set[int] = field(default_factory=set)  # messages a PUBACK of which was lost
    fresh: itertools.count[int] = field(default_factory=itertools.count)
    #: The bridge's id file (None: memory only).
    path: Path | None = None

    def __post_init__(self) -> None:
        if self.path is not None:
            self.ids = RedeliveredIds(self.path)

    def publish(self, topic: str, payload: bytes) -> None:
        self.broker.queued.append(len(self.messages))
        self.messages.append((topic, payload))

    def deliver(self, *, read: bool) -> None:
        broker = self.broker
        if broker.resend:
            packet_id, dup = broker.resend.pop(0), True
            number = broker.inflight[packet_id]
        elif broker.queued:
            packet_id, dup = broker.free_id(), False
            number = broker.queued.pop(0)
            broker.inflight[packet_id] = number
        else:
            return
        if not read:  # still in the socket when the connection ends
            return
        topic, payload = self.messages[number]
        event_id = self.ids.recall(packet_id, topic, payload, dup=dup) or f"fresh-{next(self.fresh)}"
        self.ids.remember(packet_id, topic, payload, event_id)
        self.ids.write()  # as the bridge does before the store leaves
        self.given.setdefault(number, set()).add(event_id)
        self.read_unacked.append(packet_id)

    def puback(self, count: int, *, lost: bool) -> None:
        acked, self.read_unacked = self.read_unacked[:count], self.read_unacked[count:]
        self.ids.forget(acked)
        for packet_id in acked:
            if lost:  # written, but the connection ended before the broker read it
                self.lost_puback.add(self.broker.inflight[packet_id])
            else:
                del self.broker.inflight[packet_id]

    def kill(self) -> None:
        """The bridge process is killed (`kill -9`) and started again on its session: it reads its file."""
        assert self.path is not None
        self.ids.close()  # as the kernel does for a killed process
        self.ids = RedeliveredIds(self.path)
        self.reconnect(present=True)

    def reconnect(self, *, present: bool) -> None:
        self.read_unacked = []
        self.ids.session(present=present)
        if present:
            self.broker.resend = list(self.broker.inflight)
        else:
            self.broker = Broker()


STEPS = st.one_of(
    st.tuples(st.just("publish"), st.sampled_from(TOPICS), st.sampled_from(PAYLOADS)),
    st.tuples(st.just("deliver"), st.booleans()),
    st.tuples(st.just("puback"), st.integers(0, 4), st.booleans()),
    st.tuples(st.just("reconnect"), st.booleans()),
)


# Two readings with the same topic and payload under one packet id (reused once the first was
# acknowledged); the second's first delivery is still in the socket when the connection ends.
SAME_PACKET_ID_REUSED = [
    ("publish", TOPICS[0], b"95"),
    ("deliver", True),
    ("puback", 1, False),
    ("publish", TOPICS[0], b"95"),
    ("deliver", False),
    ("reconnect", True),
    ("deliver", True),
]
# The same, but the broker forgot the session (Session Present 0) before the second one.
SESSION_LOST = [
    ("publish", TOPICS[0], b"95"),
    ("deliver", True),
    ("reconnect", False),
    ("publish", TOPICS[0], b"95"),
    ("deliver", False),
    ("reconnect", True),
    ("deliver", True),
]
# Stored, not acknowledged, connection lost: sent again with DUP.
REDELIVERED = [
    ("publish", TOPICS[0], b"95"),
    ("publish", TOPICS[0], b"95"),
    ("deliver", True),
    ("deliver", True),
    ("reconnect", True),
    ("deliver", True),
    ("deliver", True),
]


@settings(max_examples=1000, deadline=None)
@given(st.lists(STEPS, max_size=60))
@example(SAME_PACKET_ID_REUSED)
@example(SESSION_LOST)
@example(REDELIVERED)
def test_no_two_readings_share_an_id_and_a_redelivery_keeps_its_id(steps: list[tuple[object, ...]]) -> None:
    check(World(), steps)


KILLED = [
    ("publish", TOPICS[0], b"95"),
    ("publish", TOPICS[0], b"95"),
    ("deliver", True),
    ("deliver", True),
    ("kill",),
    ("deliver", True),
    ("deliver", True),
]
# Acknowledged, its packet id reused for the same reading again, then a kill before the second is read.
KILLED_AFTER_REUSE = [
    ("publish", TOPICS[0], b"95"),
    ("deliver", True),
    ("puback", 1, False),
    ("publish", TOPICS[0], b"95"),
    ("deliver", False),
    ("kill",),
    ("deliver", True),
]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(STEPS, st.just(("kill",))), max_size=60))
@example(KILLED)
@example(KILLED_AFTER_REUSE)
def test_a_killed_bridge_reads_its_ids_back_and_the_same_holds(steps: list[tuple[object, ...]]) -> None:
    """The same, with the bridge's id file, and the bridge killed and started again at any step."""
    with tempfile.TemporaryDirectory() as directory:
        check(World(path=Path(directory) / "bridge" / "b.ids"), steps)


def check(world: World, steps: list[tuple[object, ...]]) -> None:
    for step in steps:
        match step:
            case ("publish", str(topic), bytes(payload)):
                world.publish(topic, payload)
            case ("deliver", bool(read)):
                world.deliver(read=read)
            case ("puback", int(count), bool(lost)):
                world.puback(count, lost=lost)
                if lost:
                    world.reconnect(present=True)  # a lost PUBACK means the connection ended
            case ("reconnect", bool(present)):
                world.reconnect(present=present)
            case ("kill",):
                world.kill()
    world.ids.close()
    assert_one_id_each(world)


def assert_one_id_each(world: World) -> None:
    """No id was given to two readings; a reading none of whose PUBACKs was lost was stored under one."""
    owners: dict[str, int] = {}
    for number, event_ids in world.given.items():
        for event_id in event_ids:
            assert owners.setdefault(event_id, number) == number, f"{event_id} given to two readings"
        if number not in world.lost_puback:
            assert len(event_ids) == 1, f"reading {number} stored under {sorted(event_ids)}"
