"""The set-based batch apply: many intents, one PostgreSQL transaction, four round trips.

1. lock the batch's intents (ascending id, FOR NO KEY UPDATE) and read their state;
2. lock every touched balance row (ascending account id, FOR NO KEY UPDATE);
3. decide in Python (``engine._decide``, pure), in the order the ops were given;
4. write postings, balances and state changes in one statement, guarded by the expected status.

Locks are always taken intents-then-balances, each in ascending id order, so two batches can wait
on each other but never deadlock; 40P01 / 40001 are still retried (bounded, jittered) because a
manual fix or another tool may lock in another order. READ COMMITTED with row locks is the
concurrency control: no SERIALIZABLE retry storm on a hot row.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

import asyncpg

from engine._decide import (
    FINAL_STATES,
    ROW_LOCKS_OFF,
    Balance,
    Decision,
    Intent,
    Op,
    Outcome,
    StateChange,
    decide,
)
from engine._errors import InvariantViolation, RetriesExhausted
from engine._types import Conn, Db

T = TypeVar("T")
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})

_LOCK_INTENTS = """
SELECT id, kind, status, source_id, dest_id, amount_minor,
       extract(epoch FROM clock_timestamp() - created_at)::float8 AS age_s
FROM transactions WHERE id = ANY($1::uuid[])
ORDER BY id FOR NO KEY UPDATE
"""

_LOCK_BALANCES = """
SELECT account_id, posted, pending, allow_negative
FROM balances WHERE account_id = ANY($1::uuid[])
ORDER BY account_id FOR NO KEY UPDATE
"""

# The "row_locks_off" broken build: the same reads, unlocked, so two batches can read one balance
# and the later write overwrites the earlier (a lost update).
_READ_INTENTS = _LOCK_INTENTS.replace("ORDER BY id FOR NO KEY UPDATE", "")
_READ_BALANCES = _LOCK_BALANCES.replace("ORDER BY account_id FOR NO KEY UPDATE", "")

# One statement writes the whole decision; each CTE reports how many rows it touched so the
# caller can assert that every guarded update hit exactly its row.
_WRITE = """
WITH new_postings AS (
    INSERT INTO postings (transaction_id, account_id, amount_minor, balance_after)
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::bigint[])
    RETURNING 1
), new_balances AS (
    UPDATE balances b SET posted = v.posted, pending = v.pending, updated_at = now(),
        -- The dashboard's month totals (migration 0006): settled money in and out this UTC month.
        month_start = date_trunc('month', now() AT TIME ZONE 'UTC')::date,
        month_in_minor = v.month_in + CASE WHEN b.month_start
            = date_trunc('month', now() AT TIME ZONE 'UTC')::date THEN b.month_in_minor ELSE 0 END,
        month_out_minor = v.month_out + CASE WHEN b.month_start
            = date_trunc('month', now() AT TIME ZONE 'UTC')::date THEN b.month_out_minor ELSE 0 END
    FROM unnest($5::uuid[], $6::bigint[], $7::bigint[], $13::bigint[], $14::bigint[])
        AS v(account_id, posted, pending, month_in, month_out)
    WHERE b.account_id = v.account_id
    RETURNING 1
), new_states AS (
    UPDATE transactions t SET
        status = v.to_status,
        failure_reason = v.reason,
        processing_at = CASE WHEN v.via_processing THEN clock_timestamp()
                             ELSE t.processing_at END,
        settled_at = CASE WHEN v.to_status = 'settled' THEN clock_timestamp() END,
        failed_at = CASE WHEN v.to_status = 'failed' THEN clock_timestamp() END
    FROM unnest($8::uuid[], $9::text[], $10::text[], $11::text[], $12::boolean[])
        AS v(id, from_status, to_status, reason, via_processing)
    WHERE t.id = v.id AND t.status = v.from_status
    RETURNING 1
)
SELECT (SELECT count(*) FROM new_postings) AS postings,
       (SELECT count(*) FROM new_balances) AS balances,
       (SELECT count(*) FROM new_states) AS states
