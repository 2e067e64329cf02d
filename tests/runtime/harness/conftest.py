"""One suite, two bindings: every harness test runs on the in-memory JetStream and on a real nats-server."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from tests.runtime.harness.orders import sink

from nerve.runtime.harness import BINDINGS

if TYPE_CHECKING:
    from nerve.runtime.stack.brokers import NatsServer


@pytest.fixture(params=BINDINGS)
def binding(request: pytest.FixtureRequest) -> dict[str, Any]:
    """`AgentHarness` options for one binding: "memory", or "nats" on this test's nats-server."""
    if request.param == "memory":
        return {"binding": "memory"}
    request.applymarker(pytest.mark.broker)
    server: NatsServer = request.getfixturevalue("nats_server")
    return {"binding": "nats", "nats_url": server.url}


@pytest.fixture(autouse=True)
def _fresh_sink() -> None:
    """Each test (and binding) counts its own effects."""
    sink.calls.clear()
    sink.landed.clear()
