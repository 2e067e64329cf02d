"""What an action is (the `Action` protocol, for built-ins and plugins alike), and `clear_temp`.

A command's arguments come off the network, so each action has a strict parser (`validate`) that
refuses anything it does not know. Arguments never name a path: what an action may touch (the roots of
`clear_temp`) comes only from the device's configuration.

```
NerveError
├── ActionArgumentError    a command's arguments are wrong (names the argument, says what fits)
└── ActionFailed           an action ran and did not succeed (carries the reason and result data)
```
"""

from __future__ import annotations

import errno
import math
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

from nerve.runtime.errors import NerveError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = [
    "DEFAULT_OLDER_THAN_S",
    "MAX_OLDER_THAN_S",
    "Action",
    "ActionArgumentError",
    "ActionFailed",
    "ClearTemp",
    "ClearTempResult",
    "clear_temp",
    "parse_clear_temp_args",
]

DEFAULT_OLDER_THAN_S: Final = 3600.0
MAX_OLDER_THAN_S: Final = 365 * 86400.0

_CLEAR_TEMP: Final = "clear_temp"
_OLDER_THAN_S: Final = "older_than_s"
_MAX_ERRORS: Final = 20
# One directory fd stays open per level of the walk: the cap bounds fds and recursion even in a
# tree built to be deep.
_MAX_DEPTH: Final = 64
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_REPR_LIMIT: Final = 40
_KIB: Final = 1024


class ActionArgumentError(NerveError):
    """A command's arguments are wrong: `argument` is the one at fault, `expected` what fits."""

    def __init__(self, action: str, argument: str, expected: str, got: str) -> None:
        self.action = action
        self.argument = argument
        self.expected = expected
        self.got = got
        super().__init__(f"{action}: argument {argument!r} {got}; expected {expected}")


class ActionFailed(NerveError):
    """Raised by `Action.run`: the action ran and did not succeed.

    The result is `failed` with `reason`, and `data` (what it did, the program's output, …) goes in
    the result's `data`. Any other exception from `run` is also `failed`, with the exception as reason.
    """

    def __init__(self, reason: str, data: Mapping[str, Any] | None = None) -> None:
        self.reason = reason
        self.data = dict(data or {})
        super().__init__(reason)


