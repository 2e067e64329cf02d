"""Unit tests of nerve.edge.journal: the persistent record of started and finished command ids."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pytest

from nerve.edge.journal import (
    DEFAULT_RETENTION_S,
    CommandJournal,
    JournalEntry,
    JournalError,
    JournalState,
    journal_path,
)
from nerve.runtime.config.settings import Settings
from nerve.runtime.errors import NerveError

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

NOW = 1_700_000_000.0
DAY = 86400.0


class Clock:
    """A settable Unix clock."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "journal.sqlite3"


@pytest.fixture
def journal(path: Path, clock: Clock) -> Iterator[CommandJournal]:
    with CommandJournal(path, clock=clock) as opened:
        yield opened


def test_unknown_id_has_no_entry(journal: CommandJournal) -> None:
    assert journal.lookup("never-seen") is None


def test_start_then_finish(journal: CommandJournal) -> None:
    assert journal.start("c1", expires=at(NOW + 60)) is True
    assert journal.lookup("c1") == JournalEntry(
        command_id="c1", state=JournalState.STARTED, result=None, recorded_at=NOW, expires_at=NOW + 60
    )
    assert journal.finish("c1", b"\x81\xa2id\xa1r", expires=at(NOW + 60)) is True
    entry = journal.lookup("c1")
    assert entry is not None
    assert entry.state is JournalState.FINISHED
    assert entry.result == b"\x81\xa2id\xa1r"


def test_start_refuses_an_id_seen_before(journal: CommandJournal) -> None:
    assert journal.start("c1", expires=at(NOW + 60)) is True
    assert journal.start("c1", expires=at(NOW + 60)) is False
    journal.finish("c1", b"done", expires=at(NOW + 60))
    assert journal.start("c1", expires=at(NOW + 60)) is False
    entry = journal.lookup("c1")
    assert entry is not None
    assert entry.state is JournalState.FINISHED


def test_a_refusal_is_recorded_without_a_start(journal: CommandJournal) -> None:
    assert journal.finish("c1", b"rejected", expires=at(NOW - 5)) is True
    entry = journal.lookup("c1")
    assert entry is not None
    assert (entry.state, entry.result) == (JournalState.FINISHED, b"rejected")


def test_a_recorded_result_is_never_replaced(journal: CommandJournal) -> None:
    journal.finish("c1", b"first", expires=at(NOW + 60))
    assert journal.finish("c1", b"second", expires=at(NOW + 60)) is False
    entry = journal.lookup("c1")
    assert entry is not None
    assert entry.result == b"first"


def test_entries_survive_reopening(path: Path, clock: Clock) -> None:
    with CommandJournal(path, clock=clock) as journal:
        journal.start("running", expires=at(NOW + 60))
        journal.start("done", expires=at(NOW + 60))
        journal.finish("done", b"ok", expires=at(NOW + 60))
    with CommandJournal(path, clock=clock) as journal:
        running, done = journal.lookup("running"), journal.lookup("done")
    assert running is not None
    assert running.state is JournalState.STARTED
    assert done is not None
    assert done.result == b"ok"


def test_wal_and_full_sync(journal: CommandJournal) -> None:
    connection = journal._connection
    assert connection is not None
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert connection.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_prunes_commands_expired_long_ago_on_open(path: Path, clock: Clock) -> None:
    with CommandJournal(path, clock=clock) as journal:
        journal.finish("expired-long-ago", b"x", expires=at(NOW - DAY))
        journal.start("recently-expired", expires=at(NOW + 1))
        # Recorded long before the retention, but its command is still valid: must stay.
        journal.finish("long-lived", b"x", expires=at(NOW + 30 * DAY))
    clock.now = NOW + DEFAULT_RETENTION_S
    with CommandJournal(path, clock=clock) as journal:
        assert journal.lookup("expired-long-ago") is None
        assert journal.lookup("recently-expired") is not None
        assert journal.lookup("long-lived") is not None
        clock.now += 2
        assert journal.prune() == 1
        assert journal.lookup("recently-expired") is None
        assert journal.lookup("long-lived") is not None


def test_prunes_now_and_then_while_open(path: Path, clock: Clock) -> None:
    with CommandJournal(path, retention_s=10, clock=clock) as journal:
        journal.finish("old", b"x", expires=at(NOW))
        clock.now = NOW + 2 * 3600
        journal.finish("new", b"x", expires=at(clock.now + 60))
        assert journal.lookup("old") is None
        assert journal.lookup("new") is not None


def test_retention_must_be_positive(path: Path) -> None:
    with pytest.raises(ValueError, match="retention_s"):
        CommandJournal(path, retention_s=0)


def test_closed_journal_raises(path: Path) -> None:
    journal = CommandJournal(path)
    journal.close()
    journal.close()  # twice is fine
    assert "closed" in repr(journal)
    with pytest.raises(JournalError, match="closed") as caught:
        journal.lookup("c1")
    assert isinstance(caught.value, NerveError)
    assert caught.value.path == path


def test_not_a_database(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(JournalError, match="cannot open") as caught:
        CommandJournal(path)
    assert str(path) in str(caught.value)


def test_from_another_schema_version(path: Path) -> None:
    path.parent.mkdir(parents=True)
    connection = sqlite3.connect(path)
    try:
        connection.execute("PRAGMA user_version = 99")
        connection.commit()
    finally:
        connection.close()
    with pytest.raises(JournalError, match="schema 99"):
        CommandJournal(path)


def test_directory_cannot_be_made(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(JournalError, match="directory"):
        CommandJournal(blocker / "journal.sqlite3")


def test_sqlite_errors_are_wrapped(journal: CommandJournal) -> None:
    connection = journal._connection
    assert connection is not None
    connection.execute("DROP TABLE commands")
    with pytest.raises(JournalError, match="no such table"):
        journal.lookup("c1")


def test_journal_path(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert journal_path(settings, "pi-01") == tmp_path / "edge-pi-01.journal"
    configured = Settings.model_validate({"edge": {"journal": str(tmp_path / "j.db")}})
    assert journal_path(configured, "pi-01") == tmp_path / "j.db"
