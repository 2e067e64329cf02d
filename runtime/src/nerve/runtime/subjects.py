"""MQTT topics and NATS subjects: one scheme, mapped one to one (`/` becomes `.`).

`<prefix>/<device>/<kind>/<name>` on MQTT is `<prefix>.<device>.<kind>.<name>` on NATS. Device ids,
metric names, event types and actions are tokens of `[A-Za-z0-9_-]`, at most 64 long: anything else is
refused with a `TopicError`, never rewritten. This module imports no pydantic: the lean edge uses it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from nerve.runtime.errors import TopicError

TOKEN_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
DEFAULT_PREFIX: Final = "nerve"
#: The source (service name) of the events central's agents emit: `<prefix>.central.events.<type>`.
CENTRAL_SOURCE: Final = "central"


class Kind(StrEnum):
    """What a message on a device's topic is."""

    TELEMETRY = "telemetry"
    EVENTS = "events"
    COMMANDS = "commands"
    RESULTS = "results"
    FACTS = "facts"


#: Kinds that travel over MQTT (facts live only in JetStream).
MQTT_KINDS: Final = frozenset({Kind.TELEMETRY, Kind.EVENTS, Kind.COMMANDS, Kind.RESULTS})


def is_token(value: str) -> bool:
    """Tell whether `value` is a valid device id / metric / action token."""
    return TOKEN_PATTERN.fullmatch(value) is not None


def check_token(value: str, what: str) -> str:
    """Return `value` if it is a valid token; raise `ValueError` naming `what` otherwise.

    `ValueError` (not a nerve error) so that pydantic validators can use it directly.
    """
    if not is_token(value):
        raise ValueError(f"{what} {value!r} is not valid: use 1 to 64 of the characters A-Z a-z 0-9 _ -")
    return value


def check_prefix(prefix: str) -> str:
    """Return `prefix` if every `/`-separated level is a token; raise `ValueError` otherwise."""
    for level in prefix.split("/"):
        if not is_token(level):
            raise ValueError(
                f"prefix {prefix!r} is not valid: each '/'-separated level must be 1 to 64 of A-Z a-z 0-9 _ -"
            )
    return prefix


@dataclass(frozen=True, slots=True)
class Address:
    """Where a device message lives: device, kind and name (metric, event type or action)."""

    device: str
    kind: Kind
    name: str

    def topic(self, prefix: str = DEFAULT_PREFIX) -> str:
        """The MQTT topic."""
        return f"{prefix}/{self.device}/{self.kind}/{self.name}"

    def subject(self, prefix: str = DEFAULT_PREFIX) -> str:
        """The NATS subject."""
        return f"{prefix.replace('/', '.')}.{self.device}.{self.kind}.{self.name}"


def _parse(levels: list[str], prefix_levels: list[str], original: str) -> Address:
    n = len(prefix_levels)
    if levels[:n] != prefix_levels:
        raise TopicError(original, f"does not start with the prefix {'/'.join(prefix_levels)!r}")
    rest = levels[n:]
    if len(rest) != 3:  # noqa: PLR2004 - device, kind, name
        raise TopicError(original, "expected <prefix>/<device>/<kind>/<name>")
    device, kind, name = rest
    if not is_token(device):
        raise TopicError(original, f"device id {device!r} is not valid (1-64 of A-Z a-z 0-9 _ -)")
    try:
        parsed_kind = Kind(kind)
    except ValueError:
        known = ", ".join(k.value for k in Kind)
        raise TopicError(original, f"unknown kind {kind!r} (expected one of {known})") from None
    if not is_token(name):
        raise TopicError(original, f"{parsed_kind.value} name {name!r} is not valid")
    return Address(device=device, kind=parsed_kind, name=name)


def parse_topic(topic: str, prefix: str = DEFAULT_PREFIX) -> Address:
    """Parse an MQTT topic of the scheme; raise `TopicError` saying what is wrong."""
    return _parse(topic.split("/"), prefix.split("/"), topic)


def parse_subject(subject: str, prefix: str = DEFAULT_PREFIX) -> Address:
    """Parse a NATS subject of the scheme; raise `TopicError` saying what is wrong."""
    return _parse(subject.split("."), prefix.split("/"), subject)


def topic_to_subject(topic: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Map a valid MQTT topic to its NATS subject (raises `TopicError`)."""
    return parse_topic(topic, prefix).subject(prefix)


def subject_to_topic(subject: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Map a valid NATS subject to its MQTT topic (raises `TopicError`)."""
    return parse_subject(subject, prefix).topic(prefix)


def status_topic(device: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The retained presence topic of a device (`online` / `offline`)."""
    return f"{prefix}/{device}/status"


def subject_root(prefix: str = DEFAULT_PREFIX) -> str:
    """The NATS form of the prefix."""
    return prefix.replace("/", ".")


def kind_filter(kind: Kind, prefix: str = DEFAULT_PREFIX) -> str:
    """The NATS subject filter that matches every message of `kind` (e.g. `nerve.*.telemetry.*`)."""
    return f"{subject_root(prefix)}.*.{kind}.*"


def deadletter_subject(part: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The dead-letter subject of a part (bridge, edge, central).

    Three tokens, where device subjects have four: the two can never overlap, whatever a device is called.
    """
    if part != "*":
        check_token(part, "dead-letter part")
    return f"{subject_root(prefix)}.deadletter.{part}"
