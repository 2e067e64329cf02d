"""The lean edge process: what `nerve edge` becomes (`os.execv`, same PID) once its settings are valid.

`nerve edge` (nerve.runtime.cli.main) loads and validates the settings with pydantic as every part does,
then puts them, as JSON, in the environment variable `_NERVE_EDGE_HANDOVER` and execs
`python -m nerve.edge.main`. This process reads them into plain frozen dataclasses
(`nerve.edge.settings.EdgeProcessSettings`), removes the variable (actions' child processes never see
it), and runs the daemon. It never imports pydantic, paho, aiomqtt or nats-py: the daemon stays at
~25 MiB of RSS instead of ~41 (see bench/README.md, `make bench-edge`).

Errors are what `nerve edge` prints: one line `nerve edge: error: ...` and exit status 2; SIGINT and
SIGTERM stop it cleanly (exit status 0).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Final

from nerve.edge.daemon import open_edge
from nerve.edge.settings import EdgeProcessSettings, handover_json
from nerve.runtime.cancellation import until_signalled
from nerve.runtime.errors import NerveError

if TYPE_CHECKING:
    from nerve.runtime.config.settings import Settings

__all__ = ["HANDOVER_VARIABLE", "handover", "main"]

# Not NERVE_*: load_settings reads those as settings, and this one is not a setting.
HANDOVER_VARIABLE: Final = "_NERVE_EDGE_HANDOVER"
EXIT_ERROR: Final = 2
EXIT_INTERRUPTED: Final = 130


def handover(settings: Settings, *, device: str | None, log_level: str | None) -> str:
    """What `nerve edge` hands this process: the validated settings, `--device` and `--log-level`."""
    return json.dumps({"settings": handover_json(settings), "device": device, "log_level": log_level})


async def _run(settings: EdgeProcessSettings, device: str | None) -> int:
    async with open_edge(settings, device=device) as edge:
        await edge.run()
    return 0


def main() -> int:
    """Run the edge daemon from the handed-over settings; returns the exit status."""
    text = os.environ.pop(HANDOVER_VARIABLE, None)
    if text is None:
        print(
            f"nerve edge: error: {HANDOVER_VARIABLE} is not set: start the daemon with `nerve edge`",
            file=sys.stderr,
        )
        return EXIT_ERROR
    handed = json.loads(text)
    settings = EdgeProcessSettings.from_json(handed["settings"])
    level = (handed["log_level"] or "info").upper()
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return asyncio.run(until_signalled(_run(settings, handed["device"])))
    except NerveError as exc:
        print(f"nerve edge: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
