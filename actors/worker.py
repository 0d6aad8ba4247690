"""The worker process: SAQ consumers for its shards, the actors, the group committer.

One event loop (uvloop), one asyncio.TaskGroup owning everything. SIGTERM / SIGINT stop the SAQ
consumers first (in-flight jobs get a grace period to finish: their batches commit or roll back
as a whole), then the committer and the actors, then the pools.

Its only port is a small Prometheus endpoint (``spec.metrics_port``; every path answers with the
metrics), opened once the pools and consumers are up: ``kizo up`` counts the worker started when
it answers there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client import REGISTRY, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError
from saq import Worker
from saq.types import Context, PartialTimersDict

from actors._actor import Limits, Registry
from actors._committer import Committer
from actors._metrics import SHARDS_OWNED
from actors.bank_client import BankClient
from actors.leases import ShardLeases, surplus
from actors.routing import SETTLE_JOB, SETTLE_MANY_JOB, QueueSet
from infra.config import MUTATION_HELP, Config
from infra.db import create_pool, redis_client

log = structlog.get_logger("kizo.worker")

DB_POOL_SIZE = 4
# SAQ waits this long for in-flight jobs (and always for its upkeep loops, which never end
# by themselves) before cancelling: long enough for a batch commit, short enough for Ctrl-C.
SHUTDOWN_GRACE_S = 3
SHARD_CONCURRENCY_MIN = 20
SWEEP_INTERVAL_S = 5
UPKEEP_CONNECTIONS = 8
DEQUEUE_TIMEOUT_S = 1.0
# Longer than a blocking dequeue (DEQUEUE_TIMEOUT_S), which waits on its socket.
WORKER_REDIS_SOCKET_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class WorkerSpec:
    database_url: str
    redis_url: str
    bank_url: str
    shards: Sequence[int]  # the shards it consumes; with leases, those it may hold (all)
    metrics_port: int = 0  # 0: no metrics endpoint (workers started inside tests)
    lease_ttl_s: float = 0.0  # > 0: shards held by lease (actors/leases.py), not fixed


def owned_shards(total: int, index: int, of: int) -> list[int]:
    """Worker ``index`` of ``of`` owns every ``of``-th shard starting at ``index``."""
    return [s for s in range(total) if s % of == index]


async def _settle_many(ctx: SettleContext, *, items: list[list[str]]) -> None:
    registry = ctx["registry"]
    # SAQ runs each job in a task of its own: what is bound here stays with this job.
    structlog.contextvars.bind_contextvars(job_id=ctx["job"].key)
    # At most SETTLE_MANY_MAX items, each waiting on its actor's bounded mailbox (not a pool):
    # the committer's flushers are what use the database pool.
    await asyncio.gather(
        *(registry.submit(uuid.UUID(account), uuid.UUID(txn)) for txn, account in items)
    )


class SettleContext(Context, total=False):
    registry: Registry


async def _settle(ctx: SettleContext, *, txn_id: str, account_id: str) -> None:
    registry = ctx["registry"]
    structlog.contextvars.bind_contextvars(job_id=ctx["job"].key, txn_id=txn_id)
    await registry.submit(uuid.UUID(account_id), uuid.UUID(txn_id))


async def run_worker(config: Config, spec: WorkerSpec, stop: asyncio.Event) -> None:
    p = config.pipeline
    if config.mutation:
        log.warning(
            "MUTATION_ACTIVE", mutation=config.mutation, meaning=MUTATION_HELP[config.mutation]
        )
    pool = await create_pool(
        spec.database_url,
        min_size=2,
        max_size=DB_POOL_SIZE,
        acquire_timeout_s=config.pools.wait_s,
        command_timeout=config.ledger.statement_timeout_ms / 1000,
    )
    # The process's concurrency is shared by its shard consumers; every one of their jobs may
    # hold a Redis connection (a blocking dequeue, a finish), plus each consumer's upkeep. The
    # pool waits when full (SAQ's consumers are not bounded below it): a blocking dequeue holds
    # its connection for at most DEQUEUE_TIMEOUT_S, far less than the wait.
    per_shard = max(SHARD_CONCURRENCY_MIN, p.worker_concurrency // len(spec.shards))
    connections_max = (per_shard + UPKEEP_CONNECTIONS) * len(spec.shards)
    if spec.lease_ttl_s:  # whatever share it ends up holding, up to every shard
        reserve = (SHARD_CONCURRENCY_MIN + UPKEEP_CONNECTIONS) * len(spec.shards)
        connections_max = p.worker_concurrency + reserve
    redis = redis_client(
        spec.redis_url,
        connections_max=connections_max,
        wait_s=config.pools.wait_s,
        socket_timeout_s=WORKER_REDIS_SOCKET_TIMEOUT_S,
        connect_timeout_s=config.pools.redis_connect_timeout_s,
    )
    bank = BankClient(
        spec.bank_url,
        timeout_s=p.bank_timeout_s,
        retries_max=p.bank_retries_max,
        key_per_request=config.mutation == "bank_key_off",
        unknown_as_failed=config.mutation == "unknown_as_failed",
        unknown_as_succeeded=config.mutation == "unknown_as_succeeded",
    )
    queues = QueueSet(redis, p.shards, config.pools.enqueue_concurrency_max)
    committer = Committer(
        pool,
        ops_max=config.ledger.batch_size_max,
        flushers=DB_POOL_SIZE - 1,
        mutation=config.mutation,
    )
    limits = Limits(
        p.mailbox_size_max,
        p.actor_batch_size_max,
        p.actor_batch_wait_ms / 1000,
        p.actor_idle_evict_s,
    )
    try:
        async with asyncio.TaskGroup() as tg:
            registry = Registry(tg, pool, committer, bank, limits)
            committer_task = tg.create_task(committer.run())
            consumers = _Consumers(tg, queues, registry)
            leases: ShardLeases | None = None
            if spec.lease_ttl_s:
                leases = ShardLeases(redis, _worker_id(), len(spec.shards), spec.lease_ttl_s)
                held = await _lease_round(leases, consumers, p.worker_concurrency)
                log.info("worker_started", leases=leases.worker_id, shards=sorted(held))
            else:
                for s in spec.shards:
                    consumers.start(s, per_shard)
                log.info("worker_started", shards=list(spec.shards))
            if spec.metrics_port:
                await redis.ping()  # the pool proved PostgreSQL; serve only once Redis answers
                SHARDS_OWNED.set(len(consumers.running))
                REGISTRY.register(_ActorsCollector(registry))
                # A daemon thread: it ends with the process, which ends when this returns.
                start_http_server(spec.metrics_port, addr=config.host)
            if leases is None:
                await stop.wait()
            else:
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), leases.round_every_s)
                    if not stop.is_set():
                        held = await _lease_round(leases, consumers, p.worker_concurrency, held)
            log.info("worker_stopping")
            await consumers.stop(list(consumers.running))
            if leases is not None:
                with contextlib.suppress(RedisError, OSError):
                    await leases.leave(held)
            committer_task.cancel()
            raise _Stopped
    except* _Stopped:
        pass
    finally:
        await bank.aclose()
        await redis.aclose()
        await pool.close()
        log.info("worker_stopped")


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class _Consumers:
    """The SAQ consumers this worker runs now, one per shard it consumes."""

    def __init__(self, tg: asyncio.TaskGroup, queues: QueueSet, registry: Registry) -> None:
        self._tg, self._queues, self._registry = tg, queues, registry
        self.running: dict[int, Worker[SettleContext]] = {}
        self.stopping: set[int] = set()  # shards whose consumer is finishing its jobs

    def start(self, shard: int, concurrency: int) -> None:
        worker = _saq_worker(self._queues.queues[shard], self._registry, concurrency)
        self.running[shard] = worker
        self._tg.create_task(worker.start())

    async def stop(self, shards: Iterable[int]) -> None:
        """Stops consuming ``shards``: in-flight jobs get the grace period to finish."""
        stopping = [self.running.pop(s) for s in shards if s in self.running]
        await asyncio.gather(*(w.stop() for w in stopping))

    def stop_soon(self, shards: Iterable[int], then: Callable[[int], Awaitable[object]] | None
                  ) -> None:  # fmt: skip
        """Stops consuming ``shards`` in the background (the grace period outlasts a lease
        round: rounds must go on meanwhile), then calls ``then`` for each."""
        for shard in shards:
            worker = self.running.pop(shard, None)
            if worker is not None:
                self.stopping.add(shard)
                self._tg.create_task(self._stop_one(shard, worker, then))

    async def _stop_one(self, shard: int, worker: Worker[SettleContext],
                        then: Callable[[int], Awaitable[object]] | None) -> None:  # fmt: skip
        try:
            await worker.stop()
            if then is not None:
                with contextlib.suppress(RedisError, OSError):  # else it expires: taken later
                    await then(shard)
        finally:
            self.stopping.discard(shard)


async def _lease_round(leases: ShardLeases, consumers: _Consumers, concurrency: int,
                       held: frozenset[int] = frozenset()) -> frozenset[int]:  # fmt: skip
    """One lease round: consume exactly the shards held, hand surplus ones back once their
    consumer has stopped. Returns the shards held afterwards (``held`` unchanged when Redis did
    not answer: the consumers cannot dequeue meanwhile either, and the next round tells what is
    still ours)."""
    try:
        now = await leases.round()
    except (RedisError, OSError) as exc:
        log.warning("shard_lease_round_failed", error=str(exc))
        return held
    lost = [s for s in consumers.running if s not in now.held]
    if lost:
        log.warning("shards_lost", shards=lost)  # expired while we were away: others have them
        consumers.stop_soon(lost, None)
    extra = surplus(now.held, now.share)
    handed = [s for s in extra if s in consumers.running]
    consumers.stop_soon(handed, leases.release)  # the lease is renewed until it is released
    keep = now.held - set(extra) - consumers.stopping
    gained = sorted(s for s in keep if s not in consumers.running)
    per_shard = max(SHARD_CONCURRENCY_MIN, concurrency // max(1, now.share))
    for s in gained:
        consumers.start(s, per_shard)
    if gained or lost or handed:
        log.info("shard_leases", held=sorted(consumers.running), gained=gained, lost=lost,
                 handed_back=handed, share=now.share, workers=now.live)  # fmt: skip
    SHARDS_OWNED.set(len(consumers.running))
    return now.held


class _ActorsCollector(Collector):
    """The actors and their mailboxes, read when Prometheus scrapes (from the metrics thread:
    a racy read of sizes is fine for a gauge)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        messages, deepest = self.registry.mailboxes()
        yield GaugeMetricFamily("kizo_actors_active", "Account actors alive",
                                value=self.registry.active)  # fmt: skip
        yield GaugeMetricFamily("kizo_actor_mailbox_messages", "Messages in all mailboxes",
                                value=messages)  # fmt: skip
        yield GaugeMetricFamily("kizo_actor_mailbox_depth_max", "The deepest mailbox",
                                value=deepest)  # fmt: skip


class _Stopped(Exception):
    """Ends the TaskGroup: cancels the actors (idle by now) once the consumers have stopped."""


def _saq_worker(queue: Any, registry: Registry, concurrency: int) -> Worker[SettleContext]:
    worker: Worker[SettleContext] = Worker(
        queue,
        functions=[(SETTLE_JOB, _settle), (SETTLE_MANY_JOB, _settle_many)],
        concurrency=concurrency,
        shutdown_grace_period_s=SHUTDOWN_GRACE_S,
        dequeue_timeout=DEQUEUE_TIMEOUT_S,
        # Sweep for the stuck jobs of dead workers often (SAQ's default is once a minute).
        timers=PartialTimersDict(schedule=1, worker_info=10, sweep=SWEEP_INTERVAL_S, abort=1),
    )
    worker.SIGNALS = []  # one handler for the process, below, stops every consumer
    worker.context["registry"] = registry
    return worker


async def main(config: Config, spec: WorkerSpec) -> None:
    # SAQ warns at every shutdown that its upkeep loops (which never end by themselves) had to be
    # cancelled; job failures stay visible, they are logged as errors.
    logging.getLogger("saq").setLevel(logging.ERROR)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await run_worker(config, spec, stop)
