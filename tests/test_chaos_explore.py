"""``kizo chaos explore``: the generator (deterministic, the whole vocabulary, every scenario a
valid file), the shrinker (against pure predicates), the verdicts, bad usage, and one real
exploration that finds a broken build from scratch and shrinks it to a file that fails again."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chaos import explorer
from chaos.explorer import Candidate, Window
from chaos.mockbank.faults import FaultsUpdate
from chaos.proxy.model import TOXIC_TYPES
from chaos.runner import scenario as scenarios

ROOT = Path(__file__).resolve().parent.parent
SEEDS = st.integers(min_value=0, max_value=2**31 - 1)
MANY_SEEDS = range(400)


def _identity(w: Window) -> tuple[str, str, str, str]:
    return (w.kind, w.target, w.type, w.stream)


@given(seed=SEEDS)
def test_the_generator_is_deterministic_per_seed(seed: int) -> None:
    vocabulary = explorer.vocabulary()
    assert explorer.generate(seed, vocabulary) == explorer.generate(seed, vocabulary)


def test_over_many_seeds_every_proxy_process_fault_kind_toxic_and_stream_is_drawn() -> None:
    vocabulary = explorer.vocabulary()
    drawn = [w for seed in MANY_SEEDS for w in explorer.generate(seed, vocabulary).windows]
    assert {w.kind for w in drawn} == set(explorer.KINDS)
    for kind in ("toxic", "disable"):
        assert {w.target for w in drawn if w.kind == kind} == set(scenarios.PROXIES)
    for kind in ("kill", "pause"):
        assert {w.target for w in drawn if w.kind == kind} == set(vocabulary.processes)
    assert {w.target for w in drawn if w.kind == "crash"} == {"postgres", "valkey"}
    toxics = {(w.type, w.stream) for w in drawn if w.kind == "toxic"}
    assert toxics == {(t, s) for t in explorer.TOXICS for s in ("upstream", "downstream")}
    assert {name for w in drawn if w.kind == "bank_faults" for name, _ in w.attributes} == set(
        explorer.BANK_FAULTS
    )
    assert len({explorer.generate(seed, vocabulary) for seed in MANY_SEEDS}) == len(MANY_SEEDS)


def test_the_vocabulary_is_read_when_a_run_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    # Another proxy (a per-role link, say) is drawn as soon as chaos.runner.scenario lists it.
    monkeypatch.setattr(scenarios, "PROXIES", (*scenarios.PROXIES, "postgres_api"))
    vocabulary = explorer.vocabulary()
    assert "postgres_api" in vocabulary.proxies
    targets = {w.target for s in MANY_SEEDS for w in explorer.generate(s, vocabulary).windows}
    assert "postgres_api" in targets
    assert {"worker-0", "api", "janitor", "bank"} == set(vocabulary.processes)


def test_the_fault_tables_cover_what_the_proxy_and_the_bank_take() -> None:
    # A toxic or a bank fault added there and not here fails this: one line adds it here.
    assert {t: tuple(a) for t, a in explorer.TOXICS.items()} == {
        t: a for t, a in TOXIC_TYPES.items() if t != "noop"
    }
    assert set(explorer.BANK_FAULTS) == set(FaultsUpdate.model_fields) - {"seed"}


def _healed(candidate: Candidate) -> bool:
    """Every fault the method starts, it ends: nothing left for the runner's final heal."""
    open_faults: set[tuple[str, str]] = set()
    for step in explorer.steps(candidate):
        key = (step.target, str(step.body.get("name", "")))
        if step.action in ("toxic", "disable", "kill", "pause"):
            open_faults.add((step.target, str(step.body.get("name", ""))))
        elif step.action == "bank_faults" and any(step.body.values()):
            open_faults.add(("bank", "faults"))
        elif step.action == "bank_faults":
            open_faults.discard(("bank", "faults"))
        else:
            open_faults.discard(key)
    return not open_faults


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(seed=SEEDS)
def test_every_generated_and_shrunk_scenario_is_a_valid_file_that_reads_back_the_same(
    seed: int, tmp_path: Path
) -> None:
    candidate = explorer.generate(seed, explorer.vocabulary())
    assert explorer.valid(candidate) and candidate.windows
    simpler = [c for c in explorer.simpler(candidate) if explorer.valid(c)]
    for c in [candidate, *random.Random(seed).sample(simpler, min(5, len(simpler)))]:
        path = tmp_path / f"c{seed}.toml"
        path.write_text(explorer.to_toml(c, "drawn\nby the test"))
        loaded = scenarios.load(str(path), c.seed)
        assert loaded == explorer.to_scenario(c, path.stem, "drawn\nby the test")
        assert loaded.workload == explorer.workload(c) and loaded.workload.seed == c.seed
        assert all(s.at_s <= 8.0 for s in loaded.method) and _healed(c)
        assert _nothing_right_after_a_restart(loaded.method)


