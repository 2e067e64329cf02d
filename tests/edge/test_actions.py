"""Unit tests of nerve.edge.actions: clear_temp on real temporary trees, argument parsing."""

from __future__ import annotations

import errno
import math
import os
import stat
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nerve.edge.actions import (
    DEFAULT_OLDER_THAN_S,
    MAX_OLDER_THAN_S,
    ActionArgumentError,
    ClearTempResult,
    clear_temp,
    parse_clear_temp_args,
)
from nerve.runtime.errors import NerveError

NOW = 1_700_000_000.0
HOUR = 3600.0


def put(path: Path, *, age: float, size: int = 10) -> Path:
    """A regular file of `size` bytes last modified `age` seconds before NOW."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (NOW - age, NOW - age))
    return path


def link(path: Path, target: Path, *, age: float = 10 * HOUR) -> Path:
    """A symlink, itself old, so only its type can keep it."""
    path.symlink_to(target)
    os.utime(path, (NOW - age, NOW - age), follow_symlinks=False)
    return path


def clear(*roots: Path, older_than_s: float = HOUR, max_files: int = 10_000) -> ClearTempResult:
    return clear_temp(roots=roots, older_than_s=older_than_s, max_files=max_files, now=NOW)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """Old files outside the root, which must never be touched."""
    path = tmp_path / "outside"
    put(path / "precious", age=100 * HOUR)
    put(path / "dir" / "precious", age=100 * HOUR)
    return path


def test_deletes_old_files_only_and_reports_bytes(root: Path) -> None:
    put(root / "old", age=2 * HOUR, size=100)
    put(root / "sub" / "deeper" / "old", age=3 * HOUR, size=50)
    young = put(root / "young", age=10, size=1000)
    edge = put(root / "exactly-at-the-cutoff", age=HOUR)

    result = clear(root)

    assert result == ClearTempResult(files_deleted=2, bytes_freed=150, skipped=0, errors=[])
    assert sorted(p.name for p in root.rglob("*")) == [
        "deeper",
        "exactly-at-the-cutoff",
        "sub",
        "young",
    ]
    assert young.exists()
    assert edge.exists()


def test_now_defaults_to_the_clock(root: Path) -> None:
    old = root / "old"
    old.write_bytes(b"x")
    os.utime(old, (0, 0))
    young = root / "young"
    young.write_bytes(b"x")
    result = clear_temp(roots=[root], older_than_s=HOUR)
    assert result.files_deleted == 1
    assert not old.exists()
    assert young.exists()


def test_leaves_directories_even_old_and_empty(root: Path) -> None:
    empty = root / "empty" / "deeper"
    empty.mkdir(parents=True)
    os.utime(empty, (0, 0))
    os.utime(empty.parent, (0, 0))
    result = clear(root, older_than_s=0)
    assert result.files_deleted == 0
    assert empty.is_dir()


def test_older_than_zero_deletes_every_file_older_than_now(root: Path) -> None:
    put(root / "a", age=1)
    put(root / "now", age=0)
    result = clear(root, older_than_s=0)
    assert result.files_deleted == 1
    assert [p.name for p in root.iterdir()] == ["now"]


def test_does_not_follow_a_symlink_to_a_file_outside(root: Path, outside: Path) -> None:
    link(root / "link", outside / "precious")
    result = clear(root)
    assert result.files_deleted == 0
    assert result.skipped == 1
    assert (outside / "precious").exists()
    assert (root / "link").is_symlink()


def test_does_not_enter_a_symlink_to_a_directory_outside(root: Path, outside: Path) -> None:
    link(root / "dirlink", outside / "dir")
    link(root / "toplink", outside)
    result = clear(root)
    assert result.files_deleted == 0
    assert result.skipped == 2
    assert (outside / "precious").exists()
    assert (outside / "dir" / "precious").exists()
    assert (root / "dirlink").is_symlink()


def test_a_symlink_inside_the_root_is_left_alone_and_never_followed(root: Path) -> None:
    young = put(root / "young", age=10)
    link(root / "old-link-to-young", young)
    old = put(root / "old", age=2 * HOUR)
    link(root / "old-link-to-old", old)
    link(root / "dangling", root / "nothing")

    result = clear(root)

    assert result.files_deleted == 1  # `old`, found by its own name
    assert result.skipped == 3
    assert young.exists()
    assert not old.exists()
    for name in ("old-link-to-young", "old-link-to-old", "dangling"):
        assert (root / name).is_symlink()


def test_a_root_that_is_a_symlink_is_refused(tmp_path: Path, outside: Path) -> None:
    root_link = link(tmp_path / "root-link", outside)
    result = clear(root_link)
    assert result.files_deleted == 0
    assert result.errors == [f"{root_link}: refused: the root is a symlink"]
    assert (outside / "precious").exists()


def test_a_missing_relative_or_file_root_is_an_error_and_the_others_still_run(
    tmp_path: Path, root: Path
) -> None:
    put(root / "old", age=2 * HOUR)
    a_file = put(tmp_path / "a-file", age=2 * HOUR)
    result = clear(tmp_path / "missing", Path("relative"), a_file, root)
    assert result.files_deleted == 1
    assert result.errors == [
        f"{tmp_path / 'missing'}: No such file or directory",
        "relative: refused: a root must be an absolute path",
        f"{a_file}: Not a directory",
    ]
    assert a_file.exists()


def test_sockets_fifos_and_devices_are_skipped(root: Path) -> None:
    fifo = root / "fifo"
    os.mkfifo(fifo)
    os.utime(fifo, (0, 0))
    result = clear(root)
    assert result.skipped == 1
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


def test_stops_after_max_files(root: Path) -> None:
    for i in range(5):
        put(root / f"old{i}", age=2 * HOUR)
    result = clear(root, max_files=2)
    assert result.files_deleted == 2
    assert result.limit_reached
    assert len(list(root.iterdir())) == 3
    assert "stopped at the file limit" in result.summary()

    result = clear(root, max_files=3)
    assert result.files_deleted == 3
    assert not result.limit_reached

    put(root / "again", age=2 * HOUR)
    result = clear(root, root, max_files=0)
    assert result.files_deleted == 0
    assert result.limit_reached
    assert (root / "again").exists()


def test_an_unreadable_subdirectory_is_recorded(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put(root / "locked" / "old", age=2 * HOUR)
    put(root / "open" / "old", age=2 * HOUR)
    real_open = os.open

    def deny_locked(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if path == "locked":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", deny_locked)
    result = clear(root)
    assert result.files_deleted == 1
    assert result.errors == [f"{root / 'locked'}: Permission denied"]
    assert (root / "locked" / "old").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every directory")
def test_a_really_unreadable_subdirectory_is_recorded(root: Path) -> None:
    locked = root / "locked"
    put(locked / "old", age=2 * HOUR)
    put(root / "old", age=2 * HOUR)
    locked.chmod(0)
    try:
        result = clear(root)
    finally:
        locked.chmod(0o700)
    assert result.files_deleted == 1
    assert result.errors == [f"{locked}: Permission denied"]


def test_a_file_that_cannot_be_deleted_is_recorded_and_errors_are_capped(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(25):
        put(root / f"old{i:02}", age=2 * HOUR)

    def deny(*_args: object, **_kwargs: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "unlink", deny)
    result = clear(root)
    assert result.files_deleted == 0
    assert len(result.errors) == 20
    assert result.errors_omitted == 5
    assert all(error.endswith(": Operation not permitted") for error in result.errors)
    assert ", 25 errors (first: " in result.summary()


def test_a_file_vanishing_concurrently_is_skipped(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put(root / "old", age=2 * HOUR)
    real_unlink = os.unlink

    def unlink_first(path: Any, *, dir_fd: int | None = None) -> None:
        real_unlink(path, dir_fd=dir_fd)  # someone else was faster
        raise FileNotFoundError(errno.ENOENT, "No such file or directory")

    monkeypatch.setattr(os, "unlink", unlink_first)
    result = clear(root)
    assert (result.files_deleted, result.skipped, result.errors) == (0, 1, [])


def test_a_directory_swapped_for_a_symlink_mid_walk_is_not_followed(
    tmp_path: Path, root: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(root / "sub" / "old", age=2 * HOUR)
    real_open = os.open

    def swap_then_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if path == "sub":  # listed as a directory; now an attacker swaps it
            (root / "sub").rename(tmp_path / "moved")
            (root / "sub").symlink_to(outside)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", swap_then_open)
    result = clear(root)
    assert (result.files_deleted, result.skipped, result.errors) == (0, 1, [])
    assert (outside / "precious").exists()
    assert (outside / "dir" / "precious").exists()


def test_another_filesystem_inside_the_root_is_not_entered(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(root / "mnt" / "old", age=2 * HOUR)
    put(root / "old", age=2 * HOUR)
    real_fstat = os.fstat
    directories = 0

    def fstat(fd: int) -> Any:
        nonlocal directories
        st_ = real_fstat(fd)
        if not stat.S_ISDIR(st_.st_mode):
            return st_  # someone else's file
        directories += 1
        # The first directory is the root; every later one claims another device.
        return st_ if directories == 1 else SimpleNamespace(st_dev=st_.st_dev + 1)

    monkeypatch.setattr(os, "fstat", fstat)
    result = clear(root)
    assert (result.files_deleted, result.skipped) == (1, 1)
    assert (root / "mnt" / "old").exists()


def test_a_tree_deeper_than_the_limit_is_not_entered(root: Path) -> None:
    deep = root.joinpath(*["d"] * 65)
    put(deep / "old", age=2 * HOUR)
    put(deep.parent / "old", age=2 * HOUR)
    result = clear(root)
    assert result.files_deleted == 1
    assert result.errors == [f"{deep}: not entered: deeper than 64 levels"]
    assert (deep / "old").exists()


@pytest.mark.parametrize(("older_than_s", "max_files"), [(-1.0, 1), (math.nan, 1), (math.inf, 1), (1.0, -1)])
def test_bad_parameters_raise(root: Path, older_than_s: float, max_files: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        clear(root, older_than_s=older_than_s, max_files=max_files)


@pytest.mark.parametrize(
    ("result", "text"),
    [
        (ClearTempResult(0, 0, 0, []), "deleted 0 files (0 B), skipped 0, 0 errors"),
        (ClearTempResult(1, 1023, 2, []), "deleted 1 file (1023 B), skipped 2, 0 errors"),
        (
            ClearTempResult(3, 1536, 0, ["/tmp/x: boom"]),
            "deleted 3 files (1.5 KiB), skipped 0, 1 error (first: /tmp/x: boom)",
        ),
        (ClearTempResult(9, 5 * 1024**3, 0, []), "deleted 9 files (5.0 GiB), skipped 0, 0 errors"),
        (ClearTempResult(9, 3 * 1024**4, 0, []), "deleted 9 files (3.0 TiB), skipped 0, 0 errors"),
    ],
)
def test_summary(result: ClearTempResult, text: str) -> None:
    assert result.summary() == text


# --- arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({}, DEFAULT_OLDER_THAN_S),
        ({"older_than_s": 0}, 0.0),
        ({"older_than_s": 60}, 60.0),
        ({"older_than_s": 1.5}, 1.5),
        ({"older_than_s": MAX_OLDER_THAN_S}, MAX_OLDER_THAN_S),
    ],
)
def test_good_arguments(args: dict[str, object], expected: float) -> None:
    parsed = parse_clear_temp_args(args)
    assert parsed == expected
    assert type(parsed) is float


def test_the_default_is_one_hour() -> None:
    assert DEFAULT_OLDER_THAN_S == HOUR
    assert MAX_OLDER_THAN_S == 365 * 86400


@pytest.mark.parametrize(
    ("args", "argument", "got"),
    [
        ({"path": "/etc"}, "path", "is not a known argument"),
        ({"older_than_s": 60, "roots": ["/"]}, "roots", "is not a known argument"),
        ({"older_than_s": -1}, "older_than_s", "is -1"),
        ({"older_than_s": -0.5}, "older_than_s", "is -0.5"),
        ({"older_than_s": "3600"}, "older_than_s", "is a str ('3600')"),
        ({"older_than_s": True}, "older_than_s", "is a bool (True)"),
        ({"older_than_s": None}, "older_than_s", "is a NoneType (None)"),
        ({"older_than_s": [1]}, "older_than_s", "is a list ([1])"),
        ({"older_than_s": MAX_OLDER_THAN_S + 1}, "older_than_s", "is 31536001.0"),
        ({"older_than_s": 10**400}, "older_than_s", "is 1000000000000000000000000000000000000..."),
        ({"older_than_s": 10**5000}, "older_than_s", "is an integer too large to print"),
        ({"older_than_s": math.inf}, "older_than_s", "is inf"),
        ({"older_than_s": math.nan}, "older_than_s", "is nan"),
    ],
)
def test_bad_arguments_raise(args: dict[str, object], argument: str, got: str) -> None:
    with pytest.raises(ActionArgumentError) as info:
        parse_clear_temp_args(args)
    error = info.value
    assert isinstance(error, NerveError)
    assert (error.action, error.argument, error.got) == ("clear_temp", argument, got)
    assert str(error).startswith(f"clear_temp: argument {argument!r} {got}; expected ")


def test_max_age_is_configurable() -> None:
    assert parse_clear_temp_args({"older_than_s": 60}, max_age_s=60) == 60.0
    with pytest.raises(ActionArgumentError, match=r"expected a number of seconds from 0 to 60$"):
        parse_clear_temp_args({"older_than_s": 61}, max_age_s=60)


def test_a_long_unknown_key_is_cut_short() -> None:
    with pytest.raises(ActionArgumentError) as info:
        parse_clear_temp_args({"x" * 10_000: 1})
    assert info.value.argument == "x" * 40


def test_a_non_string_key_is_named() -> None:
    with pytest.raises(ActionArgumentError, match="argument '1' is not a known argument"):
        parse_clear_temp_args({1: 60})  # type: ignore[dict-item]


# --- property --------------------------------------------------------------------------------

KINDS = ("file", "file", "file", "link-out-file", "link-out-dir", "link-in", "dir")
names = st.sampled_from(["a", "b", "c", "d"])
trees = st.dictionaries(
    st.lists(names, min_size=1, max_size=3).map(tuple),
    st.tuples(st.sampled_from(KINDS), st.integers(0, 10), st.integers(0, 100)),
    max_size=20,
)


def snapshot(top: Path) -> dict[str, tuple[str, float, int]]:
    """Every entry under top with its kind, mtime and size, symlinks not followed."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st_ = path.lstat()
            if stat.S_ISDIR(st_.st_mode):
                # A directory's mtime changes when an entry goes; it only has to stay.
                found[str(path.relative_to(top))] = ("dir", 0.0, 0)
            else:
                kind = "link" if stat.S_ISLNK(st_.st_mode) else "file"
                found[str(path.relative_to(top))] = (kind, st_.st_mtime, st_.st_size)
    return found


