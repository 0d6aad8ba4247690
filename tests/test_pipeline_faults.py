"""Faults in the settlement pipeline: a worker killed, Redis gone, the bank dropping answers.

After each, every intent is final, nothing was paid twice, and a janitor pass reports zero
findings. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import random
import signal
import uuid
from collections.abc import AsyncIterator, Sequence

import asyncpg
import httpx
import pytest
import pytest_asyncio
import redis.exceptions
from redis.asyncio import Redis

from actors.janitor import JanitorDeps, run_pass
from actors.routing import QueueSet
from engine import BANK_SETTLEMENT, NewIntent, system_account
from infra.config import PipelineConfig
from tests._ledger_helpers import intents
from tests._pipeline_helpers import (
    ENQUEUE_CONCURRENCY,
    SHARDS,
    bank_funded,
    enqueue,
    janitor_deps,
    janitor_until_quiet,
    start_worker,
    stop_worker,
    until_some_final,
    wait_final,
    with_janitor,
)
from tests.conftest import BankProcess, ServerSet

FAST = PipelineConfig(
    shards=SHARDS,
    redrive_after_s=0.5,
    redrive_backoff_base_s=0.5,
    resolve_after_s=0.0,
    reconcile_grace_s=0.0,
    bank_timeout_s=2,
)


@pytest_asyncio.fixture
async def deps(
    pool: asyncpg.Pool, own_bank: BankProcess, redis_client: Redis
) -> AsyncIterator[JanitorDeps]:
    async with janitor_deps(pool, redis_client, own_bank.url, FAST) as made:
        yield made


async def _assert_clean(deps: JanitorDeps, txn_ids: Sequence[object]) -> None:
    summary = await janitor_until_quiet(deps)
    assert summary.findings == []
    open_count = await deps.pool.fetchval(
        "SELECT count(*) FROM transactions WHERE status NOT IN ('settled', 'failed')"
    )
    assert open_count == 0


@pytest.mark.asyncio
async def test_worker_killed_mid_flight_then_restarted(
    servers: ServerSet, db_url: str, deps: JanitorDeps, own_bank: BankProcess
) -> None:
    rng = random.Random(11)
    users = await bank_funded(deps.pool, deps.bank, [50_000] * 40)
    pairs = [rng.sample(users, 2) for _ in range(4000)]
    ids = await intents(
        deps.pool, [NewIntent("transfer", a, b, rng.randint(1, 100)) for a, b in pairs]
    )
    worker = start_worker(servers, db_url, own_bank.url)
    try:
        await enqueue(deps.pool, servers.redis_url, ids)
        done = await until_some_final(deps.pool, ids)
        assert stop_worker(worker, signal.SIGKILL) == -signal.SIGKILL
        assert 0 < done < len(ids)
        worker = start_worker(servers, db_url, own_bank.url)
        # The dead worker's jobs are stuck "active" in SAQ; the janitor re-drives their intents.
        await with_janitor(deps, wait_final(deps.pool, ids, timeout_s=90))
    finally:
        stop_worker(worker)
    await _assert_clean(deps, ids)
    postings = await deps.pool.fetchval(
        "SELECT count(*) FROM postings p JOIN transactions t ON t.id = p.transaction_id"
        " WHERE t.kind = 'transfer'"
    )
    settled = await deps.pool.fetchval(
        "SELECT count(*) FROM transactions WHERE kind = 'transfer' AND status = 'settled'"
    )
    assert postings == 2 * settled


@pytest.mark.asyncio
async def test_redis_down_while_intents_are_created_then_back(
    servers: ServerSet, db_url: str, deps: JanitorDeps, own_bank: BankProcess
) -> None:
    if servers.valkey is None:
        pytest.skip("needs the embedded Valkey to stop and start it")
    users = await bank_funded(deps.pool, deps.bank, [5_000] * 6)
    worker = start_worker(servers, db_url, own_bank.url)
    try:
        servers.valkey.kill()
        ids = await intents(
            deps.pool,
            [NewIntent("transfer", users[i % 6], users[(i + 1) % 6], 10 + i) for i in range(60)],
        )
        with pytest.raises((redis.exceptions.ConnectionError, OSError)):
            await enqueue(deps.pool, servers.redis_url, ids)  # what the API meets: it answers 202
        servers.valkey.start()
        await asyncio.sleep(FAST.redrive_after_s)
        fresh = Redis.from_url(servers.redis_url, socket_timeout=5)
        try:
            relay = JanitorDeps(
                deps.pool, QueueSet(fresh, SHARDS, ENQUEUE_CONCURRENCY), deps.bank, FAST
            )
            summary = await janitor_until_quiet(relay)
            assert summary.redis_ok
            await wait_final(deps.pool, ids, timeout_s=60)
            await _assert_clean(relay, ids)
        finally:
            await fresh.aclose()
    finally:
        stop_worker(worker)
    statuses = await deps.pool.fetch(
        "SELECT DISTINCT status FROM transactions WHERE id = ANY($1::uuid[])", ids
    )
    assert [r["status"] for r in statuses] == ["settled"]


@pytest.mark.asyncio
async def test_bank_drops_payout_answers_no_double_payout(
    servers: ServerSet, db_url: str, deps: JanitorDeps, own_bank: BankProcess
) -> None:
    users = await bank_funded(deps.pool, deps.bank, [10_000] * 5)
    bank_account = await system_account(deps.pool, BANK_SETTLEMENT)
    async with httpx.AsyncClient(base_url=own_bank.url, timeout=5) as client:
        await client.put("/admin/faults", json={"drop_rate": 1.0, "seed": 2})
        ids = await intents(
            deps.pool, [NewIntent("withdrawal", u, bank_account, 1_000) for u in users]
        )
        worker = start_worker(servers, db_url, own_bank.url, KIZO_BANK_TIMEOUT_S="0.5")
        try:
            await enqueue(deps.pool, servers.redis_url, ids)
            counts = await wait_final(deps.pool, ids, timeout_s=30, final=("processing",))
            assert counts == {
                "processing": len(ids)
            }  # outcome unknown: neither posted nor released
        finally:
            stop_worker(worker)
        await client.delete("/admin/faults")
        # Let the bank finish any request still in flight before the janitor asks it by key.
        await asyncio.sleep(3.5)
        await _assert_clean(deps, ids)
        for user, txn in zip(users, ids, strict=True):
            payment = (await client.get(f"/payments/{txn}")).json()
            assert (payment["kind"], payment["status"]) == ("payout", "succeeded")
            account = (await client.get(f"/admin/accounts/{user}")).json()
            assert account["balance_minor"] == 100_000_000 - 10_000 + 1_000  # paid out once
    rows = await deps.pool.fetch(
        "SELECT b.posted, b.pending FROM balances b WHERE account_id = ANY($1::uuid[])", users
    )
    assert {(r["posted"], r["pending"]) for r in rows} == {(9_000, 0)}


@pytest.mark.asyncio
async def test_deposits_whose_requests_the_bank_lost_are_never_credited_until_it_collects(
    servers: ServerSet, db_url: str, deps: JanitorDeps, own_bank: BankProcess
) -> None:
    users = await bank_funded(deps.pool, deps.bank, [0] * 4)
    bank_account = await system_account(deps.pool, BANK_SETTLEMENT)
    async with httpx.AsyncClient(base_url=own_bank.url, timeout=5) as client:
        # Every request read and lost unprocessed: to the worker, the same "no answer" as a
        # dropped one.
        await client.put("/admin/faults", json={"lose_rate": 1.0, "seed": 4})
        ids = await intents(deps.pool, [NewIntent("deposit", bank_account, u, 700) for u in users])
        worker = start_worker(servers, db_url, own_bank.url, KIZO_BANK_TIMEOUT_S="0.5")
        try:
            await enqueue(deps.pool, servers.redis_url, ids)
            counts = await wait_final(deps.pool, ids, timeout_s=30, final=("processing",))
            assert counts == {"processing": len(ids)}  # unknown: not credited, not failed
            # The janitor asks by key (404: never collected) and re-issues, lost again: still
            # nothing credited.
            await run_pass(deps)
            assert await wait_final(deps.pool, ids, timeout_s=5, final=("processing",))
            for txn in ids:
                assert (await client.get(f"/payments/{txn}")).status_code == 404
        finally:
            stop_worker(worker)
        await client.delete("/admin/faults")
        await _assert_clean(deps, ids)  # the janitor's re-issue now lands: collected once
        for user, txn in zip(users, ids, strict=True):
            payment = (await client.get(f"/payments/{txn}")).json()
            assert (payment["kind"], payment["status"]) == ("collection", "succeeded")
            account = (await client.get(f"/admin/accounts/{user}")).json()
            assert account["balance_minor"] == 100_000_000 - 700
    rows = await deps.pool.fetch(
        "SELECT b.posted, b.pending FROM balances b WHERE account_id = ANY($1::uuid[])", users
    )
    assert {(r["posted"], r["pending"]) for r in rows} == {(700, 0)}


# A statement of the batch fails after the batch began (its intents and balances locked): every
# insert into postings is refused. NOT VALID: the rows already there are not checked.
BATCH_FAULT_ON = "ALTER TABLE postings ADD CONSTRAINT injected_fault CHECK (false) NOT VALID"
BATCH_FAULT_OFF = "ALTER TABLE postings DROP CONSTRAINT injected_fault"
JOBS_POLL_S = 0.1
JOBS_RETRIED_S_MAX = 30.0


async def _jobs_while_batches_fail(
    pool: asyncpg.Pool, queues: QueueSet, jobs: dict[str, uuid.UUID]
) -> set[str]:
    """Polls (bounded) until every job has failed or been retried; at every look no job may be
    complete, since the fault leaves every intent pending. The statuses seen."""
    seen: set[str] = set()
    deadline = asyncio.get_running_loop().time() + JOBS_RETRIED_S_MAX
    while True:
        found = [await queues.for_account(account).job(key) for key, account in jobs.items()]
        pending = await pool.fetchval(
            "SELECT count(*) FROM transactions WHERE id = ANY($1::uuid[]) AND status = 'pending'",
            [uuid.UUID(key) for key in jobs],
        )
        assert pending == len(jobs), "a transfer settled although every posting write fails"
        statuses = [job.status.value if job is not None else "gone" for job in found]
        seen.update(statuses)
        done = [k for k, s in zip(jobs, statuses, strict=True) if s in ("complete", "gone")]
        assert not done, f"{len(done)} jobs reported done while their intents are pending"
        if all(j is not None and (j.status.value == "failed" or j.attempts >= 2) for j in found):
            return seen
        assert asyncio.get_running_loop().time() < deadline, f"jobs never retried: {seen}"
        await asyncio.sleep(JOBS_POLL_S)


@pytest.mark.asyncio
async def test_a_batch_whose_statement_fails_leaves_its_jobs_retried_or_failed_never_done(
    servers: ServerSet, db_url: str, deps: JanitorDeps, own_bank: BankProcess
) -> None:
    rng = random.Random(7)
    users = await bank_funded(deps.pool, deps.bank, [10_000] * 6)
    pairs = [rng.sample(users, 2) for _ in range(40)]
    ids = await intents(
        deps.pool, [NewIntent("transfer", a, b, rng.randint(1, 50)) for a, b in pairs]
    )
    jobs = {str(t): a for t, (a, _b) in zip(ids, pairs, strict=True)}  # transfers: the source's
    await deps.pool.execute(BATCH_FAULT_ON)
    worker = start_worker(servers, db_url, own_bank.url)
    try:
        await enqueue(deps.pool, servers.redis_url, ids)
        seen = await _jobs_while_batches_fail(deps.pool, deps.queues, jobs)
        # Anything but done: waiting for a retry, running, out of retries, or being aborted by
        # SAQ (a job past its timeout on a loaded machine).
        assert seen <= {"queued", "active", "failed", "aborting", "aborted"}, seen
        await deps.pool.execute(BATCH_FAULT_OFF)
        # Jobs that ran out of retries are the janitor's to re-drive; the ledger applies once.
        await with_janitor(deps, wait_final(deps.pool, ids, timeout_s=60))
    finally:
        stop_worker(worker)
    await _assert_clean(deps, ids)
    counts = await deps.pool.fetchrow(
        "SELECT count(*) FILTER (WHERE t.status = 'settled'),"
        " (SELECT count(*) FROM postings p WHERE p.transaction_id = ANY($1::uuid[]))"
        " FROM transactions t WHERE t.id = ANY($1::uuid[])",
        ids,
    )
    assert counts is not None and tuple(counts) == (len(ids), 2 * len(ids))  # each moved once
