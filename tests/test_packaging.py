"""The layout promises: import names, no leaking top-level modules, an edge install without nats-py."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
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


# --- installing from a clone -----------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("runtime", "edge", "bridge", "agents")


def test_the_root_takes_its_parts_from_the_clone() -> None:
    # `pip install .` must not look for nerve-runtime & co. on PyPI, where they are not.
    root = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert root["tool"]["hatch"]["metadata"]["allow-direct-references"] is True
    references = {}
    for requirement in root["project"]["dependencies"]:
        name, at, url = (part.strip() for part in requirement.partition("@"))
        if name.startswith("nerve-"):
            assert at, f"{name} is not taken from the clone"
            references[name] = url
    for part in PARTS:
        name = tomllib.loads((ROOT / part / "pyproject.toml").read_text())["project"]["name"]
        assert references.get(name) == f"{{root:uri}}/{part}", name
        assert references.get(f"{name}[nats]", f"{{root:uri}}/{part}") == f"{{root:uri}}/{part}"


def _venv(where: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=120)
    return where / "bin"


def _pip_install(bin_dir: Path, *what: str) -> None:
    done = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", *what],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr


def _has_module(bin_dir: Path, module: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([str(bin_dir / "python"), "-c", code], check=False, timeout=60).returncode == 0


@pytest.mark.slow
def test_pip_install_from_a_clone_in_a_fresh_venv(tmp_path: Path) -> None:
    # As a user would: an edge-only install first (no nats-py), then the whole product with `pip install .`.
    bin_dir = _venv(tmp_path / "venv")
    _pip_install(bin_dir, "./runtime", "./edge")
    assert _has_module(bin_dir, "nerve.edge")
    assert not _has_module(bin_dir, "nats"), "an edge-only install pulled nats-py"
    assert not _has_module(bin_dir, "nerve.bridge")

    _pip_install(bin_dir, ".")
    version = subprocess.run(
        [str(bin_dir / "nerve"), "--version"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    for part in PARTS:
        assert f"nerve-{part} " in version
    assert _has_module(bin_dir, "nats")
    assert (bin_dir / "nats-server").exists()  # what `nerve up` starts when no NATS answers


# --- the docs a clone has --------------------------------------------------------------------------

DOCS = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / part / "README.md" for part in PARTS)]
LINK = re.compile(r"\]\(([^)#\s]+)[^)]*\)|`((?:\.\./|/)[\w./-]*\.md)`")


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_docs_link_only_inside_the_repository(doc: Path) -> None:
    for match in LINK.finditer(doc.read_text()):
        target = match.group(1) or match.group(2)
        if target.startswith(("http://", "https://")):
            continue
        resolved = (doc.parent / target).resolve()
        assert resolved.is_relative_to(ROOT), f"{doc.name} points outside the repository: {target}"
        assert resolved.exists(), f"{doc.name} points at {target}, which a clone does not have"


@pytest.mark.parametrize("part", PARTS)
def test_each_part_says_what_lives_there_and_what_it_may_import(part: str) -> None:
    text = (ROOT / part / "README.md").read_text()
    assert f"nerve.{part}" in text
    assert "may import" in text


def test_the_readme_starts_with_the_two_commands_ci_runs_one_of() -> None:
    first_block = (ROOT / "README.md").read_text().split("```")[1]
    assert [line.split()[:2] for line in first_block.splitlines()[1:3]] == [["make", "run"], ["make", "test"]]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert (ROOT / "docs" / "architecture.md").exists()
    assert "Apache License" in (ROOT / "LICENSE").read_text()


@pytest.mark.parametrize("part", ["runtime", "edge", "bridge", "agents"])
def test_the_product_has_one_mqtt_client(part: str) -> None:
    # nerve.runtime.wire is the only MQTT client of the product; paho-mqtt and aiomqtt are for benches
    # and tests (the root `dev` extra) only.
    project = tomllib.loads((ROOT / part / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {}).values()
    wanted = [*project.get("dependencies", []), *(r for extra in extras for r in extra)]
    assert not [r for r in wanted if r.lower().startswith(("paho", "aiomqtt", "gmqtt"))]
