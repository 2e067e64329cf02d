"""The uplink's spool: readings JetStream cannot take yet wait on the bridge's disk, not in mosquitto.

Why: under an overload (devices offer more than JetStream stores) the backlog has to wait somewhere. Left
with mosquitto (2.0), it is queued in mosquitto's memory for the bridge's session and written, whole, to
mosquitto's database at every autosave, in mosquitto's only thread: at about 400 MiB queued a save stopped
mosquitto for about 1.2 s, and every command sent then waited it out (docs/fleet.md, "A command waits
out mosquitto's autosave"). Here the bridge keeps taking what mosquitto sends; what comes while JetStream
is behind (half of `bridge.max_in_flight` stores already on their way) is appended to this file and
acknowledged to mosquitto once written, and is sent to JetStream from the file, in order, as room comes
back. mosquitto then holds no backlog, and a command goes through it at once.

The file (`<data_dir>/bridge/<client id>.spool`) is a 16-byte header (magic, then the offset up to which
every record is stored in JetStream) and records, each `length (u32) | crc32 (u32) | msgpack of
(subject, headers, body, dead letter?, origin topic)`: what the pump would have published, dedup id in the
headers. Nothing is lost:

- A record is written (one `pwrite` per batch) before the PUBACKs of its readings leave: a bridge killed
  at any moment has it in the file (the kernel keeps a killed process's writes), or mosquitto still has
  it. The file is fsync'd every second while records are added (`Spool.sync`, off the event loop): a
  power cut loses at most about a second of the spool, where mosquitto's own database loses up to its
  `autosave_interval` (60 s in the shipped configs).
- The header's offset moves once the records before it are stored; after a restart (or a new session)
  everything past it is sent again with its dedup id, so what was on its way is stored once if it comes
  back within the stream's duplicate window (30 s for telemetry; a bridge down longer than that may store
  up to `bridge.max_in_flight` readings twice, never lose one).
- A record that does not read back whole (cut short, or its checksum wrong: a write torn by a power cut)
  ends the file: it and anything after it are dropped, with a warning saying how many bytes.
- Once every record is stored the file is cut back to its header: a spool takes disk only while a backlog
  lasts. At `bridge.spool_bytes` of records it takes no more: the pump stops reading from mosquitto (the
  backlog waits with mosquitto again, as without a spool) until everything spooled is stored.

Order is kept: while records wait in the spool, new readings go behind them into it, never past them.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import time
import zlib
from typing import TYPE_CHECKING, Final, NamedTuple

import msgspec

from nerve.bridge.state import state_path

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from nerve.runtime.config.settings import Settings

log = logging.getLogger(__name__)

MAGIC: Final = b"NRVSPL1\n"
HEADER: Final = struct.Struct("<8sQ")
RECORD: Final = struct.Struct("<II")
#: How much is read from the file at a time when records are taken back.
READ_CHUNK: Final = 256 * 1024
#: How much is read at a time when a spool is checked as it is opened.
SCAN_CHUNK: Final = 4 << 20
#: A record longer than this is not one of ours (the NATS server's largest payload is 64 MiB).
MAX_RECORD: Final = 80 << 20


class Record(NamedTuple):
    """One spooled store: what the pump publishes, and where the record ends in the file."""

    subject: str
    headers: bytes
    body: bytes
    dead_letter: bool
    origin: str
    end: int


_Stored = tuple[str, bytes, bytes, bool, str]
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(_Stored).decode


def spool_path(settings: Settings) -> Path:
    """The spool of the bridge of `settings`: `<data_dir>/bridge/<client id>.spool`."""
    return state_path(settings, "spool")


class Spool:
    """An append-only file of stores waiting for JetStream; see the module docstring.

    `budget`: bytes of records it takes before it `holds` (0: it takes none, but still gives back what
    an earlier run left in the file). Raises OSError if the file cannot be opened or read.
    """

    def __init__(self, path: Path, *, budget: int) -> None:
        self._path = path
        self._budget = budget
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self._lock()
            self._committed, self._end = self._recover()
        except BaseException:
            os.close(self._fd)
            raise
        self._read = self._committed
        self._dirty = False
        self._records = 0  # appended since the spool was last empty
        self._since = 0.0
        self._holding = self._end - HEADER.size >= budget > 0 or (budget == 0 and not self.empty)

    def _lock(self) -> None:
        """Take the file for this process: two writers would write over each other's records."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            msg = (
                f"{self._path} is in use by another bridge process (two uplinks with one bridge.client_id "
                "take each other's MQTT session too)"
            )
            raise OSError(msg) from None

    def _recover(self) -> tuple[int, int]:
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, HEADER.size, 0)
        if size == 0 or len(head) < HEADER.size:
            self._write_header(HEADER.size)
            os.ftruncate(self._fd, HEADER.size)
            return HEADER.size, HEADER.size
        magic, committed = HEADER.unpack(head)
        # Past the end only if killed while cutting the file back, when every record was stored.
        committed = min(committed, size)
        if magic != MAGIC or committed < HEADER.size:
            bad = self._path.with_name(self._path.name + ".bad")
            log.warning(
                "bridge: %s is not a spool nerve wrote; moved to %s, starting an empty one", self._path, bad
            )
            self._path.replace(bad)
            os.close(self._fd)
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._lock()
            self._write_header(HEADER.size)
            return HEADER.size, HEADER.size
        end, count = self._scan(committed, size)
        if end < size:
            log.warning(
                "bridge: the spool %s ends in %d bytes that do not read back as a whole record (a write cut "
                "short); dropped",
                self._path,
                size - end,
            )
            os.ftruncate(self._fd, end)
        if count:
            log.info("bridge: %d readings wait in the spool %s; sending them to JetStream", count, self._path)
        return committed, end

    def _frames(self, start: int, stop: int, chunk_size: int) -> Iterator[tuple[int, memoryview]]:
        """Each whole record in [start, stop), in order: (where it ends, its checksummed bytes).

        Stops at the first record that is cut short, too long or whose checksum is wrong. Reads
        `chunk_size` at a time (a record longer than that is read on its own).
        """
        offset = start
        while offset < stop:
            chunk = memoryview(os.pread(self._fd, min(chunk_size, stop - offset), offset))
            at = 0
            while at + RECORD.size <= len(chunk):
                length, crc = RECORD.unpack_from(chunk, at)
                if length > MAX_RECORD or offset + at + RECORD.size + length > stop:
                    return
                if at + RECORD.size + length > len(chunk):
                    break  # read on from this record
                data = chunk[at + RECORD.size : at + RECORD.size + length]
                if zlib.crc32(data) != crc:
                    return
                at += RECORD.size + length
                yield offset + at, data
            if at == 0:  # the chunk ends inside its first record: a record longer than the chunk
                if len(chunk) < RECORD.size:
                    return
                length, crc = RECORD.unpack_from(chunk, 0)
                whole = memoryview(os.pread(self._fd, RECORD.size + length, offset))
                if len(whole) < RECORD.size + length or zlib.crc32(whole[RECORD.size :]) != crc:
                    return
                at = len(whole)
                yield offset + at, whole[RECORD.size :]
            offset += at

    def _scan(self, start: int, stop: int) -> tuple[int, int]:
        """Where the whole records from `start` end, and how many there are.

        Framing and checksums only (decoding each record too took 1.6 s a million readings here).
        """
        end, count = start, 0
        for end, _ in self._frames(start, stop, SCAN_CHUNK):  # noqa: B007 - the last one is the answer
            count += 1
        return end, count

    def _write_header(self, committed: int) -> None:
        os.pwrite(self._fd, HEADER.pack(MAGIC, committed), 0)

    def _parse(self, start: int, stop: int, *, limit: int) -> list[Record]:
        """The whole records in [start, stop), at most `limit`; stops at the first that does not read."""
        records: list[Record] = []
        if limit < 1:
            return records
        for end, data in self._frames(start, stop, READ_CHUNK):
            try:
                subject, headers, body, dead_letter, origin = _decode(data)
            except msgspec.DecodeError:
                break
            records.append(Record(subject, headers, body, dead_letter, origin, end))
            if len(records) >= limit:
                break
        return records

    # -- state

    @property
    def pending(self) -> bool:
        """Records wait that were not taken yet."""
        return self._read < self._end

    @property
    def empty(self) -> bool:
        """Every record is stored (the file is its header)."""
        return self._committed == self._end

    @property
    def holding(self) -> bool:
        """The budget was reached: take no more readings until everything spooled is stored."""
        return self._holding

    @property
    def size(self) -> int:
        """Bytes of records in the file (stored ones included, until it is cut back)."""
        return self._end - HEADER.size

    @property
    def accepts(self) -> bool:
        """New records may be added (under the budget)."""
        return not self._holding and self._budget > 0

    # -- the pump's side

    def append(self, stores: list[_Stored]) -> None:
        """Write `stores` at the end, in one write; raises OSError (nothing counted as written then)."""
        parts: list[bytes] = []
        for store in stores:
            data = _encode(store)
            parts.append(RECORD.pack(len(data), zlib.crc32(data)))
            parts.append(data)
        blob = b"".join(parts)
        if self.empty and not self._records:
            self._since = time.monotonic()
            log.info("bridge: JetStream is behind: readings wait in the spool %s", self._path)
        written = os.pwrite(self._fd, blob, self._end)
        if written != len(blob):
            os.ftruncate(self._fd, self._end)
            msg = f"short write to {self._path} ({written} of {len(blob)} bytes; disk full?)"
            raise OSError(msg)
        self._end += len(blob)
        self._records += len(stores)
        self._dirty = True
        if self._budget > 0 and self.size >= self._budget:
            self._holding = True

    def take(self, limit: int) -> list[Record]:
        """Up to `limit` records not taken yet, in order (read back from the file)."""
        records = self._parse(self._read, self._end, limit=limit)
        if records:
            self._read = records[-1].end
        elif self._read < self._end:  # cannot happen with our own writes; never spin on it
            log.error(
                "bridge: the spool %s does not read back at %d; skipping to its end", self._path, self._read
            )
            self._read = self._end
        return records

    def commit(self, end: int) -> None:
        """Every record up to `end` is stored; once all are, the file is cut back to its header."""
        if end <= self._committed:
            return
        self._committed = end
        self._write_header(end)
        if end == self._end and self._read == self._end:
            # Header first: a kill between the two leaves an offset past the end, read as "all stored".
            os.ftruncate(self._fd, HEADER.size)
            self._committed = self._read = self._end = HEADER.size
            self._write_header(HEADER.size)
            self._holding = False
            if self._records:
                log.info(
                    "bridge: the spool is empty again: %d readings waited there, for %.1f s",
                    self._records,
                    time.monotonic() - self._since,
                )
            self._records = 0

    def rewind(self) -> None:
        """A new session: what was taken and not stored is taken again (same dedup ids)."""
        self._read = self._committed

    def sync(self) -> None:
        """Write to disk (fsync) the records were added since the last time (call it off the event loop)."""
        if self._dirty:
            self._dirty = False
            os.fsync(self._fd)

    def close(self) -> None:
        """Close the file; what it holds is sent at the next start."""
        with contextlib.suppress(OSError):
            os.close(self._fd)
