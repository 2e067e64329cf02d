"""The command executor: turns the bytes of a command into at most one run of an allow-listed action.

Checks, in order, for a message on `<prefix>/<device>/commands/<action>`:

1. topic (a command topic of this device), size, decoding as a `Command`;
2. the journal: a command id with a recorded result gets that result again (a replay of captured
   bytes too), and nothing runs; once the command is past its expiry (and the skew), a replay of one
   that ran is refused instead (`rejected`, reason "expired: ..."; a forged one as forged);
3. addressing (the command's subject and action match the device and the topic), the signature;
4. an id the journal holds for a different command (another digest) is refused as replayed; a
   command the journal saw start but never finish (the device restarted while it ran) is answered
   `unknown` and not run again, unless its action is idempotent (then it runs again if not expired);
   otherwise expiry and the validity window (with the allowed clock skew: not expired, `time` not in
   the future, `expires - time` at most the configured maximum), the size of the arguments, the
   allow-list and the action's arguments;
5. then the journal records `started` (committed and fsynced), the action runs, the journal records
   the result.

Only commands whose signature verified are journalled (steps 4 and 5, and the "unknown" answer for a
command interrupted by a restart). Refusals in step 3 are answered but not kept: otherwise anyone able
to publish on the topic could take a genuine command's id, forge the rest, and have the device record
a refusal that the genuine command would then get as its "recorded result".

Every answer is signed with the device's own key (`signer`, key id = device id), refusals included, so
central can tell it from a forged one (`nerve.runtime.trust.devices`); without a key, answers go out
unsigned and central does not act on them. The journal keeps results unsigned: they are signed as they
leave, so a replayed answer is signed too, with the key the device has now.

A message that cannot be answered, because no command id can be read from it (or it is not on a
command topic of this device), is counted in `Executor.unanswered` under its kind (`UNANSWERED_KINDS`):
the first of each kind is logged as a warning, the rest at debug level, so a flood cannot fill the log.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Final, Literal, TypeGuard

import msgspec

from nerve.edge.actions import ActionArgumentError, ActionFailed, ClearTemp
from nerve.edge.allowlist import build_allow_list
from nerve.edge.journal import JournalError, JournalState
from nerve.runtime.envelope.codec import DEFAULT_MAX_PAYLOAD, decode, is_msgpack_map, to_msgpack
from nerve.runtime.envelope.model import MAX_HOPS, MAX_ID_CHARS, Command, CommandResult, utcnow
from nerve.runtime.errors import ConfigError, DecodeError, PayloadTooLarge, SignatureError, TopicError
from nerve.runtime.subjects import DEFAULT_PREFIX, Kind, is_token, parse_topic
from nerve.runtime.trust.signing import Signer, Verifier

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from nerve.edge.actions import Action
    from nerve.edge.journal import CommandJournal, JournalEntry
    from nerve.edge.settings import SettingsView
    from nerve.runtime.envelope.model import ResultStatus

__all__ = [
    "DEFAULT_MAX_ARGS_BYTES",
    "INTERRUPTED_REASON",
    "RERUN_REASON",
    "UNANSWERED_KINDS",
    "Executor",
    "Unanswered",
    "command_digest",
]

_log: Final = logging.getLogger(__name__)

INTERRUPTED_REASON: Final = "the device restarted while running this command; not run again"
RERUN_REASON: Final = "run again: the device restarted while running it, and the action is idempotent"
DEFAULT_MAX_ARGS_BYTES: Final = 4096
_EXPIRED_SINCE_REASON: Final = (
    "the device restarted while running this command, and it has expired since; not run again"
)
_UNREADABLE_REASON: Final = "the result recorded for this command cannot be read; not run again"
_MAX_REASON_CHARS: Final = 500

_CLEAR_TEMP: Final = "clear_temp"
_MSGPACK: Final = msgspec.msgpack.Encoder()

#: Why a message got no answer: `oversized` (over the payload limit, and no command id readable in
#: it), `no_command_id` (it does not parse into a map with a valid `id`), `foreign_topic` (not a
#: command topic of this device, or an invalid action level with an unreadable payload).
Unanswered = Literal["oversized", "no_command_id", "foreign_topic"]
UNANSWERED_KINDS: Final[tuple[Unanswered, ...]] = ("oversized", "no_command_id", "foreign_topic")


class _Head(msgspec.Struct):
    """What an answer to a message that is not a valid command needs of it; every other attribute is skipped.

    `id` is typed `Any`, so a value of any type is read (and then checked), not refused by the decoder.
    The others are kept raw and read one by one: one unreadable (a number out of range, say) must not
    cost the answer.
    """

    id: Any = None
    correlationid: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)  # empty when absent
    hops: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)


_JSON_HEAD: Final = msgspec.json.Decoder(_Head)
_MSGPACK_HEAD: Final = msgspec.msgpack.Decoder(_Head)
_JSON_ANY: Final = msgspec.json.Decoder()
_MSGPACK_ANY: Final = msgspec.msgpack.Decoder()


def command_digest(command: Command) -> bytes:
    """What identifies a command's request in the journal: SHA-256 of its device, action and arguments.

    Time, expiry and signature are left out on purpose: a central that re-creates the same command
    under the same (derived) id after a restart gets the recorded result, not a refusal.
    """
    request = {"subject": command.subject, "action": command.action, "data": command.data}
    text = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=repr)
    return hashlib.sha256(text.encode()).digest()


class Executor:
    """Runs the signed, allow-listed commands addressed to one device, each command id at most once.

    `handle()` is synchronous and may block (it writes the journal with fsync, and runs the action):
    call it from a worker thread in async code. Calls must not overlap: the journal guarantees that
    an id never runs twice, but two overlapping deliveries of one id would get "already running".

    `signer` (the device's own key, whose key id must be `device`) signs every result `handle` returns;
    None: results go out unsigned (central will not act on them).

    The allow-list is `clear_temp` on `clear_temp_roots` (with no roots it is refused as not
    allow-listed), plus `actions` (built by `from_settings` from `edge.actions`, plugins included);
    `disabled` maps names to the reason they do not run, for the refusal. A command whose arguments
    encode (msgpack) to more than `max_args_bytes` is refused before its action sees them. A command
    is good only for a short, present window: its `time` no later than now plus `clock_skew_s`, its
    `expires` no earlier than now minus `clock_skew_s`, and `expires - time` at most `max_validity_s`.

    Raises `ConfigError` from the constructor: a device id that is not a token, a signer whose key id is
    not the device id, a root that is not an
    absolute path, a clock skew that is negative or not shorter than the journal's retention (an
    entry pruned while its command could still pass the expiry check would let a replay run again),
    a maximum validity that is not positive.
    """

    def __init__(
        self,
        *,
        device: str,
        verifier: Verifier,
        signer: Signer | None = None,
        journal: CommandJournal,
        clear_temp_roots: Sequence[Path],
        source: str,
        actions: Sequence[Action] = (),
        disabled: Mapping[str, str] | None = None,
        clock_skew_s: float = 30.0,
        max_validity_s: float,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_args_bytes: int = DEFAULT_MAX_ARGS_BYTES,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        if not is_token(device):
            raise ConfigError(f"{device!r} is not a valid device id (1-64 of A-Z a-z 0-9 _ -)", key="device")
        _check_signer(signer, device)
        roots = tuple(Path(root) for root in clear_temp_roots)
        for root in roots:
            if not root.is_absolute():
                raise ConfigError(f"{str(root)!r} is not an absolute path", key="edge.clear_temp_roots")
        if not 0 <= clock_skew_s < journal.retention_s:
            raise ConfigError(
                f"must be from 0 to less than the journal retention ({journal.retention_s:g} s), "
                f"got {clock_skew_s!r}",
                key="edge.clock_skew_s",
            )
        for key, limit in (
            ("edge.max_command_validity_s", max_validity_s),
            ("max_payload", max_payload),
            ("edge.actions.max_args_bytes", max_args_bytes),
        ):
            if not limit > 0:
                raise ConfigError(f"must be > 0, got {limit!r}", key=key)
        self._device = device
        self._verifier = verifier
        self._signer = signer
        self._journal = journal
        self._source = source
        self._skew = timedelta(seconds=clock_skew_s)
        self._max_validity = timedelta(seconds=max_validity_s)
        self._unanswered: dict[Unanswered, int] = dict.fromkeys(UNANSWERED_KINDS, 0)
        self._max_payload = max_payload
        self._max_args_bytes = max_args_bytes
        self._clock = clock
        self._actions: dict[str, Action] = {}
        self._disabled: dict[str, str] = {}
        # Ids whose action runs right now in this process: a `started` entry of any other id was
        # left by a previous run of the device.
        self._running: set[str] = set()
        if roots:
            self._actions[_CLEAR_TEMP] = ClearTemp(roots)
        else:
            self._disabled[_CLEAR_TEMP] = "no clear_temp roots are configured"
        for action in actions:
            if action.name in self._actions:
                raise ConfigError(f"action {action.name!r} is given twice", key="edge.actions.allow")
            self._actions[action.name] = action
            self._disabled.pop(action.name, None)
        self._disabled.update({k: v for k, v in (disabled or {}).items() if k not in self._actions})

    @classmethod
    def from_settings(cls, settings: SettingsView, *, device: str, journal: CommandJournal) -> Executor:
        """An executor configured by `settings.edge` (trusted keys, its own key, roots, clock skew).

        Logs one warning if `edge.signing_key` is unset: results then go out unsigned.
        Raises `ConfigError` for unreadable or malformed keys, and as the constructor does.
        """
        verifier = Verifier.from_config(settings.edge.trusted_keys, settings.edge.trusted_keys_dir)
        if not verifier.keyids:
            _log.warning(
                "no trusted keys are configured: every command will be refused as signed by an unknown key"
            )
        signer = None
        if settings.edge.signing_key is not None:
            signer = Signer.from_file(settings.edge.signing_key, device)
        else:
            _log.warning(
                "edge.signing_key is not set: this device's results go out unsigned, and central will not "
                "act on them (`nerve devices add %s` makes its key)",
                device,
            )
        allowed = build_allow_list(settings.edge)
        clear = allowed.actions.pop(_CLEAR_TEMP, None)
        if clear is None and _CLEAR_TEMP not in allowed.disabled:
            allowed.disabled[_CLEAR_TEMP] = "not in edge.actions.allow"
        return cls(
            device=device,
            verifier=verifier,
            signer=signer,
            journal=journal,
            clear_temp_roots=settings.edge.clear_temp_roots if clear is not None else (),
            source=f"nerve://edge/{device}",
            actions=list(allowed.actions.values()),
            disabled=allowed.disabled,
            clock_skew_s=settings.edge.clock_skew_s,
            max_validity_s=settings.edge.max_command_validity_s,
            max_payload=settings.bridge.max_payload,
            max_args_bytes=settings.edge.actions.max_args_bytes,
        )

    @property
    def device(self) -> str:
        """The device whose commands this executor runs."""
        return self._device

    @property
    def actions(self) -> frozenset[str]:
        """The actions this device runs (the allow-list)."""
        return frozenset(self._actions)

    @property
    def unanswered(self) -> dict[Unanswered, int]:
        """How many messages got no answer, by kind (every kind of `UNANSWERED_KINDS` is a key)."""
        return dict(self._unanswered)

    def handle(self, topic: str, payload: bytes, *, prefix: str = DEFAULT_PREFIX) -> CommandResult | None:
        """Handle one message received on a command topic; return the result to publish.

        Never raises for any `topic` and `payload`. Returns None when there is nobody to answer,
        counting it in `unanswered` (the first of each kind logged as a warning, the rest at debug
        level): the topic is not one of this device's command topics, or no valid command `id` can be
        read from the payload (it is not a map, or is nested too deeply for Python to read, or its id
        is missing or not a string of 1-128 characters). A payload over the size limit, or one that
        is not a valid command (a version skew, data nested too deeply, a wrong type), is answered
        `rejected` with the problem when its id can be read, so central learns why instead of
        waiting for a timeout.

        Otherwise the result says what happened: `ok` or `failed` (the action ran), `rejected` or
        `expired` (it did not, `reason` says why), `unknown` (it was started before a restart and is
        not run again). A command id that was journalled before gets the recorded result again.
        Every result is signed with the device's key, if it has one.
        """
        result = self._answer(topic, payload, prefix)
        if result is None or self._signer is None:
            return result
        return self._signer.sign(result)

    def _answer(self, topic: str, payload: bytes, prefix: str) -> CommandResult | None:
        try:
            address = parse_topic(topic, prefix)
        except TopicError as exc:
            return self._bad_topic(topic, payload, prefix, exc)
        if address.device != self._device or address.kind is not Kind.COMMANDS:
            why = f"not a command topic of device {self._device!r}"
            self._unanswerable("foreign_topic", topic, why)
            return None
        if len(payload) > self._max_payload:
            # Read no further than its id: the rest of it is refused unread.
            reason = f"too large: {PayloadTooLarge(len(payload), self._max_payload)}"
            return self._answer_unreadable(topic, payload, address.name, reason, "oversized")
        try:
            command = decode(payload, Command, max_size=self._max_payload)
        except DecodeError as exc:
            return self._answer_unreadable(topic, payload, address.name, exc.reason, "no_command_id")
        _log.debug("command %s (%s) received on %s", command.id, command.action, topic)
        return self._handle(command, address.name)

    def _handle(self, command: Command, topic_action: str) -> CommandResult:
        try:
            entry = self._journal.lookup(command.id)
        except JournalError as exc:
            _log.error("command %s not run: %s", command.id, exc)
            return self._refuse(command, f"not run: {exc}")
        digest = command_digest(command)
        same = entry is not None and (entry.digest is None or entry.digest == digest)
        if entry is not None and same and entry.state is JournalState.FINISHED:
            answered = self._answered_before(command, entry, topic_action)
            if answered is not None:
                return answered
        refusal = self._authenticate(command, topic_action)
        if refusal is not None:
            return self._refuse(command, refusal)
        if entry is None:
            return self._admit(command, digest)
        return self._seen_before(command, entry, digest, same=same)

    def _answered_before(
        self, command: Command, entry: JournalEntry, topic_action: str
    ) -> CommandResult | None:
        """The answer to a command that finished before: its recorded result, or `expired` once past it."""
        recorded = self._recorded(entry)
        if recorded is None:
            return None
        if recorded.status == "rejected" or not self._past_expiry(command):
            _log.debug("command %s seen before: answering with its recorded result", command.id)
            return recorded
        # Answered before and expired since: a genuine replay is refused as expired, a forged one as forged.
        refusal = self._authenticate(command, topic_action)
        if refusal is not None:
            return self._refuse(command, refusal)
        return self._replayed_after_expiry(command)

    def _past_expiry(self, command: Command) -> bool:
        return self._clock() > command.expires + self._skew

    def _replayed_after_expiry(self, command: Command) -> CommandResult:
        """A command answered before and now past its expiry is refused as expired, not answered again."""
        now = self._clock()
        reason = (
            f"expired: command expired at {_stamp(command.expires)}; device time is {_stamp(now)} "
            f"(clock skew allowed: {self._skew.total_seconds():g} s); it was answered before and is not "
            "run again"
        )
        _log.info("command %s (%s) replayed after its expiry: refused", command.id, command.action)
        return self._result(command, "rejected", reason)

    def _seen_before(
        self, command: Command, entry: JournalEntry, digest: bytes, *, same: bool
    ) -> CommandResult:
        """A genuine command whose id is journalled already, without a result to answer with."""
        if not same:
            # Not journalled: the entry stays the first command's.
            return self._refuse(
                command,
                f"replayed: command id {command.id!r} was used before by a different command; not run",
            )
        if command.id in self._running:
            return self._refuse(command, "not run: this command is already running on the device")
        action = self._actions.get(command.action)
        if entry.state is JournalState.STARTED and action is not None and action.idempotent:
            _log.warning(
                "command %s was interrupted by a restart: %s is idempotent, running it again",
                command.id,
                command.action,
            )
            return self._admit(command, digest, rerun=True)
        _log.warning("command %s was journalled before but has no readable result: not run again", command.id)
        reason = INTERRUPTED_REASON if entry.state is JournalState.STARTED else _UNREADABLE_REASON
        return self._record(command, self._result(command, "unknown", reason))

    def _authenticate(self, command: Command, topic_action: str) -> str | None:
        """Why `command` is refused before anything about it is journalled, or None if it is genuine."""
        if command.subject != self._device:
            return f"command is for device {command.subject!r}, not {self._device!r}"
        if command.action != topic_action:
            return f"command action {command.action!r} does not match its topic's action {topic_action!r}"
        try:
            self._verifier.verify(command)
        except SignatureError as exc:
            _log.warning("command %s from %s refused: %s", command.id, command.source, exc)
            return str(exc)
        return None

    def _admit(self, command: Command, digest: bytes, *, rerun: bool = False) -> CommandResult:
        """Check expiry, argument size, allow-list and arguments of a genuine command, then run it."""
        refusal = self._precheck(command, rerun=rerun)
        if refusal is not None:
            status, reason = refusal
            return self._record(command, self._result(command, status, reason), digest)
        action = self._actions[command.action]
        try:
            args = action.validate(command.data)
        except ActionArgumentError as exc:
            return self._record(command, self._result(command, "rejected", str(exc)), digest)
        except Exception as exc:  # noqa: BLE001 - a plugin's bug is an answer, never a crash
            _log.exception("command %s: %s could not check its arguments", command.id, command.action)
            reason = _clip(f"{command.action} could not check its arguments: {type(exc).__name__}: {exc}")
            return self._record(command, self._result(command, "rejected", reason), digest)
        return self._execute(command, action, args, digest, rerun=rerun)

    def _precheck(self, command: Command, *, rerun: bool) -> tuple[ResultStatus, str] | None:
        """Why a genuine command is not run (out of its window, arguments too large, not allowed), or None.

        These refusals are journalled like results: a replay gets the same answer even if the command
        would pass later (a future-dated one once its time comes, any one after a setting changed).
        """
        if rerun and self._past_expiry(command):
            return "unknown", _EXPIRED_SINCE_REASON
        outside = self._outside_window(command)
        if outside is not None:
            return "rejected", outside
        size = _encoded_size(command.data)
        if size > self._max_args_bytes:
            return (
                "rejected",
                f"arguments too large: {size} bytes encoded, the limit is {self._max_args_bytes} bytes",
            )
        if command.action not in self._actions:
            reason = f"action {command.action!r} is not allow-listed on this device"
            if command.action in self._disabled:
                reason += f" ({self._disabled[command.action]})"
            return "rejected", reason
        return None

    def _outside_window(self, command: Command) -> str | None:
        """Why `command` is not good now (expired, future-dated, valid for too long), or None."""
        now = self._clock()
        skew = self._skew.total_seconds()
        if now > command.expires + self._skew:
            return (
                f"expired: command expired at {_stamp(command.expires)}; device time is {_stamp(now)} "
                f"(clock skew allowed: {skew:g} s)"
            )
        if command.time > now + self._skew:
            return (
                f"future-dated: command time is {_stamp(command.time)}; device time is {_stamp(now)} "
                f"(clock skew allowed: {skew:g} s)"
            )
        validity = command.expires - command.time
        if validity > self._max_validity:
            return (
                f"validity too long: command is valid for {_seconds(validity)} s (from "
                f"{_stamp(command.time)} to {_stamp(command.expires)}); this device accepts at most "
                f"{_seconds(self._max_validity)} s (edge.max_command_validity_s)"
            )
        return None

    def _execute(
        self, command: Command, action: Action, args: Mapping[str, Any], digest: bytes, *, rerun: bool
    ) -> CommandResult:
        if not rerun:
            try:
                claimed = self._journal.start(command.id, expires=command.expires, digest=digest)
            except JournalError as exc:
                _log.error("command %s not run: %s", command.id, exc)
                return self._refuse(command, f"not run: {exc}")
            if not claimed:
                return self._refuse(command, "not run: this command is already running on the device")
        _log.info("running %s (command %s from %s)", command.action, command.id, command.source)
        self._running.add(command.id)
        try:
            data = action.run(args)
        except ActionFailed as exc:
            _log.warning("command %s: %s failed: %s", command.id, command.action, exc.reason)
            result = self._result(command, "failed", _clip(exc.reason), data=exc.data)
        except Exception as exc:  # noqa: BLE001 - an action that fails is reported, never raised
            _log.exception("command %s: %s failed", command.id, command.action)
            result = self._result(
                command, "failed", _clip(f"{command.action} raised {type(exc).__name__}: {exc}")
            )
        else:
            result = self._result(command, "ok", RERUN_REASON if rerun else "", data=data)
        finally:
            self._running.discard(command.id)
        return self._record(command, result, digest)

    def _record(self, command: Command, result: CommandResult, digest: bytes | None = None) -> CommandResult:
        try:
            self._journal.finish(command.id, to_msgpack(result), expires=command.expires, digest=digest)
        except JournalError as exc:
            # The answer still goes out; a replay will get "unknown" (if started) or be checked again.
            _log.error("result of command %s not journalled: %s", command.id, exc)
        _log.info("command %s (%s): %s %s", command.id, command.action, result.status, result.reason)
        return result

    def _refuse(self, command: Command, reason: str) -> CommandResult:
        _log.info("command %s (%s) refused: %s", command.id, command.action, reason)
        return self._result(command, "rejected", reason)

    def _result(
        self,
        command: Command,
        status: ResultStatus,
        reason: str = "",
        data: dict[str, Any] | None = None,
    ) -> CommandResult:
        try:
            # In its JSON form now: a value with none (from a plugin, say) fails here, not when sent.
            return CommandResult.for_command(
                command,
                source=self._source,
                status=status,
                reason=reason,
                data=msgspec.to_builtins(data or {}, enc_hook=_json_form),
                # The answer comes from this device, whoever the command was meant for.
                subject=self._device,
            )
        except (TypeError, ValueError) as exc:
            return CommandResult.for_command(
                command,
                source=self._source,
                status="failed",
                reason=_clip(f"{command.action} returned data with no JSON form: {exc}"),
                subject=self._device,
            )

    def _recorded(self, entry: JournalEntry) -> CommandResult | None:
        if entry.result is None:
            return None
        try:
            return decode(entry.result, CommandResult, max_size=len(entry.result))
        except DecodeError as exc:
            _log.warning("recorded result of command %s cannot be read: %s", entry.command_id, exc)
            return None

    def _bad_topic(self, topic: str, payload: bytes, prefix: str, exc: TopicError) -> CommandResult | None:
        # Only a subscription to `<prefix>/<device>/commands/+` brings us here, so what is wrong is the
        # last level: a command that decodes is answered (on its own action's topic) with the problem.
        if not topic.startswith(f"{prefix}/{self._device}/{Kind.COMMANDS}/"):
            self._unanswerable("foreign_topic", topic, str(exc))
            return None
        try:
            command = decode(payload, Command, max_size=self._max_payload)
        except DecodeError as decode_error:
            self._unanswerable("foreign_topic", topic, f"{exc}; {decode_error.reason}")
            return None
        return self._refuse(command, str(exc))

    def _answer_unreadable(
        self, topic: str, payload: bytes, action: str, reason: str, kind: Unanswered
    ) -> CommandResult | None:
        """`rejected` with `reason` for a message that is no valid command, if its id can be read."""
        as_msgpack = is_msgpack_map(payload)
        head = _read_head(payload, as_msgpack=as_msgpack)
        if head is None or not _is_message_id(head.id):
            self._unanswerable(kind, topic, f"it has no command id to answer: {reason}")
            return None
        command_id = head.id
        correlation = _read_raw(head.correlationid, as_msgpack=as_msgpack)
        if not _is_message_id(correlation):
            correlation = command_id
        hops = _read_raw(head.hops, as_msgpack=as_msgpack)
        if not (isinstance(hops, int) and not isinstance(hops, bool) and hops >= 0):
            hops = 0
        result = CommandResult(
            source=self._source,
            type=f"nerve.result.{action}",
            subject=self._device,
            action=action,
            status="rejected",
            reason=_clip(reason),
            causationid=command_id,
            correlationid=correlation,
            hops=min(hops + 1, MAX_HOPS),  # a hops past the envelope's limit still gets an answer
        )
        _log.info("command %s on %s refused: %s", command_id, topic, reason)
        return result

    def _unanswerable(self, kind: Unanswered, topic: str, why: str) -> None:
        """Count a message nobody can be answered for; warn about the first of its kind only."""
        self._unanswered[kind] += 1
        if self._unanswered[kind] == 1:
            _log.warning(
                "message on %r dropped (%s): %s; further %s messages are counted, and logged at debug level",
                topic,
                kind,
                _clip(why),
                kind,
            )
        else:
            _log.debug("message on %r dropped (%s): %s", topic, kind, _clip(why))


def _check_signer(signer: Signer | None, device: str) -> None:
    """Raise `ConfigError` unless `signer` is None or signs as `device` (central wants `keyid == subject`)."""
    if signer is not None and signer.keyid != device:
        raise ConfigError(
            f"the device's key id must be its device id {device!r}, got {signer.keyid!r}",
            key="edge.signing_key",
        )


def _read_head(payload: bytes, *, as_msgpack: bool) -> _Head | None:
    """The id, correlation id and hops of a payload that is a map (msgpack or JSON), or None."""
    try:
        return (_MSGPACK_HEAD if as_msgpack else _JSON_HEAD).decode(payload)
    except (msgspec.DecodeError, RecursionError):  # not a map, malformed, or nested too deeply to skip
        return None


def _read_raw(raw: msgspec.Raw, *, as_msgpack: bool) -> object:
    """The value `raw` holds, or None if it is empty or cannot be read."""
    if not raw:
        return None
    try:
        return (_MSGPACK_ANY if as_msgpack else _JSON_ANY).decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None


def _is_message_id(value: object) -> TypeGuard[str]:
    """Whether `value` is a valid message id (as `MessageId` in the envelope): it can head an answer."""
    if not (isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:  # a lone surrogate, from JSON's \ud800
        return False
    return True


def _json_form(value: object) -> object:
    """What `msgspec.to_builtins` cannot convert itself (it raises `TypeError` for anything else)."""
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"a value of type {type(value).__name__} has no JSON form")


def _encoded_size(data: Mapping[str, Any]) -> int:
    try:
        return len(_MSGPACK.encode(data))
    except (TypeError, ValueError, OverflowError):
        # Cannot happen for decoded msgpack or JSON; if it does, the arguments fit no limit.
        return 2**31


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _seconds(span: timedelta) -> str:
    """`300`, `300.5`, `3153600000`: never in exponent notation, to the millisecond."""
    return f"{span.total_seconds():.3f}".rstrip("0").rstrip(".")


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 1] + "…"
