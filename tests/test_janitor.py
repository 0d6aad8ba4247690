"""The janitor against real PostgreSQL, Valkey and a real bank process."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from actors.bank_client import BankClient
from actors.janitor import JanitorDeps, flagged_intents, rearm_flagged, run_pass
from actors.janitor_main import open_deps
from actors.routing import QueueSet, queue_name, shard_for
from engine import BANK_SETTLEMENT, Action, NewIntent, Op, apply_batch, system_account
from infra.config import Config, PipelineConfig, PoolsConfig
from infra.servers import free_port
from tests._ledger_helpers import funded, intents
from tests._pipeline_helpers import ENQUEUE_CONCURRENCY, bank_funded, janitor_deps
from tests.conftest import BankProcess, ServerSet, kizo_env

SHARDS = 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = PipelineConfig(
    shards=SHARDS,
    redrive_after_s=0.0,
    resolve_after_s=0.0,
    reconcile_grace_s=0.0,
    redrive_attempts_max=3,
    bank_timeout_s=2,
)


@pytest_asyncio.fixture
async def deps(
    pool: asyncpg.Pool, own_bank: BankProcess, redis_client: Redis
) -> AsyncIterator[JanitorDeps]:
    async with janitor_deps(pool, redis_client, own_bank.url, FAST) as made:
        yield made


async def _job_exists(redis: Redis, key: str, account: uuid.UUID) -> bool:
    name = queue_name(shard_for(account, SHARDS))
    return bool(await redis.exists(f"saq:job:{name}:{key}"))


@pytest.mark.asyncio
async def test_redrive_enqueues_stuck_intents_once_then_backs_off(
    deps: JanitorDeps, redis_client: Redis
) -> None:
    alice, bob = await bank_funded(deps.pool, deps.bank, [100, 0])
    [txn] = await intents(deps.pool, [NewIntent("transfer", alice, bob, 10)])
    first = await run_pass(deps)
    assert first.redriven == 1
    assert await _job_exists(redis_client, f"{txn}#1", alice)  # attempt 1's own job
    second = await run_pass(deps)
    assert second.redriven == 0  # backoff: next attempt not due yet
    assert await deps.pool.fetchval("SELECT attempts FROM transactions WHERE id = $1", txn) == 1


@pytest.mark.asyncio
async def test_the_janitor_relays_a_backlog_ten_times_its_redis_pool(
    tmp_path: Path, db_url: str, servers: ServerSet, own_bank: BankProcess, redis_client: Redis
) -> None:
    # The janitor's own pools and clients, as `kizo janitor` makes them.
    config = Config(
        home=tmp_path,
        database_url=db_url,
        redis_url=servers.redis_url,
        bank_url_override=own_bank.url,
        pipeline=FAST,
        pools=PoolsConfig(janitor_redis_connections_max=8),
    )
    async with open_deps(config) as deps:
        users = await funded(deps.pool, [1_000] * 10)
        pairs = [(users[n % 10], users[(n + 1) % 10]) for n in range(80)]
        backlog = await intents(deps.pool, [NewIntent("transfer", a, b, 1) for a, b in pairs])
        summary = await run_pass(deps)
    assert (summary.redis_ok, summary.redriven) == (True, len(backlog))
    for txn, (source, _) in zip(backlog, pairs, strict=True):
        assert await _job_exists(redis_client, f"{txn}#1", source)


@pytest.mark.asyncio
async def test_attempts_exhausted_flags_needs_attention(deps: JanitorDeps) -> None:
    alice, bob = await bank_funded(deps.pool, deps.bank, [100, 0])
    [txn] = await intents(deps.pool, [NewIntent("transfer", alice, bob, 10)])
    flagged = 0
    for _ in range(FAST.redrive_attempts_max + 1):
        await deps.pool.execute("UPDATE transactions SET next_attempt_at = NULL WHERE id = $1", txn)
        summary = await run_pass(deps)
        flagged += summary.flagged
    row = await deps.pool.fetchrow(
        "SELECT needs_attention, status FROM transactions WHERE id = $1", txn
    )
    assert row is not None
    assert (row["needs_attention"], row["status"]) == (True, "pending")
    assert (flagged, summary.needs_attention) == (1, 1)


@pytest.mark.asyncio
async def test_redis_down_the_rest_of_the_pass_still_runs(deps: JanitorDeps) -> None:
    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    broken = dataclasses.replace(deps, queues=QueueSet(dead, SHARDS, ENQUEUE_CONCURRENCY))
    alice, bob = await bank_funded(deps.pool, deps.bank, [100, 0])
    await intents(deps.pool, [NewIntent("transfer", alice, bob, 10)])
    await deps.pool.execute("UPDATE balances SET posted = posted + 1 WHERE account_id = $1", bob)
    try:
        summary = await run_pass(broken)
    finally:
        await dead.aclose()
    assert not summary.redis_ok
    assert "audit:balance_mismatch" in {f.kind for f in summary.findings}


async def _held_withdrawal(deps: JanitorDeps, amount: int) -> tuple[uuid.UUID, uuid.UUID]:
    pool = deps.pool
    [alice] = await bank_funded(deps.pool, deps.bank, [1_000])
    bank = await system_account(pool, BANK_SETTLEMENT)
    [txn] = await intents(pool, [NewIntent("withdrawal", alice, bank, amount)])
    [held] = await apply_batch(pool, [Op(txn, Action.HOLD)])
    assert held.status == "processing"
    return alice, txn


async def _payouts(bank_url: str, key: uuid.UUID) -> dict[str, object]:
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(f"{bank_url}/payments/{key}")
    assert response.status_code == 200
    return dict(response.json())


@pytest.mark.asyncio
async def test_a_payout_the_bank_made_but_we_never_heard_of_is_posted(
    deps: JanitorDeps, own_bank: BankProcess
) -> None:
    alice, txn = await _held_withdrawal(deps, 400)
    made = await deps.bank.payout(txn, alice, 400, "USD")  # the answer we "lost"
    assert made.outcome == "succeeded"
    summary = await run_pass(deps)
    assert summary.resolved == 1
    assert (
        await deps.pool.fetchval("SELECT status FROM transactions WHERE id = $1", txn) == "settled"
    )
    assert (
        await deps.pool.fetchval("SELECT posted FROM balances WHERE account_id = $1", alice) == 600
    )
    assert (await _payouts(own_bank.url, txn))["status"] == "succeeded"
    assert summary.findings == []


@pytest.mark.asyncio
async def test_a_payout_the_bank_never_saw_is_reissued_once(
    deps: JanitorDeps, own_bank: BankProcess
) -> None:
    alice, txn = await _held_withdrawal(deps, 250)
    summary = await run_pass(deps)
    assert summary.resolved == 1
    assert (
        await deps.pool.fetchval("SELECT status FROM transactions WHERE id = $1", txn) == "settled"
    )
    async with httpx.AsyncClient(timeout=5) as client:
        balance = (await client.get(f"{own_bank.url}/admin/accounts/{alice}")).json()
    assert balance["balance_minor"] == 100_000_000 - 1_000 + 250  # collected once, paid once
    again = await run_pass(deps)
    assert (again.resolved, again.findings) == (0, [])


@pytest.mark.asyncio
async def test_a_bank_payment_without_a_kizo_transaction_is_a_finding(deps: JanitorDeps) -> None:
    stray = uuid.uuid4()
    assert (await deps.bank.payout(stray, uuid.uuid4(), 99, "USD")).outcome == "succeeded"
    summary = await run_pass(deps)
    assert [(f.kind, f.subject) for f in summary.findings] == [("bank_without_kizo", str(stray))]
    stored = await deps.pool.fetch(
        "SELECT kind, subject FROM reconciliation_findings WHERE resolved_at IS NULL"
    )
    assert [(r["kind"], r["subject"]) for r in stored] == [("bank_without_kizo", str(stray))]
    await run_pass(deps)  # recurring: still one open row
    assert await deps.pool.fetchval("SELECT count(*) FROM reconciliation_findings") == 1


def _janitor_once(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kizo.cli", "janitor", "--once"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


@pytest.mark.asyncio
async def test_kizo_janitor_once_exit_code_speaks_for_the_ledger(
    servers: ServerSet, db_url: str, deps: JanitorDeps, own_bank: BankProcess
) -> None:
    pool = deps.pool
    alice, bob = await bank_funded(deps.pool, deps.bank, [500, 0])
    [txn] = await intents(pool, [NewIntent("transfer", alice, bob, 100)])
    await apply_batch(pool, [Op(txn, Action.TRANSFER)])
    env = kizo_env(
        servers,
        db_url,
        KIZO_BANK_PORT=own_bank.url.rsplit(":", 1)[1],
        KIZO_RECONCILE_GRACE_S="0",
        KIZO_SHARDS=str(SHARDS),
    )
    clean = await asyncio.to_thread(_janitor_once, env)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "findings=0" in clean.stdout
    # Corrupt one posting: the janitor must say so and exit 1.
    await pool.execute(
        "UPDATE postings SET amount_minor = amount_minor + 1"
        " WHERE transaction_id = $1 AND amount_minor > 0",
        txn,
    )
    dirty = await asyncio.to_thread(_janitor_once, env)
    assert dirty.returncode == 1
    assert "finding audit:transaction_unbalanced" in dirty.stdout
    assert "Traceback" not in dirty.stderr


async def _flag(deps: JanitorDeps, txn: uuid.UUID) -> None:
    """Spend the intent's whole re-drive budget, as a bank down for long would."""
    await deps.pool.execute(
        "UPDATE transactions SET attempts = $2, needs_attention = true, next_attempt_at = now()"
        " WHERE id = $1",
        txn,
        FAST.redrive_attempts_max + 1,
    )


