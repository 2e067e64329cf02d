"""The command executor: turns the bytes of a command into at most one run of an allow-listed action.

Checks, in order, for a message on `<prefix>/<device>/commands/<action>`:

1. size, topic (a command topic of this device), decoding as a `Command`;
2. the journal: a command id with a recorded result gets that result again (a replay of captured
   bytes too), and nothing runs;
3. addressing (the command's subject and action match the device and the topic), the signature;
4. a command the journal saw start but never finish (the device restarted while it ran) is answered
   `unknown` and not run again; otherwise expiry (with the allowed clock skew), the allow-list and the
   action's arguments;
5. then the journal records `started` (committed and fsynced), the action runs, the journal records
   the result.

Only commands whose signature verified are journalled (steps 4 and 5, and the "unknown" answer for a
command interrupted by a restart). Refusals in step 3 are answered but not kept: otherwise anyone able
to publish on the topic could take a genuine command's id, forge the rest, and have the device record
a refusal that the genuine command would then get as its "recorded result".
"""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from pydantic import ValidationError

from nerve.edge.actions import ActionArgumentError, clear_temp, parse_clear_temp_args
from nerve.edge.journal import JournalError, JournalState
from nerve.runtime.codec import DEFAULT_MAX_PAYLOAD, decode, load_document, to_msgpack
from nerve.runtime.envelope import Command, CommandResult, ResultStatus, utcnow
from nerve.runtime.errors import ConfigError, DecodeError, PayloadTooLarge, SignatureError, TopicError
from nerve.runtime.signing import Verifier
from nerve.runtime.subjects import DEFAULT_PREFIX, Kind, is_token, parse_topic

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from nerve.edge.journal import CommandJournal, JournalEntry
    from nerve.runtime.config import Settings

__all__ = ["INTERRUPTED_REASON", "Executor"]

_log: Final = logging.getLogger(__name__)

INTERRUPTED_REASON: Final = "the device restarted while running this command; not run again"
_UNREADABLE_REASON: Final = "the result recorded for this command cannot be read; not run again"
_MAX_REASON_CHARS: Final = 500
_MAX_ID_CHARS: Final = 128  # as `MessageId` in the envelope

_CLEAR_TEMP: Final = "clear_temp"

# An action whose arguments were parsed, ready to run; it returns the result's `data`.
_Prepared: TypeAlias = "Callable[[], dict[str, Any]]"


