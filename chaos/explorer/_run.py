"""The explorer's one way into the runner: a scenario run on a scratch system, judged as
``kizo chaos run`` judges it, and told apart: a money violation, a run whose steps did not run
as planned, a system not steady before the method, or a run that could not be made at all.

One scratch system serves run after run (each run's workload signs up its own users and the
checker judges only them): starting one takes 15-25 s on a loaded 2-core machine, a run on it
5-10 s. A run whose steps did not run as planned, or that could not be made, retires it (what
it left is unknown), and so does a violation of the whole ledger (its audit, the steady-state
hypothesis); a violation of the run's own users does not. The next run's steady-state
hypothesis is the guard: a system not steady before the method (a ledger whose audit fails,
an item needing an operator) is retired and the run made again on a fresh one, where the same
deviation is the build's own (row_locks_off loses updates in the setup's deposits). The
explorer confirms its result on a fresh system."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

from chaos import runner
from chaos.explorer._faults import Vocabulary
from chaos.runner import scenario as scenarios
from chaos.runner.scenario import Scenario
from infra.system import System, scratch_system

SHOWN_MAX = 5
HYPOTHESIS_RULE = "hypothesis"
UNSTEADY_BEFORE = "not in steady state before"


@dataclass(frozen=True)
class Verdict:
    kind: str  # pass | violation | steps_failed | unsteady | error
    rules: tuple[str, ...] = ()  # the checker's rules that fired, "hypothesis" for a deviation
    seconds: float = 0.0  # the run's, with the system's start when it needed one
    fresh: bool = False  # a scratch system was started for it
    shown: tuple[str, ...] = ()  # the first violations, step failures or the error


def vocabulary() -> Vocabulary:
    """What a run's system has, read now: chaos.runner.scenario.PROXIES, the workers the chaos runs
    start (KIZO_WORKERS, 1 unless set), the API, the janitor and the bank."""
    workers = int(runner.CHAOS_OVERRIDES.get("KIZO_WORKERS", "1"))
    processes = (*(f"worker-{i}" for i in range(workers)), "api", "janitor", "bank")
    return Vocabulary(tuple(scenarios.PROXIES), processes, tuple(sorted(scenarios.SERVERS)))


def judge(report: dict[str, Any]) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(kind, rules, shown) of a report. A system not steady before the method comes first:
    the workload did not run, so what the checker finds is the system's state before the run
    (on a fresh system, the build's own doing: see ``Runner.run``). Then the checker's
    violations (money is money, late steps or not), then steps that did not run as planned,
    then the hypothesis after the run."""
    hypothesis = (report.get("hypothesis") or {}).get("failed") or []
    before = [d for d in hypothesis if d.startswith(UNSTEADY_BEFORE)]
    after = [d for d in hypothesis if not d.startswith(UNSTEADY_BEFORE)]
    rules = tuple(sorted(report["violation_rules"])) + ((HYPOTHESIS_RULE,) if hypothesis else ())
    if before:
        return "unsteady", rules, tuple(before[:SHOWN_MAX])
    if report["violations"]:
        return "violation", rules, tuple(report["violations_shown"][:SHOWN_MAX])
    if report["steps_failed"]:
        return "steps_failed", (), tuple(report["steps_failed"][:SHOWN_MAX])
    if after:
        return "violation", rules, tuple(after[:SHOWN_MAX])
    return "pass", (), ()


class Runner:
    """Runs scenarios on the ``mutation``'s build, on one scratch system while runs pass."""

    def __init__(self, mutation: str) -> None:
        self.mutation = mutation
        self._stack = contextlib.ExitStack()
        self._system: System | None = None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.retire()

    @property
    def up(self) -> bool:
        """Whether the next run finds a system up (else it starts one)."""
        return self._system is not None

    def retire(self) -> None:
        """Stop the system (the next run starts a fresh one)."""
        self._system = None
        self._stack.close()

    def run(self, scenario: Scenario, seed: int, fresh: bool = False) -> Verdict:
        """The run's verdict, on the system of the runs before unless ``fresh``; once more on a
        fresh system when the old one was not steady before the method."""
        started = time.monotonic()
        if fresh:
            self.retire()
        verdict = self._run(scenario, seed)
        if verdict.kind == "unsteady" and not verdict.fresh:  # what an earlier run left
            verdict = self._run(scenario, seed)
        if verdict.kind == "unsteady":  # a fresh system the build broke in the setup already
            verdict = replace(verdict, kind="violation")
        return replace(verdict, seconds=round(time.monotonic() - started, 1))

    def _run(self, scenario: Scenario, seed: int) -> Verdict:
        started = time.monotonic()
        fresh = self._system is None
        try:
            if self._system is None:
                overrides = runner.system_overrides(self.mutation, scenario)
                self._system = self._stack.enter_context(scratch_system(overrides, True))
            report = runner.run_on(self._system, scenario.workload, scenario, seed, self.mutation)
        except Exception as exc:  # one broken run (a start that failed...): named, not fatal
            self.retire()
            first = (str(exc).splitlines() or [""])[0][:200]
            return Verdict("error", (), round(time.monotonic() - started, 1), fresh,
                           (f"{type(exc).__name__}: {first}",))  # fmt: skip
        kind, rules, shown = judge(report)
        if kind not in ("pass", "violation"):
            self.retire()
        elif HYPOTHESIS_RULE in rules or any(r.startswith("audit:") for r in rules):
            self.retire()  # the ledger itself is broken: the next run would find it so
        return Verdict(kind, rules, round(time.monotonic() - started, 1), fresh, shown)
