"""Shard routing and the enqueue half of the outbox: intents in PostgreSQL, jobs in SAQ.

shard = zlib.crc32(str(account_id)) % N (never ``hash()``: it changes between processes). The
account that owns a transaction's actor is the one whose funds it checks: the source of a
transfer or withdrawal, the destination of a deposit. The job key is the transaction id, so a
second enqueue of an intent whose job is still queued or running is a no-op in SAQ, and one
whose job already completed is a no-op in the ledger (the batch guards on status).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import uuid
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from saq.job import Job
from saq.queue.redis import RedisQueue

SETTLE_JOB = "settle"
# Bulk path: one job carries up to SETTLE_MANY_MAX intents of one shard, so SAQ's per-job
# Redis round trips are paid once per group instead of once per intent.
SETTLE_MANY_JOB = "settle_many"
SETTLE_MANY_MAX = 100
# The API's enqueues that failed (Redis down), kept for a retry: at most this many, retried
# after RETRY_FIRST_S, doubling to RETRY_MAX_S while Redis stays away.
PARKED_MAX = 100_000
RETRY_FIRST_S = 0.25
RETRY_MAX_S = 2.0
QUEUE_PREFIX = "settle-"
# A job that does not finish in this time is retried by SAQ; the ledger makes the retry safe.
# It is also how long the jobs of a worker that died stay "active" before SAQ's sweep hands
# them to another: longer than one bank call (timeout 5 s), short enough to recover promptly.
JOB_TIMEOUT_S = 15
JOB_RETRIES_MAX = 5
JOB_TTL_S = 600
T = TypeVar("T")
# A dequeue that found Redis away waits about this long before it fails (jittered, so the
# consumers do not come back all at once).
DEQUEUE_RETRY_S = 1.0


def shard_for(account_id: uuid.UUID | str, shards: int) -> int:
    assert shards >= 1
    return zlib.crc32(str(account_id).encode()) % shards


def queue_name(shard: int) -> str:
    return f"{QUEUE_PREFIX}{shard}"


def actor_account(kind: str, source_id: uuid.UUID, dest_id: uuid.UUID) -> uuid.UUID:
    """The account whose actor settles a transaction of ``kind``."""
    return dest_id if kind == "deposit" else source_id


@dataclass(frozen=True)
class Routed:
    """One intent to hand to its shard's queue. ``attempt`` 0 is the first enqueue (the API's);
    a re-drive passes its attempt number so that it gets a job of its own even when the first
    job is stuck "active" in SAQ under a worker that died (SAQ sweeps those only one by one,
    slowly). Two jobs for one intent are harmless: the ledger applies it once."""

    txn_id: uuid.UUID
    account_id: uuid.UUID
    attempt: int = 0

    @property
    def job_key(self) -> str:
        return str(self.txn_id) if self.attempt == 0 else f"{self.txn_id}#{self.attempt}"


class SettleQueue(RedisQueue):
    """A shard's queue. SAQ's consumer loop asks for the next job again the moment a dequeue
    fails, so while Redis is down every consumer of every shard spun on a refused connection:
    a whole core at 100 % for the length of the outage (measured). A failed dequeue therefore
    pauses before it fails; jobs resume within about ``DEQUEUE_RETRY_S`` of Redis's return."""

    async def dequeue(
        self,
        timeout: float = 0.0,  # noqa: ASYNC109 (SAQ's own signature)
        poll_interval: float = 0.0,
    ) -> Job | None:
        try:
            return await super().dequeue(timeout, poll_interval)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            await asyncio.sleep(DEQUEUE_RETRY_S * (0.5 + random.random()))
            raise


