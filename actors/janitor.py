"""The janitor: makes sure nothing is stuck, lost or paid twice, and says so when it is.

One pass (``run_pass``), every step bounded:
0. re-arm: when the bank answers its health check, deposits and withdrawals flagged
   ``needs_attention`` get a fresh attempt budget (at most ``rearm_max`` times each, a batch per
   pass), since what stopped them was most likely the bank; transfers never need the bank and
   stay flagged for an operator (``rearm_flagged`` with ``kinds``, the admin API's route);
1. re-drive: pending intents older than a threshold go back to their shard's queue (this is also
   the outbox relay for intents whose enqueue failed); attempts are counted with exponential
   backoff and, past the limit, the intent is flagged ``needs_attention`` — never dropped;
2. resolve unknown bank outcomes: ``processing`` transactions are looked up at the bank by key;
   a definite answer finalizes them; "never seen" re-issues the same idempotent request (a
   hold is never released on "not found" alone: a delayed request could still land);
3. audit the ledger (engine.audit);
4. reconcile the bank statement with settled deposits and withdrawals;
5. store findings (one open row per kind and subject; resolved when they clear);
6. expire idempotency keys.
The chaos checker reuses these functions.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg
import redis.exceptions
import structlog

from actors._metrics import record_final
from actors.bank_client import BankClient, BankPayment, BankResult, BankUnavailable
from actors.routing import QueueSet, Routed, actor_account
from engine import CHECKS, Action, Op, apply_batch, audit
from infra.config import PipelineConfig

log = structlog.get_logger("kizo.janitor")

STATEMENT_PAGES_MAX = 20
BANK_CALLS_MAX = 16
_CURSOR = "bank_statement_cursor"


@dataclass(frozen=True)
class Finding:
    kind: str
    subject: str
    detail: str


@dataclass
class PassSummary:
    rearmed: int = 0
    redriven: int = 0
    flagged: int = 0
    needs_attention: int = 0
    resolved: int = 0
    unresolved: int = 0
    findings: list[Finding] = field(default_factory=list)
    expired_keys: int = 0
    redis_ok: bool = True
    bank_ok: bool = True
    duration_ms: float = 0.0

    def line(self) -> str:
        return (
            f"janitor pass: rearmed={self.rearmed} redriven={self.redriven}"
            f" flagged={self.flagged}"
            f" needs_attention={self.needs_attention} resolved={self.resolved}"
            f" unresolved={self.unresolved} findings={len(self.findings)}"
            f" expired_keys={self.expired_keys} redis_ok={self.redis_ok}"
            f" bank_ok={self.bank_ok} duration_ms={self.duration_ms:.0f}"
        )


@dataclass
class JanitorDeps:
    pool: asyncpg.Pool
    queues: QueueSet
    bank: BankClient
    config: PipelineConfig


BANK_KINDS = ("deposit", "withdrawal")
# A fresh budget: attempts from zero and due at once (the re-drive's age threshold still counts
# from created_at, so a re-armed intent is re-driven in the same pass). ``rearms`` counts only
# the janitor's own re-arms ($4): an operator's re-arm starts the count again.
_REARM = """
WITH flagged AS (
    SELECT id FROM transactions
    WHERE needs_attention AND status = 'pending' AND kind = ANY($1::text[])
      AND ($4 OR rearms < $3)
    ORDER BY created_at LIMIT $2
    FOR NO KEY UPDATE SKIP LOCKED
)
UPDATE transactions t SET
    needs_attention = false, attempts = 0, next_attempt_at = NULL,
    rearms = CASE WHEN $4 THEN 0 ELSE t.rearms + 1 END
