"""Human approval: a pending decision a person takes with `nerve approve`, signed with the operator's key.

`step.approve(name, route=..., expires=..., on_expiry=...)` journals a pending approval (the step waits,
its result names the route and what happens on expiry), keeps an `approval_requested` fact and schedules
a durable timer for its expiry. A decision is a `Command` addressed to the run (`subject` = run id,
`action` = `approve` or `reject`, `data` = the step's name and a comment), signed like `nerve send`'s
commands, and stored under `approval.<run id>.<decision id>` in the runs bucket. The engine acts on the
first decision that is signed by a trusted operator key, names this run and step, and was stored before
both its own `expires` and the approval's expiry; any other is refused and kept as an `approval_refused`
fact, and the step goes on waiting.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Literal

import msgspec

from nerve.runtime.envelope.codec import decode
from nerve.runtime.envelope.model import Command
from nerve.runtime.errors import DecodeError, SignatureError

if TYPE_CHECKING:
    from nerve.runtime.trust.signing import Signer, Verifier

#: The actions of a decision.
APPROVE: Final = "approve"
REJECT: Final = "reject"
#: What an expired approval does: go on (an `expired` decision) or fail the run (its undos run); `fallback`,
#: a `Person` fallback that is not the last way: fail the step so that the next way is taken.
OnExpiry = Literal["escalate", "compensate", "fallback"]
ON_EXPIRY: Final = ("escalate", "compensate", "fallback")
#: The longest comment a decision carries.
MAX_COMMENT_CHARS: Final = 1000
Outcome = Literal["approved", "rejected", "expired"]


class Decision(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What became of an approval: `approved`, `rejected` (by key id `by`) or `expired` (nobody decided)."""

    outcome: Outcome
    by: str = ""
    comment: str = ""
    decision: str = ""  # the id of the signed decision

    @property
    def approved(self) -> bool:
        """Whether a person approved."""
        return self.outcome == "approved"


class DecisionRefused(Exception):
    """A stored decision the engine does not act on; `reason` says why (it is kept as a fact).

    `elsewhere`: a sound decision on another step of the run (an earlier approval): passed over quietly.
    """

    def __init__(self, reason: str, *, elsewhere: bool = False) -> None:
        self.reason = reason
        self.elsewhere = elsewhere
        super().__init__(reason)


def expiry_path(on_expiry: OnExpiry, route: str) -> str:
    """What an approval's expiry leads to, as its `approval_expired` fact says it."""
    if on_expiry == "escalate":
        return f"escalated: {route} must look"
    if on_expiry == "fallback":
        return "this way failed; the step's next fallback is taken"
    return "the run compensates"


def pending_info(*, route: str, due: float, on_expiry: OnExpiry, summary: str) -> dict[str, Any]:
    """The journalled result of a step waiting for a decision (how `nerve approve` finds it)."""
    return {"approval": {"route": route, "expires": due, "on_expiry": on_expiry, "summary": summary}}


def is_pending_approval(result: object) -> bool:
    """Whether a waiting step's journalled result is that of a pending approval."""
    return isinstance(result, dict) and isinstance(result.get("approval"), dict)


def sign_decision(
    signer: Signer, *, run_id: str, step: str, approve: bool, comment: str, valid_until: float
) -> Command:
    """The operator's signed decision on step `step` of run `run_id`, valid until `valid_until` (epoch s).

    Raises `ValueError` if the comment is too long or the decision would expire at once.
    """
    if len(comment) > MAX_COMMENT_CHARS:
        raise ValueError(f"the comment is longer than {MAX_COMMENT_CHARS} characters")
    ttl = valid_until - datetime.now(UTC).timestamp()
    if ttl <= 0:
        raise ValueError("the approval has expired")
    command = Command.create(
        device=run_id,
        action=APPROVE if approve else REJECT,
        args={"step": step, "comment": comment},
        source="nerve://operator/approve",
        ttl=timedelta(seconds=ttl),
    )
    return signer.sign(command)


def check_decision(
    data: bytes, *, run_id: str, step: str, due: float, stored: datetime, operators: Verifier | None
) -> tuple[Command, Decision]:
    """The decision in `data` (stored at `stored`) on step `step` of run `run_id`, if it is to be acted on.

    Raises `DecisionRefused` naming why not: not a decision, not signed by a trusted operator key, about
    another run or step, or stored after it expired or after the approval expired (epoch `due`).
    """
    try:
        command = decode(data, Command)
    except DecodeError as exc:
        raise DecisionRefused(f"not a decision: {exc.reason}") from None
    if operators is None:
        raise DecisionRefused("the engine trusts no operator key")
    try:
        operators.verify(command)
    except SignatureError as exc:
        raise DecisionRefused(str(exc)) from None
    if command.subject != run_id:
        raise DecisionRefused(f"it is about run {command.subject}")
    if command.data.get("step") != step:
        raise DecisionRefused(f"it is about step {command.data.get('step')!r}", elsewhere=True)
    if command.action not in {APPROVE, REJECT}:
        raise DecisionRefused(f"{command.action!r} is neither {APPROVE} nor {REJECT}")
    if stored > command.expires:
        raise DecisionRefused("it was stored after it expired")
    if stored.timestamp() > due:
        raise DecisionRefused("it came after the approval expired")
    comment = command.data.get("comment", "")
    return command, Decision(
        outcome="approved" if command.action == APPROVE else "rejected",
        by=command.keyid,
        comment=comment if isinstance(comment, str) else str(comment),
        decision=command.id,
    )
