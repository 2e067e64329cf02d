"""Where the bridge keeps its files: `<data_dir>/bridge/<client id>.<suffix>` (the id file, the spool).

Named by the uplink's client id, so that bridges of a `$share` group (each its own client id) sharing a
data dir keep apart, and a bridge restarted on the same session finds its own.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from nerve.runtime.subjects import is_token

if TYPE_CHECKING:
    from pathlib import Path

    from nerve.runtime.config.settings import Settings


def state_path(settings: Settings, suffix: str) -> Path:
    """`<data_dir>/bridge/<client id>.<suffix>`; a client id that is not a token is named by its digest."""
    client_id = settings.bridge.client_id
    name = client_id if is_token(client_id) else hashlib.sha256(client_id.encode()).hexdigest()[:32]
    return settings.data_dir / "bridge" / f"{name}.{suffix}"
