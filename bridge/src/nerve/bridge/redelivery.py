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

Kept on disk too (`<data_dir>/bridge/<client id>.ids`), so a bridge killed with `kill -9` does not
forget: its successor on the same session reads the file and gives mosquitto's redeliveries their first
ids. Each id given is appended before its reading leaves for JetStream (one write per batch of
readings), and each packet id acknowledged is appended as forgotten before its PUBACK leaves. Written
without fsync: the file is for a killed process, whose writes the kernel keeps; a machine that loses
power also loses mosquitto's in-memory session, and with it every redelivery. The file is rewritten
with only what is remembered once it passes `LOG_REWRITE_BYTES`; a line that does not read back (cut
short) is skipped, and its reading, if mosquitto sends it again, gets a fresh id (stored twice, never
lost).

Bounded: keyed by packet id (16 bits), so at most 65,535 entries, and in practice the bridge's in-flight
window (`bridge.max_in_flight`). An entry holds a digest of the payload, not the payload: a few dozen
bytes each, whatever the payload's size (two payloads of one length and topic under one packet id whose
64-bit hashes collide would be taken for one: about one chance in 10^19, after everything above).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from typing import TYPE_CHECKING, Final, NamedTuple

import msgspec

from nerve.bridge.state import state_path

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    from nerve.runtime.config.settings import Settings

log = logging.getLogger(__name__)

#: The id file is rewritten with only what is remembered once it is this large.
LOG_REWRITE_BYTES: Final = 4 << 20
#: A failing write of the id file is said at most this often.
WARN_EVERY_S: Final = 60.0


def ids_path(settings: Settings) -> Path:
    """The id file of the bridge of `settings`: `<data_dir>/bridge/<client id>.ids`."""
    return state_path(settings, "ids")


def digest_of(payload: bytes) -> int:
    """A digest of `payload` that is the same in every process (Python's `hash` of bytes is not)."""
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "big")


class _Given(NamedTuple):
    topic: str
    size: int
    digest: int
    event_id: str


class RedeliveredIds:
    """Packet id → the event id the bridge gave that unacknowledged PUBLISH; see the module docstring.

    With `path`, kept in that file too, and read back from it (a bridge that was killed).
    """

    __slots__ = ("_given", "_log")

    def __init__(self, path: Path | None = None) -> None:
        self._given: dict[int, _Given] = {}
        self._log: _IdLog | None = None
        if path is not None:
            try:
                self._log = _IdLog(path, self._given)
            except OSError as exc:  # a read-only data dir: the bridge works, and forgets when killed
                log.warning(
                    "bridge: cannot keep reading ids in %s (%s): a bridge killed now stores the readings "
                    "mosquitto sends again twice; set data_dir to a writable directory",
                    path,
                    exc.strerror or exc,
                )

    def __len__(self) -> int:
        return len(self._given)

    def session(self, *, present: bool) -> None:
        """A new MQTT session began: without Session Present the broker forgot ours, so do we."""
        if not present:
            self._given.clear()
            if self._log is not None:
                self._log.cleared()

    def recall(self, packet_id: int, topic: str, payload: bytes, *, dup: bool) -> str | None:
        """The id given to this PUBLISH's first delivery, if it is a redelivery of one we remember."""
        if not dup:
            return None  # a first delivery: even a remembered packet id is then another message
        given = self._given.get(packet_id)
        if (
            given is None
            or given.topic != topic
            or given.size != len(payload)
            or given.digest != digest_of(payload)
        ):
            return None
        return given.event_id

    def remember(self, packet_id: int, topic: str, payload: bytes, event_id: str) -> None:
        """PUBLISH `packet_id` (`topic`, `payload`) was given `event_id`; no-op at QoS0 (packet id 0).

        On disk once `write` is called: before the reading leaves for JetStream.
        """
        if packet_id:
            given = _Given(topic, len(payload), digest_of(payload), event_id)
            self._given[packet_id] = given
            if self._log is not None:
                self._log.given(packet_id, given)

    def write(self) -> None:
        """Put what was remembered since the last call on disk (before its readings leave).

        A write that fails (a full disk) is said once a minute at most; the ids stay in memory.
        """
        if self._log is not None:
            self._log.write()

    def close(self) -> None:
        """Close the file, if one is kept (a later `write` opens it again)."""
        if self._log is not None:
            self._log.close()

    def forget(self, packet_ids: Iterable[int]) -> None:
        """Their PUBACKs are about to be written: the broker may then give these packet ids to others.

        Call it before the PUBACKs leave: the file says so first.
        """
        given = self._given
        if given:
            packet_ids = list(packet_ids)
            for packet_id in packet_ids:
                given.pop(packet_id, None)
            if self._log is not None:
                self._log.forgotten(packet_ids)
                self._log.write()


