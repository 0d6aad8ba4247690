"""Every audit check speaks when the ledger is corrupted in the way it exists to catch."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

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

AUDIT_LIMIT = 100  # audit()'s default limit_per_check


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

# The ledger of ``_ledger``: each user's transfer posting is the last posting of that user, and
# bank_settlement's last posting is the deposit to users[1]; a corruption that changes a last
# posting keeps every other running sum (balance_after) true.


async def _bump_last(c: Conn, txn: uuid.UUID, account: uuid.UUID, delta: int) -> None:
    """Change an account's posting of ``txn`` (its last) by ``delta``, balance kept in step."""
    await c.execute(
        "UPDATE postings SET amount_minor = amount_minor + $3, balance_after = balance_after + $3"
        " WHERE transaction_id = $1 AND account_id = $2",
        txn,
        account,
        delta,
    )
    await c.execute(
        "UPDATE balances SET posted = posted + $2 WHERE account_id = $1", account, delta
    )


async def _unbalanced(c: Conn, users: list[uuid.UUID], ok: uuid.UUID, _f: uuid.UUID) -> None:
    # The transfer pays one more than it takes, and the deposit to users[1] takes it back from
    # the bank: two transactions off by one each way, the ledger as a whole still at zero.
    await _bump_last(c, ok, users[1], 1)
    bank = await system_account(c, BANK_SETTLEMENT)
    deposit = await c.fetchval(
        "SELECT transaction_id FROM postings WHERE account_id = $1 ORDER BY id DESC LIMIT 1", bank
    )
    await _bump_last(c, deposit, bank, -1)


async def _ledger_total(c: Conn, users: list[uuid.UUID], ok: uuid.UUID, _f: uuid.UUID) -> None:
    # One minor unit created out of nothing, every balance and running sum in step with it.
    await _bump_last(c, ok, users[1], 1)


async def _balance_bumped(c: Conn, users: list[uuid.UUID], _o: uuid.UUID, _f: uuid.UUID) -> None:
    await c.execute("UPDATE balances SET posted = posted + 1 WHERE account_id = $1", users[0])


async def _fake_hold(c: Conn, users: list[uuid.UUID], _o: uuid.UUID, _f: uuid.UUID) -> None:
    await c.execute("UPDATE balances SET pending = 10 WHERE account_id = $1", users[0])


async def _negative(c: Conn, users: list[uuid.UUID], _o: uuid.UUID, _f: uuid.UUID) -> None:
    # A withdrawal in flight that holds more than the account has, its hold and its intent in
    # step: only the available balance is wrong (past the table's own guard).
    await c.execute("ALTER TABLE balances DROP CONSTRAINT balances_check")
    bank = await system_account(c, BANK_SETTLEMENT)
    [txn] = await intents(c, [NewIntent("withdrawal", users[0], bank, 500)])
    [held] = await apply_batch(c, [Op(txn, Action.HOLD)])
    assert held.status == "processing"
    await c.execute("UPDATE transactions SET amount_minor = 1500 WHERE id = $1", txn)
    await c.execute("UPDATE balances SET pending = 1500 WHERE account_id = $1", users[0])


async def _wrong_after(c: Conn, _u: list[uuid.UUID], ok: uuid.UUID, _f: uuid.UUID) -> None:
    await c.execute(
        "UPDATE postings SET balance_after = balance_after + 1 WHERE transaction_id = $1", ok
    )


async def _settled_bare(c: Conn, users: list[uuid.UUID], ok: uuid.UUID, _f: uuid.UUID) -> None:
    await c.execute("DELETE FROM postings WHERE transaction_id = $1", ok)
    # The balances as if the transfer had never been posted.
    await c.execute("UPDATE balances SET posted = posted + 100 WHERE account_id = $1", users[0])
    await c.execute("UPDATE balances SET posted = posted - 100 WHERE account_id = $1", users[1])


async def _failed_with_postings(
    c: Conn, users: list[uuid.UUID], _o: uuid.UUID, _f: uuid.UUID
) -> None:
    # A failed transfer whose postings (and balances) moved exactly its amount anyway.
    [txn] = await intents(c, [NewIntent("transfer", users[0], users[1], 10)])
    await c.execute(
        "UPDATE transactions SET status = 'failed', failure_reason = 'insufficient_funds',"
        " failed_at = now() WHERE id = $1",
        txn,
    )
    await c.execute(
        "INSERT INTO postings (transaction_id, account_id, amount_minor, balance_after)"
        " VALUES ($1, $2, -10, 890), ($1, $3, 10, 1110)",
        txn,
        users[0],
        users[1],
    )
    await c.execute("UPDATE balances SET posted = posted - 10 WHERE account_id = $1", users[0])
    await c.execute("UPDATE balances SET posted = posted + 10 WHERE account_id = $1", users[1])


