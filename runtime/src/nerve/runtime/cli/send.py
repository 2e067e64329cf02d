"""`nerve send`: an operator signs one command, sends it the way central does, and waits for its result.

The command goes into JetStream (`NERVE_COMMANDS`, subject `<prefix>.<device>.commands.<action>`);
the bridge's downlink carries it to the device over MQTT, and the device's result comes back up into
`NERVE_RESULTS`, where this waits for the one whose `causationid` is the command's id.
"""

from __future__ import annotations

import asyncio
import json
import re
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

from nerve.runtime.cancellation import checkpoint
from nerve.runtime.envelope.codec import decode
from nerve.runtime.envelope.model import Command, CommandResult
from nerve.runtime.errors import ConfigError, DecodeError
from nerve.runtime.jetstream.client import connect, publish_envelope
from nerve.runtime.jetstream.streams import ensure_streams
from nerve.runtime.subjects import Address, Kind, is_token
from nerve.runtime.trust.signing import PRIVATE_SUFFIX, Signer

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from nerve.runtime.config.settings import Settings

__all__ = [
    "MAX_EXPIRES_S",
    "format_result",
    "parse_args",
    "parse_duration",
    "send_command",
    "signer_for",
]

MAX_EXPIRES_S: Final = 7 * 86400.0
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
    if not 0 < seconds <= MAX_EXPIRES_S:
        raise ConfigError(
            f"{text!r} is not a duration from 1ms to 7d (like 60s, 5m, 2h)", source="command line", key=flag
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


def signer_for(settings: Settings, key: Path | None) -> Signer:
    """The operator's signer.

    `key` (its stem is the key id), else `central.signing_key`, else the key that `nerve up`
    generated under `<data_dir>/keys`.

    Raises:
        ConfigError: none of them exists or it cannot be read.
    """
    if key is not None:
        return Signer.from_file(key)
    if settings.central.signing_key is not None:
        return Signer.from_file(settings.central.signing_key, settings.central.keyid)
    generated = settings.data_dir / "keys" / f"{settings.central.keyid}{PRIVATE_SUFFIX}"
    if generated.exists():
        return Signer.from_file(generated, settings.central.keyid)
    raise ConfigError(
        f"no signing key: pass --key, set central.signing_key, or run `nerve up` to create {generated}",
        key="central.signing_key",
    )


async def send_command(
    settings: Settings,
    *,
    signer: Signer,
    device: str,
    action: str,
    args: dict[str, Any],
    expires_in: float,
    timeout: float,
) -> tuple[Command, CommandResult | None]:
    """Sign and store the command, then wait up to `timeout` seconds for its result (None if none came).

    Raises:
        ConfigError: `device` or `action` is not a token.
        BrokerUnavailable: NATS does not answer.
    """
    for what, value in (("device", device), ("action", action)):
        if not is_token(value):
            raise ConfigError(f"{value!r} is not a valid {what} (1-64 of A-Z a-z 0-9 _ -)", key=what.upper())
    command = signer.sign(
        Command.create(
            device=device,
            action=action,
            args=args,
            source="nerve://operator/send",
            ttl=timedelta(seconds=expires_in),
        )
    )
    nc = await connect(settings.nats, name="nerve-send")
    try:
        js = nc.jetstream()
        await ensure_streams(js, settings.prefix)
        # Listen before sending: the answer can be back before the publish call returns.
        results = await nc.subscribe(Address(device, Kind.RESULTS, action).subject(settings.prefix))
        await publish_envelope(
            js,
            Address(device, Kind.COMMANDS, action).subject(settings.prefix),
            command,
            codec=settings.nats.codec,
        )
        try:
            async with asyncio.timeout(timeout):
                async for msg in results.messages:
                    checkpoint()
                    try:
                        result = decode(msg.data, CommandResult)
                    except DecodeError:
                        continue  # someone else's garbage on the subject; not ours to judge here
                    if result.causationid == command.id:
                        return command, result
        except TimeoutError:
            pass
        return command, None
    finally:
        await nc.close()


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
