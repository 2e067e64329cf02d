"""`nerve send`: an operator signs one command, sends it the way central does, and waits for its result.

The command goes into JetStream (`NERVE_COMMANDS`, subject `<prefix>.<device>.commands.<action>`);
the bridge's downlink carries it to the device over MQTT, and the device's result comes back up into
`NERVE_RESULTS`, where this waits for the one whose `causationid` is the command's id and that the
device signed (it verifies against the key registered for the device, `central.device_keys_dir`, as
central checks it: `nerve.runtime.trust.devices`), or the bridge's unsigned `expired` that came after
the command expired (`nerve.runtime.trust.expiry`); any other is reported as ignored. Meanwhile it
looks up the device's last reading, event or result in the streams, to say early that a device has
never been seen or seems offline rather than wait in silence.
"""

from __future__ import annotations

import asyncio
import json
import re
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Self

from nats.js.errors import NotFoundError

from nerve.runtime.cancellation import checkpoint
from nerve.runtime.config.settings import DEFAULT_MAX_COMMAND_VALIDITY_S
from nerve.runtime.envelope.codec import decode
from nerve.runtime.envelope.model import Command, CommandResult, utcnow
from nerve.runtime.errors import ConfigError, DecodeError
from nerve.runtime.jetstream.client import connect, publish_envelope
from nerve.runtime.jetstream.streams import STREAM_OF_KIND, ready_streams
from nerve.runtime.subjects import Address, Kind, is_token, subject_root
from nerve.runtime.trust.devices import DeviceKeys, registry_dir
from nerve.runtime.trust.signing import PRIVATE_SUFFIX, Signer

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from nats.aio.client import Client as NatsClient
    from nats.aio.subscription import Subscription

    from nerve.runtime.config.settings import Settings

__all__ = [
    "MAX_DURATION_S",
    "MAX_EXPIRES_S",
    "SEEN_KINDS",
    "CommandChannel",
    "device_registry",
    "format_age",
    "format_result",
    "parse_args",
    "parse_duration",
    "parse_expires_in",
    "presence_notice",
    "sign_command",
    "signer_for",
    "signing_key_path",
]

#: The longest `--timeout`.
MAX_DURATION_S: Final = 7 * 86400.0
#: The longest `--expires-in`: what a device accepts by default (`edge.max_command_validity_s`).
MAX_EXPIRES_S: Final = DEFAULT_MAX_COMMAND_VALIDITY_S
# Where a device's own messages land: its last one says when it was last heard from.
SEEN_KINDS: Final = (Kind.TELEMETRY, Kind.EVENTS, Kind.RESULTS)
_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?")
_KEY: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def parse_duration(text: str, *, flag: str) -> float:
    """Seconds from `90`, `90s`, `1.5m`, `2h`, `500ms`, `1d`: more than 0, at most 7 days.

    Raises:
        ConfigError: anything else (names the flag and what fits).
    """
    match = _DURATION.fullmatch(text.strip())
    seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"] if match else -1.0
    if not 0 < seconds <= MAX_DURATION_S:
        raise ConfigError(
            f"{text!r} is not a duration from 1ms to 7d (like 60s, 5m, 2h)", source="command line", key=flag
        )
    return seconds


def parse_expires_in(text: str) -> float:
    """`--expires-in`: a duration (`parse_duration`) of at most `MAX_EXPIRES_S`.

    A device refuses a command valid for longer than `edge.max_command_validity_s` (300 s by
    default): sending one would only get it refused there.

    Raises:
        ConfigError: not a duration, or longer than `MAX_EXPIRES_S` (one line saying why).
    """
    seconds = parse_duration(text, flag="--expires-in")
    if seconds > MAX_EXPIRES_S:
        raise ConfigError(
            f"{text!r} is longer than {MAX_EXPIRES_S:g}s: devices refuse a command valid for longer "
            "(edge.max_command_validity_s)",
            source="command line",
            key="--expires-in",
        )
    return seconds


