"""Property: any sequence of batches keeps every audit invariant and matches a simple model.

Hypothesis draws batches of transfers, deposits (credited or failed), withdrawals (held, then
posted or released) and re-applications of earlier ops (duplicates within and across batches),
over a few accounts with small balances so overdrafts are common. Each batch goes through the
real ``engine.apply_batch`` on PostgreSQL; after each one the database must equal the model below,
which is written independently of ``engine._decide``, and ``engine.audit`` must find nothing.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import BANK_SETTLEMENT, Action, NewIntent, Op, apply_batch, audit, system_account
from tests._ledger_helpers import funded, intents

ACCOUNTS = 3

Step = tuple[str, int, int, int, bool]  # (kind, a, b, amount, ok)

steps = st.tuples(
    st.sampled_from(["transfer", "transfer", "deposit", "withdraw", "finish", "again"]),
    st.integers(0, ACCOUNTS - 1),
    st.integers(0, ACCOUNTS - 1),
    st.integers(1, 400),
    st.booleans(),
)
batches = st.lists(st.lists(steps, min_size=1, max_size=12), min_size=1, max_size=6)


@dataclass
class Model:
    """Money as a bookkeeper would track it: posted and held amounts, and each intent's state."""

    posted: dict[uuid.UUID, int]
    held: dict[uuid.UUID, int]
    bank: uuid.UUID
    status: dict[uuid.UUID, str] = field(default_factory=dict)
    txn: dict[uuid.UUID, tuple[uuid.UUID, uuid.UUID, int]] = field(default_factory=dict)

    def free(self, account: uuid.UUID) -> int:
        return self.posted[account] - self.held[account]

    def move(self, txn_id: uuid.UUID) -> None:
        src, dst, amount = self.txn[txn_id]
        self.posted[src] -= amount
        self.posted[dst] += amount

    def apply(self, action: Action, txn_id: uuid.UUID) -> None:
        src, _dst, amount = self.txn[txn_id]
        state = self.status[txn_id]
        user_src = src != self.bank
        if action is Action.TRANSFER and state == "pending":
            ok = self.free(src) >= amount
            if ok:
                self.move(txn_id)
            self.status[txn_id] = "settled" if ok else "failed"
        elif action is Action.CREDIT and state in ("pending", "processing"):
            self.move(txn_id)
            self.status[txn_id] = "settled"
        elif action is Action.FAIL and state in ("pending", "processing"):
            self.status[txn_id] = "failed"
        elif action is Action.HOLD and state == "pending":
            ok = not user_src or self.free(src) >= amount
            if ok:
                self.held[src] += amount
            self.status[txn_id] = "processing" if ok else "failed"
        elif action is Action.POST and state == "processing":
            self.held[src] -= amount
            self.move(txn_id)
            self.status[txn_id] = "settled"
        elif action is Action.RELEASE and state == "processing":
            self.held[src] -= amount
            self.status[txn_id] = "failed"


async def _run(url: str, program: list[list[Step]]) -> None:
    conn = await asyncpg.connect(url)
    try:
        users = await funded(conn, [300] * ACCOUNTS)
        bank = await system_account(conn, BANK_SETTLEMENT)
        bank_start = await conn.fetchval("SELECT posted FROM balances WHERE account_id = $1", bank)
        model = Model({u: 300 for u in users} | {bank: bank_start}, dict.fromkeys(users, 0), bank)
        model.held[bank] = 0
        applied: list[Op] = []
        withdrawals: list[uuid.UUID] = []
        for batch in program:
            ops = await _ops_for(conn, batch, users, model, applied, withdrawals)
            await apply_batch(conn, ops)
            for op in ops:
                model.apply(op.action, op.txn_id)
            applied.extend(ops)
            await _check(conn, model)
    finally:
        await conn.close()


async def _ops_for(
    conn: asyncpg.Connection,
    batch: list[Step],
    users: list[uuid.UUID],
    model: Model,
    applied: list[Op],
    withdrawals: list[uuid.UUID],
) -> list[Op]:
    ops: list[Op] = []
    for kind, a, b, amount, ok in batch:
        src, dst = users[a], users[b]
        if kind == "transfer" and src != dst:
            [t] = await intents(conn, [NewIntent("transfer", src, dst, amount)])
            model.txn[t], model.status[t] = (src, dst, amount), "pending"
            ops.append(Op(t, Action.TRANSFER))
        elif kind == "deposit":
            [t] = await intents(conn, [NewIntent("deposit", model.bank, dst, amount)])
            model.txn[t], model.status[t] = (model.bank, dst, amount), "pending"
            ops.append(Op(t, Action.CREDIT if ok else Action.FAIL, None if ok else "declined"))
        elif kind == "withdraw":
            [t] = await intents(conn, [NewIntent("withdrawal", src, model.bank, amount)])
            model.txn[t], model.status[t] = (src, model.bank, amount), "pending"
            withdrawals.append(t)
            ops.append(Op(t, Action.HOLD))
        elif kind == "finish" and withdrawals:
            t = withdrawals[amount % len(withdrawals)]
            ops.append(Op(t, Action.POST if ok else Action.RELEASE, None if ok else "declined"))
        elif kind == "again" and (applied or ops):
            pool = applied + ops
            ops.append(pool[amount % len(pool)])
    return ops


async def _check(conn: asyncpg.Connection, model: Model) -> None:
    rows = await conn.fetch(
        "SELECT account_id, posted, pending FROM balances WHERE account_id = ANY($1::uuid[])",
        list(model.posted),
    )
    assert {r["account_id"]: (r["posted"], r["pending"]) for r in rows} == {
        a: (model.posted[a], model.held[a]) for a in model.posted
    }
    stored = await conn.fetch(
        "SELECT id, status FROM transactions WHERE id = ANY($1::uuid[])", list(model.status)
    )
    assert {r["id"]: r["status"] for r in stored} == model.status
    assert await audit(conn) == []


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(program=batches)
def test_random_batches_keep_invariants_and_match_the_model(
    sync_db_url: str, program: list[list[Step]]
) -> None:
    asyncio.run(_run(sync_db_url, program))


def test_model_and_ledger_agree_on_a_known_story(sync_db_url: str) -> None:
    """A fixed program that touches every branch, so the property cannot pass vacuously."""
    program: list[list[Step]] = [
        [("transfer", 0, 1, 200, True), ("transfer", 0, 1, 200, True)],  # second overdraws
        [("withdraw", 1, 0, 450, True), ("withdraw", 1, 0, 100, True)],  # second: no funds
        [("finish", 0, 0, 0, True), ("again", 0, 0, 0, True), ("deposit", 0, 2, 50, False)],
        [("deposit", 0, 2, 70, True), ("withdraw", 2, 0, 10, True), ("finish", 0, 0, 2, False)],
    ]
    asyncio.run(_run(sync_db_url, program))

    async def statuses() -> list[str]:
        conn = await asyncpg.connect(sync_db_url)
        try:
            rows = await conn.fetch(
                "SELECT kind, status FROM transactions"
                " WHERE kind <> 'deposit' OR amount_minor < 100"
                " ORDER BY created_at"
            )
            return [f"{r['kind']}:{r['status']}" for r in rows]
        finally:
            await conn.close()

    assert asyncio.run(statuses()) == [
        "transfer:settled",
        "transfer:failed",
        "withdrawal:settled",
        "withdrawal:failed",
        "deposit:failed",
        "deposit:settled",
        "withdrawal:failed",
    ]
