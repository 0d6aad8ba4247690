"""Fault knobs of one bank process, held in memory (a restart clears them).

Each faultable request draws exactly two numbers from one seeded RNG, in a fixed order (error,
then drop), whatever the rates are, and one from a second RNG seeded from the same seed (lose):
the same seed and the same sequence of requests give the same faults, so a chaos scenario can
be replayed. The lose die has its own RNG so that adding it left the error and drop faults of
every existing seed as they were.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

LATENCY_MAX_MS = 10_000
SEED_ABS_MAX = 2**63 - 1


class FaultsUpdate(BaseModel):
    """``PUT /admin/faults``: each field optional, a missing one is left unchanged."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    error_rate: float | None = Field(default=None, ge=0, le=1)
    latency_ms: int | None = Field(default=None, ge=0, le=LATENCY_MAX_MS)
    drop_rate: float | None = Field(default=None, ge=0, le=1)
    # The request is read, then lost before the bank acts: no record, no answer.
    lose_rate: float | None = Field(default=None, ge=0, le=1)
    # null (given explicitly) draws from fresh OS entropy: faults no longer repeatable.
    seed: int | None = Field(default=None, ge=-SEED_ABS_MAX, le=SEED_ABS_MAX)


@dataclass(frozen=True)
class Decision:
    error: bool
    drop: bool
    latency_ms: int
    lose: bool = False


def _lose_rng(seed: int | None) -> random.Random:
    # A string seed is hashed deterministically (random.seed's version 2), unlike hash().
    return random.Random(None if seed is None else f"lose:{seed}")


class Faults:
    def __init__(self) -> None:
        self.error_rate = 0.0
        self.latency_ms = 0
        self.drop_rate = 0.0
        self.lose_rate = 0.0
        self.seed: int | None = None
        self._rng = random.Random()
        self._lose_rng = random.Random()

    def as_json(self) -> dict[str, Any]:
        return {
            "error_rate": self.error_rate,
            "latency_ms": self.latency_ms,
            "drop_rate": self.drop_rate,
            "lose_rate": self.lose_rate,
            "seed": self.seed,
        }

    def update(self, change: FaultsUpdate) -> None:
        if change.error_rate is not None:
            self.error_rate = change.error_rate
        if change.latency_ms is not None:
            self.latency_ms = change.latency_ms
        if change.drop_rate is not None:
            self.drop_rate = change.drop_rate
        if change.lose_rate is not None:
            self.lose_rate = change.lose_rate
        if "seed" in change.model_fields_set:
            self.seed = change.seed
            self._rng = random.Random(change.seed)
            self._lose_rng = _lose_rng(change.seed)

    def clear(self) -> None:
        self.error_rate, self.latency_ms, self.drop_rate, self.seed = 0.0, 0, 0.0, None
        self.lose_rate = 0.0
        self._rng = random.Random()
        self._lose_rng = random.Random()

    def roll(self) -> Decision:
        error_draw, drop_draw = self._rng.random(), self._rng.random()
        lose = self._lose_rng.random() < self.lose_rate
        # A lost request never reached the bank's logic: no error answer, no payment to drop.
        return Decision(error_draw < self.error_rate and not lose,
                        drop_draw < self.drop_rate and not lose, self.latency_ms, lose)  # fmt: skip
