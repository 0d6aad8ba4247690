"""The capacity profile: ``CapacityUser`` (signed in once, no think time), the number of users
stepped up (``KIZO_LOAD_STEPS``, comma-separated user counts; ``KIZO_LOAD_STEP_S`` seconds each).
The runner reads each step's throughput and payment p99 from the request log."""

from __future__ import annotations

import os

from locust import LoadTestShape
from original_mix import CapacityUser  # locust puts this file's folder on the path

__all__ = ["CapacityUser", "Steps"]
STEPS = [int(n) for n in os.environ.get("KIZO_LOAD_STEPS", "10,20,40").split(",")]
STEP_S = float(os.environ.get("KIZO_LOAD_STEP_S", "15"))
SPAWN_PER_S = 50


class Steps(LoadTestShape):
    def tick(self) -> tuple[int, float] | None:
        step = int(self.get_run_time() // STEP_S)
        return (STEPS[step], SPAWN_PER_S) if step < len(STEPS) else None
