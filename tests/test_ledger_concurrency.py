"""Several connections applying overlapping batches on the same hot accounts at once."""

from __future__ import annotations

import asyncio
import random
import uuid

import asyncpg
import pytest

from engine import (
    BANK_SETTLEMENT,
    Action,
    NewIntent,
    Op,
    RetriesExhausted,
    apply_batch,
    audit,
    system_account,
    with_retries,
)
from tests._ledger_helpers import funded, intents

CLIENTS = 6
BATCHES_PER_CLIENT = 12
BATCH_SIZE = 40


def _pairs(rng: random.Random, users: list[uuid.UUID]) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """A mix in which two accounts are hot: users[0] pays many, users[1] is paid by many."""
    pairs = []
    for n in range(CLIENTS * BATCHES_PER_CLIENT * BATCH_SIZE):
        a, b = rng.sample(users[2:], 2)
        pairs.append([(users[0], b), (a, users[1]), (a, b)][n % 3])
    return pairs


@pytest.mark.asyncio
async def test_overlapping_batches_on_hot_accounts_conserve_money(pool: asyncpg.Pool) -> None:
    rng = random.Random(7)
    users = await funded(pool, [200_000, 0] + [8_000] * 30)
    bank = await system_account(pool, BANK_SETTLEMENT)
    pairs = _pairs(rng, users)
    ids = await intents(pool, [NewIntent("transfer", a, b, rng.randint(1, 300)) for a, b in pairs])
    # Each client applies its own slice, in a shuffled order, plus a copy of a neighbour's
    # batch, so the same intents are also raced by two connections at once.
    slices = [ids[i::CLIENTS] for i in range(CLIENTS)]

    async def client(n: int) -> None:
        mine = slices[n] + slices[(n + 1) % CLIENTS][: BATCH_SIZE * 2]
        random.Random(n).shuffle(mine)
        for start in range(0, len(mine), BATCH_SIZE):
            await apply_batch(
                pool, [Op(t, Action.TRANSFER) for t in mine[start : start + BATCH_SIZE]]
            )

    async with asyncio.TaskGroup() as tg:
        for n in range(CLIENTS):
            tg.create_task(client(n))

    assert await audit(pool) == []
    statuses = await pool.fetch(
        "SELECT status, count(*) AS n FROM transactions WHERE id = ANY($1::uuid[]) GROUP BY 1", ids
    )
    by_status = {r["status"]: r["n"] for r in statuses}
    assert set(by_status) <= {"settled", "failed"}
    assert sum(by_status.values()) == len(ids)
    assert by_status.get("settled", 0) > len(ids) // 2
    # Conservation: every balance is its postings' sum (audit) and all of them sum to zero;
    # the users together hold exactly what the bank paid in.
    total = await pool.fetchval("SELECT sum(posted) FROM balances")
    users_total = await pool.fetchval(
        "SELECT sum(posted) FROM balances WHERE account_id = ANY($1::uuid[])", users
    )
    bank_posted = await pool.fetchval("SELECT posted FROM balances WHERE account_id = $1", bank)
    assert total == 0
    assert users_total == -bank_posted == 200_000 + 8_000 * 30
    # No lost update: replaying the settled set in a model gives every final balance.
    settled = await pool.fetch(
        "SELECT source_id, dest_id, amount_minor FROM transactions"
        " WHERE id = ANY($1::uuid[]) AND status = 'settled'",
        ids,
    )
    expected = dict.fromkeys(users, 0) | {users[0]: 200_000} | dict.fromkeys(users[2:], 8_000)
    for row in settled:
        expected[row["source_id"]] -= row["amount_minor"]
        expected[row["dest_id"]] += row["amount_minor"]
    final = await pool.fetch(
        "SELECT account_id, posted FROM balances WHERE account_id = ANY($1::uuid[])", users
    )
    assert {r["account_id"]: r["posted"] for r in final} == expected
    assert min(expected.values()) >= 0


async def _lock_in_order(
    url: str, first: uuid.UUID, second: uuid.UUID, gate: asyncio.Event, ready: asyncio.Event
) -> None:
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.execute("SELECT 1 FROM balances WHERE account_id = $1 FOR UPDATE", first)
            ready.set()
            await gate.wait()
            await conn.execute("SELECT 1 FROM balances WHERE account_id = $1 FOR UPDATE", second)
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_a_real_deadlock_is_retried_and_then_succeeds(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        a, b = await funded(conn, [1, 1])
    finally:
        await conn.close()
    attempts = 0

    async def attempt() -> str:
        nonlocal attempts
        attempts += 1
        if attempts > 1:
            return "done"
        gate, ready_a, ready_b = asyncio.Event(), asyncio.Event(), asyncio.Event()
        left = asyncio.create_task(_lock_in_order(db_url, a, b, gate, ready_a))
        right = asyncio.create_task(_lock_in_order(db_url, b, a, gate, ready_b))
        await asyncio.wait_for(asyncio.gather(ready_a.wait(), ready_b.wait()), 10)
        gate.set()
        results = await asyncio.gather(left, right, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == 1  # PostgreSQL broke the cycle by failing exactly one side
        raise errors[0]

    result = await with_retries(attempt, attempts_max=3, backoff_base_s=0.001, backoff_max_s=0.01)
    assert (result, attempts) == ("done", 2)


@pytest.mark.asyncio
async def test_retries_are_bounded(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    calls = 0

    async def always_conflicts() -> None:
        nonlocal calls
        calls += 1
        # A real serialization failure, raised by the server on purpose.
        await conn.execute(
            "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = 'serialization_failure'; END $$"
        )

    try:
        with pytest.raises(RetriesExhausted):
            await with_retries(
                always_conflicts, attempts_max=4, backoff_base_s=0.001, backoff_max_s=0.005
            )
    finally:
        await conn.close()
    assert calls == 4


@pytest.mark.asyncio
async def test_other_database_errors_are_not_retried(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    calls = 0

    async def broken() -> None:
        nonlocal calls
        calls += 1
        await conn.execute("SELECT * FROM no_such_table")

    try:
        with pytest.raises(asyncpg.UndefinedTableError):
            await with_retries(broken, attempts_max=4, backoff_base_s=0.001, backoff_max_s=0.005)
    finally:
        await conn.close()
    assert calls == 1