"""


async def with_retries(
    attempt: Callable[[], Awaitable[T]],
    *,
    attempts_max: int,
    backoff_base_s: float,
    backoff_max_s: float,
) -> T:
    """Run ``attempt`` again on serialization failure or deadlock, with full-jitter backoff."""
    for number in range(1, attempts_max + 1):
        try:
            return await attempt()
        except asyncpg.PostgresError as exc:
            if exc.sqlstate not in RETRYABLE_SQLSTATES or number == attempts_max:
                if exc.sqlstate in RETRYABLE_SQLSTATES:
                    raise RetriesExhausted(f"gave up after {number} attempts: {exc}") from exc
                raise
            cap = min(backoff_max_s, backoff_base_s * 2**number)
            await asyncio.sleep(random.uniform(0, cap))
    raise AssertionError("unreachable: the loop returns or raises")


async def _apply_once(conn: Conn, ops: Sequence[Op], mutation: str) -> Decision:
    locked = mutation != ROW_LOCKS_OFF
    async with conn.transaction():
        txn_ids = sorted({op.txn_id for op in ops})
        rows = await conn.fetch(_LOCK_INTENTS if locked else _READ_INTENTS, txn_ids)
        intents = {
            row["id"]: Intent(
                row["id"],
                row["kind"],
                row["status"],
                row["source_id"],
                row["dest_id"],
                row["amount_minor"],
            )
            for row in rows
        }
        account_ids = sorted({a for i in intents.values() for a in (i.source_id, i.dest_id)})
        balances = {
            row["account_id"]: Balance(
                row["account_id"], row["posted"], row["pending"], row["allow_negative"]
            )
            for row in await conn.fetch(_LOCK_BALANCES if locked else _READ_BALANCES, account_ids)
        }
        if len(balances) != len(account_ids):
            raise InvariantViolation("an intent references an account without a balance row")
        decision = decide(ops, intents, balances, mutation)
        if decision.changes:
            await _write(conn, decision)
        ages = {row["id"]: row["age_s"] for row in rows}
        decision.outcomes[:] = [_aged(o, intents, ages) for o in decision.outcomes]
        return decision


def _aged(outcome: Outcome, intents: Mapping[uuid.UUID, Intent],
          ages: Mapping[uuid.UUID, float]) -> Outcome:  # fmt: skip
    """The outcome with its intent's kind and age when the op made the intent final."""
    if not outcome.applied or outcome.status not in FINAL_STATES:
        return outcome
    return dataclasses.replace(outcome, kind=intents[outcome.txn_id].kind,
                               age_s=ages[outcome.txn_id])  # fmt: skip


def _collapse(changes: Sequence[StateChange]) -> list[tuple[uuid.UUID, str, str, str | None, bool]]:
    """One row per intent: from its first state to its last (a hold and a post of the same
    withdrawal in one batch become pending -> settled, having passed through processing)."""
    rows: dict[uuid.UUID, tuple[uuid.UUID, str, str, str | None, bool]] = {}
    for c in changes:
        first = rows.get(c.txn_id)
        from_status = c.from_status if first is None else first[1]
        via = (first is not None and first[4]) or c.to_status == "processing"
        rows[c.txn_id] = (c.txn_id, from_status, c.to_status, c.failure_reason, via)
    return list(rows.values())


async def _write(conn: Conn, d: Decision) -> None:
    touched = list(d.touched.values())
    states = _collapse(d.changes)
    # Postings are made when money settles: what each account got and paid this batch.
    month_in: dict[uuid.UUID, int] = {}
    month_out: dict[uuid.UUID, int] = {}
    for p in d.postings:
        side = month_in if p.amount_minor > 0 else month_out
        side[p.account_id] = side.get(p.account_id, 0) + abs(p.amount_minor)
    counts = await conn.fetchrow(
        _WRITE,
        [p.txn_id for p in d.postings],
        [p.account_id for p in d.postings],
        [p.amount_minor for p in d.postings],
        [p.balance_after for p in d.postings],
        [b.account_id for b in touched],
        [b.posted for b in touched],
        [b.pending for b in touched],
        [row[0] for row in states],
        [row[1] for row in states],
        [row[2] for row in states],
        [row[3] for row in states],
        [row[4] for row in states],
        [month_in.get(b.account_id, 0) for b in touched],
        [month_out.get(b.account_id, 0) for b in touched],
    )
    assert counts is not None
    expected = (len(d.postings), len(touched), len(states))
    if (counts["postings"], counts["balances"], counts["states"]) != expected:
        raise InvariantViolation(f"batch wrote {tuple(counts)}, expected {expected}")


async def apply_batch(
    db: Db,
    ops: Sequence[Op],
    *,
    attempts_max: int = 8,
    backoff_base_s: float = 0.005,
    backoff_max_s: float = 0.25,
    mutation: str = "",
) -> list[Outcome]:
    """Apply ``ops`` in one transaction and return one outcome per op, in order.

    Safe to call again with the same ops (after a crash, a re-drive, a duplicate job): an op
    whose intent has already left its starting state is reported as not applied. ``mutation``
    ("" unless the chaos harness runs a broken build) removes one safeguard if it is one of
    LEDGER_MUTATIONS; the other layers' mutations mean nothing here."""
    if not ops:
        return []

    async def attempt() -> list[Outcome]:
        if isinstance(db, asyncpg.Pool):
            async with db.acquire() as conn:
                return (await _apply_once(conn, ops, mutation)).outcomes
        return (await _apply_once(db, ops, mutation)).outcomes

    return await with_retries(
        attempt,
        attempts_max=attempts_max,
        backoff_base_s=backoff_base_s,
        backoff_max_s=backoff_max_s,
    )


def new_id() -> uuid.UUID:
    return uuid.uuid4()
