"""The bank's ledger in its own database: customer accounts and one payment per idempotency key.

Invariants: a key names at most one payment (the primary key), a payment never changes once
written, and a succeeded payment moved the customer's balance exactly once, in the same
transaction that wrote it.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import asyncpg
from asyncpg.pool import PoolConnectionProxy

MIGRATIONS = Path(__file__).with_name("migrations")
Kind = Literal["collection", "payout"]
_COLUMNS = "key, kind, account, amount_minor, currency, status, failure_reason, created_at"


@dataclass(frozen=True)
class PaymentRequest:
    key: str
    kind: Kind
    account: str
    amount_minor: int
    currency: str


@dataclass(frozen=True)
class Paid:
    created: bool
    payment: dict[str, Any]


class KeyConflict(Exception):
    """The key was used before for a different request."""


class BadCursor(ValueError):
    """A statement cursor this bank did not hand out."""


def payment_json(row: asyncpg.Record) -> dict[str, Any]:
    created: dt.datetime = row["created_at"]
    return {
        "key": row["key"],
        "kind": row["kind"],
        "account": row["account"],
        "amount_minor": row["amount_minor"],
        "currency": row["currency"],
        "status": row["status"],
        "failure_reason": row["failure_reason"],
        "created_at": created.astimezone(dt.UTC).isoformat(timespec="microseconds")[:-6] + "Z",
    }


def _replay(row: asyncpg.Record, req: PaymentRequest) -> Paid:
    stored = (row["kind"], row["account"], row["amount_minor"], row["currency"])
    if stored != (req.kind, req.account, req.amount_minor, req.currency):
        raise KeyConflict(f"key {req.key!r} was used for a different {row['kind']}")
    return Paid(False, payment_json(row))


class _LostRace(Exception):
    """Another request committed this key first; roll back and answer with its payment."""


# The customer's row lock (taken by the upsert) serializes the balance check with the debit.
_LOCK_ACCOUNT = """
INSERT INTO customer_accounts (account, balance_minor) VALUES ($1, $2)
ON CONFLICT (account) DO UPDATE SET account = EXCLUDED.account
RETURNING balance_minor
"""

# ON CONFLICT waits for a concurrent insert of the same key to commit or abort, so of many
# requests with one key exactly one inserts; the balance moves only with a row that was inserted.
_INSERT_PAYMENT = f"""
WITH paid AS (
    INSERT INTO payments (key, kind, account, amount_minor, currency, status, failure_reason)
    VALUES ($1, $2, $3, $4, $5, $6, $7)
    ON CONFLICT (key) DO NOTHING
    RETURNING {_COLUMNS}
), moved AS (
    UPDATE customer_accounts SET balance_minor = balance_minor + $8
    WHERE account = $3 AND EXISTS (SELECT 1 FROM paid WHERE status = 'succeeded')
)
SELECT {_COLUMNS} FROM paid
"""


async def pay(
    pool: asyncpg.Pool, req: PaymentRequest, opening_minor: int, timeout_s: float
) -> Paid:
    """Make the payment once per key. A replay of the same request returns the stored payment;
    a different request under a used key raises KeyConflict and changes nothing."""
    async with pool.acquire(timeout=timeout_s) as conn:
        row = await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM payments WHERE key = $1", req.key, timeout=timeout_s
        )
        if row is not None:
            return _replay(row, req)
        try:
            return await _first(conn, req, opening_minor, timeout_s)
        except _LostRace:
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM payments WHERE key = $1", req.key, timeout=timeout_s
            )
            assert row is not None, "a key that conflicted on insert must exist"
            return _replay(row, req)


async def _first(
    conn: PoolConnectionProxy, req: PaymentRequest, opening_minor: int, timeout_s: float
) -> Paid:
    async with conn.transaction():
        balance = await conn.fetchval(_LOCK_ACCOUNT, req.account, opening_minor, timeout=timeout_s)
        ok = req.kind == "payout" or balance >= req.amount_minor
        delta = req.amount_minor if req.kind == "payout" else -req.amount_minor
        row = await conn.fetchrow(
            _INSERT_PAYMENT,
            req.key,
            req.kind,
            req.account,
            req.amount_minor,
            req.currency,
            "succeeded" if ok else "failed",
            None if ok else "insufficient_funds",
            delta,
            timeout=timeout_s,
        )
        if row is None:
            raise _LostRace  # leaves the transaction: nothing of this request is kept
        return Paid(True, payment_json(row))


async def get_payment(pool: asyncpg.Pool, key: str, timeout_s: float) -> dict[str, Any] | None:
    row = await pool.fetchrow(
        f"SELECT {_COLUMNS} FROM payments WHERE key = $1", key, timeout=timeout_s
    )
    return None if row is None else payment_json(row)


def encode_cursor(xid: int, seq: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{xid}:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        version, xid, seq = raw.split(":")
        if version != "v1":
            raise ValueError(version)
        position = int(xid), int(seq)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadCursor("not a statement cursor of this bank") from None
    if min(position) < 0 or max(position) >= 2**63:
        raise BadCursor("cursor out of range")
    return position


# Only rows of transactions older than every running one: that part of the order is final.
_STATEMENT = f"""
SELECT {_COLUMNS}, xid::text::bigint AS xid_n, seq FROM payments
WHERE status = 'succeeded'
  AND (xid, seq) > ($1::text::xid8, $2)
  AND xid < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY xid, seq
LIMIT $3
"""


async def statement(
    pool: asyncpg.Pool, cursor: str | None, limit: int, timeout_s: float
) -> tuple[list[dict[str, Any]], str | None]:
    """Succeeded payments after ``cursor`` in processing order; a cursor when more remain."""
    xid, seq = (0, 0) if cursor is None else decode_cursor(cursor)
    rows = await pool.fetch(_STATEMENT, str(xid), seq, limit + 1, timeout=timeout_s)
    page = rows[:limit]
    more = len(rows) > limit
    next_cursor = encode_cursor(page[-1]["xid_n"], page[-1]["seq"]) if more else None
    return [payment_json(r) for r in page], next_cursor


async def set_balance(
    pool: asyncpg.Pool, account: str, balance_minor: int, timeout_s: float
) -> None:
    await pool.execute(
        "INSERT INTO customer_accounts (account, balance_minor) VALUES ($1, $2)"
        " ON CONFLICT (account) DO UPDATE SET balance_minor = EXCLUDED.balance_minor",
        account,
        balance_minor,
        timeout=timeout_s,
    )


async def get_balance(pool: asyncpg.Pool, account: str, timeout_s: float) -> int | None:
    value = await pool.fetchval(
        "SELECT balance_minor FROM customer_accounts WHERE account = $1", account, timeout=timeout_s
    )
    return None if value is None else int(value)


async def ping(pool: asyncpg.Pool, timeout_s: float) -> None:
    await pool.fetchval("SELECT 1", timeout=timeout_s)