def parse_args(pairs: Sequence[str]) -> dict[str, Any]:
    """A command's arguments from `key=value` pairs.

    A value that is JSON (`3600`, `true`, `[1]`, `"7"`) is read as JSON, any other as text.

    Raises:
        ConfigError: a pair without `=`, a key that is not an identifier, or a key given twice.
    """
    args: dict[str, Any] = {}
    for pair in pairs:
        key, equals, raw = pair.partition("=")
        if not equals or not _KEY.fullmatch(key):
            raise ConfigError(
                f"{pair!r} is not key=value with key a name like older_than_s",
                source="command line",
                key="--arg",
            )
        if key in args:
            raise ConfigError(f"{key!r} is given twice", source="command line", key="--arg")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        args[key] = value
    return args


def signing_key_path(settings: Settings, key: Path | None, keys_dir: Path) -> tuple[Path, bool]:
    """The key file `nerve send` signs with, and whether it is the default one.

    `key` (the --key flag), else `central.signing_key`, else `<keys_dir>/<keyid>.key`: where `nerve up`
    creates the central key when its settings name none, so both find the same key by default.
    """
    if key is not None:
        return key, False
    if settings.central.signing_key is not None:
        return settings.central.signing_key, False
    return keys_dir / f"{settings.central.keyid}{PRIVATE_SUFFIX}", True


def device_registry(settings: Settings) -> Path:
    """The device registry `nerve send` checks results against: central's (`registry_dir`)."""
    return registry_dir(settings.central.device_keys_dir, settings.data_dir)


def signer_for(settings: Settings, key: Path | None, keys_dir: Path) -> Signer:
    """The operator's signer, from the file `signing_key_path` names (its stem is the key id for --key).

    Raises:
        ConfigError: the file does not exist or cannot be read (names the file and how to get one).
    """
    path, default = signing_key_path(settings, key, keys_dir)
    if not path.exists():
        how = "`nerve up` creates it there" if default else "check the path"
        raise ConfigError(
            f"no signing key at {path} ({how}; or pass --key FILE, or set central.signing_key)",
            source="command line" if key is not None else None,
            key="--key" if key is not None else "central.signing_key",
        )
    return Signer.from_file(path, None if key is not None else settings.central.keyid)


def sign_command(
    signer: Signer, *, device: str, action: str, args: dict[str, Any], expires_in: float
) -> Command:
    """A signed command for `device` to run `action`, valid for `expires_in` seconds.

    Raises:
        ConfigError: `device` or `action` is not a token.
    """
    for what, value in (("device", device), ("action", action)):
        if not is_token(value):
            raise ConfigError(f"{value!r} is not a valid {what} (1-64 of A-Z a-z 0-9 _ -)", key=what.upper())
    return signer.sign(
        Command.create(
            device=device,
            action=action,
            args=args,
            source="nerve://operator/send",
            ttl=timedelta(seconds=expires_in),
        )
    )


