"""The pure heart of the ledger: given locked intents and balances, decide a batch.

No I/O here. ``decide`` walks the batch's operations in order against in-memory balances and
returns the postings, new balances and state changes to write. The property tests compare it
(through the database) with an independent model, so keep it small and obvious.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from engine._errors import InvariantViolation

INSUFFICIENT_FUNDS = "insufficient_funds"

# Deliberately broken ledgers, for showing that the chaos checker catches them (infra/config.py
# MUTATIONS names them; only scratch systems honour them). Each removes one safeguard:
FINAL_STATE_GUARD_OFF = "final_state_guard_off"  # apply an op whatever state its intent is in
ROW_LOCKS_OFF = "row_locks_off"  # read intents and balances without locking them
LEDGER_MUTATIONS = frozenset({FINAL_STATE_GUARD_OFF, ROW_LOCKS_OFF})


class Action(enum.StrEnum):
    """What a batch may do to one intent. Each names the states it may start from."""

    TRANSFER = "transfer"  # transfer: pending -> settled | failed(insufficient_funds)
    CREDIT = "credit"  # deposit: pending | processing -> settled (bank collected)
    HOLD = "hold"  # withdrawal: pending -> processing (funds held) | failed(insufficient_funds)
    POST = "post"  # withdrawal: processing -> settled (bank paid out)
    RELEASE = "release"  # withdrawal: processing -> failed (bank refused; hold released)
    FAIL = "fail"  # deposit: pending | processing -> failed (bank refused)
    MARK_PROCESSING = "mark_processing"  # deposit: pending -> processing (bank outcome unknown)


KIND_OF: Mapping[Action, str] = {
    Action.TRANSFER: "transfer",
    Action.CREDIT: "deposit",
    Action.HOLD: "withdrawal",
    Action.POST: "withdrawal",
    Action.RELEASE: "withdrawal",
    Action.FAIL: "deposit",
    Action.MARK_PROCESSING: "deposit",
}

FROM_STATES: Mapping[Action, frozenset[str]] = {
    Action.TRANSFER: frozenset({"pending"}),
    Action.CREDIT: frozenset({"pending", "processing"}),
    Action.HOLD: frozenset({"pending"}),
    Action.POST: frozenset({"processing"}),
    Action.RELEASE: frozenset({"processing"}),
    Action.FAIL: frozenset({"pending", "processing"}),
    Action.MARK_PROCESSING: frozenset({"pending"}),
}

FINAL_STATES = frozenset({"settled", "failed"})


@dataclass(frozen=True)
class Op:
    """One request to the ledger: do ``action`` to transaction ``txn_id``."""

    txn_id: uuid.UUID
    action: Action
    reason: str | None = None  # failure reason for RELEASE / FAIL


@dataclass(frozen=True)
class Intent:
    id: uuid.UUID
    kind: str
    status: str
    source_id: uuid.UUID
    dest_id: uuid.UUID
    amount_minor: int


@dataclass
class Balance:
    account_id: uuid.UUID
    posted: int
    pending: int
    allow_negative: bool

    @property
    def available(self) -> int:
        return self.posted - self.pending


@dataclass(frozen=True)
class Posting:
    txn_id: uuid.UUID
    account_id: uuid.UUID
    amount_minor: int
    balance_after: int


@dataclass(frozen=True)
class Outcome:
    """What became of one op. ``applied`` is False when the intent was not in a state the
    action starts from (already applied, or final): applying twice is a no-op."""

    txn_id: uuid.UUID
    action: Action
    applied: bool
    status: str
    failure_reason: str | None = None
    # Set by apply_batch on an op that made its intent final: its kind, and its age then
    # (accepted -> final, by PostgreSQL's clock), for the settlement-lag metric. Not identity.
    kind: str = field(default="", compare=False)
    age_s: float | None = field(default=None, compare=False)


@dataclass(frozen=True)
class StateChange:
    txn_id: uuid.UUID
    from_status: str
    to_status: str
    failure_reason: str | None


@dataclass
class Decision:
    outcomes: list[Outcome] = field(default_factory=list)
    postings: list[Posting] = field(default_factory=list)
    changes: list[StateChange] = field(default_factory=list)
    touched: dict[uuid.UUID, Balance] = field(default_factory=dict)


def _post(d: Decision, balances: Mapping[uuid.UUID, Balance], txn: Intent, release: int) -> None:
    """Move ``txn.amount_minor`` from source to destination; ``release`` of it was held."""
    source, dest = balances[txn.source_id], balances[txn.dest_id]
    source.posted -= txn.amount_minor
    source.pending -= release
    dest.posted += txn.amount_minor
    d.postings.append(Posting(txn.id, source.account_id, -txn.amount_minor, source.posted))
    d.postings.append(Posting(txn.id, dest.account_id, txn.amount_minor, dest.posted))
    d.touched[source.account_id] = source
    d.touched[dest.account_id] = dest


def _funds_ok(balance: Balance, amount_minor: int) -> bool:
    return balance.allow_negative or balance.available >= amount_minor


def _apply_one(
    d: Decision, balances: Mapping[uuid.UUID, Balance], op: Op, txn: Intent
) -> tuple[str, str | None]:
    """Apply one applicable op; returns (new status, failure reason)."""
    source = balances[txn.source_id]
    if op.action is Action.TRANSFER:
        if not _funds_ok(source, txn.amount_minor):
            return "failed", INSUFFICIENT_FUNDS
        _post(d, balances, txn, release=0)
        return "settled", None
    if op.action is Action.CREDIT:
        _post(d, balances, txn, release=0)
        return "settled", None
    if op.action is Action.HOLD:
        if not _funds_ok(source, txn.amount_minor):
            return "failed", INSUFFICIENT_FUNDS
        source.pending += txn.amount_minor
        d.touched[source.account_id] = source
        return "processing", None
    if op.action is Action.POST:
        _post(d, balances, txn, release=txn.amount_minor)
        return "settled", None
    if op.action is Action.RELEASE:
        source.pending -= txn.amount_minor
        d.touched[source.account_id] = source
        return "failed", op.reason or "bank_declined"
    if op.action is Action.FAIL:
        return "failed", op.reason or "bank_declined"
    assert op.action is Action.MARK_PROCESSING
    return "processing", None


def decide(
    ops: Sequence[Op],
    intents: Mapping[uuid.UUID, Intent],
    balances: Mapping[uuid.UUID, Balance],
    mutation: str = "",
) -> Decision:
    """Decide a batch in order. ``balances`` must hold every account the intents touch and is
    updated in place; an op whose intent is unknown, of another kind or not in a starting state
    is reported as not applied and changes nothing. ``mutation``: "" (always, outside the chaos
    harness's broken builds) or one of LEDGER_MUTATIONS."""
    d = Decision()
    state_guard = mutation != FINAL_STATE_GUARD_OFF
    status_now = {txn_id: txn.status for txn_id, txn in intents.items()}
    for op in ops:
        txn = intents.get(op.txn_id)
        current = status_now.get(op.txn_id, "unknown")
        if (
            txn is None
            or txn.kind != KIND_OF[op.action]
            or (state_guard and current not in FROM_STATES[op.action])
        ):
            d.outcomes.append(Outcome(op.txn_id, op.action, False, current))
            continue
        status, reason = _apply_one(d, balances, op, txn)
        status_now[op.txn_id] = status
        d.changes.append(StateChange(op.txn_id, current, status, reason))
        d.outcomes.append(Outcome(op.txn_id, op.action, True, status, reason))
    _check(d)
    return d


def _check(d: Decision) -> None:
    """Invariants of every decided batch: postings balance per transaction, no user balance
    below zero, holds never negative."""
    per_txn: dict[uuid.UUID, int] = {}
    for posting in d.postings:
        per_txn[posting.txn_id] = per_txn.get(posting.txn_id, 0) + posting.amount_minor
    if any(total != 0 for total in per_txn.values()):
        raise InvariantViolation(f"unbalanced postings in batch: {per_txn}")
    for balance in d.touched.values():
        if balance.pending < 0:
            raise InvariantViolation(f"negative hold on {balance.account_id}")
        if not balance.allow_negative and balance.available < 0:
            raise InvariantViolation(f"negative available balance on {balance.account_id}")
