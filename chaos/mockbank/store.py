"""The bank's ledger: customer accounts and idempotent payments, in its own database."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

MIGRATIONS = Path(__file__).with_name("migrations")
KINDS = ("collection", "payout")
_COLUMNS = "key, kind, account, amount_minor, currency, status, failure_reason, created_at, seq"


@dataclass(frozen=True)
class PaymentRequest:
    key: str
    kind: str
    account: str
    amount_minor: int
    currency: str


class KeyConflict(Exception):
    """The key was used before for a different request."""


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
        "created_at": created.astimezone(dt.UTC).isoformat().replace("+00:00", "Z"),
    }


def _same(row: asyncpg.Record, req: PaymentRequest) -> bool:
    return (row["kind"], row["account"], row["amount_minor"], row["currency"]) == (
        req.kind,
        req.account,
        req.amount_minor,
        req.currency,
    )


async def pay(
    pool: asyncpg.Pool, req: PaymentRequest, opening_minor: int
) -> tuple[bool, dict[str, Any]]:
    """Make the payment once per key; returns (created, payment). A replay of the same request
    returns the stored payment; a different request under a used key raises KeyConflict."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO customer_accounts (account, balance_minor) VALUES ($1, $2)"
            " ON CONFLICT DO NOTHING",
            req.account,
            opening_minor,
        )
        # The customer's row lock serializes every payment on that account, duplicates included.
        balance = await conn.fetchval(
            "SELECT balance_minor FROM customer_accounts WHERE account = $1 FOR UPDATE",
            req.account,
        )
        existing = await conn.fetchrow(f"SELECT {_COLUMNS} FROM payments WHERE key = $1", req.key)
        if existing is not None:
            if not _same(existing, req):
                raise KeyConflict(f"key {req.key} was used for a different payment")
            return False, payment_json(existing)
        ok = req.kind == "payout" or balance >= req.amount_minor
        delta = req.amount_minor if req.kind == "payout" else -req.amount_minor
        row = await conn.fetchrow(
            f"INSERT INTO payments (key, kind, account, amount_minor, currency, status,"
            f" failure_reason) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {_COLUMNS}",
            req.key,
            req.kind,
            req.account,
            req.amount_minor,
            req.currency,
            "succeeded" if ok else "failed",
            None if ok else "insufficient_funds",
        )
        if ok:
            await conn.execute(
                "UPDATE customer_accounts SET balance_minor = balance_minor + $2"
                " WHERE account = $1",
                req.account,
                delta,
            )
        assert row is not None
        return True, payment_json(row)


async def get_payment(pool: asyncpg.Pool, key: str) -> dict[str, Any] | None:
    row = await pool.fetchrow(f"SELECT {_COLUMNS} FROM payments WHERE key = $1", key)
    return None if row is None else payment_json(row)


async def statement(
    pool: asyncpg.Pool, since_seq: int, limit: int
) -> tuple[list[dict[str, Any]], int | None]:
    """Succeeded payments after ``since_seq`` in order; the next cursor when more remain."""
    rows = await pool.fetch(
        f"SELECT {_COLUMNS} FROM payments WHERE seq > $1 AND status = 'succeeded'"
        " ORDER BY seq LIMIT $2",
        since_seq,
        limit + 1,
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return [payment_json(r) for r in rows], (rows[-1]["seq"] if more else None)


async def set_balance(pool: asyncpg.Pool, account: str, balance_minor: int) -> None:
    await pool.execute(
        "INSERT INTO customer_accounts (account, balance_minor) VALUES ($1, $2)"
        " ON CONFLICT (account) DO UPDATE SET balance_minor = EXCLUDED.balance_minor",
        account,
        balance_minor,
    )


async def get_balance(pool: asyncpg.Pool, account: str) -> int | None:
    value = await pool.fetchval(
        "SELECT balance_minor FROM customer_accounts WHERE account = $1", account
    )
    return None if value is None else int(value)
