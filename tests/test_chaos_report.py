"""A chaos run's report: the journal's sections built from hand-made histories, ledgers and
samples; the sampler riding out a server that goes away; the ``--all`` table; bad usage. The
journal and chart of a real run are checked in tests/test_chaos_scenarios.py, on a run the
suite makes anyway."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from chaos.checker import RULES, Op
from chaos.runner import matrix, report
from chaos.runner.sampler import Sample, Sampler
from chaos.runner.scenario import Step
from infra.commands import UsageError
from infra.servers import EmbeddedValkey, free_port

ROOT = Path(__file__).resolve().parent.parent
CLOCK = report.Clock(load_at=100.0, load_wall=1_000.0, history_offset_s=-2.0,
                     load_ended_s=3.0, healed_s=3.5)  # fmt: skip


def _op(index: int, completed_s: float, status: int | None) -> Op:
    outcome = "info" if status is None or status >= 500 else "ok" if status < 300 else "fail"
    # History times count from the recorder's start, 2 s before the load (the offset above).
    return Op(0, index, "transfer", "u", "k", {}, completed_s + 1.9, completed_s + 2.0, status,
              outcome)  # fmt: skip


def _applied(at_s: float, step: Step, status: object = 200, took_s: float = 0.0) -> dict[str, Any]:
    return {"at_s": at_s, "actual_s": at_s + 0.01, "took_s": took_s, "step": step.describe(),
            "status": status}  # fmt: skip


def test_fault_windows_run_from_each_fault_to_what_removes_it_or_the_heal() -> None:
    latency = {"type": "latency", "attributes": {"latency": 40}}
    steps = [
        Step(0.5, "toxic", "postgres", latency),
        Step(1.0, "disable", "redis"),
        Step(1.5, "kill", "worker-0"),
        Step(2.0, "bank_faults", body={"error_rate": 0.1, "drop_rate": 0.2}),
        Step(2.2, "kill", "api"),  # refused: opens nothing
        Step(2.5, "restart", "worker-0"),
        Step(3.0, "remove_toxic", "postgres", {"name": "latency_downstream"}),
        Step(3.5, "bank_faults", body={"error_rate": 0.0}),
        Step(4.0, "pause", "janitor"),
    ]
    applied = [_applied(s.at_s, s, took_s=1.0 if s.action == "restart" else 0.0) for s in steps]
    applied[4]["status"] = "error: no process 'api'"
    windows = report.fault_windows(steps, applied, healed_s=6.0)
    assert [(w["label"], w["start_s"], w["end_s"], w["ended_by"]) for w in windows] == [
        ("postgres latency", 0.51, 3.01, "remove_toxic postgres {'name': 'latency_downstream'}"),
        ("redis off", 1.01, 6.0, "rollback"),
        ("worker-0 killed", 1.51, 3.51, "restart worker-0"),  # back when its restart ended
        ("bank error 10%, drop 20%", 2.01, 3.51, "bank_faults {'error_rate': 0.0}"),
        ("janitor paused", 4.01, 6.0, "rollback"),
    ]
    healed = report.fault_windows([steps[1], Step(2.0, "heal")],
                                  [applied[1], _applied(2.0, Step(2.0, "heal"))], 9.0)  # fmt: skip
    assert [(w["end_s"], w["ended_by"]) for w in healed] == [(2.01, "heal")]


def test_the_sections_put_history_ledger_and_samples_on_one_clock() -> None:
    history = [_op(1, -0.5, 202), _op(2, 0.2, 202), _op(3, 0.7, None), _op(4, 0.8, 503),
               _op(5, 1.2, 500), _op(6, 1.3, 422)]  # fmt: skip
    txns = [  # wall clock: the load started at 1000.0
        report.TxnTimes(1_000.1, 1_000.2, settled=True),  # lag 100 ms, final in bin 0
        report.TxnTimes(1_000.1, 1_000.4, settled=True),  # 300 ms, bin 0
        report.TxnTimes(1_000.5, 1_004.5, settled=True),  # 4000 ms, bin 9: 1 s after the heal
        report.TxnTimes(1_000.5, 1_001.0, settled=False),  # failed: no lag
    ]
    samples = [Sample(100.0, 3, 1, 2.0), Sample(100.5, None, 0, 400.0), Sample(101.0, 1, None, 5.0)]
    out = report.sections(history, txns, samples, CLOCK, [], [], {"samples": 3})
    assert out["operations"] == {"total": 6, "by_outcome": {"ok": 2, "fail": 1, "unknown": 3},
                                 "by_status": {"202": 2, "422": 1, "500": 1, "503": 1,
                                               "none": 1}}  # fmt: skip
    assert out["convergence"] == {"seconds": 1.0, "healed_s": 3.5, "last_final_s": 4.5,
                                  "transactions": 4, "still_open": 0}  # fmt: skip
    figures = out["figures"]
    assert figures["lag_ms"] == {"p50": 300.0, "p99": 4000.0, "max": 4000.0, "settled": 3}
    assert (figures["backlog_peak"], figures["queued_peak"], figures["answers_5xx"]) == (3, 1, 1)
    assert figures["answered_per_s"] == round(4 / 3.0, 1)  # 5 answered, 1 before the load
    series = out["series"]
    assert series["t_s"][:3] == [0.0, 0.5, 1.0] and len(series["t_s"]) == 9  # up to 4.5 s
    assert series["answered_per_s"][:3] == [2.0, 2.0, 4.0]
    assert series["unknown_per_s"][:2] == [0.0, 2.0]
    assert series["errors_503_per_s"][:2] == [0.0, 2.0]
    assert series["errors_5xx_per_s"][:3] == [0.0, 0.0, 2.0]
    assert series["lag_p50_ms"][0] == 100.0 and series["lag_p99_ms"][0] == 300.0
    assert series["lag_p99_ms"][1] is None  # nothing settled then: a gap, not a zero
    assert out["samples"] == {"t_s": [0.0, 0.5, 1.0], "backlog": [3, None, 1],
                              "queued": [1, 0, None]}  # fmt: skip


def test_a_transaction_still_open_means_no_convergence_time() -> None:
    txns = [report.TxnTimes(1_000.0, None, settled=False), report.TxnTimes(1_000.0, 1_001.0, True)]
    conv = report.sections([], txns, [], CLOCK, [], [], {})["convergence"]
    assert conv["seconds"] is None and conv["still_open"] == 1


def test_the_checker_section_lists_every_rule() -> None:
    rules = {"conservation": 2, "audit:balance_mismatch": 3, "audit:hold_mismatch": 1}
    section = report.checker_section({"violations": 6, "violation_rules": rules,
                                      "steps_failed": ["late"]}, failed=True)  # fmt: skip
    assert section["verdict"] == "fail" and section["steps_failed"] == 1
    assert list(section["rules"]) == [*RULES, "audit"]
    assert section["rules"]["conservation"] == 2 and section["rules"]["audit"] == 4


def test_rules_names_every_rule_the_checker_can_report() -> None:
    import re

    source = (ROOT / "chaos" / "checker" / "_check.py").read_text()
    named = set(re.findall(r'Violation\(\s*"([a-z_]+)"', source))
    assert named == set(RULES)


async def _ticks(sampler: Sampler, valkey: EmbeddedValkey) -> list[Sample]:
    taken = [await sampler.tick()]
    valkey.kill()  # Redis gone: a gap in its series, PostgreSQL still sampled
    taken.append(await sampler.tick())
    valkey.start()
    taken.append(await sampler.tick())
    await sampler.close()
    return taken


def test_the_sampler_rides_out_a_server_that_goes_away(sync_db_url: str, tmp_path: Path) -> None:
    valkey = EmbeddedValkey(tmp_path / "valkey", free_port())
    try:
        valkey.start()
        sampler = Sampler(sync_db_url, valkey.url(), shards=4)
        taken = asyncio.run(_ticks(sampler, valkey))
    finally:
        valkey.stop()
    assert [(s.backlog, s.queued) for s in taken] == [(0, 0), (0, None), (0, 0)]
    assert sampler.stats()["queued_gaps"] == 1 and sum(sampler.errors.values()) == 1


def test_the_sampler_thread_keeps_going_with_nothing_to_sample() -> None:
    nowhere = free_port()
    sampler = Sampler(f"postgresql://postgres@127.0.0.1:{nowhere}/kizo",
                      f"redis://127.0.0.1:{nowhere}/0", shards=2, interval_s=0.05)  # fmt: skip
    sampler.start()
    sampler.stop()
    stats = sampler.stats()
    assert stats["samples"] >= 1 and stats["backlog_gaps"] == stats["samples"]
    assert not sampler._thread or not sampler._thread.is_alive()


def test_the_all_table_aligns_a_row_per_run() -> None:
    rows = [
        {"scenario": "bank-flaky", "seed": 1, "ops": 590, "violations": 0, "steps_failed": 0,
         "convergence_s": 1.234, "lag_p99_ms": 812.4, "verdict": "pass"},
        {"scenario": "pg-crash", "seed": 12, "ops": 1204, "violations": 3, "steps_failed": 1,
         "convergence_s": None, "lag_p99_ms": None, "verdict": "fail"},
        {"scenario": "api-crash", "seed": 2, "ops": None, "violations": None,
         "steps_failed": None, "convergence_s": None, "lag_p99_ms": None,
         "verdict": "error: RuntimeError: api did not start"},
    ]  # fmt: skip
    assert matrix.table(rows).splitlines() == [
        "scenario    seed   ops  violations  steps failed  convergence s  lag p99 ms  verdict",
        "----------  ----  ----  ----------  ------------  -------------  ----------"
        "  --------------------------------------",
        "bank-flaky     1   590           0             0           1.23         812  pass",
        "pg-crash      12  1204           3             1              -           -  fail",
        "api-crash      2     -           -             -              -           -"
        "  error: RuntimeError: api did not start",
    ]
    assert matrix.format_row(rows[0]).startswith("scenario bank-flaky  seed 1  ops 590")


@pytest.mark.parametrize(("raw", "seeds"), [(None, [1, 2, 3]), ("7", [7]), ("1, 2,30", [1, 2, 30])])
def test_seeds_are_a_comma_list(raw: str | None, seeds: list[int]) -> None:
    assert matrix.parse_seeds(raw) == seeds


@pytest.mark.parametrize("raw", ["", "1,,2", "a", "-1", "1.5", "1,1", ",".join("0123456789" * 3)])
def test_bad_seeds_are_refused(raw: str) -> None:
    with pytest.raises(UsageError, match="--seeds"):
        matrix.parse_seeds(raw)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "redis-outage", "--all"], "--all goes with kizo chaos run and no scenario"),
        (["bank", "--all"], "--all goes with kizo chaos run"),
        (["run", "--all", "--seeds", "1,x"], "--seeds takes seeds separated by commas"),
        (["run", "redis-outage", "--seeds", "1,2"], "--seeds goes with kizo chaos run --all"),
    ],
)
def test_bad_all_usage_is_one_line_and_exit_2(
    args: list[str], message: str, tmp_path: Path
) -> None:
    result = subprocess.run([sys.executable, "-m", "kizo.cli", "chaos", *args, "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=60,
                            cwd=ROOT)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir()), "bad usage wrote something"


def check_journal(run: dict[str, Any], out: Path) -> None:
    """What a real run writes: the journal (every section), and a PNG worth looking at."""
    journal = json.loads((out / report.JOURNAL).read_text())
    assert journal["files"] == {"journal": str(out / report.JOURNAL),
                                "chart": str(out / report.CHART)}  # fmt: skip
    for section in ("timeline", "rollback", "clock", "operations", "checker", "convergence",
                    "fault_windows", "figures", "series", "samples", "sampler"):  # fmt: skip
        assert journal[section] == run[section], section
    assert journal["checker"]["verdict"] == "pass"
    assert journal["operations"]["total"] == run["ops"]
    assert journal["convergence"]["seconds"] is not None
    assert journal["convergence"]["seconds"] >= 0 and journal["convergence"]["still_open"] == 0
    assert journal["figures"]["lag_ms"]["settled"] > 0
    assert 0 < journal["figures"]["lag_ms"]["p50"] <= journal["figures"]["lag_ms"]["p99"]
    assert journal["fault_windows"], "a scenario with faults shows their windows"
    for window in journal["fault_windows"]:
        assert 0 <= window["start_s"] <= window["end_s"] <= journal["rollback"]["healed_s"] + 0.01
    series, samples = journal["series"], journal["samples"]
    assert len(series["t_s"]) == len(series["answered_per_s"]) == len(series["lag_p99_ms"])
    assert sum(series["answered_per_s"]) > 0
    assert journal["sampler"]["samples"] == len(samples["t_s"]) > 0
    assert any(b is not None for b in samples["backlog"])
    png = (out / report.CHART).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000


def test_ledger_times_follow_the_database_clock_through_a_step() -> None:
    """The wall clock jumps 5 s forward between the sampler's readings at 1 s and 2 s: the
    ledger's timestamps after the jump land where they happened, not 5 s later."""
    readings = ((100.0, 900.0), (101.0, 900.0), (102.0, 905.0), (103.0, 905.0))
    clock = report.Clock(100.0, 1_000.0, 0.0, 3.0, 3.0, readings)
    assert clock.from_wall(1_000.5) == 0.5
    assert clock.from_wall(1_007.5) == 2.5  # read as 905 + 102.5 after the jump
    assert clock.from_wall(999.0) == -1.0  # before any reading: the first one's offset
    assert clock.section() == {"db_readings": 4, "db_clock_moved_s": 5.0}


