"""The command journal: what this device did with each command id, kept across restarts.

It is what makes "a command id executes at most once" hold through crashes and replays. A command
is recorded as `started` (committed and fsynced) before its action runs, and as `finished` with the
encoded result it got afterwards. A `started` entry found later means the device stopped while the
action ran: the executor must not run it again.

SQLite in WAL mode with `synchronous=FULL` on every commit: commands are rare, and a lost `finished`
record would turn a real answer into "unknown" after a power cut.

```
NerveError
└── JournalError    the journal file cannot be opened, read or written (carries the path)
```
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Final

from nerve.edge.sqlite_file import ClosedOnExit, check_schema_version, open_prepared, use_wal
from nerve.runtime.errors import NerveError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from datetime import datetime

    from nerve.edge.settings import SettingsView

__all__ = [
    "DEFAULT_RETENTION_S",
    "CommandJournal",
    "JournalEntry",
    "JournalError",
    "JournalState",
    "journal_path",
]

DEFAULT_RETENTION_S: Final = 7 * 86400.0

_log: Final = logging.getLogger(__name__)

_SCHEMA_VERSION: Final = 2
_PRUNE_EVERY_S: Final = 3600.0
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS commands (
    id          TEXT PRIMARY KEY,
    state       TEXT NOT NULL CHECK (state IN ('started', 'finished')),
    result      BLOB,
    recorded_at REAL NOT NULL,
    expires_at  REAL NOT NULL,
    digest      BLOB
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS commands_expires_at ON commands (expires_at);
"""


