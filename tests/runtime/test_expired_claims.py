"""The bridge's unsigned `expired` result: believed only for the receiver's own command, once it expired.

`nerve.runtime.trust.expiry.expired_claim_refusal` is the rule; `DeviceKeys.refusal(sent=, arrived=)`
applies it for `nerve send`, the engine's command step calls it with the time JetStream stored the result.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nerve.runtime.envelope.model import Command, CommandResult
from nerve.runtime.testing import provision_device
from nerve.runtime.trust import EXPIRED_CLAIM_MARGIN_S, DeviceKeys, expired_claim_refusal

if TYPE_CHECKING:
    from pathlib import Path

    from nerve.runtime.envelope.model import ResultStatus

EXPIRES = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
MARGIN = timedelta(seconds=EXPIRED_CLAIM_MARGIN_S)


def sent(command_id: str = "cmd-1", device: str = "pi-01") -> Command:
    command = Command.create(
        device=device,
        action="clear_temp",
        args={},
        source="nerve://central/disk",
        ttl=timedelta(seconds=30),
        command_id=command_id,
    )
    return msgspec.structs.replace(command, time=EXPIRES - timedelta(seconds=30), expires=EXPIRES)


def claim(command: Command, *, status: ResultStatus = "expired") -> CommandResult:
    """What the bridge's downlink stores: unsigned, from `nerve://bridge`, no data."""
    return CommandResult.for_command(command, source="nerve://bridge", status=status, reason="expired at ...")


def test_the_bridges_claim_is_believed_once_the_command_expired_plus_the_margin() -> None:
    command = sent()
    assert expired_claim_refusal(claim(command), command, arrived=EXPIRES + MARGIN) is None
    assert expired_claim_refusal(claim(command), command, arrived=EXPIRES + timedelta(hours=1)) is None


@pytest.mark.parametrize(
    "arrived", [EXPIRES - timedelta(seconds=20), EXPIRES, EXPIRES + MARGIN - timedelta(microseconds=1)]
)
def test_a_claim_before_the_command_expired_is_refused_and_says_when(arrived: datetime) -> None:
    command = sent()
    why = expired_claim_refusal(claim(command), command, arrived=arrived)
    assert why == (
        f"it came at {arrived.isoformat()}, before the command expired "
        f"({EXPIRES.isoformat()} plus {EXPIRED_CLAIM_MARGIN_S:g}s)"
    )


def test_the_results_own_time_counts_for_nothing() -> None:
    """A forger dates the claim after `expires`: it is judged by when it came."""
    command = sent()
    forged = msgspec.structs.replace(claim(command), time=EXPIRES + timedelta(hours=1))
    assert expired_claim_refusal(forged, command, arrived=EXPIRES - timedelta(seconds=5)) is not None


@pytest.mark.parametrize("status", ["ok", "failed", "rejected", "unknown"])
def test_any_other_unsigned_status_is_refused_even_late(status: ResultStatus) -> None:
    command = sent()
    why = expired_claim_refusal(claim(command, status=status), command, arrived=EXPIRES + timedelta(hours=1))
    assert why == f"an unsigned result is believed only as `expired`, not `{status}`"


@pytest.mark.parametrize(
    ("change", "what"),
    [
        ({"causationid": "cmd-other"}, "does not answer command cmd-1"),
        ({"subject": "pi-02"}, "does not answer command cmd-1"),
        ({"action": "restart"}, "does not answer command cmd-1"),
        ({"data": {"files_deleted": 4242}}, "carries no data"),
        ({"keyid": "pi-01", "sig": "x"}, "it is signed"),
    ],
)
def test_a_claim_about_another_command_with_data_or_signed_is_not_this_rules(
    change: dict[str, object], what: str
) -> None:
    command = sent()
    other = msgspec.structs.replace(claim(command), **change)
    why = expired_claim_refusal(other, command, arrived=EXPIRES + timedelta(hours=1))
    assert why is not None
    assert what in why


@given(offset_us=st.integers(min_value=-(10**12), max_value=10**12), margin_s=st.floats(0, 600))
def test_believed_exactly_from_expires_plus_the_margin(offset_us: int, margin_s: float) -> None:
    """Property: over every arrival time and margin, believed iff arrived >= expires + margin."""
    command = sent()
    arrived = EXPIRES + timedelta(microseconds=offset_us)
    believed = expired_claim_refusal(claim(command), command, arrived=arrived, margin_s=margin_s) is None
    assert believed == (arrived >= EXPIRES + timedelta(seconds=margin_s))


# --- DeviceKeys.refusal: what `nerve send` asks ---------------------------------------------------


def test_device_keys_believes_the_claim_only_given_the_command_and_a_late_arrival(tmp_path: Path) -> None:
    provision_device(tmp_path, "pi-01")
    keys = DeviceKeys(tmp_path)
    command = sent()
    late, early = EXPIRES + MARGIN, EXPIRES - timedelta(seconds=1)
    assert keys.refusal(claim(command), sent=command, arrived=late) is None
    refusal = keys.refusal(claim(command))  # no command known: refused as every unsigned result
    assert refusal is not None
    assert (refusal.kind, refusal.reason) == ("unsigned", "result from pi-01 is not signed")
    refusal = keys.refusal(claim(command), sent=command, arrived=early)
    assert refusal is not None
    assert refusal.kind == "unsigned"
    assert refusal.reason.startswith("result from pi-01 is not signed, and it came at ")
    forged_ok = keys.refusal(claim(command, status="ok"), sent=command, arrived=late)
    assert forged_ok is not None
    assert (forged_ok.kind, forged_ok.reason) == ("unsigned", "result from pi-01 is not signed")
    other = sent("cmd-2")
    assert keys.refusal(claim(other), sent=command, arrived=late) is not None
