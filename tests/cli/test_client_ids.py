"""Client ids of `nerve up`: unique per data dir, stable across restarts, and explicit settings win."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nerve.runtime.config.settings import Settings, load_settings
from nerve.runtime.stack.local import Stack, client_ids

if TYPE_CHECKING:
    from nerve.runtime.stack.brokers import Mosquitto

DATA = Path("/srv/nerve/a")


def test_ids_differ_per_data_dir_and_stay_the_same_for_one() -> None:
    settings = Settings()
    a = client_ids(settings, device="pi", data_dir=Path("/srv/nerve/a"))
    b = client_ids(settings, device="pi", data_dir=Path("/srv/nerve/b"))
    assert a == client_ids(settings, device="pi", data_dir=Path("/srv/nerve/a"))
    assert a[0] != b[0]
    assert a[1] != b[1]
    assert a[0].startswith("nerve-bridge-")
    assert a[1].startswith("nerve-edge-pi-")


@given(one=st.text(min_size=1, max_size=40), other=st.text(min_size=1, max_size=40))
def test_two_data_dirs_never_share_an_id(one: str, other: str) -> None:
    settings = Settings()
    if Path("/d", one) != Path("/d", other):
        ids = client_ids(settings, device="pi", data_dir=Path("/d", one))
        assert set(ids).isdisjoint(client_ids(settings, device="pi", data_dir=Path("/d", other)))


def test_explicit_settings_win() -> None:
    explicit = {"bridge": {"client_id": "site-bridge"}, "edge": {"client_id": "pi-x"}}
    settings = load_settings(overrides=explicit)
    assert client_ids(settings, device="pi", data_dir=DATA) == ("site-bridge", "pi-x")
    # Even set to the old default: whoever wrote it meant it.
    settings = load_settings(overrides={"bridge": {"client_id": "nerve-bridge"}})
    assert client_ids(settings, device="pi", data_dir=DATA)[0] == "nerve-bridge"


def test_the_stack_runs_its_parts_with_them(tmp_path: Path) -> None:
    stack = Stack(settings=load_settings(overrides={"data_dir": str(tmp_path)}), device="pi")
    bridge, edge = client_ids(Settings(), device="pi", data_dir=tmp_path.resolve())
    assert (stack.settings.bridge.client_id, stack.settings.edge.client_id) == (bridge, edge)


def test_the_stack_runs_the_whole_bridge_whatever_bridge_part_says(tmp_path: Path) -> None:
    for part in ("uplink", "downlink"):
        settings = load_settings(overrides={"data_dir": str(tmp_path), "bridge": {"part": part}})
        assert Stack(settings=settings, device="pi").settings.bridge.part == "both"


@pytest.mark.broker
async def test_two_stacks_on_one_broker_take_no_session_over(
    mosquitto: Mosquitto, settings: Settings, tmp_path: Path
) -> None:
    one = settings.model_copy(update={"data_dir": tmp_path / "one"})
    two = settings.model_copy(update={"data_dir": tmp_path / "two"})
    async with Stack(settings=one, device="pi"), Stack(settings=two, device="pi"):
        await asyncio.sleep(1)  # room for a takeover ping-pong, if there were one
    log = mosquitto.log_path.read_text(errors="replace")
    assert "already connected, closing old connection" not in log
    assert "nerve-bridge-" in log