FROM flagged WHERE t.id = flagged.id
RETURNING t.id
"""


async def rearm_flagged(
    pool: asyncpg.Pool,
    kinds: Sequence[str],
    limit: int,
    *,
    rearms_max: int = 0,
    by_operator: bool = False,
) -> list[uuid.UUID]:
    """Give pending intents flagged ``needs_attention`` a fresh re-drive budget; their ids."""
    assert limit > 0 and set(kinds) <= {"deposit", "withdrawal", "transfer"}
    rows = await pool.fetch(_REARM, list(kinds), limit, rearms_max, by_operator)
    return [r["id"] for r in rows]


async def flagged_intents(pool: asyncpg.Pool, limit: int) -> tuple[int, list[asyncpg.Record]]:
    """How many pending intents are flagged ``needs_attention``, and the oldest ``limit``."""
    count = await pool.fetchval(
        "SELECT count(*) FROM transactions WHERE needs_attention AND status = 'pending'"
    )
    rows = await pool.fetch(
        "SELECT id, kind, amount_minor, currency, attempts, rearms, created_at FROM transactions"
        " WHERE needs_attention AND status = 'pending' ORDER BY created_at LIMIT $1",
        limit,
    )
    return int(count), list(rows)


async def rearm(deps: JanitorDeps, summary: PassSummary) -> None:
    """When the bank answers again (its health check gives 200 through the janitor's own way to
    it), what the bank's absence flagged can settle without an operator."""
    if not deps.config.rearm_max or not await _flagged_bank_intents(deps.pool):
        return
    if not await deps.bank.healthy():
        summary.bank_ok = False
        return
    ids = await rearm_flagged(
        deps.pool, BANK_KINDS, deps.config.janitor_batch_max, rearms_max=deps.config.rearm_max
    )
    summary.rearmed = len(ids)
    if ids:
        log.info("needs_attention_rearmed", count=len(ids), first=str(ids[0]))


async def _flagged_bank_intents(pool: asyncpg.Pool) -> bool:
    return bool(
        await pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM transactions WHERE needs_attention"
            " AND status = 'pending' AND kind = ANY($1::text[]))",
            list(BANK_KINDS),
        )
    )


_REDRIVE = """
WITH due AS (
    SELECT id FROM transactions
    WHERE status = 'pending' AND NOT needs_attention
      AND created_at < now() - make_interval(secs => $1)
      AND (next_attempt_at IS NULL OR next_attempt_at <= now())
    ORDER BY created_at LIMIT $2
    FOR NO KEY UPDATE SKIP LOCKED
)
UPDATE transactions t SET
    attempts = t.attempts + 1,
    needs_attention = t.attempts + 1 > $3,
    next_attempt_at = now() + make_interval(secs => least($4, $5 * 2 ^ t.attempts))
FROM due WHERE t.id = due.id
RETURNING t.id, t.kind, t.source_id, t.dest_id, t.needs_attention, t.attempts
"""


async def redrive(deps: JanitorDeps, summary: PassSummary) -> None:
    c = deps.config
    rows = await deps.pool.fetch(
        _REDRIVE,
        c.redrive_after_s,
        c.janitor_batch_max,
        c.redrive_attempts_max,
        c.redrive_backoff_max_s,
        c.redrive_backoff_base_s,
    )
    summary.flagged = sum(1 for r in rows if r["needs_attention"])
    due = [
        Routed(r["id"], actor_account(r["kind"], r["source_id"], r["dest_id"]), r["attempts"])
        for r in rows
        if not r["needs_attention"]
    ]
    try:
        await deps.queues.enqueue(due)
        summary.redriven = len(due)
    except (redis.exceptions.RedisError, OSError) as exc:
        summary.redis_ok = False
        log.warning("redrive_redis_unavailable", error=repr(exc), due=len(due))
    summary.needs_attention = int(
        await deps.pool.fetchval(
            "SELECT count(*) FROM transactions WHERE needs_attention AND status = 'pending'"
        )
    )


_PROCESSING = """
SELECT id, kind, source_id, dest_id, amount_minor, currency FROM transactions
WHERE status = 'processing' AND processing_at < now() - make_interval(secs => $1)
ORDER BY processing_at LIMIT $2
"""


