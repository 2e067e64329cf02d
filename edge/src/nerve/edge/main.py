"""The lean edge process: what `nerve edge` becomes (`os.execv`, same PID) once its settings are valid.

`nerve edge` (nerve.runtime.cli.main) loads and validates the settings with pydantic as every part does,
then puts them, as JSON, in the environment variable `_NERVE_EDGE_HANDOVER` and execs
`python -m nerve.edge.main`. This process reads them into plain frozen dataclasses
(`nerve.edge.settings.EdgeProcessSettings`), removes the variable (actions' child processes never see
it), and runs the daemon. It never imports pydantic, paho, aiomqtt or nats-py: the daemon stays at
~25 MiB of RSS instead of ~41 (see bench/README.md, `make bench-edge`).

OpenSSL only when needed: asyncio imports `ssl` whenever it is importable and `hashlib` imports `_hashlib`,
and each maps OpenSSL's libcrypto into the process (~4.6 MiB of RSS together, measured: 26.9 -> 22.3 MiB
after importing the daemon). When the settings ask for neither an `mqtts://` broker nor a plugin
(`nerve.edge.settings.needs_openssl`), this process marks both modules absent before anything imports
them: asyncio and nerve's MQTT client work without `ssl`, and `hashlib` falls back to Python's own
SHA-2 and BLAKE2 (what the executor's digests use), as it does on a Python built without OpenSSL. So
this module and `nerve.edge`'s package import nothing heavy at the top: the daemon comes in once that is
decided.

Errors are what `nerve edge` prints: one line `nerve edge: error: ...` and exit status 2; SIGINT and
SIGTERM stop it cleanly (exit status 0).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Final

from nerve.edge.settings import EdgeProcessSettings, handover_json

if TYPE_CHECKING:
    from nerve.runtime.config.settings import Settings

__all__ = ["HANDOVER_VARIABLE", "handover", "main"]

# Not NERVE_*: load_settings reads those as settings, and this one is not a setting.
HANDOVER_VARIABLE: Final = "_NERVE_EDGE_HANDOVER"
EXIT_ERROR: Final = 2
EXIT_INTERRUPTED: Final = 130
_OPENSSL_MODULES: Final = ("ssl", "_ssl", "_hashlib")


def handover(settings: Settings, *, device: str | None, log_level: str | None) -> str:
    """What `nerve edge` hands this process: the validated settings, `--device` and `--log-level`."""
    return json.dumps({"settings": handover_json(settings), "device": device, "log_level": log_level})


async def _run(settings: EdgeProcessSettings, device: str | None) -> int:
    from nerve.edge.daemon import open_edge  # noqa: PLC0415 - after the OpenSSL decision (module docstring)

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
    if not settings.openssl:
        for module in _OPENSSL_MODULES:
            sys.modules.setdefault(module, None)  # type: ignore[arg-type] # None: absent, to the import system
    level = (handed["log_level"] or "info").upper()
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # After the decision above: these bring asyncio in.
    import asyncio  # noqa: PLC0415

    from nerve.runtime.cancellation import until_signalled  # noqa: PLC0415
    from nerve.runtime.errors import NerveError  # noqa: PLC0415

    try:
        return asyncio.run(until_signalled(_run(settings, handed["device"])))
    except NerveError as exc:
        print(f"nerve edge: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
