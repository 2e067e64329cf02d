"""The uplink's spool: what is appended comes back whole and in order, across a kill, and never twice."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nerve.bridge.bridge import open_spool
from nerve.bridge.spool import HEADER, MAGIC, SCAN_CHUNK, Spool, spool_path
from nerve.runtime.config.settings import load_settings
from nerve.runtime.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

STORES = st.tuples(
    st.text(min_size=1, max_size=40),
    st.binary(max_size=64),
    st.binary(max_size=600),
    st.booleans(),
    st.text(max_size=40),
)


def store(n: int, size: int = 10) -> tuple[str, bytes, bytes, bool, str]:
    return (
        f"nerve.d{n}.telemetry.cpu",
        b"NATS/1.0\r\n\r\n",
        bytes([n % 256]) * size,
        False,
        f"nerve/d{n}/telemetry/cpu",
    )


def holding(spool: Spool) -> bool:
    """Read through a call: mypy would keep an asserted property's value across the calls that change it."""
    return spool.holding


def accepts(spool: Spool) -> bool:
    return spool.accepts


def taken(spool: Spool, limit: int = 1_000_000) -> list[tuple[str, bytes, bytes, bool, str]]:
    return [record[:5] for record in spool.take(limit)]


@settings(max_examples=200, deadline=None)
@given(batches=st.lists(st.lists(STORES, max_size=8), max_size=8), limit=st.integers(1, 5))
def test_what_is_appended_is_taken_back_in_order_and_the_file_is_cut_back_once_stored(
    tmp_path_factory: pytest.TempPathFactory,
    batches: list[list[tuple[str, bytes, bytes, bool, str]]],
    limit: int,
) -> None:
    path = tmp_path_factory.mktemp("spool") / "b.spool"
    spool = Spool(path, budget=1 << 30)
    for batch in batches:
        spool.append(batch)
    expected = [s for batch in batches for s in batch]
    got: list[tuple[str, bytes, bytes, bool, str]] = []
    while spool.pending:
        records = spool.take(limit)
        assert 0 < len(records) <= limit
        got += [record[:5] for record in records]
        spool.commit(records[-1].end)
    assert got == expected
    assert spool.empty
    assert path.stat().st_size == HEADER.size  # all stored: cut back to the header
    spool.close()


def test_a_killed_bridge_gets_back_what_was_not_stored_and_not_what_was(tmp_path: Path) -> None:
    path = tmp_path / "b.spool"
    spool = Spool(path, budget=1 << 30)
    spool.append([store(i) for i in range(5)])
    first = spool.take(2)
    spool.commit(first[-1].end)  # 0 and 1 stored
    spool.take(2)  # 2 and 3 on their way, not stored
    spool.close()  # killed: nothing else written; the kernel closes the file (and drops its lock)
    again = Spool(path, budget=1 << 30)
    assert taken(again) == [store(i) for i in range(2, 5)]
    again.close()


def test_a_new_session_takes_again_what_the_last_one_took_and_did_not_store(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "b.spool", budget=1 << 30)
    spool.append([store(i) for i in range(3)])
    assert len(spool.take(3)) == 3
    assert not spool.pending
    spool.rewind()
    assert taken(spool) == [store(i) for i in range(3)]
    spool.close()


@pytest.mark.parametrize("cut", [1, 5, 9, 20])
def test_a_record_cut_short_is_dropped_and_the_ones_before_it_kept(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "b.spool"
    spool = Spool(path, budget=1 << 30)
    spool.append([store(1), store(2)])
    spool.close()
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(size - cut)  # the second record's tail never reached the disk
    again = Spool(path, budget=1 << 30)
    assert taken(again) == [store(1)]
    again.append([store(3)])  # written where the torn one was
    again.rewind()
    assert taken(again) == [store(1), store(3)]
    again.close()


def test_a_record_whose_bytes_changed_ends_the_file(tmp_path: Path) -> None:
    path = tmp_path / "b.spool"
    spool = Spool(path, budget=1 << 30)
    spool.append([store(1), store(2), store(3)])
    spool.close()
    data = bytearray(path.read_bytes())
    data[-25] ^= 0xFF  # inside the third record's body: its checksum no longer matches
    path.write_bytes(bytes(data))
    again = Spool(path, budget=1 << 30)
    assert taken(again) == [store(1), store(2)]
    again.close()


def test_a_file_that_is_not_a_spool_is_moved_aside_not_read(tmp_path: Path) -> None:
    path = tmp_path / "b.spool"
    path.write_bytes(b"something else entirely, not a spool")
    spool = Spool(path, budget=1 << 30)
    assert not spool.pending
    assert (tmp_path / "b.spool.bad").read_bytes() == b"something else entirely, not a spool"
    spool.close()


def test_killed_while_cutting_back_reads_as_all_stored(tmp_path: Path) -> None:
    """The header says "stored up to X", then the file is cut: a kill between leaves X past the end."""
    path = tmp_path / "b.spool"
    spool = Spool(path, budget=1 << 30)
    spool.append([store(1), store(2)])
    spool.close()
    end = path.stat().st_size
    with path.open("r+b") as f:
        f.write(HEADER.pack(MAGIC, end))
        f.truncate(HEADER.size)
    again = Spool(path, budget=1 << 30)
    assert not again.pending
    assert again.empty
    again.close()


def test_at_its_budget_the_spool_holds_until_everything_in_it_is_stored(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "b.spool", budget=150)  # a record here is about 110 bytes
    spool.append([store(1, 40)])
    assert accepts(spool)
    assert not holding(spool)
    spool.append([store(2, 40)])  # past 150 bytes of records
    assert holding(spool)
    assert not accepts(spool)
    records = spool.take(10)
    spool.commit(records[0].end)
    assert holding(spool)  # one still waits
    spool.commit(records[1].end)
    assert not holding(spool)
    assert accepts(spool)
    assert spool.size == 0
    spool.close()


def test_a_budget_of_zero_takes_nothing_new_but_gives_back_what_an_earlier_run_left(tmp_path: Path) -> None:
    path = tmp_path / "b.spool"
    spool = Spool(path, budget=1 << 30)
    spool.append([store(1)])
    spool.close()
    again = Spool(path, budget=0)
    assert not accepts(again)
    assert holding(again)  # the bridge reads no more from mosquitto until this is stored
    records = again.take(10)
    assert [r[:5] for r in records] == [store(1)]
    again.commit(records[-1].end)
    assert not holding(again)
    assert not accepts(again)
    again.close()


def test_records_are_framed_with_length_and_checksum(tmp_path: Path) -> None:
    """The format the module docstring names: a header, then length | crc32 | msgpack."""
    import zlib  # noqa: PLC0415

    path = tmp_path / "b.spool"
    spool = Spool(path, budget=1 << 30)
    spool.append([store(7)])
    spool.close()
    data = path.read_bytes()
    magic, committed = HEADER.unpack_from(data)
    assert (magic, committed) == (MAGIC, HEADER.size)
    length, crc = struct.unpack_from("<II", data, HEADER.size)
    body = data[HEADER.size + 8 :]
    assert (len(body), zlib.crc32(body)) == (length, crc)


def test_a_spool_budget_below_zero_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"bridge\.spool_bytes") as refused:
        load_settings(overrides={"bridge": {"spool_bytes": -1}})
    assert "\n" not in str(refused.value).strip()


