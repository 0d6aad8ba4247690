"""Small builders shared by the ledger tests: funded accounts and intents on a real database."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import asyncpg

from engine import (
    BANK_SETTLEMENT,
    Action,
    Conn,
    NewIntent,
    Op,
    apply_batch,
    create_intents,
    open_accounts,
    system_account,
)

CUR = "USD"
MAX = 1_000_000


async def funded(db: asyncpg.Pool | Conn, amounts: Sequence[int]) -> list[uuid.UUID]:
    """Open one account per amount and deposit that amount into it (zero: no deposit)."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            return await funded(conn, amounts)
    accounts = await open_accounts(db, [None] * len(amounts), CUR)
    bank = await system_account(db, BANK_SETTLEMENT)
    deposits = [
        NewIntent("deposit", bank, a, amt) for a, amt in zip(accounts, amounts, strict=True) if amt
    ]
    created = await create_intents(db, deposits, currency=CUR, amount_max_minor=10**12)
    await apply_batch(db, [Op(t.id, Action.CREDIT) for t in created])
    return accounts


async def intents(db: asyncpg.Pool | Conn, new: Sequence[NewIntent]) -> list[uuid.UUID]:
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            return await intents(conn, new)
    created = await create_intents(db, new, currency=CUR, amount_max_minor=10**12)
    return [t.id for t in created]
