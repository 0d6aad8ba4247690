"""``kizo bench ledger``: transfers straight through the engine, against pgbench, in one run.

Setup (untimed): a scratch database on one server, ``accounts`` funded user accounts, and
``transfers`` pending intents per workload. Timed: ``clients`` connections each take the next
batch of ``batch_size`` intents and apply it with ``engine.apply_batch`` until none are left.
Then pgbench (tpcb-like, the same client count) runs against the same server. The figures are
ratios measured in one run, so the noisy shared machine affects both sides alike.

Workloads:
- random: source and destination drawn uniformly from all accounts;
- hot_dest: every transfer pays one merchant account (its balance row is locked by every batch);
- hot_source: one funded account pays everyone (every batch debits the same row).
``hot_transfers_per_s`` is the slower of the two hot workloads.
"""

from __future__ import annotations

import asyncio
import random
import re
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from engine import (
    BANK_SETTLEMENT,
    Action,
    NewIntent,
    Op,
    apply_batch,
    audit,
    create_intents,
    ensure_system_accounts,
    open_accounts,
    system_account,
)
from infra import aio
from infra.config import PoolsConfig
from infra.db import create_pool
from infra.migrate import migrate
from infra.servers import EmbeddedPostgres, free_port, pg_bin_dir

SETUP_CHUNK = 5000


@dataclass(frozen=True)
class LedgerBenchParams:
    transfers: int = 40_000
    accounts: int = 20_000
    batch_size: int = 200
    clients: int = 4
    pgbench_seconds: int = 10
    seed: int = 1
    currency: str = "USD"
    pgbench_scale: int = 10


@dataclass(frozen=True)
class WorkloadResult:
    name: str
    transfers: int
    seconds: float
    batch_p50_ms: float
    batch_p99_ms: float

    @property
    def per_s(self) -> float:
        return self.transfers / self.seconds


async def admin_sql(base_url: str, sql: str) -> None:
    conn = await asyncpg.connect(f"{base_url}/postgres", timeout=30)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def setup_funded_ledger(url: str, accounts: int, currency: str) -> list[uuid.UUID]:
    """Migrate a scratch database and open ``accounts`` funded user accounts (untimed setup,
    shared by both benchmarks)."""
    conn = await asyncpg.connect(url, timeout=30)
    try:
        await migrate(conn)
        await ensure_system_accounts(conn, currency)
        bank = await system_account(conn, BANK_SETTLEMENT)
        users = await open_accounts(conn, [None] * accounts, currency)
        for start in range(0, len(users), SETUP_CHUNK):
            chunk = users[start : start + SETUP_CHUNK]
            deposits = await create_intents(
                conn,
                [NewIntent("deposit", bank, a, 10**9) for a in chunk],
                currency=currency,
                amount_max_minor=10**12,
            )
            await apply_batch(conn, [Op(t.id, Action.CREDIT) for t in deposits])
        return users
    finally:
        await conn.close()


def _pairs(
    name: str, accounts: Sequence[uuid.UUID], n: int, rng: random.Random
) -> list[tuple[uuid.UUID, uuid.UUID]]:
    hot = accounts[0]
    pairs = []
    for _ in range(n):
        a, b = rng.sample(accounts[1:], 2)
        if name == "hot_dest":
            a, b = a, hot
        elif name == "hot_source":
            a, b = hot, b
        pairs.append((a, b))
    return pairs


async def _create(
    url: str, pairs: Sequence[tuple[uuid.UUID, uuid.UUID]], p: LedgerBenchParams, rng: random.Random
) -> list[uuid.UUID]:
    conn = await asyncpg.connect(url, timeout=30)
    try:
        ids: list[uuid.UUID] = []
        for start in range(0, len(pairs), SETUP_CHUNK):
            chunk = pairs[start : start + SETUP_CHUNK]
            created = await create_intents(
                conn,
                [NewIntent("transfer", a, b, rng.randint(1, 10_000)) for a, b in chunk],
                currency=p.currency,
                amount_max_minor=10**12,
            )
            ids.extend(t.id for t in created)
        return ids
    finally:
        await conn.close()


