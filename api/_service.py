"""The API's rules, one PostgreSQL transaction each; SQL lives here, not in the handlers."""

from __future__ import annotations

import base64
import csv
import dataclasses
import datetime as dt
import hashlib
import io
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from actors import flagged_intents, rearm_flagged
from api._problems import Problem
from engine import (
    BANK_SETTLEMENT,
    TRANSACTION_COLUMNS,
    Conn,
    NewIntent,
    SelfTransfer,
    Transaction,
    create_intents,
    new_id,
    open_accounts,
    system_account,
    validate_amount,
)

IDEMPOTENCY_WAIT_MS = 5000
PAGE_MAX = 200


@dataclass(frozen=True)
class User:
    id: uuid.UUID
    email: str
    name: str
    role: str
    account_id: uuid.UUID

    def as_json(self) -> dict[str, str]:
        return {"id": str(self.id), "email": self.email, "name": self.name, "role": self.role,
                "account_id": str(self.account_id)}  # fmt: skip


_USER = "id, email, name, role, account_id"


async def create_user(pool: asyncpg.Pool, email: str, name: str, password_hash: str,
                      currency: str) -> User:  # fmt: skip
    async with pool.acquire() as conn, conn.transaction():
        [account] = await open_accounts(conn, [None], currency)
        try:
            row = await conn.fetchrow(
                f"INSERT INTO users (email, name, password_hash, account_id)"
                f" VALUES ($1, $2, $3, $4) RETURNING {_USER}",
                email,
                name,
                password_hash,
                account,
            )
        except asyncpg.UniqueViolationError:
            raise Problem(409, "Email taken", "an account with this email exists") from None
        assert row is not None
        await conn.execute("UPDATE accounts SET owner_id = $1 WHERE id = $2", row["id"], account)
    return User(**dict(row))


async def find_login(pool: asyncpg.Pool, email: str) -> tuple[User | None, str | None]:
    row = await pool.fetchrow(
        f"SELECT {_USER}, password_hash FROM users WHERE lower(email) = lower($1)", email
    )
    if row is None:
        return None, None
    values = dict(row)
    password_hash = values.pop("password_hash")
    return User(**values), password_hash


async def get_user(pool: asyncpg.Pool, user_id: uuid.UUID) -> User:
    row = await pool.fetchrow(f"SELECT {_USER} FROM users WHERE id = $1", user_id)
    if row is None:
        raise Problem(401, "Unauthorized", "the user of this token no longer exists")
    return User(**dict(row))


