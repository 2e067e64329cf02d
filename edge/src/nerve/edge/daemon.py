"""`nerve edge`: the device daemon assembled from settings."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from nerve.edge.agent import EdgeAgent, default_device_id
from nerve.edge.executor import Executor
from nerve.edge.journal import CommandJournal, journal_path
from nerve.edge.outbox import Outbox, outbox_path

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from nerve.edge.settings import SettingsView


@asynccontextmanager
async def open_edge(settings: SettingsView, *, device: str | None = None) -> AsyncIterator[EdgeAgent]:
    """An `EdgeAgent` with its journal and outbox open; `run()` it inside the block.

    The device id is `device`, else `edge.device`, else the host name. Raises `ConfigError` for bad keys
    or a host name that is not a valid device id, `JournalError` if the journal cannot be opened,
    `OutboxError` if the outbox file belongs to another nerve version (an outbox that cannot be
    written, such as on a full disk, is not an error: see `nerve.edge.outbox`).
    """
    device = device or settings.edge.device or default_device_id()
    path = journal_path(settings, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    cap = settings.edge.outbox.max_bytes
    with (
        CommandJournal(path) as journal,
        Outbox(outbox_path(settings, device), device=device, max_bytes=cap) as outbox,
    ):
        executor = Executor.from_settings(settings, device=device, journal=journal)
        yield EdgeAgent(settings=settings, device=device, executor=executor, outbox=outbox)