@runtime_checkable
class Action(Protocol):
    """An action a device runs on a signed command: a built-in or a plugin (entry point `nerve.actions`).

    The executor calls `validate` with the command's arguments (its `data`) once the command is
    genuine, current and allow-listed; then, after the command id is journalled as started, `run`
    with what `validate` returned. `run` is called from a worker thread and may block; it returns
    the result's `data` (JSON-like: str, int, float, bool, None, lists, dicts with str keys).

    `idempotent` says whether running the action twice is as good as once: after a crash during its
    run, an idempotent action runs again when the command is delivered again (if not expired),
    any other is answered `unknown` and never run again.
    """

    @property
    def name(self) -> str:
        """The action's name: the last level of its command topic, a token (`[A-Za-z0-9_-]`)."""
        ...

    @property
    def idempotent(self) -> bool:
        """True if running it again after an interrupted run is safe."""
        ...

    def validate(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        """Check the command's arguments; return them as `run` wants them.

        Raises:
            ActionArgumentError: an argument is unknown, missing, of the wrong type or out of range.
                Nothing has run; the command is answered `rejected` with this message.
        """
        ...

    def run(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Do it; return the result's `data`.

        Raises:
            ActionFailed: it ran and failed; the result is `failed` with its reason and data.
        """
        ...


class ClearTemp:
    """`clear_temp` as an `Action`: deletes old regular files under the configured roots only."""

    name: Final = "clear_temp"
    # Not idempotent: its cutoff moves with the clock, so a second run deletes more than the first
    # would have; an interrupted clear_temp is reported `unknown`, central decides.
    idempotent: Final = False

    def __init__(self, roots: Sequence[Path], *, max_age_s: float = MAX_OLDER_THAN_S) -> None:
        self._roots = tuple(roots)
        self._max_age_s = max_age_s

    def validate(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        """`older_than_s` only; see `parse_clear_temp_args`."""
        return {_OLDER_THAN_S: parse_clear_temp_args(args, max_age_s=self._max_age_s)}

    def run(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Delete; the data says how many files and bytes, what was skipped and why."""
        done = clear_temp(roots=self._roots, older_than_s=float(args[_OLDER_THAN_S]))
        return {
            "files_deleted": done.files_deleted,
            "bytes_freed": done.bytes_freed,
            "skipped": done.skipped,
            "errors": list(done.errors),
            "errors_omitted": done.errors_omitted,
            "limit_reached": done.limit_reached,
            "summary": done.summary(),
        }


def parse_clear_temp_args(args: Mapping[str, object], *, max_age_s: float = MAX_OLDER_THAN_S) -> float:
    """Validate the arguments of a `clear_temp` command and return `older_than_s`.

    The only argument is `older_than_s`: a number of seconds (int or float, not bool) from 0 to
    `max_age_s`; when absent it is `DEFAULT_OLDER_THAN_S` (one hour).

    Raises:
        ActionArgumentError: an unknown argument (a path, say), or `older_than_s` of the wrong
            type, not finite, negative or over `max_age_s`.
    """
    for key in args:
        if key != _OLDER_THAN_S:
            raise ActionArgumentError(
                _CLEAR_TEMP,
                str(key)[:_REPR_LIMIT],
                f"only {_OLDER_THAN_S!r}",
                "is not a known argument",
            )
    if _OLDER_THAN_S not in args:
        return DEFAULT_OLDER_THAN_S
    value = args[_OLDER_THAN_S]
    expected = f"a number of seconds from 0 to {max_age_s:g}"
    # bool is an int to Python, but `true` is never a number of seconds.
    if isinstance(value, bool) or not isinstance(value, int | float):
        got = f"is a {type(value).__name__} ({_short_repr(value)})"
        raise ActionArgumentError(_CLEAR_TEMP, _OLDER_THAN_S, expected, got)
    # Compared before float(): an int too large for a float must fail here, not overflow.
    if not (isinstance(value, int) or math.isfinite(value)) or not 0 <= value <= max_age_s:
        got = f"is {_short_repr(value)}"
        raise ActionArgumentError(_CLEAR_TEMP, _OLDER_THAN_S, expected, got)
    return float(value)


@dataclass(frozen=True, slots=True)
class ClearTempResult:
    """What `clear_temp` did.

    `skipped` counts entries left alone for a reason other than their age: symlinks, sockets,
    fifos and devices, files that vanished before they could be deleted, directories swapped for
    something else mid-walk or on another filesystem. `errors` holds the first 20 problems
    (a path and why); `errors_omitted` counts the rest. `limit_reached` says the walk stopped at
    `max_files` with old files still left.
    """

    files_deleted: int
    bytes_freed: int
    skipped: int
    errors: list[str]
    errors_omitted: int = 0
    limit_reached: bool = False

    def summary(self) -> str:
        """One line for a person, e.g. `deleted 3 files (1.5 KiB), skipped 1, 0 errors`."""
        files = "file" if self.files_deleted == 1 else "files"
        text = (
            f"deleted {self.files_deleted} {files} ({_human_bytes(self.bytes_freed)}), skipped {self.skipped}"
        )
        if self.limit_reached:
            text += ", stopped at the file limit"
        count = len(self.errors) + self.errors_omitted
        text += f", {count} {'error' if count == 1 else 'errors'}"
        if self.errors:
            text += f" (first: {self.errors[0]})"
        return text


def clear_temp(
    *,
    roots: Sequence[Path],
    older_than_s: float,
    max_files: int = 10_000,
    now: float | None = None,
) -> ClearTempResult:
    """Delete the regular files under `roots` last modified more than `older_than_s` ago.

    Only regular files are deleted. Directories stay (even empty ones), and symlinks, sockets,
    fifos and devices are left alone, the links themselves too. Nothing is ever followed:

    - A root must be an absolute path to a real directory. A root that is itself a symlink is
      refused (an error in the result), so configuration must name the real directory; parent
      components of a root are trusted, as they come from configuration.
    - Every directory is opened relative to its parent's descriptor with O_NOFOLLOW, and every
      file is unlinked relative to its directory's descriptor, so a directory swapped for a
      symlink mid-walk cannot redirect a deletion outside the root.
    - The walk stays on the root's filesystem (like `find -xdev`) and goes at most 64 levels deep.

    It stops after `max_files` deletions. Problems never raise: a vanished file counts as
    skipped, a permission error or a missing root is recorded in `errors`, and the walk goes on.

    Remaining race: between the lstat that finds a file old and the unlink, another process can
    put something else under the same name in that directory, and that gets unlinked instead
    (a link is unlinked, never its target). It stays inside the root either way.

    Raises:
        ValueError: `older_than_s` is negative or not finite, or `max_files` is negative.
    """
    if not (math.isfinite(older_than_s) and older_than_s >= 0):
        raise ValueError(f"older_than_s must be a finite number >= 0, not {older_than_s!r}")
    if max_files < 0:
        raise ValueError(f"max_files must be >= 0, not {max_files!r}")
    walk = _Walk(cutoff=(time.time() if now is None else now) - older_than_s, max_files=max_files)
    for root in roots:
        if walk.stopped:
            break
        walk.root(Path(root))
    return walk.result()


@dataclass(slots=True)
class _Walk:
    """The running state of one `clear_temp` call."""

    cutoff: float
    max_files: int
    deleted: int = 0
    freed: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)
    errors_omitted: int = 0
    stopped: bool = False

    def result(self) -> ClearTempResult:
        return ClearTempResult(
            files_deleted=self.deleted,
            bytes_freed=self.freed,
            skipped=self.skipped,
            errors=self.errors,
            errors_omitted=self.errors_omitted,
            limit_reached=self.stopped,
        )

    def error(self, path: Path, reason: str | OSError) -> None:
        if isinstance(reason, OSError):
            reason = reason.strerror or type(reason).__name__
        if len(self.errors) < _MAX_ERRORS:
            self.errors.append(f"{path}: {reason}")
        else:
            self.errors_omitted += 1

    def root(self, root: Path) -> None:
        if not root.is_absolute():
            self.error(root, "refused: a root must be an absolute path")
            return
        try:
            fd = os.open(root, _DIR_FLAGS)
        except OSError as exc:
            # With O_DIRECTORY a symlink fails as ENOTDIR, so tell the two apart for the message.
            self.error(root, "refused: the root is a symlink" if root.is_symlink() else exc)
            return
        try:
            self.directory(fd, root, os.fstat(fd).st_dev, depth=0)
        finally:
            os.close(fd)

    def directory(self, fd: int, path: Path, device: int, depth: int) -> None:
        subdirectories: list[str] = []
        try:
            # scandir works on a dup of fd; it is closed before descending, so the walk holds
            # one descriptor per level.
            with os.scandir(fd) as entries:
                for entry in entries:
                    if self.stopped:
                        return
                    self.entry(fd, path, entry, subdirectories)
        except OSError as exc:
            self.error(path, exc)
        for name in subdirectories:
            if self.stopped:
                return
            self.subdirectory(fd, path / name, name, device, depth + 1)

    def entry(self, dir_fd: int, dir_path: Path, entry: os.DirEntry[str], subdirectories: list[str]) -> None:
        try:
            if entry.is_dir(follow_symlinks=False):
                subdirectories.append(entry.name)
                return
            st = entry.stat(follow_symlinks=False) if entry.is_file(follow_symlinks=False) else None
        except FileNotFoundError:
            self.skipped += 1
            return
        except OSError as exc:
            self.error(dir_path / entry.name, exc)
            return
        # The lstat is checked again: the name may have been replaced since it was listed.
        if st is None or not stat.S_ISREG(st.st_mode):
            self.skipped += 1
        elif st.st_mtime < self.cutoff:
            self.delete(dir_fd, dir_path / entry.name, entry.name, st.st_size)

    def delete(self, dir_fd: int, path: Path, name: str, size: int) -> None:
        if self.deleted >= self.max_files:
            self.stopped = True
            return
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            self.skipped += 1
        except OSError as exc:
            self.error(path, exc)
        else:
            self.deleted += 1
            self.freed += size

    def subdirectory(self, parent_fd: int, path: Path, name: str, device: int, depth: int) -> None:
        if depth > _MAX_DEPTH:
            self.error(path, f"not entered: deeper than {_MAX_DEPTH} levels")
            return
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except OSError as exc:
            # Gone, or swapped for a symlink or a file since it was listed.
            if exc.errno in {errno.ENOENT, errno.ENOTDIR, errno.ELOOP}:
                self.skipped += 1
            else:
                self.error(path, exc)
            return
        try:
            if os.fstat(fd).st_dev != device:
                self.skipped += 1
                return
            self.directory(fd, path, device, depth)
        finally:
            os.close(fd)


def _short_repr(value: object) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int past sys.get_int_max_str_digits()
        return "an integer too large to print"
    return text if len(text) <= _REPR_LIMIT else text[: _REPR_LIMIT - 3] + "..."


def _human_bytes(size: int) -> str:
    if size < _KIB:
        return f"{size} B"
    amount = float(size)
    for unit in ("KiB", "MiB", "GiB"):
        amount /= _KIB
        if amount < _KIB:
            return f"{amount:.1f} {unit}"
    return f"{amount / _KIB:.1f} TiB"
