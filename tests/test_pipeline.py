"""Intents flow through SAQ shards to a real worker process and settle exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import random
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from actors.routing import Coalescer, QueueSet, Routed
from engine import BANK_SETTLEMENT, NewIntent, audit, system_account
from infra.servers import free_port
from tests._ledger_helpers import funded, intents
from tests._pipeline_helpers import (
    ENQUEUE_CONCURRENCY,
    SHARDS,
    enqueue,
    start_worker,
    stop_worker,
    wait_final,
)
from tests.conftest import ServerSet


async def _exactly_once(pool: asyncpg.Pool) -> None:
    assert await audit(pool) == []
    settled = await pool.fetchval("SELECT count(*) FROM transactions WHERE status = 'settled'")
    postings = await pool.fetchval("SELECT count(*) FROM postings")
    assert postings == 2 * settled


@pytest.mark.asyncio
async def test_transfers_settle_exactly_once_even_when_enqueued_twice(
    servers: ServerSet, db_url: str, pool: asyncpg.Pool, bank_url: str, redis_client: object
) -> None:
    rng = random.Random(5)
    users = await funded(pool, [10_000] * 20)
    pairs = [rng.sample(users, 2) for _ in range(300)]
    hot = [(u, users[0]) for u in users[1:]] * 5  # a hot destination as well
    ids = await intents(
        pool, [NewIntent("transfer", a, b, rng.randint(1, 300)) for a, b in pairs + hot]
    )
    worker = start_worker(servers, db_url, bank_url)
    try:
        assert await enqueue(pool, servers.redis_url, ids) == len(ids)
        again = await enqueue(pool, servers.redis_url, ids)  # duplicates: no-ops
        counts = await wait_final(pool, ids)
        assert again < len(ids)
        assert counts.get("settled", 0) + counts.get("failed", 0) == len(ids)
        await _exactly_once(pool)
        # A job re-run after completion (a re-drive) changes nothing either.
        before = await pool.fetchval("SELECT count(*) FROM postings")
        await enqueue(pool, servers.redis_url, ids[:50])
        await wait_final(pool, ids)
        assert await pool.fetchval("SELECT count(*) FROM postings") == before
    finally:
        assert stop_worker(worker) == 0


@pytest.mark.asyncio
async def test_deposits_and_withdrawals_go_through_the_bank(
    servers: ServerSet, db_url: str, pool: asyncpg.Pool, bank_url: str, redis_client: object
) -> None:
    [alice] = await funded(pool, [0])
    bank = await system_account(pool, BANK_SETTLEMENT)
    [deposit] = await intents(pool, [NewIntent("deposit", bank, alice, 5_000)])
    worker = start_worker(servers, db_url, bank_url)
    try:
        await enqueue(pool, servers.redis_url, [deposit])
        await wait_final(pool, [deposit])
        ok, too_much = await intents(
            pool,
            [
                NewIntent("withdrawal", alice, bank, 3_000),
                NewIntent("withdrawal", alice, bank, 9_000),
            ],
        )
        await enqueue(pool, servers.redis_url, [ok, too_much])
        await wait_final(pool, [ok, too_much])
    finally:
        assert stop_worker(worker) == 0
    statuses = {
        r["id"]: (r["status"], r["failure_reason"])
        for r in await pool.fetch(
            "SELECT id, status, failure_reason FROM transactions WHERE id = ANY($1::uuid[])",
            [deposit, ok, too_much],
        )
    }
    assert statuses == {
        deposit: ("settled", None),
        ok: ("settled", None),
        too_much: ("failed", "insufficient_funds"),
    }
    assert await pool.fetchval("SELECT posted FROM balances WHERE account_id = $1", alice) == 2_000
    async with httpx.AsyncClient(base_url=bank_url, timeout=5) as client:
        for key, kind in ((deposit, "collection"), (ok, "payout")):
            payment = (await client.get(f"/payments/{key}")).json()
            assert (payment["kind"], payment["status"]) == (kind, "succeeded")
        assert (await client.get(f"/payments/{too_much}")).status_code == 404
    await _exactly_once(pool)


@pytest.mark.asyncio
async def test_grouped_jobs_settle_every_intent_once(
    servers: ServerSet, db_url: str, pool: asyncpg.Pool, bank_url: str, redis_client: object
) -> None:
    rng = random.Random(9)
    users = await funded(pool, [10_000] * 30)
    pairs = [rng.sample(users, 2) for _ in range(400)]
    ids = await intents(pool, [NewIntent("transfer", a, b, 7) for a, b in pairs])
    rows = await pool.fetch(
        "SELECT id, source_id FROM transactions WHERE id = ANY($1::uuid[])", ids
    )
    redis = Redis.from_url(servers.redis_url, socket_timeout=5)
    try:
        queues = QueueSet(redis, SHARDS, ENQUEUE_CONCURRENCY)
        items = [Routed(r["id"], r["source_id"]) for r in rows]
        jobs = await queues.enqueue_grouped(items, per_job_max=50)
        assert SHARDS <= jobs <= len(items) // 50 + SHARDS
        worker = start_worker(servers, db_url, bank_url)
        try:
            await queues.enqueue_grouped(items[:100], per_job_max=50)  # a duplicate group
            await wait_final(pool, ids)
        finally:
            assert stop_worker(worker) == 0
    finally:
        await redis.aclose()
    await _exactly_once(pool)
    assert await pool.fetchval(
        "SELECT count(*) FROM postings WHERE transaction_id = ANY($1::uuid[])", ids
    ) == 2 * await pool.fetchval(
        "SELECT count(*) FROM transactions WHERE id = ANY($1::uuid[]) AND status = 'settled'", ids
    )


@pytest.mark.asyncio
async def test_coalescer_groups_concurrent_enqueues_and_every_intent_settles_once(
    servers: ServerSet, db_url: str, pool: asyncpg.Pool, bank_url: str, redis_client: object
) -> None:
    rng = random.Random(11)
    users = await funded(pool, [10_000] * 30)
    pairs = [rng.sample(users, 2) for _ in range(600)]
    ids = await intents(pool, [NewIntent("transfer", a, b, 3) for a, b in pairs])
    rows = await pool.fetch(
        "SELECT id, source_id FROM transactions WHERE id = ANY($1::uuid[])", ids
    )
    async with running_coalescer(servers.redis_url, socket_timeout=5) as (coalescer, _):
        # One task per intent, as one API request each; a lone one first (a plain job).
        await coalescer.enqueue(Routed(rows[0]["id"], rows[0]["source_id"]))
        assert (coalescer.flushes, coalescer.intents) == (1, 1)
        await asyncio.gather(
            *(coalescer.enqueue(Routed(r["id"], r["source_id"])) for r in rows[1:])
        )
        assert coalescer.intents == len(rows)
        assert coalescer.flushes <= len(rows) // 10  # concurrent requests shared flushes
        await _settle_with_a_worker(servers, db_url, bank_url, pool, ids)


@pytest.mark.asyncio
async def test_coalescer_hands_a_redis_failure_to_every_caller_of_the_flush() -> None:
    # A Redis nobody listens on: every caller sees the error (the API then counts the intent
    # as left to the outbox relay); the flusher itself keeps running.
    async with running_coalescer(f"redis://127.0.0.1:{free_port()}", socket_timeout=1,
                                 socket_connect_timeout=1) as (coalescer, flusher):  # fmt: skip
        items = [Routed(uuid.uuid4(), uuid.uuid4()) for _ in range(20)]
        results = await asyncio.gather(
            *(coalescer.enqueue(i) for i in items), return_exceptions=True
        )
        assert all(isinstance(r, OSError | RedisError) for r in results), results
        assert not flusher.done()


class TcpRelay:
    """A TCP relay to Redis that can be told to refuse: an outage that ends."""

    def __init__(self, redis_url: str) -> None:
        target = urllib.parse.urlsplit(redis_url)
        self.target = (target.hostname or "127.0.0.1", target.port or 6379)
        self.refuse = False
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.mark.asyncio
async def test_coalescer_parks_what_redis_refused_and_enqueues_it_once_redis_is_back(
    servers: ServerSet, db_url: str, pool: asyncpg.Pool, bank_url: str
) -> None:
    # Requests during an outage see the error (they answered 202 already); their intents are
    # parked and enqueued by the coalescer itself when Redis answers again, with no request and
    # no janitor: the worker then settles every one.
    users = await funded(pool, [1_000] * 6)
    ids = await intents(pool, [NewIntent("transfer", users[i % 6], users[(i + 1) % 6], 1)
                               for i in range(40)])  # fmt: skip
    rows = await pool.fetch("SELECT id, source_id FROM transactions WHERE id = ANY($1::uuid[])",
                            ids)  # fmt: skip
    relay = TcpRelay(servers.redis_url)
    await relay.start()
    try:
        async with running_coalescer(relay.url, socket_timeout=1,
                                     socket_connect_timeout=1) as (coalescer, _):  # fmt: skip
            await _park_then_enqueue(coalescer, relay, rows)
    finally:
        await relay.stop()
    await _settle_with_a_worker(servers, db_url, bank_url, pool, ids)


async def _park_then_enqueue(coalescer: Coalescer, relay: TcpRelay,
                             rows: list[asyncpg.Record]) -> None:  # fmt: skip
    relay.refuse = True
    results = await asyncio.gather(
        *(coalescer.enqueue(Routed(r["id"], r["source_id"])) for r in rows),
        return_exceptions=True,
    )
    assert all(isinstance(r, OSError | RedisError) for r in results), results
    assert coalescer.parked == len(rows)
    relay.refuse = False
    for _ in range(100):  # bounded: the retry timer is at most 2 s
        if coalescer.parked == 0:
            break
        await asyncio.sleep(0.1)
    assert coalescer.parked == 0


@contextlib.asynccontextmanager
async def running_coalescer(redis_url: str, **options: Any
                            ) -> AsyncIterator[tuple[Coalescer, asyncio.Task[None]]]:  # fmt: skip
    """A coalescer and its flusher task on a Redis client of its own; all three end after."""
    redis = Redis.from_url(redis_url, **options)
    coalescer = Coalescer(QueueSet(redis, SHARDS, ENQUEUE_CONCURRENCY))
    flusher = asyncio.create_task(coalescer.run())
    try:
        yield coalescer, flusher
    finally:
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        await redis.aclose()


async def _settle_with_a_worker(servers: ServerSet, db_url: str, bank_url: str,
                                pool: asyncpg.Pool, ids: list[uuid.UUID]) -> None:  # fmt: skip
    worker = start_worker(servers, db_url, bank_url)
    try:
        await wait_final(pool, ids)
    finally:
        assert stop_worker(worker) == 0
    await _exactly_once(pool)