async def _orphan(c: Conn, users: list[uuid.UUID], _o: uuid.UUID, _f: uuid.UUID) -> None:
    # Two postings of a transaction that does not exist, netting to zero on users[0].
    await c.execute(
        "INSERT INTO postings (transaction_id, account_id, amount_minor, balance_after)"
        " VALUES ($1, $2, 3, 903), ($1, $2, -3, 900)",
        uuid.uuid4(),
        users[0],
    )


async def _orphan_account(c: Conn, users: list[uuid.UUID], _o: uuid.UUID, _f: uuid.UUID) -> None:
    await c.execute("DELETE FROM balances WHERE account_id = $1", users[1])


async def _wrong_amount(c: Conn, users: list[uuid.UUID], ok: uuid.UUID, _f: uuid.UUID) -> None:
    # Balanced, balances and running sums agree, but the postings move 101 where the intent
    # says 100.
    await _bump_last(c, ok, users[0], -1)
    await _bump_last(c, ok, users[1], 1)


async def _split(c: Conn, users: list[uuid.UUID], ok: uuid.UUID, _f: uuid.UUID) -> None:
    # The right amounts on the right accounts, in three postings instead of two.
    await _bump_last(c, ok, users[1], -40)
    await c.execute(
        "INSERT INTO postings (transaction_id, account_id, amount_minor, balance_after)"
        " VALUES ($1, $2, 40, 1100)",
        ok,
        users[1],
    )
    await c.execute("UPDATE balances SET posted = posted + 40 WHERE account_id = $1", users[1])


def _repoint(side: int) -> Corruption:
    """The transfer's posting of users[side] lands on bank_settlement instead (balances and
    running sums in step): balanced, but not from the intent's source to its destination."""

    async def corrupt(c: Conn, users: list[uuid.UUID], ok: uuid.UUID, _f: uuid.UUID) -> None:
        bank = await system_account(c, BANK_SETTLEMENT)
        amount = await c.fetchval(
            "SELECT amount_minor FROM postings WHERE transaction_id = $1 AND account_id = $2",
            ok,
            users[side],
        )
        await c.execute(
            "UPDATE postings SET account_id = $3,"
            " balance_after = (SELECT posted FROM balances WHERE account_id = $3) + amount_minor"
            " WHERE transaction_id = $1 AND account_id = $2",
            ok,
            users[side],
            bank,
        )
        await c.execute(
            "UPDATE balances SET posted = posted - $2 WHERE account_id = $1", users[side], amount
        )
        await c.execute(
            "UPDATE balances SET posted = posted + $2 WHERE account_id = $1", bank, amount
        )

    return corrupt


@dataclass(frozen=True)
class Case:
    check: str
    corrupt: Corruption
    # Every check that must fire, and none other: where the check cannot fire alone, the others
    # are those its invariant implies (an unbalanced ledger has an unbalanced transaction, and an
    # unbalanced transaction cannot move its intent's amount from source to destination).
    fires: frozenset[str]
    detail: str = ""  # a part of the check's own finding's detail, where the query has branches
    subject: Callable[[list[uuid.UUID], uuid.UUID], str] | None = None  # one of its subjects


def _case(
    check: str,
    corrupt: Corruption,
    *also: str,
    detail: str = "",
    name: str = "",
    subject: Callable[[list[uuid.UUID], uuid.UUID], str] | None = None,
) -> tuple[str, Case]:
    """A named case (the check's name, and a branch of it after a colon)."""
    return f"{check}:{name}" if name else check, Case(
        check, corrupt, frozenset({check, *also}), detail, subject
    )


def _user(n: int) -> Callable[[list[uuid.UUID], uuid.UUID], str]:
    return lambda users, _settled: str(users[n])


def _settled(users: list[uuid.UUID], settled: uuid.UUID) -> str:
    return str(settled)


