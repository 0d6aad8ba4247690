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

from actors import flagged_intents, rearm_flagged
from api._problems import Problem
from engine import (
    BANK_SETTLEMENT,
    TRANSACTION_COLUMNS,
    Conn,
    NewIntent,
    Transaction,
    create_intents,
    open_accounts,
    system_account,
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


async def _recipient(conn: Conn, to: str) -> tuple[uuid.UUID, str]:
    """A user's account (by email or account id) and that user's email. System accounts are no
    recipients: money reaches them only through deposits and withdrawals."""
    try:
        row = await conn.fetchrow("SELECT account_id, email FROM users WHERE account_id = $1",
                                  uuid.UUID(to))  # fmt: skip
    except ValueError:
        row = await conn.fetchrow(
            "SELECT account_id, email FROM users WHERE lower(email) = lower($1)", to
        )
    if row is None:
        raise Problem(422, "Unknown recipient", "no user with that email or account id")
    return row["account_id"], row["email"]


async def pay(pool: asyncpg.Pool, user: User, key: str, path: str, kind: str,
              body: dict[str, Any], currency: str, amount_max_minor: int,
              record_key: bool = True) -> Stored:  # fmt: skip
    """The intent and its idempotency record in one transaction, the record written last: if
    the key is taken (an earlier request, or a concurrent one still in flight, whose commit
    the insert waits for, at most the pool's lock_timeout), the whole transaction rolls back,
    the intent with it, and the stored answer is replayed (or 409 while still in flight)."""
    digest = request_hash(path, body)
    async with pool.acquire() as conn:
        try:
            async with conn.transaction():
                txn, counterparty = await _create(conn, user, kind, body, currency,
                                                  amount_max_minor)  # fmt: skip
                response = render(txn, user, counterparty)
                if not record_key:  # the "idempotency_off" mutation: a broken build
                    return Stored(202, response, False, txn)
                await conn.execute(
                    "INSERT INTO idempotency_keys (scope, key, request_hash, state, status_code,"
                    " response_body, transaction_id) VALUES ($1, $2, $3, 'done', 202, $4, $5)",
                    str(user.id), key, digest, json.dumps(response), txn.id,
                )  # fmt: skip
        except asyncpg.UniqueViolationError:
            return await _replay(conn, user, key, digest)
        except asyncpg.LockNotAvailableError:
            raise Problem(409, "Request in flight",
                          "a request with this idempotency key is still being processed",
                          headers={"Retry-After": "1"}) from None  # fmt: skip
    return Stored(202, response, False, txn)


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
    return Stored(row["status_code"], json.loads(row["response_body"]), True)


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
    return None if value is None else value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


# A transaction as its user sees it: the counterparty is the other side's email, or "bank".
_VIEW = (
    ", ".join(f"t.{c}" for c in TRANSACTION_COLUMNS.split(", "))
    + ", coalesce(u.email, CASE WHEN t.kind = 'transfer' THEN NULL ELSE 'bank' END,"
    " (CASE WHEN t.source_id = $1 THEN t.dest_id ELSE t.source_id END)::text) AS counterparty"
    " FROM transactions t LEFT JOIN users u ON t.kind = 'transfer'"
    " AND u.account_id = CASE WHEN t.source_id = $1 THEN t.dest_id ELSE t.source_id END"
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
    rows = await pool.fetch(
        f"SELECT {_VIEW} WHERE (t.source_id = $1 OR t.dest_id = $1)"
        " AND (t.created_at, t.id) < ($2, $3)"
        " ORDER BY t.created_at DESC, t.id DESC LIMIT $4", user.account_id, after[0], after[1],
        limit + 1)  # fmt: skip
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


async def dashboard(pool: asyncpg.Pool, user: User, user_currency: str) -> dict[str, Any]:
    balance = await pool.fetchrow(
        "SELECT posted, pending FROM balances WHERE account_id = $1", user.account_id
    )
    assert balance is not None
    totals = await pool.fetchrow(
        "SELECT coalesce(sum(amount_minor) FILTER (WHERE dest_id = $1), 0)::bigint AS month_in,"
        " coalesce(sum(amount_minor) FILTER (WHERE source_id = $1), 0)::bigint AS month_out,"
        " (SELECT count(*) FROM transactions WHERE (source_id = $1 OR dest_id = $1)"
        "  AND status IN ('pending', 'processing')) AS pending_count"
        " FROM transactions WHERE (source_id = $1 OR dest_id = $1) AND status = 'settled'"
        " AND settled_at >= date_trunc('month', now())",
        user.account_id,
    )
    assert totals is not None
    recent = await list_transactions(pool, user, None, 10)
    posted, pending = balance["posted"], balance["pending"]
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
