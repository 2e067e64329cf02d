"""The local stack: broker processes (mosquitto, nats-server) and `nerve up`'s everything-on-one-host."""

from nerve.runtime.stack.brokers import (
    ManagedBroker,
    Mosquitto,
    NatsServer,
    find_mosquitto,
    find_nats_server,
    free_port,
    port_answers,
)
from nerve.runtime.stack.local import Stack, StackInfo

__all__ = [
    "ManagedBroker",
    "Mosquitto",
    "NatsServer",
    "Stack",
    "StackInfo",
    "find_mosquitto",
    "find_nats_server",
    "free_port",
    "port_answers",
]
