"""Error messages never show a broker password or token."""

from __future__ import annotations

import pytest

from nerve.runtime.errors import BrokerUnavailable, shown_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
        ("nats://alice:s3cret@nats.local:4222", "nats://alice:***@nats.local:4222"),
        ("tls://t0ken@nats.local", "tls://***@nats.local"),
        ("nats://a:x@h1:1, nats://h2:2", "nats://a:***@h1:1,nats://h2:2"),
        ("mqtt://127.0.0.1:1883", "mqtt://127.0.0.1:1883"),
    ],
)
def test_passwords_and_tokens_are_hidden(url: str, shown: str) -> None:
    assert shown_url(url) == shown


def test_broker_unavailable_hides_the_password_but_keeps_the_url() -> None:
    error = BrokerUnavailable("nats://alice:s3cret@127.0.0.1:1", "nothing listens there")
    assert str(error) == "broker at nats://alice:***@127.0.0.1:1 is unavailable: nothing listens there"
    assert error.url == "nats://alice:s3cret@127.0.0.1:1"
