"""What `nerve up` and `nerve --version` tell a person: commands and paths as they can be typed here."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from nerve.runtime.cli.main import runnable, shown_path, version_line

NERVE = str(Path(sys.executable).parent / "nerve")
CLONE = Path("/home/ada/src/nerve")


def test_a_venv_below_the_working_directory_is_shown_relative() -> None:
    assert runnable(CLONE / ".venv/bin/nerve", cwd=CLONE, on_path=None) == ".venv/bin/nerve"
    assert runnable(Path(".venv/bin/nerve"), cwd=CLONE, on_path=None) == ".venv/bin/nerve"


def test_elsewhere_it_is_absolute() -> None:
    assert runnable(CLONE / ".venv/bin/nerve", cwd=Path("/tmp"), on_path=None) == str(
        CLONE / ".venv/bin/nerve"
    )
    assert (
        runnable(Path("/opt/nerve/bin/nerve"), cwd=CLONE, on_path="/usr/bin/nerve") == "/opt/nerve/bin/nerve"
    )


def test_the_bare_name_when_path_finds_this_very_program() -> None:
    assert runnable(Path("/usr/local/bin/nerve"), cwd=CLONE, on_path="/usr/local/bin/nerve") == "nerve"
    assert runnable(Path(".venv/bin/nerve"), cwd=CLONE, on_path=str(CLONE / ".venv/bin/nerve")) == "nerve"


def test_shown_path() -> None:
    assert shown_path(CLONE / ".nerve", cwd=CLONE) == ".nerve"
    assert shown_path(CLONE / ".nerve/scratch", cwd=CLONE) == ".nerve/scratch"
    assert shown_path(CLONE, cwd=CLONE) == str(CLONE)
    assert shown_path(Path("/var/lib/nerve"), cwd=CLONE) == "/var/lib/nerve"


@given(parts=st.lists(st.from_regex(r"[a-z.]{1,8}", fullmatch=True).filter(lambda p: p not in {".", ".."})))
def test_a_shown_path_leads_to_the_same_place(parts: list[str]) -> None:
    path = CLONE.joinpath(*parts)
    shown = Path(shown_path(path, cwd=CLONE))
    assert (shown if shown.is_absolute() else CLONE / shown) == path


def test_version_comes_from_the_installed_distributions() -> None:
    done = subprocess.run([NERVE, "--version"], capture_output=True, text=True, check=True, timeout=60)
    runtime = importlib.metadata.version("nerve-runtime")
    assert done.stdout == version_line() + "\n"
    assert done.stdout.startswith("nerve ")
    assert f"nerve-runtime {runtime}" in done.stdout
    assert done.stdout.count("\n") == 1
