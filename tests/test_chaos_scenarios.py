"""Chaos scenarios end to end: the bank workload against a whole system whose PostgreSQL, Redis
and bank sit behind the fault proxy, faults on a timeline, then the checker. Plus the scenario
files' validation, and a broken build caught under faults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from chaos import scenario as scenarios
from chaos.cli import run


def test_every_shipped_scenario_loads() -> None:
    names = scenarios.names()
    assert {"api-crash", "bank-flaky", "db-latency", "redis-outage", "worker-crash"} <= set(names)
    for name in names:
        loaded = scenarios.load(name, seed=1)
        assert loaded.title and loaded.method and loaded.tolerated <= {503}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("title = 1", "title must be a non-empty string"),
        ('title = "t"\ntolerated = [500]', "tolerated may list only [503]"),
        ('title = "t"\n[[method]]\naction = "explode"', "action must be one of"),
        ('title = "t"\n[[method]]\naction = "toxic"\nproxy = "mysql"', "proxy must be one of"),
        ('title = "t"\n[[method]]\naction = "remove_toxic"\nproxy = "redis"', "needs its table"),
        ('title = "t"\n[[method]]\nat_s = -1\naction = "heal"', "at_s must be"),
        ('title = "t"\n[[method]]\naction = "kill"\nprocess = "postgres"', "process must be"),
        ('title = "t"\n[[method]]\nat_s = 5\naction = "heal"\n[[method]]\nat_s = 1\n'
         'action = "heal"', "in time order"),
        ('title = "t"\n[workload]\nusers = 1', "users must be between 2 and 500"),
        ('title = "t"\n[workload]\nthreads = 4', "[workload] takes only"),
        ('title = "t"\n[workload]\nseconds_max = 1000', "at most 300 s"),
        ("title = [", "bad.toml"),
    ],
)  # fmt: skip
def test_bad_scenarios_are_refused_with_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(scenarios.ScenarioError, match=r"bad\.toml") as refused:
        scenarios.load(str(path), seed=1)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_unknown_scenario_names_the_known_ones() -> None:
    known = r"no scenario .no-such-scenario. \(known: .*bank-flaky"
    with pytest.raises(scenarios.ScenarioError, match=known):
        scenarios.find("no-such-scenario")


def _run(name: str, seed: int, mutation: str = "") -> dict[str, Any]:
    scenario = scenarios.load(name, seed)
    return run(scenario.workload, scenario, seed, mutation)


def test_a_flaky_bank_still_moves_money_exactly_once() -> None:
    report = _run("bank-flaky", seed=5)
    assert report["violations"] == 0, report["violations_shown"]
    injected = report["bank_faults_injected"]
    assert (
        isinstance(injected, dict) and injected.get("drop", 0) > 0 and injected.get("error", 0) > 0
    )
    assert report["steps_skipped"] == []


def test_database_latency_and_cut_connections_lose_nothing() -> None:
    report = _run("db-latency", seed=3)
    assert report["violations"] == 0, report["violations_shown"]
    assert report["steps_skipped"] == []
    assert [step["status"] for step in report["timeline"]] == [200, 200, 204]


def test_the_checker_catches_a_broken_build_under_faults() -> None:
    report = _run("redis-outage", seed=5, mutation="idempotency_off")
    rules = report["violation_rules"]
    assert isinstance(rules, dict)
    assert rules.get("key_many_transactions", 0) > 0 and rules.get("key_record_mismatch", 0) > 0


def test_a_worker_killed_mid_run_loses_and_duplicates_nothing() -> None:
    report = _run("worker-crash", seed=4)
    assert report["violations"] == 0, report["violations_shown"]
    assert [step["status"] for step in report["timeline"]] == ["killed", "running"]


def test_an_api_killed_under_load_leaves_only_resolved_unknowns() -> None:
    report = _run("api-crash", seed=4)
    assert report["violations"] == 0, report["violations_shown"]
    assert [step["status"] for step in report["timeline"]] == ["killed", "running"]
    unanswered = sum(n for k, n in report["by_kind_and_status"].items() if k.endswith(" None"))
    assert unanswered > 0, "the crash went unnoticed: the scenario tested nothing"