@pytest.mark.asyncio
async def test_flagged_deposits_are_rearmed_when_the_bank_answers_again_transfers_are_not(
    deps: JanitorDeps,
) -> None:
    alice, bob = await bank_funded(deps.pool, deps.bank, [100, 0])
    bank = await system_account(deps.pool, BANK_SETTLEMENT)
    deposit, transfer = await intents(
        deps.pool, [NewIntent("deposit", bank, alice, 7), NewIntent("transfer", alice, bob, 5)]
    )
    for txn in (deposit, transfer):
        await _flag(deps, txn)
    # The bank unreachable (nothing listens there): nothing is re-armed.
    async with janitor_deps(deps.pool, deps.queues.redis, f"http://127.0.0.1:{free_port()}",
                            FAST) as cut_off:  # fmt: skip
        down = await run_pass(cut_off)
    assert (down.rearmed, down.needs_attention, down.bank_ok) == (0, 2, False)
    # The bank answers: the deposit gets a fresh budget and is re-driven in the same pass.
    up = await run_pass(deps)
    assert (up.rearmed, up.redriven, up.needs_attention) == (1, 1, 1)
    row = await deps.pool.fetchrow(
        "SELECT needs_attention, attempts, rearms FROM transactions WHERE id = $1", deposit
    )
    assert row is not None and tuple(row) == (False, 1, 1)
    assert await deps.pool.fetchval(
        "SELECT needs_attention FROM transactions WHERE id = $1", transfer
    )


