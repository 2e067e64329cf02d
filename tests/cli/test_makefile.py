"""The Makefile's ways to pass arguments to `nerve up`: `ARGS`, and `NERVE_ARGS` for those who learned it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def make(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # `run` depends on `setup`, which is a no-op once the venv is installed (as it is for this test).
    clean = {key: value for key, value in os.environ.items() if not key.startswith("NERVE_")}
    return subprocess.run(
        ["make", "-s", "-C", str(ROOT), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={**clean, **env},
    )


# The flag points the stack at a broker that cannot exist, so `nerve up` stops at once, naming it.
FLAG = "--mqtt-url mqtt://from-the-flag.invalid:1883"


@pytest.mark.parametrize(
    ("args", "env"),
    [
        ([f"NERVE_ARGS={FLAG}"], {}),
        ([f"ARGS={FLAG}"], {}),
        ([], {"NERVE_ARGS": FLAG}),
    ],
    ids=["NERVE_ARGS on make's command line", "ARGS", "NERVE_ARGS in the environment"],
)
def test_run_passes_arguments_to_nerve_up_and_not_as_a_setting(
    args: list[str], env: dict[str, str], tmp_path: Path
) -> None:
    # The environment alone would also stop at once (never a stack on this machine's real ports), at
    # another address: the one named proves the arguments arrived as flags, and no environment error
    # proves that NERVE_ARGS did not reach nerve's settings.
    safe = {"NERVE_DATA_DIR": str(tmp_path), "NERVE_MQTT__URL": "mqtt://from-the-env.invalid:1883"}
    done = make("run", *args, env={**safe, **env})
    assert done.returncode != 0
    assert "nothing answers at mqtt://from-the-flag.invalid:1883" in done.stderr, done.stderr
    assert "environment" not in done.stderr
    assert "Traceback" not in done.stderr
