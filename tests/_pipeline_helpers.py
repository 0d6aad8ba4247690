"""Real worker processes and waits for the pipeline tests."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any

import asyncpg
from redis.asyncio import Redis

from actors.bank_client import BankClient
from actors.janitor import JanitorDeps, PassSummary, run_pass
from actors.routing import QueueSet, Routed, actor_account
from engine import BANK_SETTLEMENT, Action, NewIntent, Op, apply_batch, system_account
from infra.config import PipelineConfig, PoolsConfig
from tests._ledger_helpers import funded, intents
from tests.conftest import ServerSet, kizo_env

SHARDS = 4
ENQUEUE_CONCURRENCY = PoolsConfig.enqueue_concurrency_max


def start_worker(
    servers: ServerSet, db_url: str, bank_url: str, **extra: str
) -> subprocess.Popen[bytes]:
    port = bank_url.rsplit(":", 1)[1]
    env = kizo_env(servers, db_url, KIZO_SHARDS=str(SHARDS), KIZO_BANK_PORT=port, **extra)
    return subprocess.Popen([sys.executable, "-m", "kizo.cli", "worker"], env=env)


def stop_worker(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


async def enqueue(pool: asyncpg.Pool, redis_url: str, txn_ids: Sequence[uuid.UUID]) -> int:
    rows = await pool.fetch(
        "SELECT id, kind, source_id, dest_id FROM transactions WHERE id = ANY($1::uuid[])",
        list(txn_ids),
    )
    redis = Redis.from_url(redis_url, socket_timeout=5)
    try:
        queues = QueueSet(redis, SHARDS, ENQUEUE_CONCURRENCY)
        items = [
            Routed(r["id"], actor_account(r["kind"], r["source_id"], r["dest_id"])) for r in rows
        ]
        return await queues.enqueue(items)
    finally:
        await redis.aclose()


async def wait_final(
    pool: asyncpg.Pool,
    txn_ids: Sequence[uuid.UUID],
    timeout_s: float = 60,
    final: Sequence[str] = ("settled", "failed"),
) -> dict[str, int]:
    """Wait (bounded) until every transaction is in a final state; returns counts by status."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = await pool.fetch(
            "SELECT status, count(*) AS n FROM transactions WHERE id = ANY($1::uuid[]) GROUP BY 1",
            list(txn_ids),
        )
        counts = {r["status"]: r["n"] for r in rows}
        if sum(n for s, n in counts.items() if s in final) == len(txn_ids):
            return counts
        if time.monotonic() > deadline:
            raise AssertionError(f"not final within {timeout_s}s: {counts}")
        await asyncio.sleep(0.1)


async def until_some_final(pool: asyncpg.Pool, txn_ids: Sequence[uuid.UUID]) -> int:
    """Waits (bounded, 6 s) until some of ``txn_ids`` have left ``pending``; returns how many."""
    done = 0
    for _ in range(600):
        done = await pool.fetchval(
            "SELECT count(*) FROM transactions"
            " WHERE id = ANY($1::uuid[]) AND status <> 'pending'",
            list(txn_ids),
        )
        if done > 0:
            break
        await asyncio.sleep(0.01)
    return int(done)


async def with_janitor(deps: JanitorDeps, waiting: Coroutine[Any, Any, object]) -> None:
    """Await ``waiting`` while janitor passes run every half second, as in production."""
    task = asyncio.ensure_future(waiting)
    try:
        while not task.done():
            await run_pass(deps)
            await asyncio.wait([task], timeout=0.5)
    finally:
        task.cancel()
    task.result()


async def bank_funded(
    pool: asyncpg.Pool, bank: BankClient, amounts: Sequence[int]
) -> list[uuid.UUID]:
    """Accounts funded the real way: collected at the bank, then credited (so the janitor's
    reconciliation has nothing to say about them)."""
    users = await funded(pool, [0] * len(amounts))
    bank_account = await system_account(pool, BANK_SETTLEMENT)
    paying = [(u, a) for u, a in zip(users, amounts, strict=True) if a]
    deposits = await intents(pool, [NewIntent("deposit", bank_account, u, a) for u, a in paying])
    for txn, (user, amount) in zip(deposits, paying, strict=True):
        assert (await bank.collect(txn, user, amount, "USD")).outcome == "succeeded"
    await apply_batch(pool, [Op(t, Action.CREDIT) for t in deposits])
    return users


async def janitor_until_quiet(deps: JanitorDeps, passes_max: int = 10) -> PassSummary:
    """Run janitor passes (bounded) until one resolves nothing and re-drives nothing."""
    summary = await run_pass(deps)
    for _ in range(passes_max):
        if summary.resolved == 0 and summary.redriven == 0:
            break
        await asyncio.sleep(0.5)
        summary = await run_pass(deps)
    return summary


@contextlib.asynccontextmanager
async def janitor_deps(
    pool: asyncpg.Pool, redis: Redis, bank_url: str, config: PipelineConfig
) -> AsyncIterator[JanitorDeps]:
    """The janitor's dependencies on the test's database, Valkey and bank."""
    bank = BankClient(bank_url, timeout_s=2, retries_max=1)
    try:
        yield JanitorDeps(pool, QueueSet(redis, config.shards, ENQUEUE_CONCURRENCY), bank, config)
    finally:
        await bank.aclose()
