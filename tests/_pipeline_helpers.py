"""Real worker processes and waits for the pipeline tests."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence

import asyncpg
from redis.asyncio import Redis

from actors.routing import QueueSet, Routed, actor_account
from tests.conftest import ServerSet, kizo_env

SHARDS = 4


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
        queues = QueueSet(redis, SHARDS)
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
