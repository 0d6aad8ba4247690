"""Chaos scenarios end to end: the bank workload against a whole system whose PostgreSQL, Redis
and bank sit behind the fault proxy, faults on a timeline, then the checker. Plus the scenario
files' validation, and a broken build caught under faults."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio

from chaos.runner import failed, run
from chaos.runner import scenario as scenarios
from chaos.runner.hypothesis import DEFAULT, Probe, Prober
from tests.test_chaos_report import check_journal

SHIPPED = {
    "api-crash", "bank-down", "bank-flaky", "bank-lost-request", "batch-db-failure",
    "combined-storm", "db-latency", "hot-account", "token-expiry",
    "janitor-down", "janitor-partition", "pg-crash", "pg-reset", "redis-outage", "redis-slicer",
    "valkey-wipe", "worker-crash", "zombie-worker",
}  # fmt: skip


def test_every_shipped_scenario_loads() -> None:
    names = scenarios.names()
    assert set(names) >= SHIPPED
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
        ('title = "t"\n[[method]]\naction = "kill"\nprocess = "redis"', "process must be"),
        ('title = "t"\n[[method]]\naction = "pause"\nprocess = "postgres"',
         "can only be killed and restarted"),
        ('title = "t"\n[[method]]\naction = "restart"\nprocess = "postgres"\nlose_data = true',
         "lose_data = true goes only with restart of valkey"),
        ('title = "t"\n[workload]\nhot_share = 1.5', "hot_share must be a share"),
        ('title = "t"\n[[method]]\nat_s = 5\naction = "heal"\n[[method]]\nat_s = 1\n'
         'action = "heal"', "in time order"),
        ('title = "t"\n[workload]\nusers = 1', "users must be between 2 and 500"),
        ('title = "t"\n[workload]\nthreads = 4', "[workload] takes only"),
        ('title = "t"\n[workload]\nseconds_max = 1000', "at most 300 s"),
        ("title = [", "bad.toml"),
        ('title = "t"\nmethods = []', "unknown key 'methods'"),
        ('title = "t"\n[steady-state-hypothesis]\ntitle = "h"\n'
         '[[steady-state-hypothesis.probes]]\nname = "p"\nprovider = "cpu"\ntolerance = 0',
         "unknown provider 'cpu' (one of api_ready,"),
        ('title = "t"\n[steady-state-hypothesis]\ntitle = "h"\n'
         '[[steady-state-hypothesis.probes]]\nname = "p"\nprovider = "ledger_audit"\n'
         'tolerance = [3, 1]', "tolerance must be a count"),
        ('title = "t"\n[steady-state-hypothesis]\ntitle = "h"\n'
         '[[steady-state-hypothesis.probes]]\nname = "p"\nprovider = "needs_attention"\n'
         'tolerance = "none"', "tolerance must be a count"),
        ('title = "t"\n[steady-state-hypothesis]\ntitle = "h"\n'
         '[[steady-state-hypothesis.probes]]\nname = "p"\nprovider = "api_ready"\n'
         'tolerance = [200, 299]', "api_ready takes a status code"),
        ('title = "t"\n[steady-state-hypothesis]\ntitle = "h"\n'
         '[[steady-state-hypothesis.probes]]\nname = "p"\nprovider = "needs_attention"\n'
         'tolerance = 0\narguments = { older_than_s = 5 }', "needs_attention takes no arguments"),
        ('title = "t"\n[steady-state-hypothesis]\ntitle = "h"',
         "needs [[steady-state-hypothesis.probes]]"),
        ('title = "t"\n[[method]]\nat_s = 1\naction = "probe"', "probe needs its table"),
        ('title = "t"\n[[method]]\naction = "probe"\n'
         'probe = { name = "p", provider = "unsettled", tolerance = -1 }',
         "tolerance must be a count"),
        ('title = "t"\n[[rollbacks]]\nat_s = 1\naction = "heal"', "no at_s"),
        ('title = "t"\n[[rollbacks]]\naction = "enable"\nproxy = "kafka"', "proxy must be one of"),
        ('title = "t"\n[configuration]\nredrive_attempts_max = 2.5', "must be a whole number"),
        ('title = "t"\n[configuration]\nshards = 2', "[configuration] takes only"),
    ],
)  # fmt: skip
def test_bad_scenarios_are_refused_with_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(scenarios.ScenarioError, match=r"bad\.toml") as refused:
        scenarios.load(str(path), seed=1)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_the_experiment_keys_load_and_a_file_without_a_hypothesis_gets_the_default(
    tmp_path: Path,
) -> None:
    down = scenarios.load("bank-down", seed=1)
    assert down.configuration["KIZO_REDRIVE_ATTEMPTS_MAX"] == "3"
    assert [s.describe() for s in down.rollbacks] == ["enable bank", "enable bank_janitor"]
    probes = [s.body["probe"] for s in down.method if s.action == "probe"]
    assert len(probes) == 2  # at 12 s and just before the bank returns
    for probe in probes:
        assert (probe.provider, probe.tolerance) == ("needs_attention", (1, 1_000_000))
        assert probe.within(1) and not probe.within(0)
    bare = tmp_path / "bare.toml"
    bare.write_text('title = "t"\n[[method]]\naction = "heal"\n')
    loaded = scenarios.load(str(bare), seed=1)
    assert loaded.hypothesis == DEFAULT and loaded.rollbacks == () and not loaded.configuration
    assert {p.provider for p in DEFAULT.probes} == {
        "api_ready", "bank_health", "ledger_audit", "needs_attention"
    }  # fmt: skip


def test_every_shipped_scenario_has_its_own_hypothesis() -> None:
    for name in scenarios.names():
        assert scenarios.load(name, seed=1).hypothesis != DEFAULT, name


def test_kizo_chaos_list_shows_bank_down(capsys: pytest.CaptureFixture[str]) -> None:
    from kizo.cli import main

    assert main(["chaos", "list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert "bank-down" in listed and listed == scenarios.names()


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
    assert report["steps_skipped"] == [] and report["steps_failed"] == []


def test_database_latency_and_cut_connections_lose_nothing(tmp_path: Path) -> None:
    """Also the run's journal and chart (tests/test_chaos_report.py says what they hold)."""
    scenario = scenarios.load("db-latency", seed=3)
    report = run(scenario.workload, scenario, 3, out=tmp_path)
    check_journal(report, tmp_path)
    assert report["violations"] == 0, report["violations_shown"]
    assert report["steps_skipped"] == [] and report["steps_failed"] == []
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
    assert not failed(report), report["steps_failed"]


