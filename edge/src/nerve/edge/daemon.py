"""`nerve edge`: the device daemon assembled from settings."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from nerve.edge.agent import EdgeAgent, default_device_id
from nerve.edge.executor import Executor
from nerve.edge.journal import CommandJournal
from nerve.runtime.signing import Verifier

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from nerve.runtime.config import Settings

log = logging.getLogger(__name__)


@asynccontextmanager
async def open_edge(settings: Settings, *, device: str | None = None) -> AsyncIterator[EdgeAgent]:
    """An `EdgeAgent` with its journal open; `run()` it inside the block.

    The device id is `device`, else `edge.device`, else the host name. Raises `ConfigError` for bad keys
    or a host name that is not a valid device id.
    """
    device = device or settings.edge.device or default_device_id()
    verifier = Verifier.from_config(settings.edge.trusted_keys, settings.edge.trusted_keys_dir)
    if not verifier.keyids:
        log.warning("edge %s trusts no key: every command will be refused", device)
    journal_path = settings.edge.journal or settings.data_dir / "edge-journal.sqlite3"
    journal_path.parent.mkdir(parents=True, exist_ok=True)
    with CommandJournal(journal_path) as journal:
        executor = Executor(
            device=device,
            verifier=verifier,
            journal=journal,
            clear_temp_roots=settings.edge.clear_temp_roots,
            clock_skew_s=settings.edge.clock_skew_s,
            source=f"nerve://edge/{device}",
            max_payload=settings.bridge.max_payload,
        )
        yield EdgeAgent(settings=settings, device=device, executor=executor)