def format_age(seconds: float) -> str:
    """`45s`, `12m 5s`, `3h 20m`, `2d 4h`: how old something is, for a person."""
    whole = max(0, int(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def presence_notice(
    device: str, last: datetime | None, *, now: datetime, offline_after_s: float
) -> str | None:
    """What to tell a person about `device` before its result comes: None if it was heard from lately.

    `last` is when its last message (reading, event or result) was stored; None if there is none.
    """
    if last is None:
        streams = ", ".join(STREAM_OF_KIND[kind] for kind in SEEN_KINDS)
        return f"device {device} has never been seen (no message from it in {streams})"
    age = (now - last).total_seconds()
    if age <= offline_after_s:
        return None
    return f"device {device} seems offline: its last message is {format_age(age)} old"


class CommandChannel:
    """One NATS connection for `nerve send`: send, ask when the device was last heard from, wait.

    An async context manager: connected on entry, closed on exit.

    Raises `BrokerUnavailable` on entry if NATS does not answer.
    """

    def __init__(self, settings: Settings, *, registry: Path | None = None) -> None:
        """`registry`: the device registry results are checked against (default: central's, by `settings`)."""
        self._settings = settings
        self._device_keys = DeviceKeys(
            registry or registry_dir(settings.central.device_keys_dir, settings.data_dir)
        )
        self._nc: NatsClient | None = None
        self._results: Subscription | None = None

    async def __aenter__(self) -> Self:
        self._nc = await connect(self._settings.nats, name="nerve-send")
        try:
            await ready_streams(
                self._nc.jetstream(), self._settings.prefix, configure=self._settings.nats.nkey_file is None
            )
        except BaseException:
            await self._nc.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._nc is not None:
            await self._nc.close()

    @property
    def _client(self) -> NatsClient:
        if self._nc is None:
            raise RuntimeError("CommandChannel is used outside `async with`")
        return self._nc

    async def send(self, command: Command, *, device: str) -> None:
        """Store `command` for `device` in `NERVE_COMMANDS`, listening for its result first."""
        prefix = self._settings.prefix
        # Listen before sending: the answer can be back before the publish call returns.
        results = Address(device, Kind.RESULTS, command.action).subject(prefix)
        self._results = await self._client.subscribe(results)
        commands = Address(device, Kind.COMMANDS, command.action).subject(prefix)
        await publish_envelope(self._client.jetstream(), commands, command, codec=self._settings.nats.codec)

    async def last_seen(self, device: str) -> datetime | None:
        """When the newest reading, event or result of `device` was stored; None if there is none."""
        js = self._client.jetstream()
        root = subject_root(self._settings.prefix)
        latest: datetime | None = None
        for kind in SEEN_KINDS:
            try:
                # The newest message on any subject of the device in this stream (a wildcard filter).
                msg = await js.get_last_msg(STREAM_OF_KIND[kind], f"{root}.{device}.{kind.value}.*")
            except NotFoundError:
                continue
            if msg.time is not None and (latest is None or msg.time > latest):
                latest = msg.time
        return latest

    async def result(
        self, command: Command, *, timeout: float, ignored: Callable[[str], None] | None = None
    ) -> CommandResult | None:
        """The device's signed result for `command`, or None if none came within `timeout` seconds.

        Or the bridge's unsigned `expired` one, if it came once `command` expired
        (`nerve.runtime.trust.expiry`). Any other result for `command` that does not verify against the
        device's registered key is not returned: `ignored` is told `unverified result ... ignored` with
        the reason, and the wait goes on.
        """
        if self._results is None:
            raise RuntimeError("result() before send()")
        try:
            async with asyncio.timeout(timeout):
                async for msg in self._results.messages:
                    checkpoint()
                    try:
                        result = decode(msg.data, CommandResult)
                    except DecodeError:
                        continue  # someone else's garbage on the subject; not ours to judge here
                    if result.causationid != command.id:
                        continue
                    # When it came: an unsigned `expired` for it is believed only after it expired.
                    refusal = self._device_keys.refusal(result, sent=command, arrived=utcnow())
                    if refusal is None:
                        return result
                    if ignored is not None:
                        ignored(
                            f"unverified result {result.id} ({result.status}) ignored: {refusal.reason} "
                            f"(device registry {self._device_keys.directory})"
                        )
        except TimeoutError:
            pass
        return None


def format_result(result: CommandResult) -> str:
    """What a person reads: `<status>: <action> on <device>: <summary or reason>`, then the data."""
    summary = result.data.get("summary") if isinstance(result.data.get("summary"), str) else ""
    head = f"{result.status}: {result.action} on {result.subject}"
    detail = "; ".join(part for part in (result.reason, summary) if part)
    lines = [f"{head}: {detail}" if detail else head]
    data = {key: value for key, value in result.data.items() if key != "summary"}
    if data:
        lines.append(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    return "\n".join(lines)