@settings(max_examples=60, deadline=None)
@given(tree=trees, threshold=st.integers(0, 10), max_files=st.integers(0, 25))
def test_exactly_the_old_regular_files_under_the_root_are_deleted(
    tree: dict[tuple[str, ...], tuple[str, int, int]], threshold: int, max_files: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        root, outside = base / "root", base / "outside"
        root.mkdir()
        put(outside / "old", age=1000)
        put(outside / "dir" / "old", age=1000)
        for parts, (kind, age, size) in sorted(tree.items(), key=lambda item: len(item[0])):
            path = root.joinpath(*parts)
            if not path.parent.is_dir() or path.parent.is_symlink():
                continue  # an earlier entry made the parent a file or a link
            if os.path.lexists(path):
                continue
            if kind == "file":
                put(path, age=age, size=size)
            elif kind == "dir":
                path.mkdir()
            elif kind == "link-in":
                link(path, root.joinpath(*parts[:1]), age=1000)
            else:
                link(path, outside / ("old" if kind == "link-out-file" else "dir"), age=1000)
        outside_before = snapshot(outside)
        before = snapshot(root)
        old = {
            name for name, (kind, mtime, _) in before.items() if kind == "file" and mtime < NOW - threshold
        }

        result = clear_temp(roots=[root], older_than_s=threshold, max_files=max_files, now=NOW)

        after = snapshot(root)
        deleted = set(before) - set(after)
        assert deleted <= old
        assert len(deleted) == result.files_deleted == min(len(old), max_files)
        assert result.limit_reached == (len(old) > max_files)
        assert result.bytes_freed == sum(before[name][2] for name in deleted)
        assert result.errors == []
        assert all(after[name] == before[name] for name in after)
        assert set(after) == set(before) - deleted
        assert snapshot(outside) == outside_before