def _nothing_right_after_a_restart(method: tuple[scenarios.Step, ...]) -> bool:
    """A restart blocks the timeline until its process serves: what follows it within 4 s
    would start late on a loaded machine (and fail the run without a word on money)."""
    return all(b.at_s >= a.at_s + 4.0 for i, a in enumerate(method) if a.action == "restart"
               for b in method[i + 1 :])  # fmt: skip


# The shrinker against pure predicates (no system): what it keeps, and its bounds.


def _candidate(seed: int) -> Candidate:
    vocabulary = explorer.vocabulary()
    return next(c for s in range(seed, seed + 1000)
                if len((c := explorer.generate(s, vocabulary)).windows) >= 3)  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), pick=st.integers(0, 10))
def test_the_shrinker_reaches_exactly_the_one_fault_that_fails(seed: int, pick: int) -> None:
    start = _candidate(seed)
    culprit = _identity(start.windows[pick % len(start.windows)])

    def still_fails(c: Candidate) -> bool:
        return any(_identity(w) == culprit for w in c.windows)

    shrunk = explorer.shrink(start, still_fails, runs_max=400)
    [window] = shrunk.candidate.windows
    assert _identity(window) == culprit and shrunk.runs <= 400
    assert (shrunk.candidate.users, shrunk.candidate.processes, shrunk.candidate.ops) == (2, 1, 5)
    assert window.start_s == 0.5 and window.end_s == 1.0 and window.toxicity == 1.0
    # Minimal: nothing simpler still fails.
    assert not any(still_fails(c) and explorer.valid(c) and c != shrunk.candidate
                   for c in explorer.simpler(shrunk.candidate)) or shrunk.runs == 400  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), runs_max=st.integers(0, 30))
def test_the_shrinker_keeps_only_what_still_fails_within_its_bounds(
    seed: int, runs_max: int
) -> None:
    start = _candidate(seed)
    rng = random.Random(seed)
    verdicts: dict[Candidate, bool] = {}

    def noisy(c: Candidate) -> bool:  # fails at random, the same answer each time it is asked
        return verdicts.setdefault(c, rng.random() < 0.4)

    shrunk = explorer.shrink(start, noisy, runs_max)
    assert shrunk.runs == len(verdicts) <= runs_max
    assert shrunk.candidate == start or verdicts[shrunk.candidate]
    assert shrunk.kept <= sum(verdicts.values())
    stopped = explorer.shrink(start, noisy, 100, more=lambda: False)
    assert (stopped.candidate, stopped.runs) == (start, 0)


def test_the_shrinker_tries_each_candidate_once() -> None:
    start = _candidate(7)
    asked: list[Candidate] = []

    def never(c: Candidate) -> bool:
        asked.append(c)
        return False

    shrunk = explorer.shrink(start, never, runs_max=10_000)
    assert shrunk.candidate == start and len(asked) == len(set(asked)) == shrunk.runs > 0


def test_the_shrink_path_starts_with_the_found_candidate_and_ends_with_the_smallest() -> None:
    start = _candidate(11)
    culprit = _identity(start.windows[0])
    shrunk = explorer.shrink(start, lambda c: any(_identity(w) == culprit for w in c.windows),
                             runs_max=400)  # fmt: skip
    assert shrunk.path[0] == start and shrunk.path[-1] == shrunk.candidate
    assert len(shrunk.path) == shrunk.kept + 1


class _RaceRunner:
    """Stands for the runner: a candidate fails its confirming run only when its workload has
    at least ``users_min`` users (a race the smallest workloads rarely hit)."""

    up = False

    def __init__(self, users_min: int) -> None:
        self.users_min = users_min
        self.confirmed: list[int] = []

    def run(self, scenario: scenarios.Scenario, seed: int, fresh: bool = False) -> Any:
        from chaos.explorer._run import Verdict

        self.confirmed.append(scenario.workload.users)
        failing = scenario.workload.users >= self.users_min
        return Verdict("violation" if failing else "pass", ("conservation",) if failing else (),
                       1.0, fresh)  # fmt: skip


@pytest.mark.parametrize(("users_min", "chosen", "confirmed"),
                         [(2, 2, True), (4, 4, True), (8, 8, True), (9, 2, False)])  # fmt: skip
def test_when_the_smallest_does_not_fail_again_the_last_that_does_is_the_answer(
    users_min: int, chosen: int, confirmed: bool
) -> None:
    from chaos.explorer import _explore

    base = _candidate(3)
    path = tuple(dataclasses.replace(base, users=n) for n in (16, 8, 4, 2))
    x = _explore.Exploration(10_000.0, 1, "", None)
    runner = _RaceRunner(users_min)
    minimal, ok = _explore._confirm_smallest(x, runner, path)  # type: ignore[arg-type]
    assert (minimal.users, ok) == (chosen, confirmed)
    # smallest first, at most three of the path, each once (every verdict is definite)
    assert runner.confirmed == [2, 4, 8][: [2, 4, 8].index(chosen) + 1 if ok else 3]