_LINE: Final = msgspec.json.Decoder(list[int | str])
_ENCODE: Final = msgspec.json.Encoder()


class _IdLog:
    """The file behind a `RedeliveredIds`: one JSON line per id given, `[packet id]` per one forgotten."""

    __slots__ = ("_fd", "_path", "_pending", "_size", "_state", "_warned")

    def __init__(self, path: Path, state: dict[int, _Given]) -> None:
        self._path = path
        self._state = state
        self._pending = bytearray()
        self._warned = -WARN_EVERY_S
        path.parent.mkdir(parents=True, exist_ok=True)
        self._read()
        self._fd = -1
        self._size = 0
        self.rewrite()

    def _read(self) -> None:
        try:
            data = self._path.read_bytes()
        except FileNotFoundError:
            return
        skipped = 0
        for line in data.splitlines():
            try:
                entry = _LINE.decode(line)
            except msgspec.DecodeError:
                skipped += 1
                continue
            match entry:
                case [int(packet_id)]:
                    self._state.pop(packet_id, None)
                case [int(packet_id), str(topic), int(size), int(digest), str(event_id)]:
                    self._state[packet_id] = _Given(topic, size, digest, event_id)
                case _:
                    skipped += 1
        if skipped:
            log.warning("bridge: %s: %d line(s) that do not read back skipped", self._path, skipped)
        if self._state:
            log.info(
                "bridge: %d reading id(s) not yet acknowledged read back from %s",
                len(self._state),
                self._path,
            )

    def given(self, packet_id: int, given: _Given) -> None:
        self._pending += _ENCODE.encode((packet_id, *given)) + b"\n"

    def forgotten(self, packet_ids: Iterable[int]) -> None:
        for packet_id in packet_ids:
            self._pending += b"[%d]\n" % packet_id

    def write(self) -> None:
        """Append what is pending (the kernel keeps it if the process is killed); rewrite when large."""
        if not self._pending:
            return
        if self._size + len(self._pending) > LOG_REWRITE_BYTES:
            self._pending.clear()
            self.cleared()  # rewritten with what is remembered: the pending lines are in it
            return
        try:
            if self._fd < 0:
                self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._size += _write_all(self._fd, self._pending)
        except OSError as exc:
            self._failed(exc)
        self._pending.clear()

    def close(self) -> None:
        """Close the file (it opens again at the next `write`)."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def cleared(self) -> None:
        """Write the file anew with what is remembered (nothing, after a session the broker forgot)."""
        try:
            self.rewrite()
        except OSError as exc:
            self._failed(exc)

    def _failed(self, exc: OSError) -> None:
        now = time.monotonic()
        if now - self._warned > WARN_EVERY_S:
            self._warned = now
            log.warning("bridge: cannot write reading ids to %s: %s", self._path, exc.strerror or exc)

    def rewrite(self) -> None:
        """Write the file anew with only what is remembered, then append to it."""
        lines = b"".join(_ENCODE.encode((pid, *given)) + b"\n" for pid, given in self._state.items())
        fresh = self._path.with_suffix(".tmp")
        fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, lines)
        finally:
            os.close(fd)
        fresh.replace(self._path)
        self.close()  # the next write appends to the new file
        self._size = len(lines)
        self._pending.clear()


def _write_all(fd: int, data: bytes | bytearray) -> int:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return len(data)