async def _apply_all(
    pool: asyncpg.Pool, ids: list[uuid.UUID], p: LedgerBenchParams
) -> tuple[float, list[float]]:
    batches = [ids[i : i + p.batch_size] for i in range(0, len(ids), p.batch_size)]
    next_batch = iter(batches)
    latencies_ms: list[float] = []

    async def client() -> None:
        async with pool.acquire() as conn:
            for batch in next_batch:  # the iterator is shared: each batch goes to one client
                started = time.perf_counter()
                outcomes = await apply_batch(conn, [Op(t, Action.TRANSFER) for t in batch])
                latencies_ms.append((time.perf_counter() - started) * 1000)
                assert all(o.applied for o in outcomes)

    started = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(p.clients):
            tg.create_task(client())
    return time.perf_counter() - started, latencies_ms


def _percentile(values: Sequence[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def _workload(
    name: str, url: str, accounts: list[uuid.UUID], p: LedgerBenchParams, rng: random.Random
) -> WorkloadResult:
    ids = await _create(url, _pairs(name, accounts, p.transfers, rng), p, rng)
    # One connection per client, held for the whole run: nothing waits for the pool.
    pool = await create_pool(
        url, min_size=p.clients, max_size=p.clients, acquire_timeout_s=PoolsConfig.wait_s
    )
    try:
        seconds, latencies = await _apply_all(pool, ids, p)
    finally:
        await pool.close()
    return WorkloadResult(
        name, len(ids), seconds, _percentile(latencies, 50), _percentile(latencies, 99)
    )


async def _check_clean(url: str) -> None:
    conn = await asyncpg.connect(url, timeout=30)
    try:
        findings = await audit(conn)
        open_count = await conn.fetchval(
            "SELECT count(*) FROM transactions WHERE status NOT IN ('settled', 'failed')"
        )
    finally:
        await conn.close()
    if findings or open_count:
        raise RuntimeError(
            f"ledger not clean after the benchmark: {findings[:5]}, {open_count} intents not final"
        )


def run_pgbench(
    host: str, port: int, database: str, clients: int, seconds: int, scale: int
) -> float:
    """pgbench tpcb-like against ``database``; returns transactions per second."""
    pgbench_init(host, port, database, scale)
    return pgbench_tps(host, port, database, clients, seconds)


def _pgbench_args(host: str, port: int) -> list[str]:
    return [str(pg_bin_dir() / "pgbench"), "-h", host, "-p", str(port), "-U", "postgres"]


def pgbench_init(host: str, port: int, database: str, scale: int) -> None:
    subprocess.run(
        [*_pgbench_args(host, port), "-i", "-q", "-s", str(scale), database],
        check=True,
        capture_output=True,
        timeout=300,
    )


def pgbench_tps(
    host: str, port: int, database: str, clients: int, seconds: int, *, select_only: bool = False
) -> float:
    """One pgbench run on an initialised ``database`` (tpcb-like, or select-only with ``-S``);
    returns transactions per second."""
    builtin = ["-S"] if select_only else []
    out = subprocess.run(
        [
            *_pgbench_args(host, port),
            *builtin,
            "-c",
            str(clients),
            "-j",
            str(min(clients, 2)),
            "-T",
            str(seconds),
            "-M",
            "prepared",
            "-n",
            database,
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=seconds + 120,
    ).stdout
    match = re.search(r"tps = ([0-9.]+)", out)
    if match is None:
        raise RuntimeError(f"could not read pgbench's TPS from: {out[-500:]}")
    return float(match.group(1))


async def bench_on_server(host: str, port: int, p: LedgerBenchParams) -> dict[str, Any]:
    base = f"postgresql://postgres@{host}:{port}"
    db, pgb = f"kizo_bench_{uuid.uuid4().hex[:8]}", f"kizo_pgbench_{uuid.uuid4().hex[:8]}"
    await admin_sql(base, f"CREATE DATABASE {db}")
    await admin_sql(base, f"CREATE DATABASE {pgb}")
    try:
        url = f"{base}/{db}"
        rng = random.Random(p.seed)
        accounts = await setup_funded_ledger(url, p.accounts, p.currency)
        results = {}
        for name in ("random", "hot_dest", "hot_source"):
            results[name] = await _workload(name, url, accounts, p, rng)
        await _check_clean(url)
        tps = await asyncio.to_thread(
            run_pgbench, host, port, pgb, p.clients, p.pgbench_seconds, p.pgbench_scale
        )
    finally:
        await admin_sql(base, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        await admin_sql(base, f"DROP DATABASE IF EXISTS {pgb} WITH (FORCE)")
    return _report(results, tps, p)


def _report(results: dict[str, WorkloadResult], tps: float, p: LedgerBenchParams) -> dict[str, Any]:
    random_per_s = results["random"].per_s
    hot_per_s = min(results["hot_dest"].per_s, results["hot_source"].per_s)
    report: dict[str, Any] = {
        "random_transfers_per_s": round(random_per_s, 1),
        "hot_transfers_per_s": round(hot_per_s, 1),
        "hot_dest_transfers_per_s": round(results["hot_dest"].per_s, 1),
        "hot_source_transfers_per_s": round(results["hot_source"].per_s, 1),
        "pgbench_tps": round(tps, 1),
        "random_vs_pgbench": round(random_per_s / tps, 2),
        "hot_vs_random": round(hot_per_s / random_per_s, 2),
        "params": {
            "transfers": p.transfers,
            "accounts": p.accounts,
            "batch_size": p.batch_size,
            "clients": p.clients,
            "pgbench_seconds": p.pgbench_seconds,
            "pgbench_scale": p.pgbench_scale,
            "seed": p.seed,
        },
    }
    for name, r in results.items():
        report[f"{name}_batch_p50_ms"] = round(r.batch_p50_ms, 2)
        report[f"{name}_batch_p99_ms"] = round(r.batch_p99_ms, 2)
    return report


def run(p: LedgerBenchParams, database_url: str | None) -> dict[str, Any]:
    """Run on the server of ``database_url``, or on an embedded server of our own."""
    if database_url is not None:
        match = re.match(r"postgres(?:ql)?://[^@]*@?([^:/]+):?(\d+)?", database_url)
        if match is None:
            raise ValueError("DATABASE_URL must look like postgresql://user@host:port/db")
        return aio.run(bench_on_server(match.group(1), int(match.group(2) or 5432), p))
    with tempfile.TemporaryDirectory(prefix="kizo-bench-") as home:
        pg = EmbeddedPostgres(Path(home) / "pgdata", free_port())
        try:
            pg.start()
            return aio.run(bench_on_server(pg.host, pg.port, p))
        finally:
            pg.stop()
            pg.remove_data()  # run by root, the data lives outside the temporary directory


def table(report: dict[str, Any]) -> str:
    rows = [
        ("random transfers/s", report["random_transfers_per_s"]),
        ("hot destination transfers/s", report["hot_dest_transfers_per_s"]),
        ("hot source transfers/s", report["hot_source_transfers_per_s"]),
        ("pgbench tpcb-like TPS", report["pgbench_tps"]),
        ("random / pgbench", report["random_vs_pgbench"]),
        ("hot / random", report["hot_vs_random"]),
        (
            "random batch p50 / p99 ms",
            f"{report['random_batch_p50_ms']} / {report['random_batch_p99_ms']}",
        ),
    ]
    params = ", ".join(f"{k}={v}" for k, v in report["params"].items())
    return "\n".join([f"kizo bench ledger ({params})"] + [f"  {k:<30} {v}" for k, v in rows])
