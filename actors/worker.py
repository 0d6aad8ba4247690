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
import logging
import signal
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client import REGISTRY, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from saq import Worker
from saq.types import Context, PartialTimersDict

from actors._actor import Limits, Registry
from actors._committer import Committer
from actors._metrics import SHARDS_OWNED
from actors.bank_client import BankClient
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
    shards: Sequence[int]
    metrics_port: int = 0  # 0: no metrics endpoint (workers started inside tests)


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
    redis = redis_client(
        spec.redis_url,
        connections_max=(per_shard + UPKEEP_CONNECTIONS) * len(spec.shards),
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
            workers = [_saq_worker(queues.queues[s], registry, per_shard) for s in spec.shards]
            for w in workers:
                tg.create_task(w.start())
            log.info("worker_started", shards=list(spec.shards))
            if spec.metrics_port:
                await redis.ping()  # the pool proved PostgreSQL; serve only once Redis answers
                SHARDS_OWNED.set(len(spec.shards))
                REGISTRY.register(_ActorsCollector(registry))
                # A daemon thread: it ends with the process, which ends when this returns.
                start_http_server(spec.metrics_port, addr=config.host)
            await stop.wait()
            log.info("worker_stopping")
            await asyncio.gather(*(w.stop() for w in workers))
            committer_task.cancel()
            raise _Stopped
    except* _Stopped:
        pass
    finally:
        await bank.aclose()
        await redis.aclose()
        await pool.close()
        log.info("worker_stopped")


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
