"""The ledger's rules, each against the real embedded PostgreSQL."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from engine import (
    BANK_SETTLEMENT,
    Action,
    InvalidAmount,
    InvariantViolation,
    NewIntent,
    Op,
    SelfTransfer,
    UnknownAccount,
    apply_batch,
    audit,
    create_intents,
    get_balance,
    get_transaction,
    system_account,
)
from engine._decide import Balance, Decision, Posting
from engine._decide import _check as check_decision
from tests._ledger_helpers import CUR, MAX, funded, intents


async def _funded(pool: asyncpg.Pool, amounts: list[int]) -> list[uuid.UUID]:
    return await funded(pool, amounts)


async def _transfer(pool: asyncpg.Pool, src: uuid.UUID, dst: uuid.UUID, amount: int) -> uuid.UUID:
    [txn_id] = await intents(pool, [NewIntent("transfer", src, dst, amount)])
    return txn_id


@pytest.mark.asyncio
async def test_transfer_moves_money_and_records_balanced_postings(pool: asyncpg.Pool) -> None:
    alice, bob = await _funded(pool, [500, 0])
    txn_id = await _transfer(pool, alice, bob, 200)
    [outcome] = await apply_batch(pool, [Op(txn_id, Action.TRANSFER)])
    assert (outcome.applied, outcome.status) == (True, "settled")
    assert (await get_balance(pool, alice)).available == 300
    assert (await get_balance(pool, bob)).available == 200
    rows = await pool.fetch(
        "SELECT account_id, amount_minor, balance_after FROM postings WHERE transaction_id = $1"
        " ORDER BY amount_minor",
        txn_id,
    )
    assert [(r["account_id"], r["amount_minor"], r["balance_after"]) for r in rows] == [
        (alice, -200, 300),
        (bob, 200, 200),
    ]
    txn = await get_transaction(pool, txn_id)
    assert txn.settled_at is not None and txn.settled_at >= txn.created_at
    assert await audit(pool) == []


@pytest.mark.asyncio
async def test_overdraft_fails_with_reason_and_moves_nothing(pool: asyncpg.Pool) -> None:
    alice, bob = await _funded(pool, [100, 0])
    txn_id = await _transfer(pool, alice, bob, 101)
    [outcome] = await apply_batch(pool, [Op(txn_id, Action.TRANSFER)])
    assert (outcome.status, outcome.failure_reason) == ("failed", "insufficient_funds")
    assert (await get_balance(pool, alice)).available == 100
    assert (await get_balance(pool, bob)).available == 0
    assert await audit(pool) == []


@pytest.mark.asyncio
async def test_applying_twice_is_a_no_op(pool: asyncpg.Pool) -> None:
    alice, bob = await _funded(pool, [100, 0])
    txn_id = await _transfer(pool, alice, bob, 60)
    first = await apply_batch(pool, [Op(txn_id, Action.TRANSFER), Op(txn_id, Action.TRANSFER)])
    second = await apply_batch(pool, [Op(txn_id, Action.TRANSFER)])
    assert [o.applied for o in first + second] == [True, False, False]
    assert (await get_balance(pool, alice)).available == 40
    assert await audit(pool) == []


@pytest.mark.asyncio
async def test_withdrawal_hold_post_and_release(pool: asyncpg.Pool) -> None:
    [alice] = await _funded(pool, [1000])
    bank = await system_account(pool, BANK_SETTLEMENT)
    async with pool.acquire() as conn:
        paid, refused = await create_intents(
            conn,
            [NewIntent("withdrawal", alice, bank, 300), NewIntent("withdrawal", alice, bank, 400)],
            currency=CUR,
            amount_max_minor=MAX,
        )
    held = await apply_batch(pool, [Op(paid.id, Action.HOLD), Op(refused.id, Action.HOLD)])
    assert [o.status for o in held] == ["processing", "processing"]
    view = await get_balance(pool, alice)
    assert (view.posted, view.pending, view.available) == (1000, 700, 300)
    assert await audit(pool) == []
    done = await apply_batch(
        pool, [Op(paid.id, Action.POST), Op(refused.id, Action.RELEASE, "bank_declined")]
    )
    assert [(o.status, o.failure_reason) for o in done] == [
        ("settled", None),
        ("failed", "bank_declined"),
    ]
    view = await get_balance(pool, alice)
    assert (view.posted, view.pending, view.available) == (700, 0, 700)
    assert await audit(pool) == []


@pytest.mark.asyncio
async def test_hold_and_post_in_one_batch_pass_through_processing(pool: asyncpg.Pool) -> None:
    [alice] = await _funded(pool, [50])
    bank = await system_account(pool, BANK_SETTLEMENT)
    async with pool.acquire() as conn:
        [w] = await create_intents(
            conn, [NewIntent("withdrawal", alice, bank, 50)], currency=CUR, amount_max_minor=MAX
        )
    await apply_batch(pool, [Op(w.id, Action.HOLD), Op(w.id, Action.POST)])
    txn = await get_transaction(pool, w.id)
    assert txn.status == "settled" and txn.processing_at is not None
    assert (await get_balance(pool, alice)).posted == 0
    assert await audit(pool) == []


@pytest.mark.asyncio
@pytest.mark.parametrize("amount", [0, -5, MAX + 1, True, 1.5])
async def test_bad_amounts_are_refused_and_change_nothing(
    pool: asyncpg.Pool, amount: object
) -> None:
    alice, bob = await _funded(pool, [100, 0])
    async with pool.acquire() as conn:
        with pytest.raises(InvalidAmount):
            await create_intents(
                conn,
                [NewIntent("transfer", alice, bob, amount)],  # type: ignore[arg-type]
                currency=CUR,
                amount_max_minor=MAX,
            )
    assert await pool.fetchval("SELECT count(*) FROM transactions WHERE kind = 'transfer'") == 0


@pytest.mark.asyncio
async def test_self_transfer_and_unknown_account_are_named_errors(pool: asyncpg.Pool) -> None:
    [alice] = await _funded(pool, [100])
    async with pool.acquire() as conn:
        with pytest.raises(SelfTransfer):
            await create_intents(
                conn, [NewIntent("transfer", alice, alice, 1)], currency=CUR, amount_max_minor=MAX
            )
        with pytest.raises(UnknownAccount):
            await create_intents(
                conn,
                [NewIntent("transfer", alice, uuid.uuid4(), 1)],
                currency=CUR,
                amount_max_minor=MAX,
            )


@pytest.mark.asyncio
async def test_final_state_cannot_change_even_by_hand(pool: asyncpg.Pool) -> None:
    alice, bob = await _funded(pool, [100, 0])
    txn_id = await _transfer(pool, alice, bob, 10)
    await apply_batch(pool, [Op(txn_id, Action.TRANSFER)])
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute(
            "UPDATE transactions SET status = 'failed', failure_reason = 'x', failed_at = now(),"
            " settled_at = NULL WHERE id = $1",
            txn_id,
        )


@pytest.mark.asyncio
async def test_a_bank_failure_keeps_its_reason_or_is_bank_declined(pool: asyncpg.Pool) -> None:
    [alice] = await _funded(pool, [1000])
    bank = await system_account(pool, BANK_SETTLEMENT)
    out_bare, out_why, in_bare, in_why = await intents(
        pool,
        [
            NewIntent("withdrawal", alice, bank, 10),
            NewIntent("withdrawal", alice, bank, 20),
            NewIntent("deposit", bank, alice, 30),
            NewIntent("deposit", bank, alice, 40),
        ],
    )
    await apply_batch(pool, [Op(out_bare, Action.HOLD), Op(out_why, Action.HOLD)])
    ops = [
        Op(out_bare, Action.RELEASE),
        Op(out_why, Action.RELEASE, "account_closed"),
        Op(in_bare, Action.FAIL),
        Op(in_why, Action.FAIL, "account_closed"),
    ]
    expected = [("failed", "bank_declined"), ("failed", "account_closed")] * 2
    outcomes = await apply_batch(pool, ops)
    assert [(o.status, o.failure_reason) for o in outcomes] == expected
    assert [(o.txn_id, o.action, o.applied) for o in outcomes] == [
        (op.txn_id, op.action, True) for op in ops
    ]
    stored = [await get_transaction(pool, op.txn_id) for op in ops]
    assert [(t.status, t.failure_reason) for t in stored] == expected


@pytest.mark.asyncio
async def test_a_deposit_of_unknown_outcome_waits_in_processing_then_settles(
    pool: asyncpg.Pool,
) -> None:
    [alice] = await _funded(pool, [0])
    bank = await system_account(pool, BANK_SETTLEMENT)
    [deposit] = await intents(pool, [NewIntent("deposit", bank, alice, 25)])
    [marked] = await apply_batch(pool, [Op(deposit, Action.MARK_PROCESSING)])
    assert (marked.applied, marked.status) == (True, "processing")
    assert (await get_transaction(pool, deposit)).status == "processing"
    assert (await get_balance(pool, alice)).posted == 0
    [credited] = await apply_batch(pool, [Op(deposit, Action.CREDIT)])
    assert (credited.applied, credited.status) == (True, "settled")
    assert (await get_balance(pool, alice)).posted == 25


@pytest.mark.asyncio
async def test_an_op_on_an_unknown_transaction_changes_nothing_and_says_unknown(
    pool: asyncpg.Pool,
) -> None:
    ghost = uuid.uuid4()
    [outcome] = await apply_batch(pool, [Op(ghost, Action.TRANSFER)])
    assert (outcome.txn_id, outcome.action, outcome.applied, outcome.status) == (
        ghost,
        Action.TRANSFER,
        False,
        "unknown",
    )
    assert await pool.fetchval("SELECT count(*) FROM postings") == 0


@pytest.mark.asyncio
async def test_an_op_of_another_kind_is_not_applied(pool: asyncpg.Pool) -> None:
    alice, bob = await _funded(pool, [100, 0])
    bank = await system_account(pool, BANK_SETTLEMENT)
    transfer, deposit = await intents(
        pool, [NewIntent("transfer", alice, bob, 10), NewIntent("deposit", bank, alice, 20)]
    )
    wrong = [Op(transfer, Action.CREDIT), Op(deposit, Action.HOLD), Op(deposit, Action.TRANSFER)]
    outcomes = await apply_batch(pool, wrong)
    assert [(o.txn_id, o.action, o.applied, o.status) for o in outcomes] == [
        (op.txn_id, op.action, False, "pending") for op in wrong
    ]
    assert [(await get_balance(pool, a)).posted for a in (alice, bob)] == [100, 0]


def _decided(postings: list[int], balance: tuple[int, int, bool]) -> Decision:
    """A decision as a broken rule could make it: these postings on one transaction, and one
    touched balance (posted, pending, allow_negative)."""
    txn, account = uuid.uuid4(), uuid.uuid4()
    d = Decision()
    d.postings = [Posting(txn, account, amount, 0) for amount in postings]
    d.touched = {account: Balance(account, *balance)}
    return d


@pytest.mark.parametrize(
    ("postings", "balance", "says"),
    [
        ([-5, 4], (10, 0, False), "unbalanced postings"),
        ([5], (10, 0, True), "unbalanced postings"),
        ([-5, 5], (10, -1, False), "negative hold"),
        ([-5, 5], (10, 11, False), "negative available"),
        ([-5, 5], (-1, 0, False), "negative available"),
    ],
)
def test_a_batch_that_breaks_an_invariant_is_refused(
    postings: list[int], balance: tuple[int, int, bool], says: str
) -> None:
    with pytest.raises(InvariantViolation, match=says):
        check_decision(_decided(postings, balance))


@pytest.mark.parametrize(
    "balance", [(10, 0, False), (10, 10, False), (0, 0, False), (-50, 0, True), (-50, 5, True)]
)
def test_a_sound_batch_passes_its_invariants(balance: tuple[int, int, bool]) -> None:
    check_decision(_decided([-5, 5, 3, -3], balance))
