"""What the edge's SQLite files (the outbox, the command journal) share: opening, WAL, the schema version.

Standard library only: the edge daemon stays import-light.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Final, Self

if TYPE_CHECKING:
    import logging
    from collections.abc import Callable, Collection
    from pathlib import Path
    from types import TracebackType

__all__ = ["ClosedOnExit", "check_schema_version", "open_prepared", "use_wal"]

_BUSY_TIMEOUT_S: Final = 5.0


def open_prepared(
    path: Path, prepare: Callable[[sqlite3.Connection], None], *, check_same_thread: bool = True
) -> sqlite3.Connection:
    """Connect to `path` in autocommit mode and `prepare` the connection; closed again if that fails.

    Autocommit (isolation_level=None): each statement is its own transaction unless an explicit
    BEGIN opens one. Whatever `sqlite3.connect` or `prepare` raise goes to the caller.
    """
    connection = sqlite3.connect(
        path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=check_same_thread
    )
    try:
        prepare(connection)
    except BaseException:
        connection.close()
        raise
    return connection


def use_wal(connection: sqlite3.Connection, *, synchronous: str, log: logging.Logger, name: str) -> None:
    """Switch to WAL (warn on `log`, as `name`, where the file system has none) and set `synchronous`."""
    mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode != "wal":
        log.warning("%s: WAL is not available here, using %s", name, mode)
    connection.execute(f"PRAGMA synchronous = {synchronous}")


def check_schema_version(
    connection: sqlite3.Connection,
    current: int,
    *,
    error: Callable[[str], Exception],
    older: Collection[int] = (),
) -> int:
    """The file's schema version: 0 (new), `current` or one of `older`; any other raises `error(reason)`."""
    version: int = connection.execute("PRAGMA user_version").fetchone()[0]
    if version not in {0, current, *older}:
        raise error(f"written by another nerve version (schema {version}, expected {current})")
    return version


class ClosedOnExit:
    """A context manager that returns itself and calls `close()` on the way out."""

    def close(self) -> None:
        """Release what the object holds."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