class JournalError(NerveError):
    """The command journal at `path` cannot be opened, read or written; `reason` says why."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"command journal {path}: {reason}")


class JournalState(StrEnum):
    """How far a journalled command got."""

    STARTED = "started"
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """What the journal holds for one command id.

    `result` is the encoded `CommandResult` (msgpack) once `state` is `finished`, None while it is
    `started`. Times are Unix seconds: `recorded_at` when the entry was first written, `expires_at`
    when the command itself expired. `digest` identifies the command that was journalled (None for
    entries written before nerve kept it), so a different command reusing the id can be told apart.
    """

    command_id: str
    state: JournalState
    result: bytes | None
    recorded_at: float
    expires_at: float
    digest: bytes | None = None


def journal_path(settings: SettingsView, device: str) -> Path:
    """Where the journal of `device` lives: `edge.journal`, else `<data_dir>/edge-<device>.journal`."""
    return settings.edge.journal or settings.data_dir / f"edge-{device}.journal"


class CommandJournal(ClosedOnExit):
    """A persistent record of each command id this device started and the result it gave.

    Open it with the constructor (it creates the file and its directory), and close it with
    `close()` or by using it as a context manager. Methods may be called from any thread, one at a
    time (an internal lock serialises them), so the executor can run in a worker thread.

    Growth is bounded: on open, and then at most hourly, entries whose command expired more than
    `retention_s` ago are deleted. Entries are kept by their command's expiry, not by their age, so an
    entry is never dropped while its command could still pass the executor's expiry check: the
    retention must be longer than the clock skew the executor allows (the executor checks this).

    Every method raises `JournalError` when SQLite fails or the journal is closed.
    """

    def __init__(
        self,
        path: Path,
        *,
        retention_s: float = DEFAULT_RETENTION_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not retention_s > 0:
            raise ValueError(f"retention_s must be > 0, not {retention_s!r}")
        self._path = Path(path)
        self._retention_s = retention_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last_prune = 0.0
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JournalError(self._path, f"cannot create its directory: {exc.strerror}") from None
        self._connection: sqlite3.Connection | None = self._open()
        try:
            self.prune()
        except BaseException:
            self.close()
            raise

    @property
    def path(self) -> Path:
        """The SQLite file."""
        return self._path

    @property
    def retention_s(self) -> float:
        """How long after its command expired an entry is kept."""
        return self._retention_s

    def lookup(self, command_id: str) -> JournalEntry | None:
        """The entry of `command_id`, or None if this device never journalled it."""
        with self._cursor() as cursor:
            row = cursor.execute(
                "SELECT state, result, recorded_at, expires_at, digest FROM commands WHERE id = ?",
                (command_id,),
            ).fetchone()
        if row is None:
            return None
        state, result, recorded_at, expires_at, digest = row
        return JournalEntry(
            command_id=command_id,
            state=JournalState(state),
            result=result,
            recorded_at=recorded_at,
            expires_at=expires_at,
            digest=digest,
        )

    def start(self, command_id: str, *, expires: datetime, digest: bytes | None = None) -> bool:
        """Record that `command_id` (whose content hashes to `digest`) is about to run; fsynced on return.

        Returns False, writing nothing, if the id has an entry already: the caller must not run it.
        """
        with self._cursor() as cursor:
            cursor.execute(
                "INSERT INTO commands (id, state, result, recorded_at, expires_at, digest) "
                "VALUES (?, 'started', NULL, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                (command_id, self._clock(), expires.timestamp(), digest),
            )
            return cursor.rowcount == 1

    def finish(
        self, command_id: str, result: bytes, *, expires: datetime, digest: bytes | None = None
    ) -> bool:
        """Record the encoded result of `command_id`, started or not (a refusal is never started).

        A result once recorded is never replaced: returns False, writing nothing, if the id is
        `finished` already. The digest of a started entry is kept.
        """
        with self._cursor() as cursor:
            cursor.execute(
                "INSERT INTO commands (id, state, result, recorded_at, expires_at, digest) "
                "VALUES (?, 'finished', ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET state = 'finished', result = excluded.result, "
                "digest = coalesce(commands.digest, excluded.digest) "
                "WHERE commands.state = 'started'",
                (command_id, result, self._clock(), expires.timestamp(), digest),
            )
            written = cursor.rowcount == 1
        if self._clock() - self._last_prune >= _PRUNE_EVERY_S:
            self.prune()
        return written

    def prune(self) -> int:
        """Delete the entries whose command expired more than `retention_s` ago; return how many."""
        now = self._clock()
        with self._cursor() as cursor:
            cursor.execute("DELETE FROM commands WHERE expires_at < ?", (now - self._retention_s,))
            deleted = cursor.rowcount
        self._last_prune = now
        return deleted

    def close(self) -> None:
        """Close the file; calling it again does nothing."""
        with self._lock:
            connection, self._connection = self._connection, None
            if connection is not None:
                connection.close()

    def __repr__(self) -> str:
        state = "open" if self._connection is not None else "closed"
        return f"<CommandJournal {self._path} {state}>"

    def _open(self) -> sqlite3.Connection:
        try:
            # Autocommit: each statement is its own transaction, which is all this needs.
            # check_same_thread=False because the executor runs in worker threads; the lock keeps
            # calls one at a time.
            return open_prepared(self._path, self._prepare, check_same_thread=False)
        except sqlite3.Error as exc:
            raise JournalError(self._path, f"cannot open: {exc}") from None

    def _prepare(self, connection: sqlite3.Connection) -> None:
        use_wal(connection, synchronous="FULL", log=_log, name=f"command journal {self._path}")
        version = check_schema_version(
            connection, _SCHEMA_VERSION, error=partial(JournalError, self._path), older={1}
        )
        if version == 1:
            # Version 1 had no digest: its entries keep None, and are answered as before.
            # One transaction: a crash in between must not leave the column without the version.
            connection.executescript(
                "BEGIN; ALTER TABLE commands ADD COLUMN digest BLOB; "
                f"PRAGMA user_version = {_SCHEMA_VERSION}; COMMIT;"
            )
        connection.executescript(_SCHEMA)
        connection.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    @contextmanager
    def _cursor(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            if self._connection is None:
                raise JournalError(self._path, "it is closed")
            cursor = self._connection.cursor()
            try:
                yield cursor
            except sqlite3.Error as exc:
                raise JournalError(self._path, str(exc)) from None
            finally:
                cursor.close()
