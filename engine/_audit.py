"""Ledger audits: each check is one query that returns the rows that break an invariant.

The janitor runs them on a timer and the chaos checker runs them after a scenario; a clean
ledger returns no findings. Every check is written to be able to fail: the tests corrupt a
ledger on purpose and expect each one to speak.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine._types import Db


@dataclass(frozen=True)
class Finding:
    check: str
    subject: str
    detail: str


# name -> (query returning (subject, detail) rows, what the check means)
CHECKS: dict[str, tuple[str, str]] = {
    "transaction_unbalanced": (
        """SELECT transaction_id::text, 'postings sum to ' || sum(amount_minor)
           FROM postings GROUP BY transaction_id HAVING sum(amount_minor) <> 0""",
        "the postings of a transaction sum to zero",
    ),
    "ledger_unbalanced": (
        """SELECT 'ledger', 'all postings sum to ' || sum(amount_minor)
           FROM postings HAVING sum(amount_minor) <> 0""",
        "all postings together sum to zero",
    ),
    "balance_mismatch": (
        """SELECT b.account_id::text,
                  'posted ' || b.posted || ' but postings sum to ' || coalesce(p.total, 0)
           FROM balances b
           LEFT JOIN (SELECT account_id, sum(amount_minor) AS total
                      FROM postings GROUP BY account_id) p ON p.account_id = b.account_id
           WHERE b.posted <> coalesce(p.total, 0)""",
        "every balance equals the sum of its postings",
    ),
    "hold_mismatch": (
        """SELECT b.account_id::text,
                  'pending ' || b.pending || ' but open withdrawals hold ' || coalesce(h.held, 0)
           FROM balances b
           LEFT JOIN (SELECT source_id, sum(amount_minor) AS held FROM transactions
                      WHERE kind = 'withdrawal' AND status = 'processing'
                      GROUP BY source_id) h ON h.source_id = b.account_id
           WHERE b.pending <> coalesce(h.held, 0)""",
        "every hold belongs to a withdrawal in flight",
    ),
    "negative_balance": (
        """SELECT b.account_id::text, 'available ' || (b.posted - b.pending)
           FROM balances b JOIN accounts a ON a.id = b.account_id
           WHERE a.kind = 'user' AND b.posted - b.pending < 0""",
        "no user account's available balance is below zero",
    ),
    "balance_after_mismatch": (
        """SELECT account_id::text, 'posting ' || id || ' says balance_after ' || balance_after
                  || ' but the running sum is ' || running
           FROM (SELECT id, account_id, balance_after,
                        sum(amount_minor) OVER (PARTITION BY account_id ORDER BY id) AS running
                 FROM postings) p
           WHERE balance_after <> running""",
        "balance_after on each posting is the running sum of the account's postings",
    ),
    "settled_without_postings": (
        """SELECT t.id::text, t.kind || ' settled without postings'
           FROM transactions t
           WHERE t.status = 'settled'
             AND NOT EXISTS (SELECT 1 FROM postings p WHERE p.transaction_id = t.id)""",
        "every settled transaction has postings",
    ),
    "postings_on_unsettled": (
        """SELECT t.id::text, t.status || ' transaction has postings'
           FROM transactions t
           WHERE t.status <> 'settled'
             AND EXISTS (SELECT 1 FROM postings p WHERE p.transaction_id = t.id)""",
        "a failed (or unfinished) transaction has no postings",
    ),
    "orphan_posting": (
        """SELECT p.id::text, 'posting references a missing '
                  || CASE WHEN t.id IS NULL THEN 'transaction' ELSE 'account' END
           FROM postings p
           LEFT JOIN transactions t ON t.id = p.transaction_id
           LEFT JOIN balances b ON b.account_id = p.account_id
           WHERE t.id IS NULL OR b.account_id IS NULL""",
        "every posting belongs to an existing transaction and account",
    ),
    "postings_disagree_with_intent": (
        """SELECT t.id::text, 'postings do not move ' || t.amount_minor || ' from source to dest'
           FROM transactions t JOIN postings p ON p.transaction_id = t.id
           GROUP BY t.id, t.amount_minor, t.source_id, t.dest_id
           HAVING count(*) <> 2
               OR sum(p.amount_minor) FILTER (WHERE p.account_id = t.source_id)
                  IS DISTINCT FROM -t.amount_minor
               OR sum(p.amount_minor) FILTER (WHERE p.account_id = t.dest_id)
                  IS DISTINCT FROM t.amount_minor""",
        "a settled transaction's postings move exactly its amount from source to destination",
    ),
}


async def audit(db: Db, *, limit_per_check: int = 100) -> list[Finding]:
    """Run every check; returns at most ``limit_per_check`` findings per check."""
    findings: list[Finding] = []
    for name, (query, _meaning) in CHECKS.items():
        rows = await db.fetch(f"SELECT * FROM ({query}) q LIMIT {int(limit_per_check)}")
        findings.extend(Finding(name, str(row[0]), str(row[1])) for row in rows)
    return findings