def test_an_api_killed_under_load_leaves_only_resolved_unknowns() -> None:
    report = _run("api-crash", seed=4)
    assert report["violations"] == 0, report["violations_shown"]
    assert [step["status"] for step in report["timeline"]] == ["killed", "running"]
    assert not failed(report), report["steps_failed"]
    unanswered = sum(n for k, n in report["by_kind_and_status"].items() if k.endswith(" None"))
    assert unanswered > 0, "the crash went unnoticed: the scenario tested nothing"


def test_a_step_late_by_more_than_the_tolerance_or_refused_fails_the_run() -> None:
    steps = scenarios.load("worker-crash", seed=1).method
    timeline = scenarios.Timeline("", "", seed=1)
    late_s = scenarios.STEP_LATE_S_MAX + 0.5
    timeline.applied = [
        {"at_s": 1.0, "actual_s": 1.0 + late_s, "step": "kill worker-0", "status": "killed"},
        {"at_s": 2.5, "actual_s": 2.6, "step": "restart worker-0", "status": "error: gone"},
    ]
    reasons = timeline.failures(steps)
    assert reasons == [
        f"late by {late_s:.2f} s (more than {scenarios.STEP_LATE_S_MAX} s): kill worker-0",
        "failed: gone",
    ]
    timeline.applied[0]["actual_s"] = 1.0 + scenarios.STEP_LATE_S_MAX
    timeline.applied[1]["status"] = "running"
    assert timeline.failures(steps) == []
    assert timeline.failures([*steps, steps[0]]) == [
        "skipped (the workload ended first): kill worker-0"
    ]


def test_a_scenario_whose_steps_cannot_run_fails(tmp_path: Path) -> None:
    """A step refused (no such process) and one planned after the workload's deadline: the run
    finds no violation, yet fails."""
    path = tmp_path / "impossible.toml"
    path.write_text(
        'title = "t"\n[workload]\nusers = 2\nprocesses = 1\nops = 1\nseconds_max = 1\n'
        '[[method]]\nat_s = 0.2\naction = "kill"\nprocess = "worker-9"\n'
        '[[method]]\nat_s = 60\naction = "heal"\n'
    )
    scenario = scenarios.load(str(path), seed=1)
    report = run(scenario.workload, scenario, seed=1)
    assert report["violations"] == 0, report["violations_shown"]
    assert report["steps_skipped"] == ["heal"]
    reasons = report["steps_failed"]
    assert len(reasons) == 2 and "no process 'worker-9'" in reasons[0], reasons
    assert reasons[1] == "skipped (the workload ended first): heal"
    assert failed(report)