def test_the_bridge_opens_its_spool_and_one_an_earlier_run_left_even_when_turned_off(tmp_path: Path) -> None:
    on = load_settings(overrides={"data_dir": str(tmp_path)})
    path = spool_path(on)
    assert path == tmp_path / "bridge" / "nerve-bridge.spool"
    spool = open_spool(on)
    assert spool is not None
    spool.append([store(1)])
    spool.close()
    off = load_settings(overrides={"data_dir": str(tmp_path), "bridge": {"spool_bytes": 0}})
    left = open_spool(off)
    assert left is not None  # what it holds was acknowledged to mosquitto: it must still be stored
    assert taken(left) == [store(1)]
    left.close()
    path.unlink()
    assert open_spool(off) is None


def test_a_spool_that_cannot_be_opened_is_one_warning_and_no_spool(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "bridge").write_text("a file where the bridge's directory should be")
    settings = load_settings(overrides={"data_dir": str(tmp_path)})
    assert open_spool(settings) is None
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "cannot open the spool" in warning.getMessage()


@settings(max_examples=200, deadline=None)
@given(
    stores=st.lists(STORES, min_size=1, max_size=12),
    cut=st.floats(0, 1),
    flip=st.booleans(),
)
def test_whatever_is_cut_off_or_damaged_a_reopened_spool_gives_back_the_whole_records_before_it(
    tmp_path_factory: pytest.TempPathFactory,
    stores: list[tuple[str, bytes, bytes, bool, str]],
    cut: float,
    flip: bool,
) -> None:
    path = tmp_path_factory.mktemp("spool") / "b.spool"
    spool = Spool(path, budget=1 << 30)
    ends = []
    for item in stores:
        spool.append([item])
        ends.append(spool.size + HEADER.size)
    spool.close()
    size = path.stat().st_size
    at = HEADER.size + int(cut * (size - HEADER.size))
    data = bytearray(path.read_bytes()[:at])
    if flip and at > HEADER.size:
        data[at - 1] ^= 0x01  # the last byte left is wrong: the record it belongs to is not whole
        at -= 1
    path.write_bytes(bytes(data))
    whole = sum(1 for end in ends if end <= at)
    again = Spool(path, budget=1 << 30)
    assert taken(again) == stores[:whole]
    again.append([store(99)])  # written where the damage was, not behind it
    again.rewind()
    assert taken(again) == [*stores[:whole], store(99)]
    again.close()


def test_a_record_longer_than_a_read_comes_back_whole(tmp_path: Path) -> None:
    path = tmp_path / "b.spool"
    spool = Spool(path, budget=1 << 30)
    big = ("nerve.deadletter.bridge", b"h", b"x" * (SCAN_CHUNK + 12345), True, "nerve/d/events/big")
    spool.append([store(1), big, store(2)])
    spool.close()
    again = Spool(path, budget=1 << 30)
    assert taken(again) == [store(1), big, store(2)]
    again.close()


def test_a_spool_another_process_holds_is_refused_not_shared(tmp_path: Path) -> None:
    path = tmp_path / "b.spool"
    first = Spool(path, budget=1 << 30)
    with pytest.raises(OSError, match="in use by another bridge process"):
        Spool(path, budget=1 << 30)  # its own open file: as another process's would be
    first.close()
    again = Spool(path, budget=1 << 30)  # free once the holder is gone (the kernel drops it at a kill)
    again.close()


def test_the_bridge_runs_without_a_spool_another_bridge_holds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings(overrides={"data_dir": str(tmp_path)})
    held = open_spool(settings)
    assert held is not None
    assert open_spool(settings) is None
    assert any("in use by another bridge process" in r.getMessage() for r in caplog.records)
    held.close()