def request_hash(path: str, body: dict[str, Any]) -> str:
    canonical = json.dumps([path, body], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Stored:
    status: int
    body: dict[str, Any]
    replayed: bool
    txn: Transaction | None = None


async def _recipient(conn: Conn | asyncpg.Pool, to: str) -> tuple[uuid.UUID, str]:
    """A user's account (by email or account id) and that user's email. System accounts are no
    recipients: money reaches them only through deposits and withdrawals."""
    if (known := _RECIPIENTS.get(to.lower())) is not None:
        return known
    try:
        row = await conn.fetchrow("SELECT account_id, email FROM users WHERE account_id = $1",
                                  uuid.UUID(to))  # fmt: skip
    except ValueError:
        row = await conn.fetchrow(
            "SELECT account_id, email FROM users WHERE lower(email) = lower($1)", to
        )
    if row is None:
        raise Problem(422, "Unknown recipient", "no user with that email or account id")
    if len(_RECIPIENTS) >= RECIPIENTS_CACHED_MAX:
        _RECIPIENTS.clear()
    _RECIPIENTS[to.lower()] = row["account_id"], row["email"]
    return row["account_id"], row["email"]


# Who a recipient is never changes (users are not deleted, emails not edited): looked up once
# per process. Bounded: cleared when full.
_RECIPIENTS: dict[str, tuple[uuid.UUID, str]] = {}
_SYSTEM: dict[str, uuid.UUID] = {}
RECIPIENTS_CACHED_MAX = 10_000

# A payment in one statement (one round trip, its own transaction): the intent, when both
# accounts exist in the ledger's currency, and its idempotency record, written last. A key that
# is taken fails the record's insert and so the whole statement: nothing is written, the stored
# answer is replayed. The record's body is the 202's body, ``created_at`` added by the server
# (the format of ``_rfc3339``), and the answer is that stored body: the first answer and every
# replay are the same.
_PAY = """
WITH intent AS (
    INSERT INTO transactions (id, kind, source_id, dest_id, amount_minor, currency, note)
    SELECT $1::uuid, $2::text, $3::uuid, $4::uuid, $5::bigint, $6::text, $7::text
    WHERE (SELECT count(*) FROM accounts WHERE id IN ($3, $4) AND rtrim(currency) = $6::text) = 2
    RETURNING id, created_at
), record AS (
    INSERT INTO idempotency_keys (scope, key, request_hash, state, status_code, response_body,
                                  transaction_id)
    SELECT $8::text, $9::text, $10::text, 'done', 202,
        $11::jsonb || jsonb_build_object('created_at',
            to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')), id
    FROM intent
    RETURNING response_body
)
SELECT intent.created_at, record.response_body::text AS body FROM intent, record
"""


async def pay(pool: asyncpg.Pool, user: User, key: str, path: str, kind: str,
              body: dict[str, Any], currency: str, amount_max_minor: int,
              record_key: bool = True) -> Stored:  # fmt: skip
    """The intent and its idempotency record in one statement (``_PAY``); if the key is taken
    (an earlier request, or a concurrent one still in flight, whose commit the insert waits
    for, at most the pool's lock_timeout), nothing is written and the stored answer is replayed
    (or 409 while still in flight)."""
    digest = request_hash(path, body)
    if not record_key:  # the "idempotency_off" mutation: a broken build, the general path
        return await _pay_in_steps(pool, user, kind, body, currency, amount_max_minor)
    intent, counterparty = await _intent(pool, user, kind, body, amount_max_minor)
    answer = render_new(intent, user, counterparty, currency)
    try:
        row = await pool.fetchrow(
            _PAY, intent.id, kind, intent.source_id, intent.dest_id, intent.amount_minor,
            currency, intent.note, str(user.id), key, digest, orjson.dumps(answer).decode(),
        )  # fmt: skip
    except asyncpg.UniqueViolationError:
        async with pool.acquire() as conn:
            return await _replay(conn, user, key, digest)
    except asyncpg.LockNotAvailableError:
        raise Problem(409, "Request in flight",
                      "a request with this idempotency key is still being processed",
                      headers={"Retry-After": "1"}) from None  # fmt: skip
    if row is None:  # an account missing or in another currency: the engine says which
        return await _pay_in_steps(pool, user, kind, body, currency, amount_max_minor)
    assert intent.id is not None
    txn = Transaction(intent.id, kind, "pending", intent.source_id, intent.dest_id,
                      intent.amount_minor, currency, intent.note, None, row["created_at"],
                      None, None, None)  # fmt: skip
    return Stored(202, orjson.loads(row["body"]), False, txn)


async def _intent(db: asyncpg.Pool, user: User, kind: str, body: dict[str, Any],
                  amount_max_minor: int) -> tuple[NewIntent, str]:  # fmt: skip
    """The intent a payment asks for, checked as ``create_intents`` checks it, and the
    counterparty as the caller sees it."""
    amount = validate_amount(body["amount"], amount_max_minor)
    if kind == "transfer":
        dest, email = await _recipient(db, body["to"])
        if dest == user.account_id:
            raise SelfTransfer("source and destination are the same account")
        return NewIntent(kind, user.account_id, dest, amount, body.get("note"), new_id()), email
    bank = _SYSTEM.get(BANK_SETTLEMENT) or await system_account(db, BANK_SETTLEMENT)
    _SYSTEM[BANK_SETTLEMENT] = bank
    if kind == "withdrawal":
        return NewIntent(kind, user.account_id, bank, amount, None, new_id()), "bank"
    return NewIntent(kind, bank, user.account_id, amount, None, new_id()), "bank"


def render_new(intent: NewIntent, user: User, counterparty: str, currency: str
               ) -> dict[str, Any]:  # fmt: skip
    """A new intent's 202 body, but for ``created_at`` (the server's clock adds it)."""
    return {
        "id": str(intent.id), "kind": intent.kind, "status": "pending",
        "amount": intent.amount_minor, "currency": currency,
        "direction": "out" if intent.source_id == user.account_id else "in",
        "counterparty": counterparty, "note": intent.note, "failure_reason": None,
        "settled_at": None,
    }  # fmt: skip


async def _pay_in_steps(pool: asyncpg.Pool, user: User, kind: str, body: dict[str, Any],
                        currency: str, amount_max_minor: int) -> Stored:  # fmt: skip
    """The engine's general path, with no idempotency record: for the mutation, and for the
    precise error when the one statement wrote nothing."""
    async with pool.acquire() as conn, conn.transaction():
        txn, counterparty = await _create(conn, user, kind, body, currency, amount_max_minor)
    return Stored(202, render(txn, user, counterparty), False, txn)


async def _replay(conn: Conn, user: User, key: str, digest: str) -> Stored:
    row = await conn.fetchrow(
        "SELECT request_hash, state, status_code, response_body FROM idempotency_keys"
        " WHERE scope = $1 AND key = $2",
        str(user.id),
        key,
    )
    if row is None:  # the other request rolled back after all: the client may simply retry
        raise Problem(409, "Request in flight", "retry shortly", headers={"Retry-After": "1"})
    if row["request_hash"] != digest:
        raise Problem(422, "Idempotency key reused",
                      "this idempotency key was used with a different request")  # fmt: skip
    if row["state"] != "done":
        raise Problem(409, "Request in flight", "retry shortly", headers={"Retry-After": "1"})
    return Stored(row["status_code"], orjson.loads(row["response_body"]), True)


async def _create(conn: Conn, user: User, kind: str, body: dict[str, Any],
                  currency: str, amount_max_minor: int) -> tuple[Transaction, str]:  # fmt: skip
    """The intent, and the counterparty as the caller sees it."""
    amount = body["amount"]
    if kind == "transfer":
        dest, email = await _recipient(conn, body["to"])
        intent = NewIntent("transfer", user.account_id, dest, amount, body.get("note"))
    else:
        bank = await system_account(conn, BANK_SETTLEMENT)
        email = "bank"
        intent = NewIntent(kind, bank, user.account_id, amount)
        if kind == "withdrawal":
            intent = NewIntent(kind, user.account_id, bank, amount)
    [txn] = await create_intents(conn, [intent], currency=currency,
                                 amount_max_minor=amount_max_minor)  # fmt: skip
    return txn, email


def _rfc3339(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


# A transaction as its user sees it: the counterparty is the other side's email, or "bank".
_VIEW = (
    ", ".join(f"t.{c}" for c in TRANSACTION_COLUMNS.split(", "))
    + ", coalesce(u.email, CASE WHEN t.kind = 'transfer' THEN NULL ELSE 'bank' END,"
    " (CASE WHEN t.source_id = $1 THEN t.dest_id ELSE t.source_id END)::text) AS counterparty"
    " FROM transactions t LEFT JOIN users u ON t.kind = 'transfer'"
    " AND u.account_id = CASE WHEN t.source_id = $1 THEN t.dest_id ELSE t.source_id END"
)


# A page of history: the newest of what the account paid and the newest of what it got, each
# an ordered scan of its own index (source_id or dest_id, created_at DESC, id DESC) that stops
# at the page size, merged; an OR of both would read every row of the account and sort them.
_PAGE = (
    f"SELECT {_VIEW} WHERE t.id IN (SELECT id FROM ("
    " (SELECT id, created_at FROM transactions WHERE source_id = $1"
    "  AND (created_at, id) < ($2, $3) ORDER BY created_at DESC, id DESC LIMIT $4)"
    " UNION ALL"
    " (SELECT id, created_at FROM transactions WHERE dest_id = $1 AND source_id <> $1"
    "  AND (created_at, id) < ($2, $3) ORDER BY created_at DESC, id DESC LIMIT $4)"
    " ) newest ORDER BY created_at DESC, id DESC LIMIT $4)"
    " ORDER BY t.created_at DESC, t.id DESC"
)


def _viewed(row: asyncpg.Record, user: User) -> dict[str, Any]:
    return render(Transaction.from_row(row), user, row["counterparty"])


def render(txn: Transaction, user: User, counterparty: str) -> dict[str, Any]:
    outgoing = txn.source_id == user.account_id
    return {
        "id": str(txn.id), "kind": txn.kind, "status": txn.status, "amount": txn.amount_minor,
        "currency": txn.currency, "direction": "out" if outgoing else "in",
        "counterparty": counterparty, "note": txn.note, "failure_reason": txn.failure_reason,
        "created_at": _rfc3339(txn.created_at), "settled_at": _rfc3339(txn.settled_at),
    }  # fmt: skip


async def get_transaction(pool: asyncpg.Pool, user: User, txn_id: uuid.UUID) -> dict[str, Any]:
    row = await pool.fetchrow(
        f"SELECT {_VIEW} WHERE t.id = $2 AND (t.source_id = $1 OR t.dest_id = $1)",
        user.account_id,
        txn_id,
    )
    if row is None:  # another user's transaction is as unknown as a missing one
        raise Problem(404, "Not found", "no such transaction")
    return _viewed(row, user)


def _cursor(created_at: dt.datetime, txn_id: uuid.UUID) -> str:
    raw = f"{created_at.isoformat()}|{txn_id}".encode()
    return base64.urlsafe_b64encode(raw).decode()


CURSOR_CHARS_MAX = 256  # a cursor this API writes is about 92


def _parse_cursor(cursor: str) -> tuple[dt.datetime, uuid.UUID]:
    """Only what ``_cursor`` writes: an aware timestamp that is a real instant once moved to
    UTC, and a UUID. Anything else is a 400: a naive time (whose meaning would depend on the
    server's zone), or one past the ends of the calendar in UTC (year 9999 at -14:00, year 1 at
    +14:00), which the driver could not encode (that was a 500)."""
    bad = Problem(400, "Bad cursor", "the cursor is not one this API issued")
    if len(cursor) > CURSOR_CHARS_MAX:
        raise bad
    try:
        created, txn = base64.urlsafe_b64decode(cursor).decode().split("|")
        at = dt.datetime.fromisoformat(created)
        if at.tzinfo is None:
            raise bad
        return at.astimezone(dt.UTC), uuid.UUID(txn)
    except (ValueError, UnicodeError, OverflowError):
        raise bad from None


async def list_transactions(pool: asyncpg.Pool, user: User, cursor: str | None,
                            limit: int) -> dict[str, Any]:  # fmt: skip
    """Newest first, keyset-paginated on (created_at, id): stable under concurrent inserts."""
    after = _parse_cursor(cursor) if cursor else (dt.datetime.max.replace(tzinfo=dt.UTC),
                                                  uuid.UUID(int=2**128 - 1))  # fmt: skip
    rows = await pool.fetch(_PAGE, user.account_id, after[0], after[1], limit + 1)
    page = rows[:limit]
    items = [_viewed(r, user) for r in page]
    more = len(rows) > limit
    last = page[-1] if more else None
    return {
        "items": items,
        "next_cursor": None if last is None else _cursor(last["created_at"], last["id"]),
    }


CSV_PAGE = 500
CSV_ROWS_MAX = 1_000_000
CSV_COLUMNS = ["id", "kind", "status", "amount", "currency", "direction", "counterparty", "note",
               "failure_reason", "created_at", "settled_at"]  # fmt: skip
# OWASP's CSV injection triggers: a spreadsheet reads a cell starting with one as a formula.
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_cell(value: object) -> str | int:
    """A CSV cell a spreadsheet reads as data. Text (notes and emails are the users' own) that
    starts with a formula trigger, also after leading whitespace, gets a leading single quote,
    which spreadsheets show as text and which keeps the original after it. Integers (amounts,
    server-made, never user text) stay plain numbers, so sums work; the writer quotes every
    text cell (QUOTE_NONNUMERIC), so no cell's separators or quotes can split it."""
    if value is None:
        return ""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value)
    if text.startswith(FORMULA_TRIGGERS) or text.lstrip().startswith(FORMULA_TRIGGERS):
        return "'" + text
    return text


async def export_csv(pool: asyncpg.Pool, user: User) -> AsyncIterator[str]:
    """Own history as CSV, newest first, one keyset page at a time (bounded memory)."""
    out = io.StringIO()
    csv.writer(out).writerow(CSV_COLUMNS)  # names of our own: no quotes needed
    writer = csv.writer(out, quoting=csv.QUOTE_NONNUMERIC)
    yield _drain(out)
    cursor: str | None = None
    for _ in range(CSV_ROWS_MAX // CSV_PAGE):
        page = await list_transactions(pool, user, cursor, CSV_PAGE)
        for item in page["items"]:
            writer.writerow([spreadsheet_cell(item[c]) for c in CSV_COLUMNS])
        yield _drain(out)
        cursor = page["next_cursor"]
        if cursor is None:
            return


def _drain(out: io.StringIO) -> str:
    text = out.getvalue()
    out.seek(0)
    out.truncate()
    return text


# The balance, the month totals the ledger keeps beside it (migration 0006: zero when they
# belong to an earlier month) and the open transactions (partial indexes: few rows).
_DASHBOARD = """
SELECT b.posted, b.pending,
       CASE WHEN b.month_start = date_trunc('month', now() AT TIME ZONE 'UTC')::date
            THEN b.month_in_minor ELSE 0 END AS month_in,
       CASE WHEN b.month_start = date_trunc('month', now() AT TIME ZONE 'UTC')::date
            THEN b.month_out_minor ELSE 0 END AS month_out,
       (SELECT count(*) FROM transactions WHERE source_id = $1
            AND status IN ('pending', 'processing'))
       + (SELECT count(*) FROM transactions WHERE dest_id = $1 AND source_id <> $1
            AND status IN ('pending', 'processing')) AS pending_count
FROM balances b WHERE b.account_id = $1
"""
RECENT = 10


async def dashboard(pool: asyncpg.Pool, user: User, user_currency: str) -> dict[str, Any]:
    totals = await pool.fetchrow(_DASHBOARD, user.account_id)
    assert totals is not None
    recent = await list_transactions(pool, user, None, RECENT)
    posted, pending = totals["posted"], totals["pending"]
    return {
        "balance": {"currency": user_currency, "posted": posted, "pending": pending,
                    "available": posted - pending},
        "pending_count": totals["pending_count"],
        "month_totals": {"in": totals["month_in"], "out": totals["month_out"]},
        "recent": recent["items"],
    }  # fmt: skip


async def findings(pool: asyncpg.Pool, limit: int = 500) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT id, kind, subject, detail, found_at FROM reconciliation_findings"
        " WHERE resolved_at IS NULL ORDER BY id DESC LIMIT $1",
        limit,
    )
    return [{"id": r["id"], "kind": r["kind"], "subject": r["subject"], "detail": r["detail"],
             "found_at": _rfc3339(r["found_at"])} for r in rows]  # fmt: skip


async def needs_attention(pool: asyncpg.Pool, limit: int = 200) -> dict[str, Any]:
    count, rows = await flagged_intents(pool, limit)
    items = [{"id": str(r["id"]), "kind": r["kind"], "amount": r["amount_minor"],
              "currency": r["currency"], "attempts": r["attempts"], "rearms": r["rearms"],
              "created_at": _rfc3339(r["created_at"])} for r in rows]  # fmt: skip
    return {"count": count, "items": items}


async def rearm(pool: asyncpg.Pool, kinds: list[str], limit: int) -> dict[str, Any]:
    ids = await rearm_flagged(pool, sorted(set(kinds)), limit, by_operator=True)
    return {"rearmed": len(ids), "ids": [str(i) for i in ids]}


async def make_admin(pool: asyncpg.Pool, email: str, name: str, password_hash: str,
                     currency: str) -> User:  # fmt: skip
    user = await create_user(pool, email, name, password_hash, currency)
    await pool.execute("UPDATE users SET role = 'admin' WHERE id = $1", user.id)
    return dataclasses.replace(user, role="admin")
