"""Broken builds deep in the system (ledger, actors, bank client), each caught by a money rule
of the chaos checker. One runs in the suite (seconds); the rest, each a whole scenario, run when
KIZO_CHAOS_MUTATIONS=1 (.ci/chaos sets it; make chaos also runs them through the CLI)."""

from __future__ import annotations

import dataclasses
import os
import uuid
from typing import Any

import pytest

from chaos.runner import run
from chaos.runner import scenario as scenarios
from chaos.runner.workload import WorkloadParams
from engine import LEDGER_MUTATIONS, Action, Balance, Intent, Op, decide
from infra.config import MUTATION_HELP, MUTATIONS


def test_every_mutation_has_a_one_line_description_and_the_ledgers_are_known() -> None:
    assert ("", *MUTATION_HELP) == MUTATIONS
    assert len(MUTATION_HELP) >= 5 and set(MUTATIONS) >= LEDGER_MUTATIONS
    assert all(text and "\n" not in text for text in MUTATION_HELP.values())


def _settled_transfer() -> tuple[Op, dict[uuid.UUID, Intent], dict[uuid.UUID, Balance]]:
    a, b, t = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    intents = {t: Intent(t, "transfer", "settled", a, b, 100)}
    balances = {a: Balance(a, 900, 0, False), b: Balance(b, 100, 0, False)}
    return Op(t, Action.TRANSFER), intents, balances


def test_the_final_state_guard_is_what_stops_a_second_apply() -> None:
    op, intents, balances = _settled_transfer()
    [outcome] = decide([op], intents, balances).outcomes
    assert not outcome.applied and [b.posted for b in balances.values()] == [900, 100]
    op, intents, balances = _settled_transfer()
    decision = decide([op], intents, balances, "final_state_guard_off")
    assert decision.outcomes[0].applied and len(decision.postings) == 2  # moved again


def test_without_row_locks_the_batch_reads_the_same_rows_unlocked() -> None:
    from engine import _ledger

    for locked, unlocked in [
        (_ledger._LOCK_INTENTS, _ledger._READ_INTENTS),
        (_ledger._LOCK_BALANCES, _ledger._READ_BALANCES),
    ]:
        assert "FOR NO KEY UPDATE" in locked and "FOR NO KEY UPDATE" not in unlocked
        assert unlocked.split("WHERE")[0] == locked.split("WHERE")[0]


def _rules(report: dict[str, Any]) -> dict[str, int]:
    rules = report["violation_rules"]
    assert isinstance(rules, dict)
    return rules


def test_a_bank_client_without_its_idempotency_key_is_caught_by_the_bank_rules() -> None:
    # No faults needed: every payment reaches the bank under a key no transaction has.
    params = WorkloadParams(users=4, processes=3, ops_per_process=12, seed=3)
    rules = _rules(run(params, None, 3, "bank_key_off"))
    assert rules.get("bank_unrecorded", 0) > 0 and rules.get("bank_disagrees", 0) > 0


# (mutation, scenario, operations per process (0: the scenario's), the rule that must fire)
CAUGHT = [
    ("final_state_guard_off", "worker-crash", 0, "conservation"),
    # A lost update shows in the sums, or in the audit (when it hits the setup's deposits, the
    # steady state fails before the method and the workload does not run).
    (
        "row_locks_off",
        "db-latency",
        30,
        "conservation|audit:balance_mismatch|audit:balance_after_mismatch",
    ),
    ("unknown_as_failed", "bank-flaky", 30, "bank_disagrees"),
    ("bank_key_off", "bank-flaky", 30, "bank_unrecorded"),
    ("unknown_as_succeeded", "bank-lost-request", 0, "bank_disagrees"),
]


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("KIZO_CHAOS_MUTATIONS") != "1", reason="a whole scenario each: make chaos"
)
@pytest.mark.parametrize(("mutation", "name", "ops", "rule"), CAUGHT)
def test_each_deep_mutation_is_caught_by_its_money_rule(
    mutation: str, name: str, ops: int, rule: str
) -> None:
    scenario = scenarios.load(name, seed=1)
    params = scenario.workload
    if ops:
        params = dataclasses.replace(params, ops_per_process=ops)
    report = run(params, scenario, 1, mutation)
    rules = _rules(report)
    assert sum(rules.get(r, 0) for r in rule.split("|")) > 0, report["violation_rules"]
