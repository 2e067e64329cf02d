"""The layout promises: import names, no leaking top-level modules, an edge install without nats-py."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["runtime", "edge", "bridge", "agents"])
def test_no_top_level_module_leaks(name: str) -> None:
    assert importlib.util.find_spec(name) is None


@pytest.mark.parametrize("part", ["runtime", "edge", "bridge", "agents"])
def test_parts_import_as_nerve_subpackages(part: str) -> None:
    module = importlib.import_module(f"nerve.{part}")
    assert module.__name__ == f"nerve.{part}"


def _needs_nats(distribution: str) -> list[str]:
    return [r for r in importlib.metadata.requires(distribution) or [] if r.startswith("nats-py")]


def test_edge_install_pulls_no_nats() -> None:
    # nerve-edge needs nerve-runtime without its `nats` extra; nats-py is only in that extra.
    assert _needs_nats("nerve-edge") == []
    assert all("extra == 'nats'" in r.replace('"', "'") for r in _needs_nats("nerve-runtime"))
    assert not any("[nats]" in r for r in importlib.metadata.requires("nerve-edge") or [])


def test_central_parts_do_pull_nats() -> None:
    for distribution in ("nerve-bridge", "nerve-agents"):
        assert any("nerve-runtime[nats]" in r for r in importlib.metadata.requires(distribution) or [])


@pytest.mark.parametrize("part", ["runtime", "edge", "bridge", "agents"])
def test_exported_members(part: str) -> None:
    module = importlib.import_module(f"nerve.{part}")
    exported = list(module.__all__)
    # isort style, as ruff's RUF022 keeps it: CONSTANTS, then Classes, then functions.
    assert exported == sorted(exported, key=lambda n: (0 if n.isupper() else 1 if n[0].isupper() else 2, n))
    assert len(set(exported)) == len(exported)
    for name in exported:
        assert hasattr(module, name), f"nerve.{part}.__all__ names {name}, which it does not have"
    public = {
        name
        for name in vars(module)
        if not name.startswith("_") and not isinstance(getattr(module, name), type(importlib))
    }
    assert public <= set(exported) | {"annotations", "TYPE_CHECKING"}, public - set(exported)


def test_the_lean_edge_process_imports_no_pydantic_paho_aiomqtt_nor_nats() -> None:
    # What `nerve edge` execs (nerve.edge.main) must stay small: see edge/README.md, "Footprint".
    heavy = "{'pydantic', 'pydantic_core', 'paho', 'aiomqtt', 'nats', 'yaml'}"
    code = (
        "import sys, nerve.edge.main, nerve.edge; "
        f"print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {heavy})))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert found.stdout.split() == []


@pytest.mark.parametrize("part", ["runtime", "edge", "bridge", "agents"])
def test_the_product_has_one_mqtt_client(part: str) -> None:
    # nerve.runtime.wire is the only MQTT client of the product; paho-mqtt and aiomqtt are for benches
    # and tests (the root `dev` extra) only.
    project = tomllib.loads((ROOT / part / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {}).values()
    wanted = [*project.get("dependencies", []), *(r for extra in extras for r in extra)]
    assert not [r for r in wanted if r.lower().startswith(("paho", "aiomqtt", "gmqtt"))]