class QueueSet:
    """The N ``settle-*`` queues, sharing one Redis client.

    Its enqueues run in parallel (a relay's intents, a flush's groups), at most
    ``concurrency_max`` at once and never more than the client's pool holds: redis-py's plain
    pool fails an enqueue that finds it full, and even a pool that waits would hold a backlog
    of thousands in its queue until its wait timed out."""

    def __init__(self, redis: Redis, shards: int, concurrency_max: int) -> None:
        assert concurrency_max >= 1
        self.redis = redis
        self.shards = shards
        pool_max = getattr(redis.connection_pool, "max_connections", concurrency_max)
        self.concurrency_max = min(concurrency_max, pool_max)
        self._slots = asyncio.Semaphore(self.concurrency_max)
        self.queues = [SettleQueue(redis, name=queue_name(n)) for n in range(shards)]

    def for_account(self, account_id: uuid.UUID) -> SettleQueue:
        return self.queues[shard_for(account_id, self.shards)]

    async def enqueue(self, items: Sequence[Routed]) -> int:
        """Enqueue each intent on its shard; returns how many were new jobs (the rest were
        already queued or running). Raises the first redis error (once the enqueues already
        running have ended; none starts after it): the caller decides whether the intent row,
        which stays pending, is enough (the API) or whether to retry (the relay)."""
        created = await self._bounded([functools.partial(self._enqueue_one, i) for i in items])
        return sum(created)

    async def _enqueue_one(self, item: Routed) -> bool:
        job = await self.for_account(item.account_id).enqueue(
            SETTLE_JOB,
            key=item.job_key,
            timeout=JOB_TIMEOUT_S,
            retries=JOB_RETRIES_MAX,
            ttl=JOB_TTL_S,
            txn_id=str(item.txn_id),
            account_id=str(item.account_id),
        )
        return job is not None

    async def enqueue_grouped(
        self, items: Sequence[Routed], per_job_max: int = SETTLE_MANY_MAX
    ) -> int:
        """Enqueue intents in groups per shard, one ``settle_many`` job per group; returns
        the number of jobs. Each job has a key of its own (no dedupe across calls): a second
        enqueue of the same intent costs a job, and the ledger applies the intent once."""
        by_shard: dict[int, list[Routed]] = {}
        for item in items:
            by_shard.setdefault(shard_for(item.account_id, self.shards), []).append(item)
        groups = [
            (shard, routed[start : start + per_job_max])
            for shard, routed in by_shard.items()
            for start in range(0, len(routed), per_job_max)
        ]
        await self._bounded([functools.partial(self._enqueue_group, s, g) for s, g in groups])
        return len(groups)

    async def _bounded(self, calls: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
        """Run ``calls`` with at most ``concurrency_max`` in Redis at once (across every caller
        of this QueueSet). After a failure no further call starts (Redis is likely down: the
        rest would only wait out their timeouts); the first error is raised once the calls
        already running have ended, so none is left running unowned."""
        if len(calls) == 1:  # the API's lone intent: no task to start
            async with self._slots:
                return [await calls[0]()]
        results: list[T] = []  # in no particular order
        errors: list[Exception] = []
        pending = iter(calls)

        async def runner() -> None:
            for call in pending:  # shared: each call goes to one runner
                if errors:
                    return
                async with self._slots:
                    try:
                        results.append(await call())
                    except Exception as exc:
                        errors.append(exc)

        async with asyncio.TaskGroup() as tg:
            for _ in range(min(self.concurrency_max, len(calls))):
                tg.create_task(runner())
        if errors:
            raise errors[0]
        return results

    async def _enqueue_group(self, shard: int, group: Sequence[Routed]) -> None:
        await self.queues[shard].enqueue(
            SETTLE_MANY_JOB,
            key=f"group-{uuid.uuid4()}",
            timeout=JOB_TIMEOUT_S,
            retries=JOB_RETRIES_MAX,
            ttl=JOB_TTL_S,
            items=[[str(r.txn_id), str(r.account_id)] for r in group],
        )


class Coalescer:
    """Turns concurrent one-intent enqueues (one per API request) into grouped jobs, the way a
    group commit turns concurrent transactions into one flush.

    One flusher task: while its enqueue is in Redis, the intents of other requests gather; the
    next flush takes all of them. A lone intent is flushed at once as a plain ``settle`` job
    keyed by its transaction id: no timer, so no added wait at low load, and under load the
    groups grow by themselves. Each caller awaits its own intent's flush and sees its error.

    What a failed flush held (Redis down) is parked and retried, with the next flush or on a
    timer (0.25 s, doubling to 2 s while it keeps failing), so the backlog of an outage is
    enqueued as soon as Redis answers again rather than at the janitor's next relay. Bounded
    (``parked_max``; beyond it the oldest are let go) and in memory only: the rows stay
    pending, so the janitor's relay still covers a process that dies or lets go.
    """

    def __init__(self, queues: QueueSet, per_job_max: int = SETTLE_MANY_MAX,
                 on_flush: Callable[[int], None] | None = None,
                 parked_max: int = PARKED_MAX) -> None:  # fmt: skip
        self.queues = queues
        self.per_job_max = per_job_max
        self.parked_max = parked_max
        self._parked: list[Routed] = []  # what failed flushes held, oldest first
        self._retry_s = RETRY_FIRST_S
        self._on_flush = on_flush  # told each flush's intent count (the API's metrics)
        self._waiting: list[tuple[Routed, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self.flushes = 0
        self.intents = 0

    async def enqueue(self, item: Routed) -> None:
        """Returns once the intent's job is in Redis; raises what the enqueue raised."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        self._wake.set()
        await done

    async def run(self) -> None:
        """The flusher; runs until cancelled. Intents still waiting then are told so (their
        rows stay pending: the janitor's relay enqueues them)."""
        batch: list[tuple[Routed, asyncio.Future[None]]] = []
        try:
            while True:
                if self._parked:  # retry them after a while even if no request comes
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self._retry_s)
                else:
                    await self._wake.wait()
                self._wake.clear()
                batch, self._waiting = self._waiting, []
                if batch or self._parked:
                    await self._flush(batch)
        finally:
            for _, done in batch + self._waiting:
                if not done.done():
                    done.set_exception(ConnectionError("enqueue stopped: shutting down"))
            self._waiting = []

    @property
    def parked(self) -> int:
        """Intents that a failed flush held and no flush has enqueued since (a flush in
        progress still counts them)."""
        return len(self._parked)

    async def _flush(self, batch: list[tuple[Routed, asyncio.Future[None]]]) -> None:
        items = [*self._parked, *(item for item, _ in batch)]  # only this task changes _parked
        error: BaseException | None = None
        try:
            if len(items) == 1:
                await self.queues.enqueue(items)
            else:
                await self.queues.enqueue_grouped(items, self.per_job_max)
            self._parked = []
            self._retry_s = RETRY_FIRST_S
        except Exception as exc:  # handed to every caller of this batch, who decides
            error = exc
            self._parked = items[-self.parked_max :]
            self._retry_s = min(RETRY_MAX_S, self._retry_s * 2)
        self.flushes += 1
        self.intents += len(items)
        if self._on_flush is not None:
            self._on_flush(len(items))
        for _, done in batch:
            if done.done():  # the caller went away (client disconnected): nothing to tell
                continue
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)