CASES: dict[str, Case] = dict(
    [
        _case(
            "transaction_unbalanced", _unbalanced, "postings_disagree_with_intent", subject=_settled
        ),
        _case(
            "ledger_unbalanced",
            _ledger_total,
            "transaction_unbalanced",
            "postings_disagree_with_intent",
            detail="sum to 1",
            subject=lambda _u, _s: "ledger",
        ),
        _case(
            "balance_mismatch",
            _balance_bumped,
            detail="posted 901 but postings sum to 900",
            subject=_user(0),
        ),
        _case(
            "hold_mismatch",
            _fake_hold,
            detail="pending 10 but open withdrawals hold 0",
            subject=_user(0),
        ),
        _case("negative_balance", _negative, detail="available -600", subject=_user(0)),
        _case("balance_after_mismatch", _wrong_after, subject=_user(1)),
        _case("settled_without_postings", _settled_bare, subject=_settled),
        _case("postings_on_unsettled", _failed_with_postings, detail="failed transaction"),
        _case("orphan_posting", _orphan, detail="missing transaction"),
        _case("orphan_posting", _orphan_account, detail="missing account", name="account"),
        _case("postings_disagree_with_intent", _wrong_amount, subject=_settled),
        _case("postings_disagree_with_intent", _split, name="count"),
        _case("postings_disagree_with_intent", _repoint(0), name="source"),
        _case("postings_disagree_with_intent", _repoint(1), name="dest"),
    ]
)


def test_every_check_has_a_corruption_case() -> None:
    assert {case.check for case in CASES.values()} == set(CHECKS)


@pytest.mark.asyncio
@pytest.mark.parametrize("name", sorted(CASES))
async def test_exactly_the_broken_invariants_checks_fire(pool: asyncpg.Pool, name: str) -> None:
    case = CASES[name]
    users, settled, failed = await _ledger(pool)
    async with pool.acquire() as conn:
        await case.corrupt(conn, users, settled, failed)
    findings = await audit(pool)
    assert {f.check for f in findings} == case.fires
    assert any(case.detail in f.detail for f in findings if f.check == case.check)
    # Each finding names what it is about: an account, a transaction, a posting or the ledger.
    known = {*map(str, users), str(settled), str(failed), "ledger"}
    for f in findings:
        assert f.subject in known or await _is_posting_or_row(pool, f.subject), f
    if case.subject is not None:
        assert case.subject(users, settled) in {
            f.subject for f in findings if f.check == case.check
        }


async def _is_posting_or_row(pool: asyncpg.Pool, subject: str) -> bool:
    """A posting's id, or the id of a transaction or account the corruption made itself."""
    if subject.isdigit():
        return bool(
            await pool.fetchval("SELECT count(*) FROM postings WHERE id = $1", int(subject))
        )
    return bool(
        await pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM transactions WHERE id = $1)"
            " OR EXISTS (SELECT 1 FROM accounts WHERE id = $1)",
            uuid.UUID(subject),
        )
    )


@pytest.mark.asyncio
async def test_each_check_reports_at_most_its_limit(pool: asyncpg.Pool) -> None:
    await funded(pool, [0] * (AUDIT_LIMIT + 1))
    await pool.execute("UPDATE balances SET posted = posted + 1 WHERE NOT allow_negative")
    findings = await audit(pool)
    assert Counter(f.check for f in findings) == {"balance_mismatch": AUDIT_LIMIT}
    assert len(await audit(pool, limit_per_check=3)) == 3


@pytest.mark.asyncio
async def test_a_clean_ledger_with_every_kind_of_movement_has_no_findings(
    pool: asyncpg.Pool,
) -> None:
    users, _settled, _failed = await _ledger(pool)
    await funded(pool, [0])  # a user at exactly zero is not below it
    bank = await system_account(pool, BANK_SETTLEMENT)
    posted, released, held, failed = await intents(
        pool, [NewIntent("withdrawal", users[0], bank, n) for n in (10, 20, 30, 5000)]
    )
    await apply_batch(pool, [Op(t, Action.HOLD) for t in (posted, released, held, failed)])
    await apply_batch(pool, [Op(posted, Action.POST), Op(released, Action.RELEASE, "declined")])
    statuses = await pool.fetch(
        "SELECT status FROM transactions WHERE id = ANY($1::uuid[]) ORDER BY amount_minor",
        [posted, released, held, failed],
    )
    assert [r["status"] for r in statuses] == ["settled", "failed", "processing", "failed"]
    assert await audit(pool) == []
