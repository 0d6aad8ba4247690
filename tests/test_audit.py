"""Every audit check speaks when the ledger is corrupted in the way it exists to catch."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from engine import (
    BANK_SETTLEMENT,
    CHECKS,
    Action,
    Conn,
    NewIntent,
    Op,
    apply_batch,
    audit,
    system_account,
)
from tests._ledger_helpers import funded, intents


async def _ledger(pool: asyncpg.Pool) -> tuple[list[uuid.UUID], uuid.UUID, uuid.UUID]:
    """Two funded users, one settled transfer between them, and one failed transfer."""
    users = await funded(pool, [1000, 1000])
    settled, failed = await intents(
        pool,
        [
            NewIntent("transfer", users[0], users[1], 100),
            NewIntent("transfer", users[1], users[0], 5000),
        ],
    )
    await apply_batch(pool, [Op(settled, Action.TRANSFER), Op(failed, Action.TRANSFER)])
    assert await audit(pool) == []
    return users, settled, failed


Corruption = Callable[[Conn, list[uuid.UUID], uuid.UUID, uuid.UUID], Awaitable[None]]


async def _unbalanced(c: Conn, users: list[uuid.UUID], ok: uuid.UUID, _f: uuid.UUID) -> None:
    # One extra posting that credits an account out of nowhere, with its balance kept in step.
    await c.execute(
        "INSERT INTO postings (transaction_id, account_id, amount_minor, balance_after)"
        " VALUES ($1, $2, 7, 1107)",
        ok,
        users[1],
    )
    await c.execute("UPDATE balances SET posted = posted + 7 WHERE account_id = $1", users[1])


async def _balance_bumped(c: Conn, users: list[uuid.UUID], _o: uuid.UUID, _f: uuid.UUID) -> None:
    await c.execute("UPDATE balances SET posted = posted + 1 WHERE account_id = $1", users[0])


async def _fake_hold(c: Conn, users: list[uuid.UUID], _o: uuid.UUID, _f: uuid.UUID) -> None:
    await c.execute("UPDATE balances SET pending = 10 WHERE account_id = $1", users[0])


async def _negative(c: Conn, users: list[uuid.UUID], ok: uuid.UUID, _f: uuid.UUID) -> None:
    # Drain a user below zero by postings and balance alike, past the table's own guard.
    await c.execute("ALTER TABLE balances DROP CONSTRAINT balances_check")
    await c.execute(
        "INSERT INTO postings (transaction_id, account_id, amount_minor, balance_after)"
        " VALUES ($1, $2, -5000, -4100)",
        ok,
        users[0],
    )
    await c.execute("UPDATE balances SET posted = posted - 5000 WHERE account_id = $1", users[0])


async def _wrong_after(c: Conn, _u: list[uuid.UUID], ok: uuid.UUID, _f: uuid.UUID) -> None:
    await c.execute(
        "UPDATE postings SET balance_after = balance_after + 1 WHERE transaction_id = $1", ok
    )


async def _settled_bare(c: Conn, _u: list[uuid.UUID], ok: uuid.UUID, _f: uuid.UUID) -> None:
    await c.execute("DELETE FROM postings WHERE transaction_id = $1", ok)


async def _failed_with_postings(
    c: Conn, users: list[uuid.UUID], _o: uuid.UUID, failed: uuid.UUID
) -> None:
    await c.execute(
        "INSERT INTO postings (transaction_id, account_id, amount_minor, balance_after)"
        " VALUES ($1, $2, -1, 0), ($1, $3, 1, 0)",
        failed,
        users[0],
        users[1],
    )


async def _orphan(c: Conn, users: list[uuid.UUID], _o: uuid.UUID, _f: uuid.UUID) -> None:
    await c.execute(
        "INSERT INTO postings (transaction_id, account_id, amount_minor, balance_after)"
        " VALUES ($1, $2, 3, 0), ($1, $2, -3, 0)",
        uuid.uuid4(),
        users[0],
    )


async def _wrong_amount(c: Conn, users: list[uuid.UUID], ok: uuid.UUID, _f: uuid.UUID) -> None:
    # Balanced, and balances agree, but the postings move 101 where the intent says 100.
    await c.execute(
        "UPDATE postings SET amount_minor = amount_minor + sign(amount_minor)"
        " WHERE transaction_id = $1",
        ok,
    )


async def _ledger_total(c: Conn, users: list[uuid.UUID], ok: uuid.UUID, _f: uuid.UUID) -> None:
    bank = await system_account(c, BANK_SETTLEMENT)
    await c.execute(
        "UPDATE postings SET amount_minor = amount_minor - 1 WHERE account_id = $1"
        " AND id = (SELECT min(id) FROM postings WHERE account_id = $1)",
        bank,
    )


CASES: dict[str, Corruption] = {
    "transaction_unbalanced": _unbalanced,
    "ledger_unbalanced": _ledger_total,
    "balance_mismatch": _balance_bumped,
    "hold_mismatch": _fake_hold,
    "negative_balance": _negative,
    "balance_after_mismatch": _wrong_after,
    "settled_without_postings": _settled_bare,
    "postings_on_unsettled": _failed_with_postings,
    "orphan_posting": _orphan,
    "postings_disagree_with_intent": _wrong_amount,
}


def test_every_check_has_a_corruption_case() -> None:
    assert set(CASES) == set(CHECKS)


@pytest.mark.asyncio
@pytest.mark.parametrize("check", sorted(CASES))
async def test_check_reports_its_corruption(pool: asyncpg.Pool, check: str) -> None:
    users, settled, failed = await _ledger(pool)
    async with pool.acquire() as conn:
        await CASES[check](conn, users, settled, failed)
    found = {f.check for f in await audit(pool)}
    assert check in found