def _user_account(row: asyncpg.Record) -> uuid.UUID:
    account: uuid.UUID = row["dest_id"] if row["kind"] == "deposit" else row["source_id"]
    return account


def _matches(row: asyncpg.Record, payment: BankPayment) -> bool:
    kind = "collection" if row["kind"] == "deposit" else "payout"
    return (payment.kind, payment.account, payment.amount_minor) == (
        kind,
        str(_user_account(row)),
        row["amount_minor"],
    )


async def _ask_bank(deps: JanitorDeps, row: asyncpg.Record) -> BankResult | Finding:
    payment = await deps.bank.get_payment(row["id"])
    if payment is None:  # never processed: the same idempotent request, once more
        call = deps.bank.collect if row["kind"] == "deposit" else deps.bank.payout
        return await call(row["id"], _user_account(row), row["amount_minor"], row["currency"])
    if not _matches(row, payment):
        return Finding(
            "bank_payment_mismatch",
            str(row["id"]),
            f"bank has {payment.kind} {payment.amount_minor} for {payment.account}",
        )
    if payment.status == "succeeded":
        return BankResult("succeeded", payment)
    return BankResult("failed", payment, payment.failure_reason or "bank_declined")


async def resolve_processing(deps: JanitorDeps, summary: PassSummary) -> None:
    rows = await deps.pool.fetch(
        _PROCESSING, deps.config.resolve_after_s, deps.config.janitor_batch_max
    )
    slots = asyncio.Semaphore(BANK_CALLS_MAX)

    async def one(row: asyncpg.Record) -> BankResult | Finding | None:
        async with slots:
            try:
                return await _ask_bank(deps, row)
            except BankUnavailable as exc:
                summary.bank_ok = False
                log.warning("resolve_bank_unavailable", txn=str(row["id"]), error=str(exc))
                return None

    answers = await asyncio.gather(*(one(r) for r in rows))
    ops = []
    for row, answer in zip(rows, answers, strict=True):
        if isinstance(answer, Finding):
            summary.findings.append(answer)
        elif answer is not None and answer.outcome in ("succeeded", "failed"):
            deposit = row["kind"] == "deposit"
            if answer.outcome == "succeeded":
                ops.append(Op(row["id"], Action.CREDIT if deposit else Action.POST))
            else:
                ops.append(
                    Op(row["id"], Action.FAIL if deposit else Action.RELEASE, answer.failure_reason)
                )
    outcomes = await apply_batch(deps.pool, ops)
    record_final(outcomes)
    summary.resolved = sum(1 for o in outcomes if o.applied)
    summary.unresolved = len(rows) - summary.resolved


async def _read_statement(deps: JanitorDeps) -> bool:
    """Mirror new statement pages; True when the mirror has caught up with the bank."""
    cursor = await deps.pool.fetchval("SELECT value FROM janitor_state WHERE name = $1", _CURSOR)
    for _ in range(STATEMENT_PAGES_MAX):
        items, next_cursor = await deps.bank.statement(cursor)
        await deps.pool.executemany(
            "INSERT INTO bank_statement (key, txn_id, kind, account, amount_minor, currency)"
            " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (key) DO NOTHING",
            [
                (p.key, _uuid_or_none(p.key), p.kind, p.account, p.amount_minor, p.currency)
                for p in items
            ],
        )
        if next_cursor is None:
            return True
        cursor = next_cursor
        await deps.pool.execute(
            "INSERT INTO janitor_state (name, value) VALUES ($1, $2)"
            " ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
            _CURSOR,
            cursor,
        )
    return False


