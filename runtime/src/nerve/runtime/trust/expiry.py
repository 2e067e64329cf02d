"""When an unsigned `expired` result is believed: the bridge's word that it did not send a command.

The bridge's downlink does not send a command whose signed `expires` has passed; it stores a result
`expired` for it instead, from `nerve://bridge`. It holds no device's key, so that result is unsigned,
and every other unsigned result is refused (`nerve.runtime.trust.devices`). `expired_claim_refusal` is
the one exception, applied by whoever knows the command it sent: the engine's command step, `nerve send`,
and central's runner for a command its own key signed (found through `COMMAND_SEQ_HEADER`).

An unsigned result is believed only when all of these hold:

- its status is exactly `expired` and it carries no `data` (the bridge's carries none);
- it answers the command the receiver itself sent: its `causationid` is that command's id, its
  `subject` and `action` are the command's;
- it arrived once the command's own signed `expires`, plus `EXPIRED_CLAIM_MARGIN_S`, had passed by the
  receiver's clock (the engine and central's runner: the time JetStream stored it; `nerve send`: the
  time it was received), never by the result's `time`, which its sender writes.

Why that is safe: the bridge sends no command after its `expires`, and a device refuses a command that
reaches it after its `expires` (by its own clock, `edge.clock_skew_s` later), so an `expired` claim made
after that instant cannot hide a run the bridge has yet to cause; a claim forged before that instant is
refused, however it is dated. The bridge says `expired` only for a command JetStream delivered to it
once (one handed back may have reached the device: that one gets `unknown`, never believed unsigned).
The margin covers the difference between the bridge's clock and the receiver's. What it does not cover:
a command the bridge handed to mosquitto before `expires` and that mosquitto delivers late (an offline
device's queued session) may still run up to `edge.clock_skew_s` (30 s by default) after `expires`; a
forged `expired` believed then would hide it. Only someone allowed to publish that device's results
(its own broker identity, which can sign anyway, or a NATS identity allowed results subjects) can forge
one. See docs/trust.md.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from datetime import datetime

    from nerve.runtime.envelope.model import Command, CommandResult

__all__ = ["COMMAND_SEQ_HEADER", "EXPIRED_CLAIM_MARGIN_S", "expired_claim_refusal"]

#: Seconds past a command's `expires` before an unsigned `expired` result for it is believed: clocks of
#: the bridge and of the receiver (NTP keeps them within milliseconds) may differ by up to this.
EXPIRED_CLAIM_MARGIN_S: Final = 1.0
#: The header the bridge stores its `expired` result with: the command's sequence in NERVE_COMMANDS. Only
#: where to look: central's runner, which did not send the command itself, believes the claim only for a
#: command stored there that central's own key signed.
COMMAND_SEQ_HEADER: Final = "Nerve-Command-Seq"


def expired_claim_refusal(
    result: CommandResult,
    sent: Command,
    *,
    arrived: datetime,
    margin_s: float = EXPIRED_CLAIM_MARGIN_S,
) -> str | None:
    """None if `result` is an unsigned `expired` claim about `sent` to believe; else why it is not one.

    `arrived` is when the receiver got `result` (by its clock, or JetStream's when it was stored): never
    a time the result itself carries. Pure: no clock is read here.
    """
    if result.sig or result.keyid:
        return "it is signed: its signature decides"
    if result.status != "expired":
        return f"an unsigned result is believed only as `expired`, not `{result.status}`"
    if result.causationid != sent.id or result.subject != sent.subject or result.action != sent.action:
        return f"it does not answer command {sent.id} to {sent.subject} {sent.action}"
    if result.data:
        return "an unsigned `expired` result carries no data"
    believed_from = sent.expires + timedelta(seconds=margin_s)
    if arrived < believed_from:
        return (
            f"it came at {arrived.isoformat()}, before the command expired "
            f"({sent.expires.isoformat()} plus {margin_s:g}s)"
        )
    return None
