"""The outbox without brokers: ids, order, reopening, the size cap, a full disk."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import uuid
from typing import TYPE_CHECKING

import pytest

from nerve.edge.outbox import Outbox, OutboxError, OutboxKind, read_boot_id

if TYPE_CHECKING:
    from pathlib import Path

    from tests.conftest import TinyTmpfs

DEVICE = "pi-01"
BOOT = "0b7f6f3e-1111-4222-8333-444455556666"
T, E, R = OutboxKind.TELEMETRY, OutboxKind.EVENTS, OutboxKind.RESULTS


def body(size: int = 10) -> object:
    return lambda event_id: event_id.encode().ljust(size, b"x")


def add(
    outbox: Outbox, kind: OutboxKind = T, topic: str = "nerve/pi-01/telemetry/cpu", size: int = 10
) -> int:
    entry, _ = outbox.add(kind, topic, body(size))  # type: ignore[arg-type]
    return entry.seq


def drain(outbox: Outbox) -> list[int]:
    sent = []
    while batch := outbox.peek(3):
        for entry in batch:
            sent.append(entry.seq)
            outbox.ack(entry)
    return sent


def degraded(outbox: Outbox) -> str | None:
    # A call, not the property: mypy would keep the narrowing of an earlier assert on it.
    return outbox.degraded


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "outbox.sqlite3"


def test_read_boot_id(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "boot_id").write_text(BOOT + "\n")
    assert read_boot_id(tmp_path / "boot_id") == BOOT
    with caplog.at_level(logging.WARNING, logger="nerve.edge.outbox"):
        made = read_boot_id(tmp_path / "missing")
    assert str(uuid.UUID(made)) == made
    assert "no boot id" in caplog.text


def test_ids_are_device_boot_and_sequence(path: Path) -> None:
    with Outbox(path, device=DEVICE, boot_id=BOOT) as outbox:
        entry, dropped = outbox.add(T, "nerve/pi-01/telemetry/cpu", lambda event_id: event_id.encode())
        assert dropped == 0
        assert entry.id == f"{DEVICE}.{BOOT}.1"
        assert entry.payload == entry.id.encode()
        assert add(outbox) == 2


def test_entries_go_out_in_order_results_and_events_first(path: Path) -> None:
    with Outbox(path, device=DEVICE, boot_id=BOOT) as outbox:
        kinds = [T, T, E, T, R, T, E]
        seqs = [add(outbox, kind) for kind in kinds]
        assert len(outbox) == len(kinds)
        assert drain(outbox) == [3, 5, 7, 1, 2, 4, 6]
        assert len(outbox) == 0
        assert outbox.size_bytes == 0
        assert seqs == list(range(1, 8))


def test_an_entry_stays_until_acked_and_survives_reopening(path: Path) -> None:
    with Outbox(path, device=DEVICE, boot_id=BOOT) as outbox:
        for _ in range(5):
            add(outbox)
        first, second = outbox.peek(2)
        outbox.ack(first)
        outbox.ack(first)  # twice: nothing more happens
        assert [e.seq for e in outbox.peek(10)] == [2, 3, 4, 5]
        size = outbox.size_bytes
    # A restart (even after kill -9: every add is its own committed transaction).
    with Outbox(path, device=DEVICE, boot_id="another-boot") as outbox:
        assert [e.seq for e in outbox.peek(10)] == [2, 3, 4, 5]
        assert outbox.peek(10)[0] == second  # the same bytes and id: JetStream dedups a resend
        assert outbox.size_bytes == size
        # The sequence goes on: a new entry never reuses an id, even with all old ones deleted.
        drain(outbox)
        entry, _ = outbox.add(T, "t", body())  # type: ignore[arg-type]
        assert entry.seq == 6
        assert entry.id == f"{DEVICE}.another-boot.6"


def test_cap_drops_oldest_telemetry_keeps_events_and_results_and_counts(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cap = 64 * 1024
    with Outbox(path, device=DEVICE, boot_id=BOOT, max_bytes=cap) as outbox:
        kinds = [E if i % 10 == 0 else R if i % 10 == 5 else T for i in range(200)]
        with caplog.at_level(logging.WARNING, logger="nerve.edge.outbox"):
            dropped = [outbox.add(kind, "t", body(1000))[1] for kind in kinds]  # type: ignore[arg-type]
        assert outbox.size_bytes <= cap
        assert sum(dropped) == outbox.dropped > 0
        kept = outbox.peek(1000)
        kept_seqs = {entry.seq for entry in kept}
        # Every event and result is still there, in order, ahead of telemetry.
        precious = [i + 1 for i, kind in enumerate(kinds) if kind is not T]
        assert [entry.seq for entry in kept[: len(precious)]] == precious
        # The telemetry that is left is the newest: everything dropped is older than everything kept.
        telemetry = [i + 1 for i, kind in enumerate(kinds) if kind is T]
        gone = [seq for seq in telemetry if seq not in kept_seqs]
        assert len(gone) == outbox.dropped
        assert max(gone) < min(seq for seq in telemetry if seq in kept_seqs)
        assert "dropped the" in caplog.text
        assert "events and command results are kept" in caplog.text
        total = outbox.dropped
    with Outbox(path, device=DEVICE, boot_id=BOOT, max_bytes=cap) as outbox:
        assert outbox.dropped == total  # the count is kept in the file


def test_events_and_results_are_never_dropped_even_past_the_cap(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cap = 64 * 1024
    with Outbox(path, device=DEVICE, boot_id=BOOT, max_bytes=cap) as outbox:
        with caplog.at_level(logging.WARNING, logger="nerve.edge.outbox"):
            for i in range(100):
                add(outbox, E if i % 2 else R, size=1000)
            # A reading now is the oldest telemetry: it goes at once.
            assert outbox.add(T, "t", body(1000))[1] == 1  # type: ignore[arg-type]
        assert len(outbox) == 100
        assert outbox.size_bytes > cap
        assert outbox.dropped == 1
        assert caplog.text.count("never dropped") == 1


def test_a_schema_from_another_version_is_refused(path: Path) -> None:
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA user_version = 99")
    connection.close()
    with pytest.raises(OutboxError, match="schema 99"):
        Outbox(path, device=DEVICE, boot_id=BOOT)


def fill(outbox: Outbox) -> None:
    """Let SQLite have no more pages than it uses now: the next write fails with SQLITE_FULL."""
    connection = outbox._connection
    assert connection is not None
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    pages = connection.execute("PRAGMA page_count").fetchone()[0]
    connection.execute(f"PRAGMA max_page_count = {pages}")


def test_a_full_database_keeps_entries_in_memory_in_order(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Outbox(path, device=DEVICE, boot_id=BOOT) as outbox:
        before = [add(outbox, size=100) for _ in range(3)]
        fill(outbox)
        with caplog.at_level(logging.WARNING, logger="nerve.edge.outbox"):
            during = [add(outbox, size=2000) for _ in range(20)]
            during.append(add(outbox, E, size=2000))
        assert outbox.degraded is not None
        assert "database or disk is full" in outbox.degraded
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1  # said once, not per message
        assert "cannot be written (database or disk is full)" in errors[0].getMessage()
        assert "publishing directly" in errors[0].getMessage()
        # Stored entries first, then memory, each in the order added; acks work for both.
        assert drain(outbox) == before + during
        assert len(outbox) == 0
        # Room again: the next add goes to the file and says so.
        outbox._connection.execute("PRAGMA max_page_count = 1000000")  # type: ignore[union-attr]
        with caplog.at_level(logging.WARNING, logger="nerve.edge.outbox"):
            add(outbox)
        assert degraded(outbox) is None
        assert "can be written again" in caplog.text


def test_memory_moves_back_into_the_file_in_order(path: Path) -> None:
    with Outbox(path, device=DEVICE, boot_id=BOOT) as outbox:
        add(outbox, size=100)
        fill(outbox)
        for _ in range(5):
            add(outbox, size=2000)
        outbox._connection.execute("PRAGMA max_page_count = 1000000")  # type: ignore[union-attr]
        add(outbox)
        assert degraded(outbox) is None
    with Outbox(path, device=DEVICE, boot_id=BOOT) as outbox:
        assert drain(outbox) == [1, 2, 3, 4, 5, 6, 7]


def test_an_ack_that_cannot_be_written_does_not_send_the_entry_again(path: Path) -> None:
    with Outbox(path, device=DEVICE, boot_id=BOOT) as outbox:
        for _ in range(4):
            add(outbox)
        first, *_ = outbox.peek(1)
        outbox._connection.execute("PRAGMA query_only = ON")  # type: ignore[union-attr]
        outbox.ack(first)
        assert outbox.degraded is not None
        assert [e.seq for e in outbox.peek(10)] == [2, 3, 4]
        outbox._connection.execute("PRAGMA query_only = OFF")  # type: ignore[union-attr]
        add(outbox)
        assert [e.seq for e in outbox.peek(10)] == [2, 3, 4, 5]
    with Outbox(path, device=DEVICE, boot_id=BOOT) as outbox:
        assert [e.seq for e in outbox.peek(10)] == [2, 3, 4, 5]


def test_a_file_that_cannot_be_opened_means_memory_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with caplog.at_level(logging.ERROR, logger="nerve.edge.outbox"):
        outbox = Outbox(blocker / "outbox.sqlite3", device=DEVICE, boot_id=BOOT)
    with outbox:
        assert "cannot be opened" in caplog.text
        seqs = [add(outbox) for _ in range(3)]
        assert seqs[0] > 10**12  # far past any sequence the file could hold
        assert drain(outbox) == seqs
        add(outbox)
    assert "1 message(s) that only memory held" in caplog.text


def test_a_really_full_disk(tmp_path: Path, caplog: pytest.LogCaptureFixture, tiny_tmpfs: TinyTmpfs) -> None:
    with (
        tiny_tmpfs(tmp_path / "disk", "512k") as disk,
        Outbox(disk / "outbox", device=DEVICE, boot_id=BOOT) as outbox,
    ):
        add(outbox)
        with (disk / "filler").open("wb", buffering=0) as filler, contextlib.suppress(OSError):
            while True:
                filler.write(b"\0" * 4096)
        with caplog.at_level(logging.ERROR, logger="nerve.edge.outbox"):
            seqs = [add(outbox, size=4000) for _ in range(50)]
        assert outbox.degraded is not None
        assert "cannot be written" in caplog.text
        assert drain(outbox) == [1, *seqs]
