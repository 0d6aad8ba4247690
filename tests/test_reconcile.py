"""Reconciliation names every kind of disagreement between the bank's statement and the ledger.

Against real PostgreSQL, Valkey and a real bank process: one settled deposit or withdrawal that
both sides agree on, then exactly one field of it changed, either in the bank's own database or
in the ledger's row, and one janitor pass. The fields come from the records themselves (the
statement line the bank client parses, the columns of ``transactions``), so a field added
later fails ``test_every_field_is_tampered_or_exempt`` until it is compared or said not to be.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import prometheus_client
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from actors.bank_client import BankPayment
from actors.janitor import RECONCILIATION_KINDS, JanitorDeps, PassSummary, run_pass
from actors.janitor_main import _publish
from engine import BANK_SETTLEMENT, Action, NewIntent, Op, apply_batch, system_account
from tests._ledger_helpers import intents
from tests._pipeline_helpers import bank_funded, janitor_deps
from tests.conftest import BankProcess, ServerSet
from tests.test_janitor import FAST

KINDS = ("deposit", "withdrawal")


@dataclass(frozen=True)
class Subject:
    """One settled deposit or withdrawal that the bank made, and a user it does not belong to."""

    kind: str
    txn: uuid.UUID
    user: uuid.UUID
    other: uuid.UUID


@pytest_asyncio.fixture
async def deps(
    pool: asyncpg.Pool, own_bank: BankProcess, redis_client: Redis
) -> AsyncIterator[JanitorDeps]:
    async with janitor_deps(pool, redis_client, own_bank.url, FAST) as made:
        yield made


@pytest_asyncio.fixture
async def bank_db(
    servers: ServerSet, db_name: str, own_bank: BankProcess
) -> AsyncIterator[asyncpg.Connection]:
    """The bank's own database (``running_bank`` names it after the test's)."""
    conn = await asyncpg.connect(servers.pg_url(f"{db_name}_bank"))
    try:
        yield conn
    finally:
        await conn.close()


async def _subject(deps: JanitorDeps, kind: str) -> Subject:
    user, other = await bank_funded(deps.pool, deps.bank, [1_000, 0])
    if kind == "deposit":
        txn = await deps.pool.fetchval(
            "SELECT id FROM transactions WHERE kind = 'deposit' AND dest_id = $1", user
        )
        return Subject(kind, txn, user, other)
    bank = await system_account(deps.pool, BANK_SETTLEMENT)
    [txn] = await intents(deps.pool, [NewIntent("withdrawal", user, bank, 400)])
    await apply_batch(deps.pool, [Op(txn, Action.HOLD)])
    assert (await deps.bank.payout(txn, user, 400, "USD")).outcome == "succeeded"
    [posted] = await apply_batch(deps.pool, [Op(txn, Action.POST)])
    assert posted.status == "settled"
    return Subject(kind, txn, user, other)


def _reconciliation(summary: PassSummary) -> Counter[str]:
    return Counter(f.kind for f in summary.findings if not f.kind.startswith("audit:"))


async def _open_rows(pool: asyncpg.Pool) -> Counter[str]:
    rows = await pool.fetch(
        "SELECT kind FROM reconciliation_findings"
        " WHERE resolved_at IS NULL AND kind NOT LIKE 'audit:%'"
    )
    return Counter(r["kind"] for r in rows)


def _gauge(kind: str) -> float | None:
    return prometheus_client.REGISTRY.get_sample_value(
        "kizo_reconciliation_findings", {"kind": kind}
    )


async def _pass_finds(deps: JanitorDeps, subject: Subject, expected: set[str]) -> None:
    """One pass names exactly ``expected``, once each, about the subject, stored and published."""
    summary = await run_pass(deps)
    assert _reconciliation(summary) == Counter(expected)
    if not expected & {"bank_without_kizo", "kizo_without_bank"}:  # else the key itself changed
        assert {f.subject for f in summary.findings if f.kind in expected} <= {str(subject.txn)}
    assert await _open_rows(deps.pool) == Counter(expected)
    _publish(summary)
    assert {k: _gauge(k) for k in RECONCILIATION_KINDS} == {
        k: float(k in expected) for k in RECONCILIATION_KINDS
    }


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_no_finding_when_the_bank_and_the_ledger_agree(deps: JanitorDeps, kind: str) -> None:
    subject = await _subject(deps, kind)
    for _ in range(2):
        await _pass_finds(deps, subject, set())


# --- one field of the bank's payment changed in the bank's own database -----------------------

BankTamper = Callable[[asyncpg.Connection, Subject], Awaitable[object]]


def _bank_update(assignment: str) -> BankTamper:
    async def tamper(bank_db: asyncpg.Connection, s: Subject) -> object:
        other = [str(s.other)] if "$2" in assignment else []
        return await bank_db.execute(
            f"UPDATE payments SET {assignment} WHERE key = $1", str(s.txn), *other
        )

    return tamper


# field -> (how it is changed, the findings that must follow)
BANK_TAMPERS: dict[str, tuple[BankTamper, set[str]]] = {
    "key": (
        _bank_update("key = gen_random_uuid()::text"),
        {"bank_without_kizo", "kizo_without_bank"},
    ),
    # The bank's kind is its direction too: money into Kizo or out of it.
    "kind": (
        _bank_update("kind = CASE kind WHEN 'collection' THEN 'payout' ELSE 'collection' END"),
        {"kind_mismatch", "direction_mismatch"},
    ),
    "account": (_bank_update("account = $2"), {"account_mismatch"}),
    "amount_minor": (
        _bank_update("amount_minor = amount_minor + 1"),
        {"amount_mismatch"},
    ),
    "currency": (_bank_update("currency = 'EUR'"), {"currency_mismatch"}),
    # A failed payment is not on the statement: the bank is asked by key.
    "status": (
        _bank_update("status = 'failed', failure_reason = 'declined'"),
        {"status_mismatch_bank_failed"},
    ),
}
BANK_EXEMPT = {
    "failure_reason": "only failed payments have one, and the statement lists only succeeded ones",
    "created_at": "the bank's clock, not Kizo's: the two never agree to the microsecond",
}


# --- one column of the ledger's transaction changed in SQL --------------------------------------

LedgerTamper = Callable[[asyncpg.Pool, Subject], Awaitable[object]]


def _ledger_update(assignment: str) -> LedgerTamper:
    async def tamper(pool: asyncpg.Pool, s: Subject) -> object:
        async with pool.acquire() as conn, conn.transaction():
            # Final rows are guarded against exactly this; the test plays the broken code path.
            await conn.execute("ALTER TABLE transactions DISABLE TRIGGER transactions_final_guard")
            other = [s.other] if "$2" in assignment else []
            return await conn.execute(
                f"UPDATE transactions SET {assignment} WHERE id = $1", s.txn, *other
            )

    return tamper


def _by_kind(deposit: set[str], withdrawal: set[str]) -> Callable[[str], set[str]]:
    return lambda kind: deposit if kind == "deposit" else withdrawal


def _both(expected: set[str]) -> Callable[[str], set[str]]:
    return _by_kind(expected, expected)


# column -> (how it is changed, the findings that must follow for a deposit / a withdrawal)
LEDGER_TAMPERS: dict[str, tuple[LedgerTamper, Callable[[str], set[str]]]] = {
    "id": (
        _ledger_update("id = gen_random_uuid()"),
        _both({"bank_without_kizo", "kizo_without_bank"}),
    ),
    "kind": (
        _ledger_update("kind = CASE kind WHEN 'deposit' THEN 'withdrawal' ELSE 'deposit' END"),
        _both({"kind_mismatch"}),
    ),
    "status": (
        _ledger_update(
            "status = 'failed', failure_reason = 'bank_declined', failed_at = now(),"
            " settled_at = NULL"
        ),
        _both({"status_mismatch_bank_succeeded"}),
    ),
    # Another user on the source side: a deposit then comes from no bank at all.
    "source_id": (
        _ledger_update("source_id = $2"),
        _by_kind({"account_mismatch", "direction_mismatch"}, {"account_mismatch"}),
    ),
    # Another user on the destination side: a withdrawal then leaves for no bank at all.
    "dest_id": (
        _ledger_update("dest_id = $2"),
        _by_kind({"account_mismatch"}, {"direction_mismatch"}),
    ),
    "amount_minor": (
        _ledger_update("amount_minor = amount_minor + 1"),
        _both({"amount_mismatch"}),
    ),
    "currency": (_ledger_update("currency = 'EUR'"), _both({"currency_mismatch"})),
}
# Not a column but the pair: the money moved the other way than the kind says.
LEDGER_SWAP = _ledger_update("source_id = dest_id, dest_id = source_id")
LEDGER_EXEMPT = {
    "note": "a transfer's message; deposits and withdrawals carry none to the bank",
    "failure_reason": "only a failed transaction has one; its status is compared",
    "created_at": "Kizo's clock, not the bank's",
    "processing_at": "Kizo's clock, not the bank's",
    "settled_at": "Kizo's clock; it starts the grace period, its status is compared",
    "failed_at": "Kizo's clock; its status is compared",
    "attempts": "re-drive bookkeeping, never sent to the bank",
    "next_attempt_at": "re-drive bookkeeping, never sent to the bank",
    "needs_attention": "re-drive bookkeeping, never sent to the bank",
    "rearms": "re-drive bookkeeping, never sent to the bank",
}


@pytest.mark.asyncio
async def test_every_field_is_tampered_or_exempt(pool: asyncpg.Pool) -> None:
    statement_line = {f.name for f in dataclasses.fields(BankPayment)}
    assert set(BANK_TAMPERS) | set(BANK_EXEMPT) == statement_line
    assert not set(BANK_TAMPERS) & set(BANK_EXEMPT)
    columns = await pool.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'transactions'"
    )
    assert set(LEDGER_TAMPERS) | set(LEDGER_EXEMPT) == {c["column_name"] for c in columns}
    assert not set(LEDGER_TAMPERS) & set(LEDGER_EXEMPT)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("field", sorted(BANK_TAMPERS))
async def test_a_bank_field_that_disagrees_is_its_own_finding(
    deps: JanitorDeps, bank_db: asyncpg.Connection, kind: str, field: str
) -> None:
    subject = await _subject(deps, kind)
    tamper, expected = BANK_TAMPERS[field]
    assert await tamper(bank_db, subject) == "UPDATE 1"
    await _pass_finds(deps, subject, expected)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("field", [*sorted(LEDGER_TAMPERS), "source_id<->dest_id"])
async def test_a_ledger_field_that_disagrees_is_its_own_finding(
    deps: JanitorDeps, kind: str, field: str
) -> None:
    subject = await _subject(deps, kind)
    if field == "source_id<->dest_id":
        tamper, expected = LEDGER_SWAP, {"direction_mismatch"}
    else:
        tamper, expected_of = LEDGER_TAMPERS[field]
        expected = expected_of(kind)
    assert await tamper(deps.pool, subject) == "UPDATE 1"
    await _pass_finds(deps, subject, expected)


@pytest.mark.asyncio
async def test_a_finding_resolves_when_the_difference_goes(
    deps: JanitorDeps, bank_db: asyncpg.Connection
) -> None:
    subject = await _subject(deps, "withdrawal")
    await BANK_TAMPERS["status"][0](bank_db, subject)
    await _pass_finds(deps, subject, {"status_mismatch_bank_failed"})
    await bank_db.execute(
        "UPDATE payments SET status = 'succeeded', failure_reason = NULL WHERE key = $1",
        str(subject.txn),
    )
    await _pass_finds(deps, subject, set())
