"""The engine's settings: defined with the rest of nerve's settings, as `central.engine`.

Re-exported here so that engine code and tests import them from the engine; the definition (and its
limits, documented in docs/engine.md) is `nerve.runtime.config.settings.EngineSettings`.
"""

from nerve.runtime.config.settings import MAX_RECORD_BYTES, EngineSettings

__all__ = ["MAX_RECORD_BYTES", "EngineSettings"]
