"""What `nerve edge` imports on its way to the first reading, and what it must not.

`nerve edge` runs twice over: the `nerve` command validates the settings (pydantic), then execs the lean
edge process (`nerve.edge.main`). Each module either one imports and does not use costs every start; the
time itself is measured by `make bench-edge` (bench/edge_footprint.py), never asserted here. These tests
pin the cause instead: a module outside the edge's path imported anyway (the central engine, NATS, the
site broker's tooling, asyncio before the exec, PyYAML without a settings file ...) fails them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import TYPE_CHECKING, Final

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from pathlib import Path

# Runs `nerve edge` as the console script does, up to the exec: it prints the modules loaded by then.
BEFORE_EXEC: Final = """\
import json, os, sys

def execv(*_: object) -> None:
    print(json.dumps(sorted(sys.modules)))
    sys.exit(0)

os.execv = execv
from nerve.runtime.cli import main

sys.exit(main(sys.argv[1:]))
"""
# What the lean edge process imports before it runs (nerve.edge.main, then the daemon it loads).
LEAN_PROCESS: Final = """\
import json, sys
import nerve.edge.main, nerve.edge.daemon

print(json.dumps(sorted(sys.modules)))
"""
# Nothing `nerve edge` needs before the exec, each a cost the lean process pays itself or never.
NOT_BEFORE_EXEC: Final = (
    "asyncio",  # the lean process runs the loop; the command only validates and execs
    "ssl",
    "yaml",  # no settings file, and every NERVE_* value a plain scalar
    "sqlite3",
    "nacl",
    "cryptography",
    "nats",
    "paho",
    "aiomqtt",
    "nerve.runtime.engine",
    "nerve.runtime.central",
    "nerve.runtime.trust",  # keys and the site broker's tooling (nerve.runtime.trust.site)
    "nerve.runtime.stack",
    "nerve.runtime.wire.mqtt",
    "nerve.runtime.cli.send",
    "nerve.runtime.cli.runs",
    "nerve.runtime.fleet",
    "nerve.bridge",
    "nerve.agents",
    "nerve.edge.daemon",
)
# Never in the lean process: it gets validated settings as JSON (nerve.edge.main's docstring).
NOT_IN_LEAN_PROCESS: Final = (
    "pydantic",
    "pydantic_core",
    "yaml",
    "nats",
    "paho",
    "aiomqtt",
    "cryptography",
    "nerve.runtime.config",
    "nerve.runtime.engine",
    "nerve.runtime.central",
    "nerve.runtime.trust.site",
    "nerve.runtime.stack",
    "nerve.runtime.cli",
    "nerve.bridge",
    "nerve.agents",
)


def loaded(code: str, *argv: str, env: Mapping[str, str] | None = None) -> set[str]:
    """The modules a fresh interpreter running `code` has loaded when it prints them."""
    done = subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        env=clean_env(env or {}),
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout))


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This environment without any NERVE_* variable of the caller's, plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("NERVE_")}, **extra}


def present(modules: set[str], packages: Iterable[str]) -> list[str]:
    """Those of `packages` that `modules` holds, or any of their submodules."""
    return sorted(name for name in packages if any(m == name or m.startswith(f"{name}.") for m in modules))


def edge_env(tmp_path: Path) -> dict[str, str]:
    """Variables as bench/edge_footprint.py sets them: a data dir, an interval and two key paths."""
    return {
        "NERVE_DATA_DIR": str(tmp_path / "data"),
        "NERVE_EDGE__INTERVAL_S": "10",
        "NERVE_EDGE__TRUSTED_KEYS_DIR": str(tmp_path / "keys"),
        "NERVE_EDGE__SIGNING_KEY": str(tmp_path / "device-keys" / "probe.key"),
    }


EDGE_ARGS: Final = ("edge", "--device", "probe", "--mqtt-url", "mqtt://127.0.0.1:1883")


def test_nerve_edge_imports_only_the_settings_before_it_execs(tmp_path: Path) -> None:
    modules = loaded(BEFORE_EXEC, *EDGE_ARGS, env=edge_env(tmp_path))
    # The probe went the whole way: the settings were validated and handed over.
    assert {"nerve.runtime.config.settings", "nerve.edge.main", "pydantic"} <= modules
    assert present(modules, NOT_BEFORE_EXEC) == []


def test_a_settings_file_brings_yaml_and_nothing_else(tmp_path: Path) -> None:
    config = tmp_path / "edge.yaml"
    config.write_text("edge:\n  mounts: [/]\n", encoding="utf-8")
    modules = loaded(BEFORE_EXEC, *EDGE_ARGS, "--config", str(config), env=edge_env(tmp_path))
    assert "yaml" in modules
    assert present(modules, [name for name in NOT_BEFORE_EXEC if name != "yaml"]) == []


@pytest.mark.parametrize("value", ["[/, /data]", "{}"])
def test_a_yaml_list_or_mapping_in_a_variable_is_still_read_as_one(tmp_path: Path, value: str) -> None:
    env = {
        **edge_env(tmp_path),
        "NERVE_EDGE__MOUNTS" if value.startswith("[") else "NERVE_EDGE__SENSORS": value,
    }
    assert "yaml" in loaded(BEFORE_EXEC, *EDGE_ARGS, env=env)


def test_the_lean_edge_process_imports_no_pydantic_nats_or_central_part() -> None:
    modules = loaded(LEAN_PROCESS)
    assert {"nerve.edge.daemon", "asyncio"} <= modules
    assert present(modules, NOT_IN_LEAN_PROCESS) == []
