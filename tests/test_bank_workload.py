"""The Jepsen-style bank workload against a live system, and the checker that judges it.

The checker is first shown to fail on each kind of broken history or state (a checker that
cannot fail proves nothing), then the live run must come out clean, and a deliberately broken
build (KIZO_MUTATION=idempotency_off) must not.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from chaos.checker import ApiView, FinalState, LedgerTxn, Op, Violation, check
from chaos.runner import workload as workload
from infra.system import System, scratch_system

A, B = "acct-a", "acct-b"
UA, UB = "user-a", "user-b"


def _item(txn: str, direction: str, amount: int, status: str = "settled") -> dict[str, Any]:
    return {"id": txn, "direction": direction, "amount": amount, "status": status}


def _csv(items: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{k: str(v) for k, v in i.items()} for i in items]


def _clean() -> tuple[list[Op], FinalState]:
    """Two users: A deposits 100 and pays B 30 (retried once, a replay)."""
    dep = {"id": "t1", "status": "pending"}
    pay = {"id": "t2", "status": "pending"}
    history = [
        Op(0, 1, "deposit", UA, "k1", {"amount": 100}, 0, 1, 202, "ok", dep),
        Op(0, 2, "transfer", UA, "k2", {"to": B, "amount": 30}, 1, 2, 202, "ok", pay, B),
        Op(1, 3, "transfer", UA, "k2", {"to": B, "amount": 30}, 2, 3, 202, "ok", pay, B),
        Op(1, 4, "bad:negative", UA, "k3", {"to": B, "amount": -5}, 3, 4, 422, "fail"),
        Op(1, 5, "read", UA, None, None, 4, 5, 200, "ok", {"posted": 70, "available": 70}),
    ]
    a_items = [_item("t2", "out", 30), _item("t1", "in", 100)]
    b_items = [_item("t2", "in", 30)]
    state = FinalState(
        accounts={UA: A, UB: B},
        transactions={
            "t1": LedgerTxn("t1", "deposit", "bank", A, 100, "settled"),
            "t2": LedgerTxn("t2", "transfer", A, B, 30, "settled"),
        },
        keys={(UA, "k1"): "t1", (UA, "k2"): "t2"},
        bank={"t1": ("collection", 100)},
        balances={A: (70, 0), B: (30, 0)},
        postings_total=0,
        views={
            UA: ApiView(70, 0, 70, a_items, _csv(a_items)),
            UB: ApiView(30, 0, 30, b_items, _csv(b_items)),
        },
    )
    return history, state


def _rules(violations: list[Violation]) -> set[str]:
    return {v.rule for v in violations}


def test_checker_passes_a_clean_history() -> None:
    history, state = _clean()
    assert check(history, state) == []


def test_checker_passes_refused_expired_tokens_and_jobs_done_once_final() -> None:
    history, state = _clean()
    refused = Op(1, 6, "transfer", UA, "k4", {"to": B, "amount": 9}, 5, 6, 401, "fail",
                 {"status": 401}, B, token_expired_s=0.4)  # fmt: skip
    valid = dataclasses.replace(history[1], index=7, token_expired_s=-0.1)  # a replay, in time
    txns = {
        # A deposit may rightly wait for the bank after its job: not judged by the job rule.
        "t1": dataclasses.replace(state.transactions["t1"], status="settled", final_at_s=50.0),
        "t2": dataclasses.replace(state.transactions["t2"], final_at_s=10.1),
    }
    judged = dataclasses.replace(state, transactions=txns, jobs_done={"t1": 1.0, "t2": 10.0})
    assert check([*history, refused, valid], judged) == []


def test_checker_catches_each_kind_of_violation() -> None:
    history, state = _clean()
    t2 = state.transactions["t2"]
    other = {"id": "t9", "status": "pending"}
    cases: dict[str, tuple[list[Op], FinalState]] = {
        "server_error": (
            [*history, dataclasses.replace(history[0], index=9, status=500, outcome="info")],
            state,
        ),
        "bad_input_accepted": (
            [*history[:3], dataclasses.replace(history[3], status=202, outcome="ok")],
            state,
        ),
        "bad_input_changed_state": (
            history,
            dataclasses.replace(state, keys={**state.keys, (UA, "k3"): None}),
        ),
        "key_many_transactions": (
            [*history, dataclasses.replace(history[2], index=9, response=other)],
            state,
        ),
        "lost_transaction": (
            history,
            dataclasses.replace(state, transactions={"t1": state.transactions["t1"]}),
        ),
        "not_final": (
            history,
            dataclasses.replace(
                state,
                transactions={
                    **state.transactions,
                    "t2": dataclasses.replace(t2, status="pending"),
                },
            ),
        ),
        "value_mismatch": (
            history,
            dataclasses.replace(
                state,
                transactions={**state.transactions, "t2": dataclasses.replace(t2, amount=31)},
            ),
        ),
        "unaccounted_transaction": (
            history,
            dataclasses.replace(
                state,
                transactions={**state.transactions, "t3": dataclasses.replace(t2, id="t3")},
            ),
        ),
        "conservation": (history, dataclasses.replace(state, postings_total=5)),
        "negative_balance": (
            [*history, dataclasses.replace(history[4], index=9, response={"available": -1})],
            state,
        ),
        "api_balance": (
            history,
            dataclasses.replace(
                state, views={**state.views, UB: dataclasses.replace(state.views[UB], posted=31)}
            ),
        ),
        "history_incomplete": (
            history,
            dataclasses.replace(
                state,
                views={**state.views, UB: ApiView(30, 0, 30, [], [])},
            ),
        ),
        "csv_disagrees": (
            history,
            dataclasses.replace(
                state,
                views={**state.views, UB: dataclasses.replace(state.views[UB], csv_rows=[])},
            ),
        ),
        "bank_disagrees": (history, dataclasses.replace(state, bank={})),
        "bank_unrecorded": (
            history,
            dataclasses.replace(state, bank={"t1": ("collection", 100), "t7": ("payout", 5)}),
        ),
        "expired_token_accepted": (
            [*history, dataclasses.replace(history[1], index=9, token_expired_s=0.5)],
            state,
        ),
        "job_done_early": (
            history,
            dataclasses.replace(
                state,
                transactions={**state.transactions, "t2": dataclasses.replace(t2, final_at_s=9)},
                jobs_done={"t2": 8.5},
            ),
        ),
        "audit:transaction_unbalanced": (
            history,
            dataclasses.replace(state, audit=[("transaction_unbalanced", "t2", "sum 1")]),
        ),
    }
    for rule, (h, s) in cases.items():
        assert rule in _rules(check(h, s)), rule


def test_key_reuse_counts_only_once_the_key_was_answered() -> None:
    history, state = _clean()
    changed = {"to": B, "amount": 31}
    # k2 was answered (op 2, done at 2 s): reusing it with another body and getting 202 is bad.
    reused = Op(1, 9, "bad:key_reused", UA, "k2", changed, 5, 6, 202, "ok", {"id": "t2"}, B)
    assert "bad_input_accepted" in _rules(check([*history, reused], state))
    # k9's first request never got an answer (the API was down): the "reuse" is its first use.
    lost = Op(2, 7, "transfer", UA, "k9", {"to": B, "amount": 5}, 4, 5, None, "info", None, B)
    first = Op(2, 8, "bad:key_reused", UA, "k9", changed, 5, 6, 202, "ok", {"id": "t9"}, B)
    assert "bad_input_accepted" not in _rules(check([*history, lost, first], state))
    # Under faults a tolerated 503 to bad input is no acceptance (the API could not look).
    refused = dataclasses.replace(history[3], index=11, status=503, outcome="info")
    assert "bad_input_accepted" in _rules(check([*history, refused], state))
    assert "bad_input_accepted" not in _rules(check([*history, refused], state, frozenset({503})))
    # A 503 under faults is an unknown outcome when tolerated, a server error otherwise.
    busy = dataclasses.replace(lost, index=10, status=503)
    assert "server_error" in _rules(check([*history, busy], state))
    assert "server_error" not in _rules(check([*history, busy], state, frozenset({503})))


@pytest.fixture(scope="module")
def live() -> Iterator[System]:
    with scratch_system({"KIZO_RATE_LIMITS": "off", "KIZO_JANITOR_INTERVAL_S": "1"}) as system:
        yield system


@pytest.fixture(scope="module")
def broken() -> Iterator[System]:
    overrides = {"KIZO_RATE_LIMITS": "off", "KIZO_MUTATION": "idempotency_off"}
    with scratch_system(overrides) as system:
        yield system


async def _run(system: System, params: workload.WorkloadParams) -> tuple[list[Op], list[Violation]]:
    history, members = await workload.run(system.api_url, params)
    state = await workload.converge_and_read(
        system.api_url, system.database_url, members, params, system.bank_url
    )
    return history, check(history, state)


@pytest.mark.trio
@pytest.mark.slow
async def test_bank_workload_against_the_live_api_finds_no_violation(live: System) -> None:
    params = workload.WorkloadParams(users=12, processes=8, ops_per_process=120, seed=7)
    history, violations = await _run(live, params)
    assert violations == []
    kinds = Counter(op.f.split(":")[0] for op in history)
    outcomes = Counter((op.f, op.status) for op in history)
    # The run did what it claims: payments of every kind, retries, bursts, bad input, reads.
    assert kinds["transfer"] >= 300 and kinds["deposit"] >= 40 and kinds["withdraw"] >= 40
    assert kinds["bad"] >= 50 and kinds["read"] >= 20
    keys = Counter(op.key for op in history if op.key and not op.f.startswith("bad:"))
    assert sum(1 for n in keys.values() if n >= workload.BURST) >= 50  # same key, many times
    assert outcomes[("bad:key_reused", 422)] >= 1
    assert all(op.status is not None for op in history)  # every request was answered


@pytest.mark.trio
@pytest.mark.slow
async def test_checker_catches_a_build_that_ignores_idempotency_keys(broken: System) -> None:
    params = workload.WorkloadParams(users=6, processes=4, ops_per_process=40, seed=3)
    _history, violations = await _run(broken, params)
    rules = _rules(violations)
    assert {"key_many_transactions", "key_record_mismatch"} <= rules, rules
