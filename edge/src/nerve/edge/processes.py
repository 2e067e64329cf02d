"""Run a program for an action: argv only, never a shell; a timeout; output capped.

Every action that starts a program (`vacuum_journal`, `restart_service`, `run`) goes through
`run_program`, so the same limits hold for all of them: no shell, stdin from /dev/null, cwd `/`, a
small fixed environment, its own process group (killed whole on timeout), and at most
`max_output_bytes` kept of stdout and of stderr (the rest is read and thrown away, so a chatty program
never blocks on a full pipe and never fills the device's memory).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["ProgramOutcome", "run_program"]

# Enough for systemctl and journalctl wherever a distribution puts them; nothing from the daemon's own
# environment leaks into what a command starts.
_ENV: Final = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
_CHUNK: Final = 65536
_KILL_GRACE_S: Final = 2.0


@dataclass(frozen=True, slots=True)
class ProgramOutcome:
    """How a program ended.

    `exit_code` is None when it did not start (`error` says why) or was killed on timeout
    (`timed_out`); a negative code is the signal that ended it. `stdout`/`stderr` hold at most the
    cap (decoded as UTF-8, bad bytes replaced); `truncated` says some output was dropped.
    """

    argv: tuple[str, ...]
    exit_code: int | None
    stdout: str
    stderr: str
    truncated: bool
    timed_out: bool
    duration_s: float
    error: str = ""

    @property
    def succeeded(self) -> bool:
        """It ran, in time, and exited 0."""
        return self.exit_code == 0 and not self.timed_out

    def describe(self) -> str:
        """One line for a result's reason, e.g. `exited with 3` or `timed out after 5 s`."""
        if self.error:
            return f"could not start {self.argv[0]!r}: {self.error}"
        if self.timed_out:
            return f"{self.argv[0]} timed out after {self.duration_s:.1f} s and was killed"
        if self.exit_code is not None and self.exit_code < 0:
            return f"{self.argv[0]} was killed by signal {-self.exit_code}"
        return f"{self.argv[0]} exited with {self.exit_code}"

    def as_data(self) -> dict[str, Any]:
        """The fields a CommandResult's `data` carries."""
        return {
            "argv": list(self.argv),
            "exit_code": self.exit_code,
            "timed_out": self.timed_out,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "output_truncated": self.truncated,
            "duration_s": round(self.duration_s, 3),
        }


def run_program(argv: Sequence[str], *, timeout_s: float, max_output_bytes: int) -> ProgramOutcome:
    """Run `argv` to its end or until `timeout_s`; never raises for the program's behaviour.

    A program that cannot be started (missing, not executable) is an outcome with `error` set.
    On timeout the whole process group gets SIGTERM, then SIGKILL 2 s later.
    """
    argv = tuple(argv)
    started = time.monotonic()
    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd="/",
            env=_ENV,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        return ProgramOutcome(
            argv=argv,
            exit_code=None,
            stdout="",
            stderr="",
            truncated=False,
            timed_out=False,
            duration_s=time.monotonic() - started,
            error=exc.strerror or type(exc).__name__,
        )
    deadline = started + timeout_s
    with process:
        stdout, stderr, truncated, timed_out = _read_capped(process, deadline, max_output_bytes)
        exit_code: int | None = None
        if timed_out:
            _kill_group(process)
        else:
            try:
                exit_code = process.wait(timeout=max(deadline - time.monotonic(), 0.001))
            except subprocess.TimeoutExpired:
                # Closed its output but went on running (a daemonising script, say).
                timed_out = True
                _kill_group(process)
    return ProgramOutcome(
        argv=argv,
        exit_code=exit_code,
        stdout=stdout.decode("utf-8", "replace"),
        stderr=stderr.decode("utf-8", "replace"),
        truncated=truncated,
        timed_out=timed_out,
        duration_s=time.monotonic() - started,
    )


def _read_capped(
    process: subprocess.Popen[bytes], deadline: float, limit: int
) -> tuple[bytes, bytes, bool, bool]:
    """Read stdout and stderr until both close or `deadline`: (stdout, stderr, truncated, timed out)."""
    streams = [stream for stream in (process.stdout, process.stderr) if stream is not None]
    kept = {stream.fileno(): bytearray() for stream in streams}
    truncated = False
    with selectors.DefaultSelector() as selector:
        for stream in streams:
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return (*_pick(process, kept), truncated, True)
            for key, _ in selector.select(timeout=remaining):
                chunk = os.read(key.fd, _CHUNK)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                buffer = kept[key.fd]
                room = max(limit - len(buffer), 0)
                truncated = truncated or len(chunk) > room
                buffer += chunk[:room]
    return (*_pick(process, kept), truncated, False)


def _pick(process: subprocess.Popen[bytes], kept: dict[int, bytearray]) -> tuple[bytes, bytes]:
    out = kept.get(process.stdout.fileno(), b"") if process.stdout is not None else b""
    err = kept.get(process.stderr.fileno(), b"") if process.stderr is not None else b""
    return bytes(out), bytes(err)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    # The program may have children of its own: the group goes, not only the leader.
    for signum, grace in ((signal.SIGTERM, _KILL_GRACE_S), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signum)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        return