def test_the_summary_names_convergence_lag_and_the_files() -> None:
    from chaos.runner import text

    txns = [report.TxnTimes(1_000.1, 1_000.2, True), report.TxnTimes(1_000.1, 1_004.0, True)]
    run = {"scenario": "redis-outage", "seed": 5, "mutation": None, "ops": 2, "ops_per_s": 1.0,
           "transactions": 2, "by_kind_and_status": {}, "bank_faults_injected": {},
           "timeline": [{"at_s": 1.0, "actual_s": 1.0, "took_s": 1.5, "step": "restart api",
                         "status": "running"}],
           "steps_failed": [], "violations": 0, "violation_rules": {}, "violations_shown": [],
           **report.sections([], txns, [], CLOCK, [], [],
                             {"interval_s": 0.5, "samples": 0, "backlog_gaps": 0,
                              "queued_gaps": 0, "cpu_ms_total": 0.0}),
           "files": {"journal": "out/journal.json", "chart": "out/report.png"}}  # fmt: skip
    run["checker"] = report.checker_section(run, failed=False)
    lines = text(run).splitlines()
    assert "       1.0 s ->    1.0 s  restart api -> running (took 1.5 s)" in lines
    assert "  convergence       0.50 s after the heal at 3.50 s (all 2 final)" in lines
    assert "  settlement lag    p50 100 ms, p99 3900 ms, max 3900 ms (2 settled)" in lines
    assert lines[-2:] == [
        "  journal           out/journal.json",
        "  chart             out/report.png",
    ]
    assert matrix.row(run) == {"scenario": "redis-outage", "seed": 5, "ops": 2, "violations": 0,
                               "steps_failed": 0, "convergence_s": 0.5, "lag_p99_ms": 3900.0,
                               "verdict": "pass", "journal": "out/journal.json"}  # fmt: skip
