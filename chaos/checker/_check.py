"""A Jepsen-style checker for the bank workload: a history of client operations against the
final state of the ledger and of the API. Pure: no I/O, so it can be tested on hand-made
histories, and a checker that cannot fail would show here first.

What must hold (each broken rule is a ``Violation``; an empty list means the run is clean):
- no answer is a 5xx;
- bad input is refused with a 4xx and leaves no trace (its idempotency key stores nothing);
- one idempotency key, one transaction: every 2xx answer for a key names the same transaction,
  replays return the original body, and the ledger's record for the key agrees;
- every transaction a client was told about (202) exists with what was asked and is final; an
  operation whose answer was lost (timeout, closed connection) resolved one way or the other
  (its transaction, if any, is final);
- nothing in the ledger that no key accounts for (a transaction created twice, or by nobody);
- money is conserved: all postings sum to zero, and each user's balance is what their own final
  transactions add up to; no user balance is negative;
- what the API shows agrees with the ledger: the balance, the paged history and the CSV export;
- the bank agrees: each settled deposit was collected once and each settled withdrawal paid
  out once, for the same amount; nothing else moved at the bank for these users;
- the ledger's own audit (the janitor's checks) finds nothing;
- no request sent with an access token that had already expired was accepted (the API must
  refuse it with 401);
- no settlement job was reported done (SAQ ``complete``) before its transfer was final: a job
  whose batch failed must be retried or failed, so that nothing but a retry or the janitor's
  re-drive, much later, stands between a swallowed error and a transfer never settled.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

FINAL = frozenset({"settled", "failed"})
# Every rule a ``Violation`` may name, in the order of the docs' table; plus ``audit:<check>``,
# one per finding of the ledger's own audit. The run report lists each with its count.
RULES = (
    "server_error", "bad_input_accepted", "bad_input_changed_state", "key_many_transactions",
    "replay_differs", "key_record_mismatch", "lost_transaction", "not_final", "value_mismatch",
    "unknown_unresolved", "transaction_many_keys", "unaccounted_transaction", "conservation",
    "negative_balance", "api_balance", "history_duplicates", "history_incomplete", "history_sum",
    "csv_disagrees", "bank_disagrees", "bank_unrecorded", "expired_token_accepted",
    "job_done_early",
)  # fmt: skip
# A job completes after its batch's commit, and the ledger stamps a transfer final inside that
# commit (clock_timestamp(), same machine): any job done earlier than this before its transfer
# became final was reported done without it. The margin covers SAQ's whole milliseconds.
JOB_EARLY_S_MIN = 0.25


@dataclass(frozen=True)
class Op:
    """One client request, from invocation to completion. ``outcome``: "ok" (2xx), "fail" (a
    definite 4xx), "info" (unknown: no answer)."""

    process: int
    index: int
    f: str  # deposit | withdraw | transfer | read | bad:<what>
    user: str  # the acting user's id
    key: str | None
    body: Mapping[str, Any] | None
    invoked_s: float
    completed_s: float
    status: int | None
    outcome: str
    response: Mapping[str, Any] | None = None
    dest_account: str | None = None  # a transfer's recipient, as an account id
    # How long before the request was sent its access token had expired (its ``exp`` against
    # the client's wall clock, on the server's machine): > 0, the API must have refused it,
    # as it received the request later still. None: not known (a token without ``exp``).
    token_expired_s: float | None = None

    @property
    def txn_id(self) -> str | None:
        if self.outcome != "ok" or self.response is None or self.f == "read":
            return None
        value = self.response.get("id")
        return value if isinstance(value, str) else None


@dataclass(frozen=True)
class LedgerTxn:
    id: str
    kind: str
    source: str
    dest: str
    amount: int
    status: str
    final_at_s: float | None = None  # settled_at or failed_at, epoch seconds; None: not final


@dataclass(frozen=True)
class ApiView:
    """One user's view through the API after convergence."""

    posted: int
    pending: int
    available: int
    history: Sequence[Mapping[str, Any]]  # every page of GET /transactions, in order
    csv_rows: Sequence[Mapping[str, str]]


@dataclass
class FinalState:
    """The system after the run, read once everything has had time to become final."""

    accounts: Mapping[str, str]  # user id -> account id
    transactions: Mapping[str, LedgerTxn]  # every transaction touching a workload account
    keys: Mapping[tuple[str, str], str | None]  # (user id, key) -> transaction id
    balances: Mapping[str, tuple[int, int]]  # account id -> (posted, pending)
    postings_total: int  # the sum of every posting in the ledger
    views: Mapping[str, ApiView]  # user id -> what the API shows them
    audit: Sequence[tuple[str, str, str]] = field(default_factory=list)  # (check, subject, detail)
    # The bank's succeeded payments for the members' accounts: key -> (kind, amount); None when
    # the bank was not read.
    bank: Mapping[str, tuple[str, int]] | None = None
    # Transaction id -> when the first SAQ job carrying it was marked complete (epoch seconds);
    # None when the queues were not read.
    jobs_done: Mapping[str, float] | None = None


