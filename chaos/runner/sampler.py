"""A sampler that watches the system's backlog while a chaos run goes on: every ``interval_s``
the ledger's open transactions (pending + processing, one count on a partial index) and the jobs
waiting in the settle queues (one pipelined ``LLEN`` per shard on Redis).

Why a thread with an asyncio loop of its own: the workload runs on trio in the main thread, and
its history's timestamps are the run's measure; the sampler's connections, timeouts and
reconnects stay out of trio's loop entirely (only the GIL is shared, for about a millisecond a
sample). It reads PostgreSQL and Redis directly, never through the fault proxy, so a proxy
fault does not blind it; a server that is down (killed, restarting) makes a gap in that
series, never an error: each sample has a short timeout, and a failed connection is opened
again at the next sample.

Bounded: at most ``samples_max`` samples, each query ``timeout_s``; ``stop`` waits at most
``STOP_WAIT_S`` for the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import redis.asyncio as aioredis

INTERVAL_S = 0.5
SAMPLES_MAX = 1200  # 10 minutes at 0.5 s: longer than any run's bound (RUN_S_MAX, 300 s)
TIMEOUT_S = 0.4
STOP_WAIT_S = 5.0
# SAQ's list of waiting jobs for queue ``settle-N`` (actors.routing names the queues; the
# harness may not import it, so the convention is written down here too).
QUEUED_KEY = "saq:settle-{shard}:queued"
# With the server's clock: the ledger's timestamps are put on the run's clock by these readings
# (chaos.runner.report), not by trusting that the wall clock never moved.
OPEN_SQL = ("SELECT count(*), extract(epoch FROM clock_timestamp())::float8 FROM transactions"
            " WHERE status IN ('pending', 'processing')")  # fmt: skip


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic() when the sample was taken
    backlog: int | None  # open transactions in the ledger; None: PostgreSQL did not answer
    queued: int | None  # jobs waiting in the settle queues; None: Redis did not answer
    cost_ms: float  # how long the sample took (mostly waiting for the servers)
    cpu_ms: float = 0.0  # the CPU time it took in this thread: what it takes from the run
    # PostgreSQL's clock (epoch seconds) minus time.monotonic(), around the count's query
    db_offset_s: float | None = None


@dataclass
class Sampler:
    database_url: str
    redis_url: str
    shards: int
    interval_s: float = INTERVAL_S
    samples_max: int = SAMPLES_MAX
    timeout_s: float = TIMEOUT_S
    samples: list[Sample] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)  # exception type -> count
    _pg: asyncpg.Connection | None = field(default=None, init=False, repr=False)
    _redis: aioredis.Redis | None = field(default=None, init=False, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    async def tick(self) -> Sample:
        """One sample; a server that does not answer leaves ``None`` in its field."""
        started, cpu = time.monotonic(), time.thread_time()
        backlog, db_offset_s = await self._backlog()
        queued = await self._queued()
        sample = Sample(started, backlog, queued, (time.monotonic() - started) * 1000,
                        (time.thread_time() - cpu) * 1000, db_offset_s)  # fmt: skip
        if len(self.samples) < self.samples_max:
            self.samples.append(sample)
        return sample

    async def _backlog(self) -> tuple[int | None, float | None]:
        try:
            if self._pg is None or self._pg.is_closed():
                self._pg = await asyncpg.connect(self.database_url, timeout=self.timeout_s)
            before = time.monotonic()
            row = await self._pg.fetchrow(OPEN_SQL, timeout=self.timeout_s)
            assert row is not None
            return int(row[0]), float(row[1]) - (before + time.monotonic()) / 2
        # Anything at all (refused, reset, "starting up", asyncpg's confused protocol state
        # after a crash): a gap in the series, and a new connection next time.
        except Exception as exc:
            self.errors[f"postgres: {type(exc).__name__}"] += 1
            await self._close_pg()
            return None, None

    async def _queued(self) -> int | None:
        try:
            if self._redis is None:
                self._redis = aioredis.Redis.from_url(
                    self.redis_url,
                    socket_timeout=self.timeout_s,
                    socket_connect_timeout=self.timeout_s,
                    retry_on_timeout=False,
                )
            pipe = self._redis.pipeline(transaction=False)
            for shard in range(self.shards):
                pipe.llen(QUEUED_KEY.format(shard=shard))
            lengths: list[Any] = await pipe.execute()
            return sum(int(n) for n in lengths)
        except Exception as exc:  # as above: a gap, and a new connection next time
            self.errors[f"redis: {type(exc).__name__}"] += 1
            await self._close_redis()
            return None

    async def _close_pg(self) -> None:
        if self._pg is not None:
            self._pg.terminate()  # no goodbye round trip to a server that may be gone
            self._pg = None

    async def _close_redis(self) -> None:
        if self._redis is not None:
            with contextlib.suppress(Exception):  # closing a client whose server is gone
                await self._redis.aclose()
            self._redis = None

    async def close(self) -> None:
        await self._close_pg()
        await self._close_redis()

    async def _loop(self) -> None:
        started, point = time.monotonic(), -1
        try:
            for _ in range(self.samples_max - 1):
                await self.tick()
                # On a fixed grid: a slow sample skips the points it overran, never bunches up.
                now = time.monotonic()
                ahead = self.interval_s - (now - started) % self.interval_s
                reached = int((now - started) // self.interval_s)
                if reached > point + 1:
                    self.errors["late"] += reached - point - 1
                point = reached
                # This thread's loop has nothing else to run: waiting on the event blocks only
                # it, and ``stop`` wakes it at once, for one last sample (the state at the end).
                if self._stop.wait(ahead):
                    await self.tick()
                    return
        finally:
            await self.close()

    def start(self) -> None:
        assert self._thread is None, "a sampler runs once"
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._loop(),), name="chaos-sampler", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=STOP_WAIT_S)

    def stats(self) -> dict[str, Any]:
        """What the sampling cost and missed, for the run's journal."""
        costs = [s.cost_ms for s in self.samples]
        return {
            "interval_s": self.interval_s,
            "samples": len(self.samples),
            "backlog_gaps": sum(s.backlog is None for s in self.samples),
            "queued_gaps": sum(s.queued is None for s in self.samples),
            "cost_ms_total": round(sum(costs), 1),
            "cost_ms_mean": round(sum(costs) / len(costs), 2) if costs else None,
            "cost_ms_max": round(max(costs), 1) if costs else None,
            "cpu_ms_total": round(sum(s.cpu_ms for s in self.samples), 1),
            "errors": dict(sorted(self.errors.items())),
        }
