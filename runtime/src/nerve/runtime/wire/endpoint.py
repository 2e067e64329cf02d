"""Where and how an MQTT client connects (from the `mqtt.*` settings), and why it failed, in one line.

`mqtt_endpoint` is the one place that turns the settings into a connection target: host and port from
`mqtt.url` (`mqtt://` 1883, `mqtts://` 8883), the TLS context (`ssl.create_default_context`: the
broker's certificate checked against `mqtt.ca_file` or the system store, its host name verified, TLS 1.2
or later; a client certificate from `mqtt.cert_file` + `mqtt.key_file`) and the credentials (from the URL,
percent-decoded, or `mqtt.username` + the contents of `mqtt.password_file`). It is called for every
connection, so a renewed certificate or password file is picked up at the next reconnect.

`explain` turns what went wrong on the way in (a refused TCP connection, a TLS failure) into one line
that says what to fix; passwords never appear in it (`shown_url`). Standard library only: the lean edge
process imports this. `ssl` is imported only to build a TLS context: OpenSSL costs a process ~4 MiB of
RSS, and the lean edge keeps it out when its broker is plain `mqtt://` (see `nerve.edge.main`). An error
can only be an `ssl` error if `ssl` was imported, so the checks here look it up in `sys.modules`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol
from urllib.parse import unquote, urlsplit

from nerve.runtime.errors import ConfigError, shown_url

if TYPE_CHECKING:
    import ssl
    from pathlib import Path

__all__ = [
    "DEFAULT_MAX_PACKET_SIZE",
    "DEFAULT_MQTTS_PORT",
    "DEFAULT_MQTT_PORT",
    "MqttConnectSettings",
    "MqttEndpoint",
    "default_mqtt_port",
    "explain",
    "is_tls_error",
    "mqtt_endpoint",
]

DEFAULT_MQTT_PORT: Final = 1883
DEFAULT_MQTTS_PORT: Final = 8883
# Here, not in nerve.runtime.wire.mqtt: the settings' default, and they must not import asyncio with it.
DEFAULT_MAX_PACKET_SIZE: Final = 256 * 1024  # our Maximum Packet Size (mqtt.max_packet_size)
_TLS_SCHEMES: Final = frozenset({"mqtts"})

# OpenSSL's X509_V_ERR_* codes a broker's certificate fails with most (ssl.SSLCertVerificationError).
_UNKNOWN_CA: Final = frozenset({2, 18, 19, 20, 21})
_EXPIRED: Final = 10
_NOT_YET_VALID: Final = 9
_HOST_MISMATCH: Final = frozenset({62, 64})
# OpenSSL's reasons (ssl.SSLError.reason) when the broker wants a client certificate it did not get or like.
_CERT_REQUIRED: Final = frozenset({"TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_HANDSHAKE_FAILURE"})
_CERT_REFUSED: Final = frozenset(
    {"TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_EXPIRED"}
)
_NOT_TLS: Final = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"})


class MqttConnectSettings(Protocol):
    """What a connection reads of `mqtt.*`: `nerve.runtime.config.MqttSettings` has it, so does the edge's.

    The members mirror the settings fields, documented there.
    """

    @property
    def url(self) -> str: ...
    @property
    def keepalive_s(self) -> int: ...
    @property
    def session_expiry_s(self) -> int: ...
    @property
    def ca_file(self) -> Path | None: ...
    @property
    def cert_file(self) -> Path | None: ...
    @property
    def key_file(self) -> Path | None: ...
    @property
    def username(self) -> str | None: ...
    @property
    def password_file(self) -> Path | None: ...
    @property
    def max_packet_size(self) -> int: ...


@dataclass(frozen=True, slots=True)
class MqttEndpoint:
    """A broker to connect to: address, TLS context (None: plain TCP), credentials, and the URL to show."""

    host: str
    port: int
    tls: ssl.SSLContext | None
    username: str | None
    password: bytes | None = field(repr=False)
    shown: str
    client_certificate: bool = False

    @property
    def uses_tls(self) -> bool:
        """Whether this is an `mqtts://` broker."""
        return self.tls is not None


def default_mqtt_port(url: str) -> int:
    """The port of `url` when it names none: 8883 for `mqtts://`, else 1883."""
    return DEFAULT_MQTTS_PORT if urlsplit(url).scheme in _TLS_SCHEMES else DEFAULT_MQTT_PORT


def mqtt_endpoint(settings: MqttConnectSettings) -> MqttEndpoint:
    """The endpoint `settings` describe; raise `ConfigError` naming the key and file that cannot be used."""
    parts = urlsplit(settings.url)
    tls = parts.scheme in _TLS_SCHEMES
    username: str | None = None
    password: bytes | None = None
    if parts.username is not None:
        username = unquote(parts.username)
        if parts.password is not None:
            password = unquote(parts.password).encode()
    elif settings.username is not None:
        username = settings.username
        if settings.password_file is not None:
            password = _read_password(settings.password_file)
    return MqttEndpoint(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or default_mqtt_port(settings.url),
        tls=_tls_context(settings) if tls else None,
        username=username,
        password=password,
        shown=shown_url(settings.url),
        client_certificate=tls and settings.cert_file is not None,
    )


def _read_password(path: Path) -> bytes:
    try:
        secret = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}", key="mqtt.password_file") from None
    # One trailing newline, as `echo secret > file` leaves it; anything else is the password.
    return secret.removesuffix(b"\n").removesuffix(b"\r")


def is_tls_error(exc: BaseException | None, kind: str = "SSLError") -> bool:
    """Whether `exc` is an `ssl.<kind>`; False when `ssl` was never imported (nothing can have raised one)."""
    module = sys.modules.get("ssl")
    return module is not None and isinstance(exc, getattr(module, kind))


def _tls_context(settings: MqttConnectSettings) -> ssl.SSLContext:
    import ssl  # noqa: PLC0415 - OpenSSL only for an mqtts:// broker (see the module's docstring)

    ca_file = settings.ca_file
    try:
        context = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
    except (OSError, ssl.SSLError) as exc:  # (an SSLError is an OSError; both say what is wrong)
        raise ConfigError(
            f"cannot load CA certificates from {ca_file}: {_reason(exc)}", key="mqtt.ca_file"
        ) from None
    if settings.cert_file is not None:
        try:
            context.load_cert_chain(
                str(settings.cert_file),
                None if settings.key_file is None else str(settings.key_file),
                password=_no_passphrase,
            )
        except (OSError, ssl.SSLError, _EncryptedKeyError) as exc:
            files = ", ".join(str(path) for path in (settings.cert_file, settings.key_file) if path)
            what = _reason(exc)
            if is_tls_error(exc):
                what = f"not a PEM certificate with its private key ({what})"
            raise ConfigError(
                f"cannot load the client certificate and key from {files}: {what}", key="mqtt.cert_file"
            ) from None
    return context


class _EncryptedKeyError(Exception):
    """The private key wants a passphrase."""


def _no_passphrase() -> bytes:
    # Never prompt on a terminal (a daemon has none): an encrypted key fails to load, with a reason.
    raise _EncryptedKeyError("the private key is encrypted: give an unencrypted key file (mode 0600)")


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    if is_tls_error(exc) and reason:
        return str(reason).replace("_", " ").lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def explain(exc: BaseException, endpoint: MqttEndpoint) -> str:
    """Why connecting to `endpoint` failed with `exc` (a TCP, DNS or TLS error), as one line."""
    where = endpoint.shown
    if is_tls_error(exc, "SSLCertVerificationError"):
        return f"TLS to {where}: certificate verify failed: {_certificate_problem(exc, endpoint.host)}"
    if is_tls_error(exc):
        return f"TLS to {where}: {_tls_problem(exc)}"
    if isinstance(exc, ConnectionRefusedError):
        return f"cannot connect to {where}: connection refused (nothing listens on port {endpoint.port}?)"
    if isinstance(exc, OSError):
        return f"cannot connect to {where}: {exc.strerror or exc}"
    return f"cannot connect to {where}: {type(exc).__name__}: {exc}"


def _certificate_problem(exc: BaseException, host: str) -> str:
    code = getattr(exc, "verify_code", None)
    if code in _HOST_MISMATCH:
        return f"host name mismatch: the broker's certificate is not valid for {host}"
    if code in _UNKNOWN_CA:
        return (
            "unknown CA: the broker's certificate is not signed by a CA in mqtt.ca_file (or the system "
            f"store) ({getattr(exc, 'verify_message', exc)})"
        )
    return {
        _EXPIRED: "the broker's certificate has expired",
        _NOT_YET_VALID: "the broker's certificate is not valid yet (check the clock)",
    }.get(code or 0, str(getattr(exc, "verify_message", exc)))


def _tls_problem(exc: BaseException) -> str:
    reason = str(getattr(exc, "reason", "") or "")
    if reason in _CERT_REQUIRED:
        return "the broker wants a client certificate (set mqtt.cert_file and mqtt.key_file)"
    if reason in _CERT_REFUSED:
        return f"the broker refused our client certificate ({_reason(exc)})"
    if reason in _NOT_TLS:
        return "the broker does not speak TLS on this port (use mqtt://?)"
    return f"failed: {_reason(exc)}"