def _uuid_or_none(key: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(key)
    except ValueError:
        return None


# Each statement line (a payment that succeeded at the bank), after a grace period (a processing
# transaction is the resolver's job first), against the Kizo transaction of its key: one finding
# per field that disagrees, each of its own kind. The ledger's direction is where its money went
# (from the bank's mirror account: a collection; to it: a payout), apart from what its kind says;
# the bank's customer is the other side of the transaction. A line without a transaction
# compares nothing else (every other comparison is NULL there).
_STATEMENT_DISAGREES = """
WITH bank AS (SELECT id FROM accounts WHERE code = 'bank_settlement'),
lines AS (
    SELECT s.key, s.kind AS s_kind, s.account, s.amount_minor AS s_amount, s.currency AS s_cur,
           t.id, t.kind, t.status, t.amount_minor, t.currency,
           CASE WHEN t.source_id = bank.id THEN 'collection'
                WHEN t.dest_id = bank.id THEN 'payout' END AS direction,
           (CASE WHEN t.source_id = bank.id THEN t.dest_id ELSE t.source_id END)::text AS customer
    FROM bank_statement s CROSS JOIN bank LEFT JOIN transactions t ON t.id = s.txn_id
    WHERE s.seen_at < now() - make_interval(secs => $1)
)
SELECT c.kind, l.key, c.detail FROM lines l CROSS JOIN LATERAL (VALUES
    ('bank_without_kizo', l.id IS NULL,
     'bank ' || l.s_kind || ' ' || l.s_amount || ' has no Kizo transaction'),
    ('amount_mismatch', l.amount_minor <> l.s_amount,
     'Kizo ' || l.amount_minor || ' vs bank ' || l.s_amount),
    ('currency_mismatch', l.currency <> l.s_cur,
     'Kizo ' || l.currency || ' vs bank ' || l.s_cur),
    ('kind_mismatch', l.id IS NOT NULL AND l.s_kind IS DISTINCT FROM
        CASE l.kind WHEN 'deposit' THEN 'collection' WHEN 'withdrawal' THEN 'payout' END,
     'Kizo ' || l.kind || ' vs bank ' || l.s_kind),
    ('direction_mismatch', l.id IS NOT NULL AND l.direction IS DISTINCT FROM l.s_kind,
     'Kizo moved it as ' || coalesce(l.direction, 'neither') || ' vs bank ' || l.s_kind),
    ('account_mismatch', l.customer <> l.account,
     'Kizo account ' || l.customer || ' vs bank account ' || l.account),
    ('status_mismatch_bank_succeeded', l.status <> 'settled',
     'Kizo ' || l.status || ' vs bank succeeded')
) AS c(kind, differs, detail)
WHERE c.differs
LIMIT $2
"""
STATEMENT_KINDS = (
    "bank_without_kizo",
    "amount_mismatch",
    "currency_mismatch",
    "kind_mismatch",
    "direction_mismatch",
    "account_mismatch",
    "status_mismatch_bank_succeeded",
)
# Settled at Kizo but not on the statement: the bank is asked by key whether it never saw the
# payment (kizo_without_bank) or failed it (status_mismatch_bank_failed); one it made that the
# statement does not serve yet is no finding.
_KIZO_WITHOUT_BANK = """
SELECT t.id, t.kind, t.amount_minor FROM transactions t
LEFT JOIN bank_statement s ON s.txn_id = t.id
WHERE t.kind IN ('deposit', 'withdrawal') AND t.status = 'settled' AND s.key IS NULL
  AND t.settled_at < now() - make_interval(secs => $1)
LIMIT $2
"""
LEDGER_KINDS = ("kizo_without_bank", "status_mismatch_bank_failed")
RECONCILIATION_KINDS = (*STATEMENT_KINDS, *LEDGER_KINDS, "bank_payment_mismatch")


async def reconcile(deps: JanitorDeps, summary: PassSummary) -> set[str]:
    """Compare the statement with the ledger; returns the finding kinds it fully checked."""
    try:
        caught_up = await _read_statement(deps)
    except BankUnavailable as exc:
        summary.bank_ok = False
        log.warning("reconcile_bank_unavailable", error=str(exc))
        return set()
    grace, limit = deps.config.reconcile_grace_s, deps.config.janitor_batch_max
    for row in await deps.pool.fetch(_STATEMENT_DISAGREES, grace, limit):
        summary.findings.append(Finding(row[0], row[1], row[2]))
    checked = set(STATEMENT_KINDS)
    if caught_up and await _settled_not_on_statement(deps, summary):
        checked.update(LEDGER_KINDS)
    return checked


async def _settled_not_on_statement(deps: JanitorDeps, summary: PassSummary) -> bool:
    """Findings for settled transactions the statement lacks; False when the bank did not answer."""
    rows = await deps.pool.fetch(
        _KIZO_WITHOUT_BANK, deps.config.reconcile_grace_s, deps.config.janitor_batch_max
    )
    slots = asyncio.Semaphore(BANK_CALLS_MAX)

    async def ask(txn: uuid.UUID) -> tuple[bool, BankPayment | None]:
        async with slots:
            try:
                return True, await deps.bank.get_payment(txn)
            except BankUnavailable as exc:
                log.warning("reconcile_bank_unavailable", txn=str(txn), error=str(exc))
                return False, None

    answers = await asyncio.gather(*(ask(r["id"]) for r in rows))
    for row, (answered, payment) in zip(rows, answers, strict=True):
        what = f"{row['kind']} settled for {row['amount_minor']}"
        if answered and payment is None:
            summary.findings.append(
                Finding("kizo_without_bank", str(row["id"]), what + " but the bank never saw it")
            )
        elif payment is not None and payment.status != "succeeded":
            detail = f"{what} but the bank {payment.status} it"
            summary.findings.append(Finding("status_mismatch_bank_failed", str(row["id"]), detail))
    everyone = all(answered for answered, _ in answers)
    summary.bank_ok = summary.bank_ok and everyone
    return everyone


async def store_findings(
    pool: asyncpg.Pool, findings: Sequence[Finding], checked: set[str]
) -> None:
    """Open a row per new finding; resolve open ones of the checked kinds that did not recur."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.executemany(
            "INSERT INTO reconciliation_findings (kind, subject, detail) VALUES ($1, $2, $3)"
            " ON CONFLICT (kind, subject) WHERE resolved_at IS NULL DO NOTHING",
            [(f.kind, f.subject, f.detail) for f in findings],
        )
        await conn.execute(
            "UPDATE reconciliation_findings SET resolved_at = now()"
            " WHERE resolved_at IS NULL AND kind = ANY($1::text[])"
            " AND (kind, subject) NOT IN (SELECT * FROM unnest($2::text[], $3::text[]))",
            sorted(checked),
            [f.kind for f in findings],
            [f.subject for f in findings],
        )


async def expire_keys(deps: JanitorDeps) -> int:
    status = await deps.pool.execute(
        "DELETE FROM idempotency_keys WHERE ctid = ANY(ARRAY(SELECT ctid FROM idempotency_keys"
        " WHERE expires_at < now() LIMIT $1))",
        deps.config.janitor_batch_max,
    )
    return int(status.split()[-1])


async def run_pass(deps: JanitorDeps) -> PassSummary:
    started = time.perf_counter()
    summary = PassSummary()
    await rearm(deps, summary)
    await redrive(deps, summary)
    await resolve_processing(deps, summary)
    audit_findings = [
        Finding(f"audit:{f.check}", f.subject, f.detail) for f in await audit(deps.pool)
    ]
    summary.findings.extend(audit_findings)
    checked = await reconcile(deps, summary)
    checked |= {f"audit:{name}" for name in CHECKS} | {"bank_payment_mismatch"}
    await store_findings(deps.pool, summary.findings, checked)
    summary.expired_keys = await expire_keys(deps)
    summary.duration_ms = (time.perf_counter() - started) * 1000
    return summary