def test_valkey_restarted_without_its_data_comes_back_empty(tmp_path: Path) -> None:
    """What ``restart valkey`` with ``lose_data`` does: a snapshot that survives a plain crash
    and restart is gone after ``remove_data``."""
    import redis

    from infra.servers import EmbeddedValkey, free_port

    valkey = EmbeddedValkey(tmp_path / "valkey", free_port())
    try:
        valkey.start()
        # Each client closed by its block: a client left to the collector is a
        # ResourceWarning (an error here) in whichever test runs when it is collected.
        with redis.Redis(port=valkey.port, socket_timeout=5) as client:
            client.set("queued", "job")
            client.save()  # on disk, as a queue is after its fsync
        valkey.kill()
        assert not valkey.running
        valkey.start()
        with redis.Redis(port=valkey.port, socket_timeout=5) as client:
            assert client.get("queued") == b"job"
        valkey.kill()
        valkey.remove_data()
        valkey.start()
        with redis.Redis(port=valkey.port, socket_timeout=5) as client:
            assert client.get("queued") is None and valkey.running
    finally:
        valkey.stop()


class _FixedProber(Prober):
    async def value(self, probe: Probe) -> int:
        return 0


def test_a_method_probe_out_of_tolerance_fails_the_run(tmp_path: Path) -> None:
    """A fault that did not do what it was meant to do tested nothing."""
    path = tmp_path / "probed.toml"
    path.write_text(
        'title = "t"\n[[method]]\naction = "probe"\nprobe = { name = "flagged",'
        ' provider = "needs_attention", tolerance = [1, 10] }\n'
    )
    steps = scenarios.load(str(path), seed=1).method
    timeline = scenarios.Timeline("", "", 1, None, _FixedProber("", "", ""))

    async def go() -> None:
        await timeline.run(steps, trio.current_time())

    trio.run(go)
    assert timeline.failures(steps) == [
        "failed: probe flagged: needs_attention = 0, expected in [1, 10]"
    ]


def test_a_system_not_in_steady_state_runs_no_method_and_fails(tmp_path: Path) -> None:
    path = tmp_path / "unsteady.toml"
    path.write_text(
        'title = "t"\n[workload]\nusers = 2\nprocesses = 1\nops = 5\n'
        '[steady-state-hypothesis]\ntitle = "h"\n[[steady-state-hypothesis.probes]]\n'
        'name = "five flagged"\nprovider = "needs_attention"\ntolerance = 5\n'
        '[[method]]\nat_s = 0.1\naction = "disable"\nproxy = "redis"\n'
    )
    scenario = scenarios.load(str(path), seed=1)
    report = run(scenario.workload, scenario, seed=1)
    assert report["timeline"] == [] and report["violations"] == 0, report["violations_shown"]
    assert report["hypothesis"]["failed"] == [
        "not in steady state before the method (it did not run): five flagged:"
        " needs_attention = 0, expected == 5",
        "deviates after the run: five flagged: needs_attention = 0, expected == 5",
    ]
    assert failed(report)


def test_a_run_that_killed_a_worker_is_checked_after_its_jobs_came_back() -> None:
    from actors.routing import JOB_TIMEOUT_S
    from actors.worker import SWEEP_INTERVAL_S
    from chaos.runner._run import DEAD_WORKER_JOBS_REDONE_S, _jobs_redone_at

    assert DEAD_WORKER_JOBS_REDONE_S > JOB_TIMEOUT_S + SWEEP_INTERVAL_S
    applied = [{"actual_s": 1.0, "step": "kill worker-0", "status": "killed"},
               {"actual_s": 2.5, "step": "restart worker-0", "status": "running"},
               {"actual_s": 3.0, "step": "kill api", "status": "killed"}]  # fmt: skip
    assert _jobs_redone_at(applied) == 1.0 + DEAD_WORKER_JOBS_REDONE_S
    assert _jobs_redone_at(applied[2:]) is None


def test_the_token_ttl_is_a_scenario_setting() -> None:
    assert scenarios.load("token-expiry", seed=1).configuration == {"KIZO_ACCESS_TTL_S": "2"}


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("KIZO_CHAOS_FULL") != "1",
                    reason="a whole scenario: make chaos (the API's refusal of expired tokens "
                    "is tests/test_api_tokens.py's)")  # fmt: skip
def test_tokens_expiring_in_flight_are_refused_then_renewed_and_the_payments_go_on() -> None:
    report = _run("token-expiry", seed=2)
    assert report["violations"] == 0, report["violations_shown"]
    assert not failed(report), report["steps_failed"]
    by_status: dict[int, int] = {}
    for kind_status, n in report["by_kind_and_status"].items():
        status = kind_status.rsplit(" ", 1)[1]
        if status.isdigit():
            by_status[int(status)] = by_status.get(int(status), 0) + n
    # Tokens expired mid-run (else the scenario tested nothing), and the clients renewed them:
    # without renewal every request after the first expiry is a 401.
    assert by_status.get(401, 0) > 0, by_status
    assert by_status.get(202, 0) > by_status[401], by_status
