"""Accounts, balances and intents: the rows a transfer is validated against and recorded as."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from engine._errors import (
    CurrencyMismatch,
    InvalidAmount,
    SelfTransfer,
    UnknownAccount,
    UnknownTransaction,
)
from engine._types import Conn, Db

BANK_SETTLEMENT = "bank_settlement"
FEES = "fees"
SYSTEM_CODES = (BANK_SETTLEMENT, FEES)
KINDS = frozenset({"deposit", "withdrawal", "transfer"})


@dataclass(frozen=True)
class BalanceView:
    account_id: uuid.UUID
    currency: str
    posted: int
    pending: int

    @property
    def available(self) -> int:
        return self.posted - self.pending


@dataclass(frozen=True)
class Transaction:
    id: uuid.UUID
    kind: str
    status: str
    source_id: uuid.UUID
    dest_id: uuid.UUID
    amount_minor: int
    currency: str
    note: str | None
    failure_reason: str | None
    created_at: datetime
    processing_at: datetime | None
    settled_at: datetime | None
    failed_at: datetime | None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Transaction:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})


TRANSACTION_COLUMNS = ", ".join(Transaction.__dataclass_fields__)


async def ensure_system_accounts(conn: Conn, currency: str) -> dict[str, uuid.UUID]:
    """Create the system accounts once (idempotent); returns code -> account id."""
    async with conn.transaction():
        for code in SYSTEM_CODES:
            account_id = await conn.fetchval(
                "INSERT INTO accounts (kind, code, currency) VALUES ('system', $1, $2) "
                "ON CONFLICT (code) DO NOTHING RETURNING id",
                code,
                currency,
            )
            if account_id is not None:
                await conn.execute(
                    "INSERT INTO balances (account_id, allow_negative) VALUES ($1, true)",
                    account_id,
                )
        rows = await conn.fetch(
            "SELECT code, id, currency FROM accounts WHERE kind = 'system' AND code = ANY($1)",
            list(SYSTEM_CODES),
        )
    for row in rows:
        if row["currency"] != currency:
            raise CurrencyMismatch(
                f"system account {row['code']} is in {row['currency']}, ledger is {currency}"
            )
    return {row["code"]: row["id"] for row in rows}


async def system_account(conn: Db, code: str) -> uuid.UUID:
    account_id = await conn.fetchval("SELECT id FROM accounts WHERE code = $1", code)
    if account_id is None:
        raise UnknownAccount(f"system account {code!r} does not exist; run `kizo migrate`")
    assert isinstance(account_id, uuid.UUID)
    return account_id


async def open_accounts(
    conn: Conn, owner_ids: Sequence[uuid.UUID | None], currency: str
) -> list[uuid.UUID]:
    """Open one user account (with a zero balance) per owner, in one round trip."""
    rows = await conn.fetch(
        """
        WITH new AS (
            INSERT INTO accounts (kind, owner_id, currency)
            SELECT 'user', owner, $2 FROM unnest($1::uuid[]) WITH ORDINALITY AS o(owner, n)
            ORDER BY n
            RETURNING id
        ), bal AS (
            INSERT INTO balances (account_id) SELECT id FROM new RETURNING account_id
        )
        SELECT account_id AS id FROM bal
        """,
        list(owner_ids),
        currency,
    )
    return [row["id"] for row in rows]


async def get_balance(db: Db, account_id: uuid.UUID) -> BalanceView:
    row = await db.fetchrow(
        "SELECT a.id, a.currency, b.posted, b.pending FROM accounts a "
        "JOIN balances b ON b.account_id = a.id WHERE a.id = $1",
        account_id,
    )
    if row is None:
        raise UnknownAccount(f"account {account_id} does not exist")
    return BalanceView(row["id"], row["currency"].strip(), row["posted"], row["pending"])


@dataclass(frozen=True)
class NewIntent:
    """A request to move money, validated by ``create_intents`` before anything is written."""

    kind: str
    source_id: uuid.UUID
    dest_id: uuid.UUID
    amount_minor: int
    note: str | None = None
    id: uuid.UUID | None = None


def validate_amount(amount_minor: object, amount_max_minor: int) -> int:
    """Amounts are positive integers of minor units, at most ``amount_max_minor``."""
    if isinstance(amount_minor, bool) or not isinstance(amount_minor, int):
        raise InvalidAmount("amount must be an integer number of minor units")
    if amount_minor <= 0:
        raise InvalidAmount("amount must be greater than zero")
    if amount_minor > amount_max_minor:
        raise InvalidAmount(f"amount must be at most {amount_max_minor} minor units")
    return amount_minor


async def create_intents(
    conn: Conn,
    intents: Sequence[NewIntent],
    *,
    currency: str,
    amount_max_minor: int,
) -> list[Transaction]:
    """Validate and insert pending intents (in the caller's transaction, if any).

    Every rule is checked before anything is written: bad input changes nothing."""
    for intent in intents:
        if intent.kind not in KINDS:
            raise InvalidAmount(f"unknown transaction kind {intent.kind!r}")
        validate_amount(intent.amount_minor, amount_max_minor)
        if intent.source_id == intent.dest_id:
            raise SelfTransfer("source and destination are the same account")
    ids = sorted({a for i in intents for a in (i.source_id, i.dest_id)})
    rows = await conn.fetch("SELECT id, currency FROM accounts WHERE id = ANY($1::uuid[])", ids)
    found = {row["id"]: row["currency"].strip() for row in rows}
    for account_id in ids:
        if account_id not in found:
            raise UnknownAccount(f"account {account_id} does not exist")
        if found[account_id] != currency:
            raise CurrencyMismatch(
                f"account {account_id} is in {found[account_id]}, not {currency}"
            )
    inserted = await conn.fetch(
        f"""
        INSERT INTO transactions (id, kind, source_id, dest_id, amount_minor, currency, note)
        SELECT coalesce(id, gen_random_uuid()), kind, source_id, dest_id, amount_minor, $7, note
        FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::uuid[], $5::bigint[], $6::text[])
            WITH ORDINALITY AS v(id, kind, source_id, dest_id, amount_minor, note, n)
        ORDER BY n
        RETURNING {TRANSACTION_COLUMNS}
        """,
        [i.id for i in intents],
        [i.kind for i in intents],
        [i.source_id for i in intents],
        [i.dest_id for i in intents],
        [i.amount_minor for i in intents],
        [i.note for i in intents],
        currency,
    )
    return [Transaction.from_row(row) for row in inserted]


async def get_transaction(db: Db, txn_id: uuid.UUID) -> Transaction:
    row = await db.fetchrow(f"SELECT {TRANSACTION_COLUMNS} FROM transactions WHERE id = $1", txn_id)
    if row is None:
        raise UnknownTransaction(f"transaction {txn_id} does not exist")
    return Transaction.from_row(row)
