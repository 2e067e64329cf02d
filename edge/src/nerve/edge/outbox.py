"""The outbox: every message the device sends is first written here, and deleted only once the broker has it.

Store-and-forward for the edge daemon. A reading, an event or a command result is added (one
SQLite row, WAL) before any attempt to publish it; the publisher takes entries in order, publishes
each QoS1 and deletes it on the broker's PUBACK. A broker outage or a restart of the daemon (even a
`kill -9`) loses nothing: what was not acknowledged is still here and goes out, in order, when
the broker is back. A crash between the PUBACK and the delete sends that entry once more; its id is
stable, so JetStream's dedup (`Nats-Msg-Id` = event id) stores it once.

Ids. Each entry gets the next number of a sequence kept in the file (never reused, also across
restarts), and readings and events take `<device>.<boot id>.<sequence>` as their event id (boot id
from `/proc/sys/kernel/random/boot_id`). A command result keeps the id its journal recorded.

Order. Results and events go out before the telemetry waiting with them (a command's answer must
not wait behind a day of readings); within each of the two lanes, entries go out in the order they
were added.

Size cap (`max_bytes`, approximate: payload, topic and id of each entry). Past it, the oldest
telemetry is deleted until the outbox is back under 90 % of the cap; events and command results are
never dropped, even if they alone exceed the cap. What was dropped is counted in the file
(`dropped`), logged at warning, and reported to the caller so the daemon can publish it as an event.

A full disk. If SQLite cannot write (`database or disk is full`, an I/O error), the outbox logs
one error line and keeps new entries in memory (up to 1 MiB; oldest telemetry first again), after
every entry already in the file so the order holds. The daemon keeps publishing; only what is still
in memory when the daemon stops is lost. Each later add tries the file again, and the outbox says
so when it is writable again.

```
NerveError
└── OutboxError    the outbox file cannot be opened as one (another schema; carries the path)
```
"""

from __future__ import annotations

import logging
import sqlite3
import time
import uuid
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Final

from nerve.edge.sqlite_file import ClosedOnExit, check_schema_version, open_prepared, use_wal
from nerve.runtime.errors import NerveError

if TYPE_CHECKING:
    from collections.abc import Callable

    from nerve.edge.settings import SettingsView

__all__ = [
    "BOOT_ID_PATH",
    "DEFAULT_MAX_BYTES",
    "Outbox",
    "OutboxEntry",
    "OutboxError",
    "OutboxKind",
    "outbox_path",
    "read_boot_id",
]

BOOT_ID_PATH: Final = Path("/proc/sys/kernel/random/boot_id")
DEFAULT_MAX_BYTES: Final = 16 * 1024 * 1024

_log: Final = logging.getLogger(__name__)

_SCHEMA_VERSION: Final = 1
# Per-row bookkeeping SQLite adds (row header, index entry, the integer columns), roughly.
_ROW_OVERHEAD: Final = 48
# After dropping telemetry, the outbox goes down to this share of the cap: dropping then happens
# in a few large steps rather than on every add.
_LOW_WATER: Final = 0.9
_MEMORY_MAX_BYTES: Final = 1024 * 1024
_REOPEN_EVERY_S: Final = 30.0
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL,
    kind       TEXT NOT NULL CHECK (kind IN ('telemetry', 'events', 'results')),
    lane       INTEGER NOT NULL,
    topic      TEXT NOT NULL,
    payload    BLOB NOT NULL,
    size       INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_lane_seq ON outbox (lane, seq);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
"""


class OutboxError(NerveError):
    """The outbox at `path` cannot be used: `reason` says why."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"outbox {path}: {reason}")