class Executor:
    """Runs the signed, allow-listed commands addressed to one device, each command id at most once.

    `handle()` is synchronous and may block (it writes the journal with fsync, and runs the action):
    call it from a worker thread in async code. Calls must not overlap: the journal guarantees that
    an id never runs twice, but two overlapping deliveries of one id would get "already running".

    The allow-list is `clear_temp`, on `clear_temp_roots`; with no roots configured it is refused as
    not allow-listed.

    Raises `ConfigError` from the constructor: a device id that is not a token, a root that is not an
    absolute path, a clock skew that is negative or not shorter than the journal's retention (an
    entry pruned while its command could still pass the expiry check would let a replay run again).
    """

    def __init__(
        self,
        *,
        device: str,
        verifier: Verifier,
        journal: CommandJournal,
        clear_temp_roots: Sequence[Path],
        source: str,
        clock_skew_s: float = 30.0,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        if not is_token(device):
            raise ConfigError(f"{device!r} is not a valid device id (1-64 of A-Z a-z 0-9 _ -)", key="device")
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
        if max_payload <= 0:
            raise ConfigError(f"must be > 0, got {max_payload!r}", key="max_payload")
        self._device = device
        self._verifier = verifier
        self._journal = journal
        self._roots = roots
        self._source = source
        self._skew = timedelta(seconds=clock_skew_s)
        self._max_payload = max_payload
        self._clock = clock
        self._actions: dict[str, Callable[[Mapping[str, Any]], _Prepared]] = {}
        self._disabled: dict[str, str] = {}
        if roots:
            self._actions[_CLEAR_TEMP] = self._prepare_clear_temp
        else:
            self._disabled[_CLEAR_TEMP] = "no clear_temp roots are configured"

    @classmethod
    def from_settings(cls, settings: Settings, *, device: str, journal: CommandJournal) -> Executor:
        """An executor configured by `settings.edge` (trusted keys, roots, clock skew).

        Raises `ConfigError` for unreadable or malformed trusted keys, and as the constructor does.
        """
        verifier = Verifier.from_config(settings.edge.trusted_keys, settings.edge.trusted_keys_dir)
        if not verifier.keyids:
            _log.warning(
                "no trusted keys are configured: every command will be refused as signed by an unknown key"
            )
        return cls(
            device=device,
            verifier=verifier,
            journal=journal,
            clear_temp_roots=settings.edge.clear_temp_roots,
            source=f"nerve://edge/{device}",
            clock_skew_s=settings.edge.clock_skew_s,
            max_payload=settings.bridge.max_payload,
        )

    @property
    def device(self) -> str:
        """The device whose commands this executor runs."""
        return self._device

    @property
    def actions(self) -> frozenset[str]:
        """The actions this device runs (the allow-list)."""
        return frozenset(self._actions)

    def handle(self, topic: str, payload: bytes, *, prefix: str = DEFAULT_PREFIX) -> CommandResult | None:
        """Handle one message received on a command topic; return the result to publish.

        Never raises for any `topic` and `payload`. Returns None, after logging a warning that says
        why, when there is nobody to answer: the payload is over the size limit, the topic is not
        one of this device's command topics, or the payload does not even parse into a map with an
        `id`. A payload that parses but is not a valid command is answered `rejected` with the
        decoding problem when it carries an id, so central learns why (a version skew, typically)
        instead of waiting for a timeout.

        Otherwise the result says what happened: `ok` or `failed` (the action ran), `rejected` or
        `expired` (it did not, `reason` says why), `unknown` (it was started before a restart and is
        not run again). A command id that was journalled before gets the recorded result again.
        """
        if len(payload) > self._max_payload:
            _log.warning("message on %s dropped: %s", topic, PayloadTooLarge(len(payload), self._max_payload))
            return None
        try:
            address = parse_topic(topic, prefix)
        except TopicError as exc:
            return self._bad_topic(topic, payload, prefix, exc)
        if address.device != self._device or address.kind is not Kind.COMMANDS:
            _log.warning("message on %s dropped: not a command topic of device %r", topic, self._device)
            return None
        try:
            command = decode(payload, Command, max_size=self._max_payload)
        except DecodeError as exc:
            return self._undecodable(topic, payload, address.name, exc)
        _log.debug("command %s (%s) received on %s", command.id, command.action, topic)
        return self._handle(command, address.name)

    def _handle(self, command: Command, topic_action: str) -> CommandResult:
        try:
            entry = self._journal.lookup(command.id)
        except JournalError as exc:
            _log.error("command %s not run: %s", command.id, exc)
            return self._refuse(command, f"not run: {exc}")
        if entry is not None and entry.state is JournalState.FINISHED:
            recorded = self._recorded(entry)
            if recorded is not None:
                _log.debug("command %s seen before: answering with its recorded result", command.id)
                return recorded
        refusal = self._authenticate(command, topic_action)
        if refusal is not None:
            return self._refuse(command, refusal)
        # The command is genuine from here on: what it gets is journalled, so a replay gets the same.
        if entry is not None:
            _log.warning(
                "command %s was journalled before but has no readable result: not run again", command.id
            )
            reason = INTERRUPTED_REASON if entry.state is JournalState.STARTED else _UNREADABLE_REASON
            return self._record(command, self._result(command, "unknown", reason))
        return self._admit(command)

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

    def _admit(self, command: Command) -> CommandResult:
        """Check expiry, allow-list and arguments of a genuine, new command, then run it."""
        now = self._clock()
        if now > command.expires + self._skew:
            reason = (
                f"command expired at {_stamp(command.expires)}; device time is {_stamp(now)} "
                f"(clock skew allowed: {self._skew.total_seconds():g} s)"
            )
            return self._record(command, self._result(command, "expired", reason))
        prepare = self._actions.get(command.action)
        if prepare is None:
            reason = f"action {command.action!r} is not allow-listed on this device"
            if command.action in self._disabled:
                reason += f" ({self._disabled[command.action]})"
            return self._record(command, self._result(command, "rejected", reason))
        try:
            run = prepare(command.data)
        except ActionArgumentError as exc:
            return self._record(command, self._result(command, "rejected", str(exc)))
        return self._execute(command, run)

    def _execute(self, command: Command, run: _Prepared) -> CommandResult:
        try:
            claimed = self._journal.start(command.id, expires=command.expires)
        except JournalError as exc:
            _log.error("command %s not run: %s", command.id, exc)
            return self._refuse(command, f"not run: {exc}")
        if not claimed:
            return self._refuse(command, "not run: this command is already running on the device")
        _log.info("running %s (command %s from %s)", command.action, command.id, command.source)
        try:
            data = run()
        except Exception as exc:  # noqa: BLE001 - an action that fails is reported, never raised
            _log.exception("command %s: %s failed", command.id, command.action)
            result = self._result(
                command, "failed", _clip(f"{command.action} raised {type(exc).__name__}: {exc}")
            )
        else:
            result = self._result(command, "ok", data=data)
        return self._record(command, result)

    def _record(self, command: Command, result: CommandResult) -> CommandResult:
        try:
            self._journal.finish(command.id, to_msgpack(result), expires=command.expires)
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
        result = CommandResult.for_command(
            command, source=self._source, status=status, reason=reason, data=data
        )
        # The answer comes from this device, whoever the command was meant for.
        if result.subject != self._device:
            result = result.model_copy(update={"subject": self._device})
        return result

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
            _log.warning("message on %r dropped: %s", topic, exc)
            return None
        try:
            command = decode(payload, Command, max_size=self._max_payload)
        except DecodeError as decode_error:
            _log.warning("message on %r dropped: %s; %s", topic, exc, decode_error.reason)
            return None
        return self._refuse(command, str(exc))

    def _undecodable(self, topic: str, payload: bytes, action: str, exc: DecodeError) -> CommandResult | None:
        document: object = None
        with contextlib.suppress(DecodeError):
            document = load_document(payload)
        if not isinstance(document, dict):
            document = {}
        command_id = document.get("id")
        if not (isinstance(command_id, str) and 0 < len(command_id) <= _MAX_ID_CHARS):
            _log.warning("message on %s dropped, it has no command id to answer: %s", topic, exc.reason)
            return None
        correlation = document.get("correlationid")
        if not (isinstance(correlation, str) and 0 < len(correlation) <= _MAX_ID_CHARS):
            correlation = command_id
        hops = document.get("hops")
        if not (isinstance(hops, int) and not isinstance(hops, bool) and hops >= 0):
            hops = 0
        try:
            result = CommandResult(
                source=self._source,
                type=f"nerve.result.{action}",
                subject=self._device,
                action=action,
                status="rejected",
                reason=_clip(exc.reason),
                causationid=command_id,
                correlationid=correlation,
                hops=hops + 1,
            )
        except ValidationError:
            _log.warning("message on %s dropped: %s", topic, exc.reason)
            return None
        _log.info("command %s on %s refused: %s", command_id, topic, exc.reason)
        return result

    def _prepare_clear_temp(self, args: Mapping[str, Any]) -> _Prepared:
        return partial(self._clear_temp, parse_clear_temp_args(args))

    def _clear_temp(self, older_than_s: float) -> dict[str, Any]:
        done = clear_temp(roots=self._roots, older_than_s=older_than_s)
        return {
            "files_deleted": done.files_deleted,
            "bytes_freed": done.bytes_freed,
            "skipped": done.skipped,
            "errors": list(done.errors),
            "errors_omitted": done.errors_omitted,
            "limit_reached": done.limit_reached,
            "summary": done.summary(),
        }


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 1] + "…"