@dataclass(frozen=True)
class Violation:
    rule: str
    detail: str


def check(
    history: Sequence[Op], state: FinalState, tolerated: frozenset[int] = frozenset()
) -> list[Violation]:
    """``tolerated``: statuses that are honest answers under injected faults (503: "try
    again"); such an operation counts as an unknown outcome, not as a server error."""
    found = [*_no_server_errors(history, tolerated), *_bad_input_refused(history, state, tolerated)]
    for rule in (
        _one_transaction_per_key,
        _accepted_are_recorded_and_final,
        _nothing_unaccounted,
        _money_conserved,
        _reads_never_negative,
        _api_agrees,
        _bank_agrees,
        _expired_tokens_refused,
        _jobs_done_after_their_transfers,
    ):
        found.extend(rule(history, state))
    found.extend(Violation(f"audit:{c}", f"{s}: {d}") for c, s, d in state.audit)
    return found


def _no_server_errors(history: Sequence[Op], tolerated: frozenset[int]) -> Iterable[Violation]:
    for op in history:
        if op.status is not None and op.status >= 500 and op.status not in tolerated:
            yield Violation("server_error", f"op {op.index} {op.f}: HTTP {op.status}")


def _bad_input_refused(
    history: Sequence[Op], state: FinalState, tolerated: frozenset[int]
) -> Iterable[Violation]:
    """Bad input gets a 4xx (or, under faults, a tolerated 503: the API could not even look at
    it) and leaves no trace."""
    answered: dict[tuple[str, str], float] = {}  # key -> when its first 2xx came back
    for op in history:
        if op.key and op.outcome == "ok" and not op.f.startswith("bad:"):
            scope = (op.user, op.key)
            answered[scope] = min(answered.get(scope, op.completed_s), op.completed_s)
    for op in history:
        if not op.f.startswith("bad:") or op.status is None:
            continue
        if op.f == "bad:key_reused" and op.key:
            # Only a key already answered is "reused": if the first request never landed
            # (the API was down), this is the key's first use and may well succeed.
            first = answered.get((op.user, op.key))
            if first is None or first > op.invoked_s:
                continue
        if not 400 <= op.status < 500 and op.status not in tolerated:
            yield Violation("bad_input_accepted", f"op {op.index} {op.f}: HTTP {op.status}")
        if op.f != "bad:key_reused" and op.key and (op.user, op.key) in state.keys:
            yield Violation("bad_input_changed_state", f"op {op.index} {op.f} stored key {op.key}")


def _one_transaction_per_key(history: Sequence[Op], state: FinalState) -> Iterable[Violation]:
    answers: dict[tuple[str, str], list[Op]] = defaultdict(list)
    for op in history:
        if op.key and op.txn_id and not op.f.startswith("bad:"):
            answers[(op.user, op.key)].append(op)
    for scope, ops in answers.items():
        txns = {op.txn_id for op in ops}
        if len(txns) > 1:
            yield Violation("key_many_transactions", f"key {scope[1]}: {sorted(map(str, txns))}")
        bodies = {_frozen(op.response) for op in ops}
        if len(bodies) > 1:
            yield Violation("replay_differs", f"key {scope[1]}: {len(bodies)} different bodies")
        recorded = state.keys.get(scope)
        if recorded is None or recorded not in txns:
            yield Violation("key_record_mismatch", f"key {scope[1]}: ledger has {recorded}")


def _accepted_are_recorded_and_final(
    history: Sequence[Op], state: FinalState
) -> Iterable[Violation]:
    for op in history:
        if op.txn_id is None or op.f.startswith("bad:"):
            continue
        txn = state.transactions.get(op.txn_id)
        if txn is None:
            yield Violation("lost_transaction", f"op {op.index} {op.f}: {op.txn_id} not in ledger")
            continue
        if txn.status not in FINAL:
            yield Violation("not_final", f"{txn.id} is {txn.status}")
        if _differs(op, txn, state.accounts.get(op.user, "")):
            yield Violation("value_mismatch", f"op {op.index} {op.f} {dict(op.body or {})}: {txn}")
    for op in history:
        if op.outcome == "info" and op.key and (op.user, op.key) in state.keys:
            txn_id = state.keys[(op.user, op.key)]
            txn = state.transactions.get(txn_id or "")
            if txn is None or txn.status not in FINAL:
                yield Violation("unknown_unresolved", f"op {op.index}: {txn_id} not final")


_KINDS = {"transfer": "transfer", "deposit": "deposit", "withdraw": "withdrawal"}


def _differs(op: Op, txn: LedgerTxn, account: str) -> bool:
    """Whether the ledger's transaction is not what the operation asked for."""
    amount = (op.body or {}).get("amount")
    if txn.kind != _KINDS.get(op.f) or txn.amount != amount:
        return True
    if op.f == "transfer":
        return (txn.source, txn.dest) != (account, op.dest_account)
    return (txn.dest if op.f == "deposit" else txn.source) != account


