"""``kizo bench pipeline``: intents through SAQ to real worker processes, against pgbench.

Method (all on one server, one run):
1. capacity: ``--transfers`` pending intents are created (untimed), then enqueued through SAQ
   as fast as possible; settled/s = intents / (last settled_at - first enqueue). Measured with
   grouped jobs (``QueueSet.enqueue_grouped``: up to 100 intents of one shard per job), for
   random accounts and with every transfer paying one hot merchant; and, for comparison, with
   one job per intent (``QueueSet.enqueue``, the per-request path).
2. lag at a sustained rate: intents are created and enqueued in 50 ms ticks at ``--rate-share``
   (default 60 %) of the measured random capacity for ``--lag-seconds``; lag = settled_at -
   created_at of each, p50 / p99. A burst's lag would only measure queueing, hence the rate.
3. pgbench tpcb-like with the same server, ``--clients`` clients.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from actors.routing import QueueSet, Routed
from engine import (
    NewIntent,
    audit,
    create_intents,
)
from infra.config import PoolsConfig
from infra.db import create_pool, redis_client
from infra.servers import EmbeddedPostgres, EmbeddedValkey, free_port
from kizo.bench_ledger import run_pgbench, setup_funded_ledger

TICK_S = 0.05
# Enqueues in Redis at once: the same for one job per intent and for grouped jobs.
ENQUEUE_CONCURRENCY = 64
WAIT_S_MAX = 300.0


@dataclass(frozen=True)
class PipelineBenchParams:
    transfers: int = 20_000
    accounts: int = 5_000
    workers: int = 2
    shards: int = 8
    lag_seconds: int = 10
    rate_share: float = 0.6
    clients: int = 4
    pgbench_seconds: int = 10
    seed: int = 1


def _pairs(
    users: Sequence[uuid.UUID], n: int, hot: bool, rng: random.Random
) -> list[tuple[uuid.UUID, uuid.UUID]]:
    if hot:
        return [(rng.choice(users[1:]), users[0]) for _ in range(n)]
    return [tuple(rng.sample(users, 2)) for _ in range(n)]  # type: ignore[misc]


async def _create(pool: asyncpg.Pool, pairs: Sequence[tuple[uuid.UUID, uuid.UUID]]) -> list[Routed]:
    async with pool.acquire() as conn:
        txns = await create_intents(
            conn,
            [NewIntent("transfer", a, b, 1) for a, b in pairs],
            currency="USD",
            amount_max_minor=10**12,
        )
    return [Routed(t.id, t.source_id) for t in txns]


async def _enqueue(queues: QueueSet, items: Sequence[Routed], grouped: bool) -> None:
    if grouped:
        await queues.enqueue_grouped(items)
        return
    await queues.enqueue(items)  # ENQUEUE_CONCURRENCY at once


async def _wait_settled(pool: asyncpg.Pool, ids: Sequence[uuid.UUID]) -> None:
    deadline = time.monotonic() + WAIT_S_MAX
    while time.monotonic() < deadline:
        left = await pool.fetchval(
            "SELECT count(*) FROM transactions WHERE id = ANY($1::uuid[]) AND status = 'pending'",
            list(ids),
        )
        if left == 0:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"intents still pending after {WAIT_S_MAX}s: the pipeline is stuck")


async def _capacity(
    pool: asyncpg.Pool,
    queues: QueueSet,
    pairs: Sequence[tuple[uuid.UUID, uuid.UUID]],
    grouped: bool = True,
) -> float:
    items = await _create(pool, pairs)
    ids = [i.txn_id for i in items]
    started_wall = time.time()
    await _enqueue(queues, items, grouped)
    await _wait_settled(pool, ids)
    last = await pool.fetchval(
        "SELECT extract(epoch FROM max(coalesce(settled_at, failed_at)))"
        " FROM transactions WHERE id = ANY($1::uuid[])",
        ids,
    )
    return len(ids) / (float(last) - started_wall)


async def _lag(
    pool: asyncpg.Pool,
    queues: QueueSet,
    users: Sequence[uuid.UUID],
    rate: float,
    seconds: int,
    rng: random.Random,
) -> tuple[float, float, float]:
    ids: list[uuid.UUID] = []
    per_tick, carry = rate * TICK_S, 0.0
    started = time.monotonic()
    for tick in range(int(seconds / TICK_S)):
        carry += per_tick
        n, carry = int(carry), carry - int(carry)
        if n:
            items = await _create(pool, _pairs(users, n, False, rng))
            ids.extend(i.txn_id for i in items)
            await _enqueue(queues, items, True)
        delay = started + (tick + 1) * TICK_S - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    offered = len(ids) / (time.monotonic() - started)
    await _wait_settled(pool, ids)
    row = await pool.fetchrow(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY lag) AS p50,"
        " percentile_cont(0.99) WITHIN GROUP (ORDER BY lag) AS p99 FROM ("
        " SELECT extract(epoch FROM coalesce(settled_at, failed_at) - created_at) * 1000 AS lag"
        " FROM transactions WHERE id = ANY($1::uuid[])) l",
        ids,
    )
    assert row is not None
    return offered, float(row["p50"]), float(row["p99"])


def _start_workers(
    p: PipelineBenchParams, db_url: str, redis_url: str
) -> list[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "REDIS_URL": redis_url,
        "KIZO_SHARDS": str(p.shards),
    }
    return [
        subprocess.Popen(
            [sys.executable, "-m", "kizo.cli", "worker", "--index", str(i), "--of", str(p.workers)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(p.workers)
    ]


def _stop_workers(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


async def _measure(p: PipelineBenchParams, pg: EmbeddedPostgres, redis_url: str) -> dict[str, Any]:
    url = pg.url()
    rng = random.Random(p.seed)
    users = await setup_funded_ledger(url, p.accounts, "USD")
    workers = _start_workers(p, url, redis_url)
    pools = PoolsConfig()
    pool = await create_pool(url, min_size=2, max_size=4, acquire_timeout_s=pools.wait_s)
    redis = redis_client(
        redis_url,
        connections_max=ENQUEUE_CONCURRENCY + 8,
        wait_s=pools.wait_s,
        socket_timeout_s=pools.redis_socket_timeout_s,
        connect_timeout_s=pools.redis_connect_timeout_s,
    )
    try:
        queues = QueueSet(redis, p.shards, ENQUEUE_CONCURRENCY)
        await _capacity(pool, queues, _pairs(users, 500, False, rng))  # warm-up
        per_job_per_s = await _capacity(
            pool, queues, _pairs(users, p.transfers // 2, False, rng), grouped=False
        )
        random_per_s = await _capacity(pool, queues, _pairs(users, p.transfers, False, rng))
        hot_per_s = await _capacity(pool, queues, _pairs(users, p.transfers, True, rng))
        offered, p50, p99 = await _lag(
            pool, queues, users, random_per_s * p.rate_share, p.lag_seconds, rng
        )
        findings = await audit(pool)
        if findings:
            raise RuntimeError(f"ledger not clean after the benchmark: {findings[:5]}")
    finally:
        await redis.aclose()
        await pool.close()
        _stop_workers(workers)
    tps = await asyncio.to_thread(
        run_pgbench, pg.host, pg.port, "pgbench", p.clients, p.pgbench_seconds, 10
    )
    report = _report(p, random_per_s, hot_per_s, offered, p50, p99, tps)
    report["one_job_per_intent_settled_per_s"] = round(per_job_per_s, 1)
    report["one_job_per_intent_vs_pgbench"] = round(per_job_per_s / tps, 2)
    return report


def _report(
    p: PipelineBenchParams,
    random_per_s: float,
    hot_per_s: float,
    offered: float,
    p50: float,
    p99: float,
    tps: float,
) -> dict[str, Any]:
    return {
        "settled_per_s": round(random_per_s, 1),
        "hot_settled_per_s": round(hot_per_s, 1),
        "hot_vs_random": round(hot_per_s / random_per_s, 2),
        "lag_rate_per_s": round(offered, 1),
        "lag_p50_ms": round(p50, 1),
        "lag_p99_ms": round(p99, 1),
        "pgbench_tps": round(tps, 1),
        "settled_vs_pgbench": round(random_per_s / tps, 2),
        "lag_rate_vs_pgbench": round(offered / tps, 2),
        "params": {k: getattr(p, k) for k in p.__dataclass_fields__},
    }


def run(p: PipelineBenchParams) -> dict[str, Any]:
    """Runs on embedded servers of its own (a scratch PostgreSQL and Valkey)."""
    from infra import aio

    with tempfile.TemporaryDirectory(prefix="kizo-bench-") as home:
        pg = EmbeddedPostgres(Path(home) / "pgdata", free_port())
        valkey = EmbeddedValkey(Path(home) / "valkey", free_port(), persist=False)
        try:
            pg.start()
            valkey.start()
            subprocess.run(
                [
                    str(Path(pg_bin()) / "createdb"),
                    "-h",
                    pg.host,
                    "-p",
                    str(pg.port),
                    "-U",
                    "postgres",
                    "pgbench",
                ],
                check=True,
                timeout=60,
            )
            return aio.run(_measure(p, pg, valkey.url()))
        finally:
            valkey.stop()
            pg.stop()
            pg.remove_data()  # run by root, the data lives outside the temporary directory


def pg_bin() -> str:
    from infra.servers import pg_bin_dir

    return str(pg_bin_dir())


def table(report: dict[str, Any]) -> str:
    rows = [
        ("settled transfers/s (random)", report["settled_per_s"]),
        ("  with one SAQ job per intent", report["one_job_per_intent_settled_per_s"]),
        ("settled transfers/s (hot dest)", report["hot_settled_per_s"]),
        ("pgbench tpcb-like TPS", report["pgbench_tps"]),
        ("settled / pgbench", report["settled_vs_pgbench"]),
        ("hot / random", report["hot_vs_random"]),
        ("lag at rate (transfers/s)", report["lag_rate_per_s"]),
        ("lag p50 / p99 ms", f"{report['lag_p50_ms']} / {report['lag_p99_ms']}"),
    ]
    params = ", ".join(f"{k}={v}" for k, v in report["params"].items())
    return "\n".join([f"kizo bench pipeline ({params})"] + [f"  {k:<32} {v}" for k, v in rows])