@pytest.mark.asyncio
async def test_rearms_stop_at_their_bound_and_an_operator_rearm_starts_the_count_again(
    deps: JanitorDeps,
) -> None:
    alice = (await bank_funded(deps.pool, deps.bank, [100]))[0]
    bank = await system_account(deps.pool, BANK_SETTLEMENT)
    [deposit] = await intents(deps.pool, [NewIntent("deposit", bank, alice, 7)])
    for _ in range(FAST.rearm_max):
        await _flag(deps, deposit)
        assert (await run_pass(deps)).rearmed == 1
    await _flag(deps, deposit)
    assert (await run_pass(deps)).rearmed == 0  # past KIZO_REARM_MAX: the operator's call
    ids = await rearm_flagged(deps.pool, ["deposit", "withdrawal", "transfer"], 10,
                              by_operator=True)  # fmt: skip
    assert ids == [deposit]
    assert await deps.pool.fetchval("SELECT rearms FROM transactions WHERE id = $1", deposit) == 0
    count, rows = await flagged_intents(deps.pool, 10)
    assert (count, rows) == (0, [])


@pytest.mark.asyncio
async def test_a_bank_that_cannot_be_connected_to_leaves_a_payment_unsent() -> None:
    """Refused at connect: the request never left, so the deposit may stay pending for the
    re-drive (not processing, an unknown outcome), and the health check says no."""
    from actors._actor import _after_bank

    bank = BankClient(f"http://127.0.0.1:{free_port()}", timeout_s=1, retries_max=1)
    try:
        result = await bank.collect(uuid.uuid4(), uuid.uuid4(), 5, "USD")
        assert result.outcome == "unsent"
        assert not await bank.healthy()
    finally:
        await bank.aclose()
    assert _after_bank({"id": uuid.uuid4(), "kind": "deposit"}, result) is None  # type: ignore[arg-type]