# Verdicts: a money violation is told apart from steps that did not run as planned.


def _report(**fields: Any) -> dict[str, Any]:
    return {"violations": 0, "violation_rules": {}, "violations_shown": [], "steps_failed": [],
            "hypothesis": None, **fields}  # fmt: skip


@pytest.mark.parametrize(
    ("report", "kind", "rules"),
    [
        (_report(), "pass", ()),
        (_report(violations=2, violation_rules={"conservation": 2}), "violation",
         ("conservation",)),
        (_report(steps_failed=["late by 4 s: kill worker-0"]), "steps_failed", ()),
        (_report(violations=1, violation_rules={"bank_unrecorded": 1},
                 steps_failed=["late by 4 s"]), "violation", ("bank_unrecorded",)),
        (_report(hypothesis={"failed": ["deviates after the run: audit"]}), "violation",
         ("hypothesis",)),
        (_report(hypothesis={"failed": ["not in steady state before the method (it did not "
                                        "run): audit"]}), "unsteady", ("hypothesis",)),
        # The workload did not run: the audit's findings are the system's before the run.
        (_report(violations=3, violation_rules={"audit:balance_mismatch": 3},
                 hypothesis={"failed": ["not in steady state before the method (it did not "
                                        "run): audit"]}), "unsteady",
         ("audit:balance_mismatch", "hypothesis")),
    ],
)  # fmt: skip
def test_a_run_is_judged_as_kizo_chaos_run_judges_it_and_told_apart(
    report: dict[str, Any], kind: str, rules: tuple[str, ...]
) -> None:
    assert explorer.judge(report)[:2] == (kind, rules)


# Bad usage.


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["explore"], "kizo chaos explore needs --budget SECONDS"),
        (["explore", "--budget", "5"], "argument --budget: must be between 10 and 86400"),
        (["explore", "--budget", "ten"], "argument --budget: expected an integer"),
        (["explore", "--budget", "100000"], "argument --budget: must be between 10 and 86400"),
        (["run", "bank-flaky", "--budget", "60"], "only it takes one"),
        (["explore", "bank-flaky", "--budget", "60"], "draws its own scenarios"),
        (["explore", "--budget", "60", "--all"], "draws its own scenarios"),
        (["explore", "--budget", "60", "--mutation", "all"], "invalid choice"),
    ],
)
def test_bad_explore_usage_is_one_line_and_exit_2(args: list[str], message: str,
                                                  tmp_path: Path) -> None:  # fmt: skip
    result = _kizo_chaos(*args, "--out", str(tmp_path))
    assert result.returncode == 2, result.stderr
    # One line of error (argparse's own errors follow its usage lines, as everywhere in kizo).
    assert message in result.stderr.strip().splitlines()[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir()), "bad usage wrote something"


def _kizo_chaos(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kizo.cli", "chaos", *args],
                          capture_output=True, text=True, timeout=timeout_s,
                          cwd=ROOT)  # fmt: skip


# One real exploration. bank_key_off is the mutation a random timeline finds first (every
# payment reaches the bank under a key no transaction has: docs/chaos.md, "Explorer"); seed 58's
# first timeline has four fault windows, so the file is small only if the shrinker works. The
# budget holds two runs on fresh systems (25-60 s each on the loaded 2-core machine: the first
# and the confirming one) and a few shrink runs on the system up (2-10 s each).
EXPLORE_SEED = 58
EXPLORE_BUDGET_S = 160
REPLAY_S_MAX = 180


@pytest.mark.slow
@pytest.mark.timeout(EXPLORE_BUDGET_S + 60 + REPLAY_S_MAX)
def test_explore_finds_a_broken_build_from_scratch_and_its_minimal_file_fails_again(
    tmp_path: Path,
) -> None:
    first = explorer.generate(random.Random(EXPLORE_SEED).randrange(2**31), explorer.vocabulary())
    assert len(first.windows) > 3
    result = _kizo_chaos("explore", "--budget", str(EXPLORE_BUDGET_S), "--seed",
                         str(EXPLORE_SEED), "--mutation", "bank_key_off", "--json", "--out",
                         str(tmp_path / "explore"), timeout_s=EXPLORE_BUDGET_S + 120)  # fmt: skip
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert summary["violations_found"] and summary["confirmed"], summary
    assert summary["minimal_faults"] <= 3 < len(first.windows) and summary["shrink_runs"] >= 1
    assert summary["runs"] == len(json.loads(Path(summary["journal"]).read_text())["journal_runs"])
    replay = _kizo_chaos("run", summary["minimal_scenario"], "--seed",
                         str(summary["minimal_seed"]), "--mutation", "bank_key_off", "--json",
                         "--out", str(tmp_path / "replay"), timeout_s=REPLAY_S_MAX)  # fmt: skip
    assert replay.returncode == 1, replay.stderr
    assert set(json.loads(replay.stdout)["violation_rules"]) & set(summary["first_rules"])

