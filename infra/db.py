"""Connection pools as Kizo's processes use them: PostgreSQL (asyncpg) and Redis (redis-py).

Every pool here waits, for a bounded time, for a free connection when more work wants one than
it holds: redis-py's default asyncio pool raises ``MaxConnectionsError`` instead (an enqueue of
200 groups at once on a pool of 72 failed that way), and asyncpg's waits forever unless each
acquire passes a timeout. The wait bound is ``PoolsConfig.wait_s``; a fan-out over a pool is
bounded as well (``QueueSet``), so waiting is the exception, not the plan.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from asyncpg.pool import PoolAcquireContext
from redis.asyncio import BlockingConnectionPool, Redis


class LeanConnection(asyncpg.Connection):
    """Skips asyncpg's reset query (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL) when a
    connection goes back to its pool: one round trip less per request. Safe because pooled
    connections never keep session state: settings are SET LOCAL, cursors and locks live inside
    transactions, nothing LISTENs (the migration runner, which takes a session lock, resets its
    own state before releasing)."""

    def get_reset_query(self) -> str:
        return ""


class WaitingPool(asyncpg.Pool):
    """An asyncpg pool whose every acquire has a timeout, its own convenience methods
    (``fetch``, ``execute``...) included: those acquire without one, so a pool run dry would
    otherwise hold their callers forever."""

    __slots__ = ("acquire_timeout_s",)
    acquire_timeout_s: float

    def acquire(self, *, timeout: float | None = None) -> PoolAcquireContext:
        return super().acquire(timeout=self.acquire_timeout_s if timeout is None else timeout)


async def create_pool(
    url: str, *, min_size: int, max_size: int, acquire_timeout_s: float, **options: Any
) -> asyncpg.Pool:
    """A PostgreSQL pool of at most ``max_size`` connections; an acquire waits at most
    ``acquire_timeout_s`` (then ``TimeoutError``)."""
    pool = WaitingPool(
        url,
        min_size=min_size,
        max_size=max_size,
        max_queries=50_000,
        max_inactive_connection_lifetime=300.0,
        loop=None,
        connection_class=LeanConnection,
        record_class=asyncpg.Record,
        **options,
    )
    pool.acquire_timeout_s = acquire_timeout_s
    await pool
    return pool


def redis_client(
    url: str,
    *,
    connections_max: int,
    wait_s: float,
    socket_timeout_s: float,
    connect_timeout_s: float,
) -> Redis:
    """A Redis client on a pool of at most ``connections_max`` connections that blocks, up to
    ``wait_s``, for a free one (then ``redis.exceptions.ConnectionError``). Closing the client
    closes its pool."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=connections_max,
        timeout=wait_s,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=connect_timeout_s,
    )
    return Redis.from_pool(pool)
