"""The engine's settings: leases, how many runs one process executes, and the limits of its storage.

A frozen pydantic model like every other settings section; it is meant to hang under `central.engine` in
`nerve.runtime.config.settings` (not wired there yet: other work is editing that file). Every limit is
documented in docs/engine.md.
"""

from __future__ import annotations

from typing import Final, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from nerve.runtime.config.settings import GIB, MIB, StreamLimits

_DAY_S: Final = 24 * 3600.0
#: The largest run record a bucket may be told to hold (JetStream's own default max payload is 1 MiB).
MAX_RECORD_BYTES: Final = 8 * MIB


class EngineSettings(BaseModel):
    """How the durable agent engine runs (docs/engine.md, "Limits").

    `lease_s` is how long a run stays claimed by a process that stopped renewing it: after a crash, another
    engine resumes the run that much later at most. It must be longer than the clocks of two engines can
    disagree (the fencing token keeps the journal right even then; only a step's effect could run twice).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    lease_s: float = Field(default=15.0, ge=1.0, le=3600.0, description="seconds a claim on a run lasts")
    max_live_runs: int = Field(default=1000, ge=1, description="runs one process executes at once")
    max_record_bytes: int = Field(
        default=1 * MIB, ge=64 * 1024, le=MAX_RECORD_BYTES, description="largest journal of one run"
    )
    max_steps: int = Field(default=1000, ge=1, description="steps one run may take")
    max_sleep_s: float = Field(default=30 * _DAY_S, gt=0, description="longest sleep or wait timeout")
    limits_max_bytes: int = Field(
        default=64 * MIB,
        ge=1 * MIB,
        description="bytes of nerve_limits and of nerve_lineage",
    )
    loop_window_s: float = Field(
        default=_DAY_S, gt=0, description="how long the loop guard remembers which runs a chain started"
    )
    limit_facts_window_s: float = Field(
        default=60.0, gt=0, description="after a limit's first fact per key, one counted fact per window"
    )
    limit_facts_max_keys: int = Field(default=100, ge=1, description="keys told apart in limit facts")
    fleet_size: int = Field(
        default=0, ge=0, description="devices in the fleet for blast-radius percentages (0: the registry's)"
    )
    runs: StreamLimits = StreamLimits(max_bytes=1 * GIB, max_age_s=90 * _DAY_S)
    timers: StreamLimits = StreamLimits(max_bytes=256 * MIB, max_age_s=90 * _DAY_S)

    @model_validator(mode="after")
    def _sleeps_fit(self) -> Self:
        """A run parked for `max_sleep_s` must outlive it: the journal and the timer are aged out after."""
        longest = min(self.runs.max_age_s, self.timers.max_age_s)
        if self.max_sleep_s >= longest:
            raise ValueError(
                f"max_sleep_s ({self.max_sleep_s:g}) must be shorter than runs.max_age_s and "
                f"timers.max_age_s ({longest:g}): a parked run would be aged out before it wakes"
            )
        return self

    @property
    def renew_s(self) -> float:
        """How often a live run's lease is renewed: three times per lease."""
        return self.lease_s / 3