class OutboxKind(StrEnum):
    """What an entry is; it picks the lane and whether the size cap may drop it."""

    TELEMETRY = "telemetry"
    EVENTS = "events"
    RESULTS = "results"

    @property
    def lane(self) -> int:
        """0 for events and results (sent first, never dropped), 1 for telemetry."""
        return 1 if self is OutboxKind.TELEMETRY else 0


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One message waiting for the broker: publish `payload` on `topic` (QoS1), then `ack` it."""

    seq: int
    id: str
    kind: OutboxKind
    topic: str
    payload: bytes

    @property
    def size(self) -> int:
        """What this entry counts against the cap."""
        return len(self.payload) + len(self.topic) + len(self.id) + _ROW_OVERHEAD


def outbox_path(settings: SettingsView, device: str) -> Path:
    """Where the outbox of `device` lives: `edge.outbox.path`, else `<data_dir>/edge-<device>.outbox`."""
    return settings.edge.outbox.path or settings.data_dir / f"edge-{device}.outbox"


def read_boot_id(path: Path = BOOT_ID_PATH) -> str:
    """This boot's id from the kernel; a random one (logged) where the kernel has none."""
    try:
        text = path.read_text(encoding="ascii").strip()
        return str(uuid.UUID(text))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        made = str(uuid.uuid4())
        _log.warning("no boot id in %s (%s); this run uses %s", path, exc, made)
        return made