def _nothing_unaccounted(_history: Sequence[Op], state: FinalState) -> Iterable[Violation]:
    keyed = [t for t in state.keys.values() if t is not None]
    counts: dict[str, int] = defaultdict(int)
    for txn_id in keyed:
        counts[txn_id] += 1
    for txn_id, n in counts.items():
        if n > 1:
            yield Violation("transaction_many_keys", f"{txn_id} is recorded under {n} keys")
    for txn_id in state.transactions.keys() - set(keyed):
        yield Violation("unaccounted_transaction", f"{txn_id} was created by no key")


def _money_conserved(_history: Sequence[Op], state: FinalState) -> Iterable[Violation]:
    if state.postings_total != 0:
        yield Violation("conservation", f"postings sum to {state.postings_total}, not 0")
    derived: dict[str, int] = defaultdict(int)
    for txn in state.transactions.values():
        if txn.status == "settled":
            derived[txn.dest] += txn.amount
            derived[txn.source] -= txn.amount
    for user, account in state.accounts.items():
        posted, pending = state.balances.get(account, (0, 0))
        if posted != derived[account]:
            yield Violation(
                "conservation",
                f"user {user}: balance {posted}, transactions say {derived[account]}",
            )
        if posted < 0 or posted - pending < 0:
            yield Violation("negative_balance", f"user {user}: posted {posted}, pending {pending}")


def _reads_never_negative(history: Sequence[Op], _state: FinalState) -> Iterable[Violation]:
    for op in history:
        if op.f == "read" and op.outcome == "ok" and op.response is not None:
            available, posted = op.response.get("available", 0), op.response.get("posted", 0)
            if available < 0 or posted < 0:
                yield Violation("negative_balance", f"op {op.index} read {dict(op.response)}")


def _api_agrees(_history: Sequence[Op], state: FinalState) -> Iterable[Violation]:
    for user, view in state.views.items():
        account = state.accounts[user]
        posted, pending = state.balances.get(account, (0, 0))
        if (view.posted, view.pending, view.available) != (posted, pending, posted - pending):
            yield Violation("api_balance", f"user {user}: API {view}, ledger {(posted, pending)}")
        ids = [item["id"] for item in view.history]
        if len(ids) != len(set(ids)):
            yield Violation("history_duplicates", f"user {user}: an id appears on two pages")
        mine = {t.id for t in state.transactions.values() if account in (t.source, t.dest)}
        if set(ids) != mine:
            yield Violation(
                "history_incomplete", f"user {user}: {len(ids)} listed, {len(mine)} in ledger"
            )
        net = sum(
            (1 if item["direction"] == "in" else -1) * int(item["amount"])
            for item in view.history
            if item["status"] == "settled"
        )
        if net != view.posted:
            yield Violation(
                "history_sum", f"user {user}: settled history {net}, balance {view.posted}"
            )
        rows = [(r["id"], r["status"], int(r["amount"]), r["direction"]) for r in view.csv_rows]
        listed = [(i["id"], i["status"], int(i["amount"]), i["direction"]) for i in view.history]
        if rows != listed:
            yield Violation(
                "csv_disagrees", f"user {user}: CSV {len(rows)} rows, history {len(listed)}"
            )


_BANK_KINDS = {"deposit": "collection", "withdrawal": "payout"}


def _bank_agrees(_history: Sequence[Op], state: FinalState) -> Iterable[Violation]:
    if state.bank is None:
        return
    for txn in state.transactions.values():
        if txn.kind not in _BANK_KINDS:
            continue
        paid = state.bank.get(txn.id)
        expected = (_BANK_KINDS[txn.kind], txn.amount) if txn.status == "settled" else None
        if paid != expected:
            yield Violation("bank_disagrees", f"{txn.kind} {txn.id} {txn.status}: bank has {paid}")
    for key in state.bank.keys() - state.transactions.keys():
        yield Violation("bank_unrecorded", f"bank payment {key} has no transaction")


def _expired_tokens_refused(history: Sequence[Op], _state: FinalState) -> Iterable[Violation]:
    for op in history:
        if op.outcome == "ok" and op.token_expired_s is not None and op.token_expired_s > 0:
            yield Violation("expired_token_accepted", f"op {op.index} {op.f}: HTTP {op.status}"
                            f" with a token expired {op.token_expired_s:.2f} s before")  # fmt: skip


def _jobs_done_after_their_transfers(_history: Sequence[Op], state: FinalState
                                     ) -> Iterable[Violation]:  # fmt: skip
    """Transfers only: they need nothing but the ledger, so their job is done exactly when they
    are final (a deposit or withdrawal may rightly stay pending or processing after its job,
    waiting for the bank or the janitor)."""
    if state.jobs_done is None:
        return
    for txn in state.transactions.values():
        done_s = state.jobs_done.get(txn.id)
        if txn.kind != "transfer" or done_s is None:
            continue
        if txn.final_at_s is None or txn.final_at_s - done_s > JOB_EARLY_S_MIN:
            final = "never" if txn.final_at_s is None else f"{txn.final_at_s - done_s:.2f} s later"
            yield Violation("job_done_early", f"transfer {txn.id}: its job was done, the"
                            f" transfer final {final}")  # fmt: skip


def _frozen(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value
