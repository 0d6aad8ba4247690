"""Bounded fan-out: a backlog many times larger than a Redis pool lands in full, against a real
Valkey. redis-py's plain asyncio pool raises MaxConnectionsError when more coroutines want a
connection than it holds; Kizo's pools wait for one (infra.db) and its fan-outs are bounded
below the pool (QueueSet), so neither alone may be what keeps these tests green."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio
from redis.asyncio import ConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from actors.routing import DEQUEUE_RETRY_S, SETTLE_MANY_JOB, QueueSet, Routed, queue_name
from infra.config import PoolsConfig
from infra.db import redis_client
from infra.servers import free_port
from tests.conftest import ServerSet

POOL = 8
BACKLOG = 10 * POOL
SHARDS = 4


def _waiting_pool(url: str) -> Redis:
    return redis_client(
        url, connections_max=POOL, wait_s=30, socket_timeout_s=10, connect_timeout_s=2
    )


def _plain_pool(url: str) -> Redis:
    """redis-py's own pool, which fails instead of waiting: only the fan-out's bound helps."""
    return Redis.from_pool(ConnectionPool.from_url(url, max_connections=POOL, socket_timeout=10))


@pytest_asyncio.fixture(params=[_waiting_pool, _plain_pool], ids=["waiting-pool", "plain-pool"])
async def small_pool(
    request: pytest.FixtureRequest, servers: ServerSet, redis_client: Redis
) -> AsyncIterator[Redis]:
    make: Callable[[str], Redis] = request.param
    client = make(servers.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def _queued_intents(redis: Redis) -> list[str]:
    """Every intent carried by a queued ``settle_many`` job, over all shards."""
    found: list[str] = []
    for shard in range(SHARDS):
        for job_id in await redis.lrange(f"saq:{queue_name(shard)}:queued", 0, -1):
            raw = await redis.get(job_id)
            assert raw is not None, job_id
            job = json.loads(raw)
            assert job["function"] == SETTLE_MANY_JOB
            found.extend(txn for txn, _ in job["kwargs"]["items"])
    return found


@pytest.mark.asyncio
async def test_a_grouped_backlog_ten_times_the_pool_lands_in_full(small_pool: Redis) -> None:
    queues = QueueSet(small_pool, SHARDS, PoolsConfig.enqueue_concurrency_max)
    assert queues.concurrency_max <= POOL  # bounded by the pool, not only by config
    items = [Routed(uuid.uuid4(), uuid.uuid4()) for _ in range(BACKLOG)]
    jobs = await queues.enqueue_grouped(items, per_job_max=1)  # one job per group
    assert jobs == BACKLOG
    assert sorted(await _queued_intents(small_pool)) == sorted(str(i.txn_id) for i in items)


@pytest.mark.asyncio
async def test_one_job_per_intent_backlog_ten_times_the_pool_lands_in_full(
    small_pool: Redis,
) -> None:
    queues = QueueSet(small_pool, SHARDS, PoolsConfig.enqueue_concurrency_max)
    items = [Routed(uuid.uuid4(), uuid.uuid4(), attempt=1) for _ in range(BACKLOG)]
    assert await queues.enqueue(items) == BACKLOG
    for item in items:
        name = queue_name(queues.queues.index(queues.for_account(item.account_id)))
        assert await small_pool.exists(f"saq:job:{name}:{item.job_key}")


@pytest.mark.asyncio
async def test_the_pool_kizo_makes_waits_for_a_connection_instead_of_failing(
    servers: ServerSet, redis_client: Redis
) -> None:
    # Ten times as many commands as connections, each holding its connection a moment (a
    # blocking pop on an empty list): they take turns.
    client = _waiting_pool(servers.redis_url)
    try:
        results = await asyncio.gather(
            *(client.blpop([f"fanout-empty-{n}"], timeout=0.05) for n in range(BACKLOG))
        )
    finally:
        await client.aclose()
    assert results == [None] * BACKLOG
    assert client.connection_pool.max_connections == POOL


@pytest.mark.asyncio
async def test_a_dequeue_with_redis_away_pauses_before_it_fails() -> None:
    """SAQ's consumer loop dequeues again as soon as a dequeue fails: without the pause, a
    worker spun a whole core for as long as Redis was down."""
    nowhere = redis_client(f"redis://127.0.0.1:{free_port()}/0", connections_max=POOL,
                           wait_s=1, socket_timeout_s=1, connect_timeout_s=1)  # fmt: skip
    queue = QueueSet(nowhere, SHARDS, POOL).queues[0]
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(RedisConnectionError):
            await queue.dequeue(timeout=1)
        assert loop.time() - started >= DEQUEUE_RETRY_S * 0.5
    finally:
        await nowhere.aclose()