class Outbox(ClosedOnExit):
    """A device's persistent, ordered queue of messages not yet acknowledged by the broker.

    Open it with the constructor and close it with `close()` or as a context manager. It is used
    from one thread (the daemon's event loop); its methods are quick (small SQLite transactions)
    and never raise for a write that fails (see the module docstring on a full disk).

    Raises:
        OutboxError: from the constructor, when the file holds another schema version. A file that
            cannot be opened at all (a full disk, no permission) is not an error: the outbox runs in
            memory, logs why and tries the file again every 30 s.
    """

    def __init__(
        self,
        path: Path,
        *,
        device: str,
        max_bytes: int = DEFAULT_MAX_BYTES,
        boot_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = Path(path)
        self._device = device
        self._max_bytes = max_bytes
        self._boot_id = boot_id or read_boot_id()
        self._clock = clock
        self._connection: sqlite3.Connection | None = None
        self._closed = False
        self._seq = 0
        self._stored_bytes = 0
        self._dropped = 0
        self._over_cap_logged = False
        # Entries the file could not take (a full disk): they come after every stored entry.
        self._memory: deque[OutboxEntry] = deque()
        self._memory_bytes = 0
        # Entries published and acknowledged whose delete failed: never handed out again.
        self._undeleted: set[int] = set()
        self._broken: str | None = None
        self._last_open_attempt = 0.0
        self._try_open()
        if self._connection is None:
            # The file's own sequence is unknown: start far past any it could hold (milliseconds
            # since 1970), so neither ids nor positions collide when it can be opened later.
            self._seq = int(self._clock() * 1000)

    @property
    def path(self) -> Path:
        """The SQLite file."""
        return self._path

    @property
    def boot_id(self) -> str:
        """The boot id in this run's event ids."""
        return self._boot_id

    @property
    def sequence(self) -> int:
        """The sequence number of the last entry added (0 for a new, empty outbox)."""
        return self._seq

    @property
    def dropped(self) -> int:
        """How many telemetry entries the size cap dropped, ever (kept in the file)."""
        return self._dropped

    @property
    def degraded(self) -> str | None:
        """Why the file cannot be written now (new entries are kept in memory), or None."""
        return self._broken

    @property
    def size_bytes(self) -> int:
        """What the waiting entries count against the cap (file and memory)."""
        return self._stored_bytes + self._memory_bytes

    def stable_id(self, seq: int) -> str:
        """The event id of entry `seq` of this run: `<device>.<boot id>.<seq>`."""
        return f"{self._device}.{self._boot_id}.{seq}"

    def __len__(self) -> int:
        """How many entries wait (file and memory)."""
        stored = 0
        if self._connection is not None:
            try:
                stored = self._connection.execute("SELECT count(*) FROM outbox").fetchone()[0]
            except sqlite3.Error:
                stored = 0
        return stored - len(self._undeleted) + len(self._memory)

    def add(self, kind: OutboxKind, topic: str, encode: Callable[[str], bytes]) -> tuple[OutboxEntry, int]:
        """Add a message whose payload `encode(stable id)` makes; return it and what the cap dropped.

        The count is of telemetry entries the size cap dropped to make room (already logged).
        Durable when this returns: events and results survive a power cut (fsync), telemetry a
        crash of the daemon. If the file cannot take it, it is kept in memory (logged once).
        """
        if self._closed:
            raise OutboxError(self._path, "it is closed")
        self._seq += 1
        event_id = self.stable_id(self._seq)
        entry = OutboxEntry(seq=self._seq, id=event_id, kind=kind, topic=topic, payload=encode(event_id))
        if self._connection is None:
            self._retry_open()
        if self._connection is not None and (not self._memory or self._flush_memory()):
            try:
                self._insert(self._connection, entry)
            except (sqlite3.Error, OSError) as exc:
                self._cannot_write(exc)
            else:
                self._stored_bytes += entry.size
                self._writable_again()
                return entry, self._enforce_cap()
        self._memory.append(entry)
        self._memory_bytes += entry.size
        return entry, self._enforce_memory_cap()

    def peek(self, limit: int = 64) -> list[OutboxEntry]:
        """Up to `limit` entries to publish next, in order (see the module docstring)."""
        entries: list[OutboxEntry] = []
        if self._connection is not None:
            try:
                rows = self._connection.execute(
                    "SELECT seq, id, kind, topic, payload FROM outbox ORDER BY lane, seq LIMIT ?",
                    (limit + len(self._undeleted),),
                ).fetchall()
            except sqlite3.Error as exc:
                self._cannot_write(exc)
                rows = []
            entries = [
                OutboxEntry(seq=seq, id=id_, kind=OutboxKind(kind), topic=topic, payload=payload)
                for seq, id_, kind, topic, payload in rows
                if seq not in self._undeleted
            ][:limit]
        if len(entries) < limit:
            entries.extend(list(self._memory)[: limit - len(entries)])
        return entries

    def ack(self, entry: OutboxEntry) -> None:
        """The broker has `entry`: delete it. Acking an entry already gone does nothing."""
        if self._memory and self._memory[0].seq == entry.seq:
            self._memory.popleft()
            self._memory_bytes -= entry.size
            return
        if self._connection is None:
            return
        try:
            deleted = self._connection.execute("DELETE FROM outbox WHERE seq = ?", (entry.seq,)).rowcount
        except sqlite3.Error as exc:
            self._undeleted.add(entry.seq)
            self._cannot_write(exc)
            return
        if deleted:
            self._stored_bytes -= entry.size

    def close(self) -> None:
        """Close the file; what is still in memory only is lost (logged). Calling it again does nothing."""
        self._closed = True
        if self._memory:
            _log.error(
                "outbox %s: closing with %d message(s) that only memory held (the file could not be "
                "written): they are lost",
                self._path,
                len(self._memory),
            )
            self._memory.clear()
            self._memory_bytes = 0
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "degraded" if self._broken else "open"
        return f"<Outbox {self._path} {state}>"

    # --- the file -------------------------------------------------------------------------------

    def _try_open(self) -> None:
        self._last_open_attempt = time.monotonic()
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            connection = open_prepared(self._path, self._prepare)
        except (sqlite3.Error, OSError) as exc:
            self._cannot_write(exc, opening=True)
            return
        self._connection = connection

    def _retry_open(self) -> None:
        if time.monotonic() - self._last_open_attempt >= _REOPEN_EVERY_S:
            self._try_open()

    def _prepare(self, connection: sqlite3.Connection) -> None:
        use_wal(connection, synchronous="NORMAL", log=_log, name=f"outbox {self._path}")
        version = check_schema_version(connection, _SCHEMA_VERSION, error=partial(OutboxError, self._path))
        if version == 0:
            connection.executescript(_SCHEMA)
            connection.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        row = connection.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        # The sequence goes on from the file (never below what this run handed out already).
        self._seq = max(self._seq, row[0] if row else 0)
        self._stored_bytes = connection.execute("SELECT coalesce(sum(size), 0) FROM outbox").fetchone()[0]
        row = connection.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        self._dropped = max(self._dropped, row[0] if row else 0)

    def _insert(self, connection: sqlite3.Connection, entry: OutboxEntry) -> None:
        durable = entry.kind is not OutboxKind.TELEMETRY
        if durable:
            # A power cut must not lose an event or a command's answer; a reading may go.
            connection.execute("PRAGMA synchronous = FULL")
        try:
            connection.execute(
                "INSERT INTO outbox (seq, id, kind, lane, topic, payload, size, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.seq,
                    entry.id,
                    entry.kind.value,
                    entry.kind.lane,
                    entry.topic,
                    entry.payload,
                    entry.size,
                    self._clock(),
                ),
            )
        finally:
            if durable:
                connection.execute("PRAGMA synchronous = NORMAL")

    def _flush_memory(self) -> bool:
        """Move what memory holds into the file, in order; True once memory is empty."""
        connection = self._connection
        assert connection is not None  # noqa: S101 - checked by the caller
        while self._memory:
            entry = self._memory[0]
            try:
                self._insert(connection, entry)
            except (sqlite3.Error, OSError) as exc:
                self._cannot_write(exc)
                return False
            self._memory.popleft()
            self._memory_bytes -= entry.size
            self._stored_bytes += entry.size
        return True

    def _cannot_write(self, exc: BaseException, *, opening: bool = False) -> None:
        reason = str(exc) or type(exc).__name__
        if opening:
            self._connection = None
        if self._broken is None:
            _log.error(
                "outbox %s cannot be %s (%s): the daemon goes on, publishing directly; new messages "
                "wait in memory only (up to %d KiB, oldest readings dropped first) until it can be "
                "written again",
                self._path,
                "opened" if opening else "written",
                reason,
                _MEMORY_MAX_BYTES // 1024,
            )
        self._broken = reason

    def _writable_again(self) -> None:
        if self._broken is not None:
            _log.warning("outbox %s can be written again (%s is over)", self._path, self._broken)
            self._broken = None
        if self._undeleted and self._connection is not None:
            try:
                for seq in sorted(self._undeleted):
                    self._connection.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
            except sqlite3.Error:
                return
            self._undeleted.clear()
            self._stored_bytes = self._connection.execute(
                "SELECT coalesce(sum(size), 0) FROM outbox"
            ).fetchone()[0]

    # --- the cap --------------------------------------------------------------------------------

    def _enforce_cap(self) -> int:
        if self._stored_bytes <= self._max_bytes:
            return 0
        connection = self._connection
        assert connection is not None  # noqa: S101 - only called after a write to it
        target = int(self._max_bytes * _LOW_WATER)
        freed_rows = 0
        try:
            while self._stored_bytes > target:
                rows = connection.execute(
                    "SELECT seq, size FROM outbox WHERE lane = 1 ORDER BY seq LIMIT 256"
                ).fetchall()
                if not rows:
                    break
                last, freed = rows[-1][0], 0
                for seq, size in rows:
                    freed += size
                    if self._stored_bytes - freed <= target:
                        last = seq
                        break
                connection.execute("BEGIN")
                count = connection.execute("DELETE FROM outbox WHERE lane = 1 AND seq <= ?", (last,)).rowcount
                connection.execute(
                    "INSERT INTO counters (name, value) VALUES ('dropped', ?) "
                    "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                    (count,),
                )
                connection.execute("COMMIT")
                self._stored_bytes -= sum(size for seq, size in rows if seq <= last)
                self._undeleted -= {seq for seq, _ in rows if seq <= last}
                freed_rows += count
        except sqlite3.Error as exc:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            self._cannot_write(exc)
        return self._count_drops(freed_rows)

    def _enforce_memory_cap(self) -> int:
        dropped = 0
        while self._memory_bytes > _MEMORY_MAX_BYTES:
            oldest = next((one for one in self._memory if one.kind is OutboxKind.TELEMETRY), None)
            if oldest is None:
                break
            self._memory.remove(oldest)
            self._memory_bytes -= oldest.size
            dropped += 1
        return self._count_drops(dropped)

    def _count_drops(self, count: int) -> int:
        if count:
            self._dropped += count
            _log.warning(
                "outbox %s is full (cap %d bytes): dropped the %d oldest reading(s), %d in all; events "
                "and command results are kept",
                self._path,
                self._max_bytes,
                count,
                self._dropped,
            )
        elif self.size_bytes > self._max_bytes and not self._over_cap_logged:
            self._over_cap_logged = True
            _log.warning(
                "outbox %s holds more than its cap (%d bytes) of events and command results, which "
                "are never dropped",
                self._path,
                self._max_bytes,
            )
        return count
