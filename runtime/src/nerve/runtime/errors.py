"""Every error nerve raises on purpose.

```
NerveError
├── ConfigError            a settings file, variable or flag is wrong (names the key)
├── TopicError             an MQTT topic or NATS subject outside the scheme
├── DecodeError            bytes that are not a valid message (carries the reason)
│   └── PayloadTooLarge
├── SignatureError         a command that is unsigned, forged, or signed by an unknown key
├── BrokerUnavailable      mosquitto or nats-server did not answer (carries the url)
└── (more subtrees are added by the parts: broker processes, actions, sensors)
```

Errors from paho or nats are wrapped where they enter nerve, so a user sees one of these with a clear
message, never a library traceback.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


class NerveError(Exception):
    """Root of every error nerve raises on purpose."""


class ConfigError(NerveError):
    """A setting is wrong: the message names where it came from, the key and what was expected."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None) -> None:
        self.source = source
        self.key = key
        where = ": ".join(part for part in (source, key) if part)
        super().__init__(f"{where}: {message}" if where else message)


class TopicError(NerveError):
    """An MQTT topic or NATS subject that does not fit nerve's naming scheme."""

    def __init__(self, topic: str, reason: str) -> None:
        self.topic = topic
        self.reason = reason
        super().__init__(f"topic {topic!r}: {reason}")


class DecodeError(NerveError):
    """Bytes that cannot be turned into a nerve message; `reason` says why, for the dead-letter."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class PayloadTooLarge(DecodeError):
    """A payload over the configured size limit."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"payload of {size} bytes exceeds the limit of {limit} bytes")


class SignatureError(NerveError):
    """A command whose signature is missing, forged, or made by a key the device does not trust."""


def shown_url(url: str) -> str:
    """`url` (one or comma-separated several) fit for logs and messages: passwords and tokens hidden."""
    shown = []
    for one in url.split(","):
        parts = urlsplit(one.strip())
        if parts.username is None:
            shown.append(one.strip())
            continue
        user = "***" if parts.password is None else f"{parts.username}:***"  # a lone user part is a token
        host = parts.netloc.rsplit("@", 1)[1]
        shown.append(urlunsplit(parts._replace(netloc=f"{user}@{host}")))
    return ",".join(shown)


class BrokerUnavailable(NerveError):
    """A broker did not answer at `url`."""

    def __init__(self, url: str, detail: str = "") -> None:
        self.url = url
        self.detail = detail
        super().__init__(f"broker at {shown_url(url)} is unavailable" + (f": {detail}" if detail else ""))


class BrokerBinaryMissing(NerveError):
    """The mosquitto or nats-server program that nerve would start is not installed."""

    def __init__(self, name: str, hint: str) -> None:
        self.name = name
        self.hint = hint
        super().__init__(f"{name} is not installed: {hint}")


class BrokerStartFailed(NerveError):
    """A broker process that nerve started exited or did not answer on its port in time.

    `log_tail` holds the last lines the broker wrote, which usually say why.
    """

    def __init__(self, name: str, port: int, reason: str, log_tail: str = "") -> None:
        self.name = name
        self.port = port
        self.reason = reason
        self.log_tail = log_tail
        message = f"{name} on 127.0.0.1:{port} did not start: {reason}"
        if log_tail:
            message += f"\n--- last lines of its log ---\n{log_tail}"
        super().__init__(message)
