"""The exploration: timeline after timeline within the budget, the first violation shrunk,
the smallest confirmed by one more run, written as a scenario file and a journal."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos.explorer._generate import Candidate, generate, to_scenario, to_toml
from chaos.explorer._run import Runner, Verdict, vocabulary
from chaos.explorer._shrink import shrink
from chaos.runner import scenario as scenarios

RUNS_DIR = Path("chaos-runs")
JOURNAL = "explore.json"
MINIMAL = "minimal.toml"
FOUND = "found.toml"
SEED_MAX = 2**31
# Until runs have been timed: a run on a fresh system (its start included), and one on the
# system of the run before, seconds.
FRESH_RUN_S_GUESS = 30.0
REUSED_RUN_S_GUESS = 15.0
# A confirming run that could not be made, or whose steps did not run as planned, says
# nothing: it is made again, this many times in all (a run that passes is the answer).
CONFIRM_TRIES_MAX = 2
# When the smallest candidate passes its confirming run (a race it hit once), the ones kept
# before it are confirmed in turn, smallest first, at most this many in all.
CONFIRM_CANDIDATES_MAX = 3
SHRINK_RUNS_MAX = 40
ERRORS_IN_A_ROW_MAX = 3  # runs that could not be made at all: the system does not start


@dataclass
class Exploration:
    budget_s: float
    seed: int
    mutation: str
    say: Callable[[str], None] | None
    started: float = field(default_factory=time.monotonic)
    journal: list[dict[str, Any]] = field(default_factory=list)
    fresh_s: list[float] = field(default_factory=list)  # runs that started a system
    reused_s: list[float] = field(default_factory=list)  # runs on the system of the last

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def room(self, runner: Runner) -> bool:
        """Whether one more run, then a confirming run on a fresh system, fit in what is left
        of the budget, each as long as the last of its kind (on the system up, or fresh)."""
        fresh_s = self.fresh_s[-1] if self.fresh_s else FRESH_RUN_S_GUESS
        next_s = fresh_s
        if runner.up:
            next_s = self.reused_s[-1] if self.reused_s else REUSED_RUN_S_GUESS
        return self.elapsed_s() + next_s + fresh_s <= self.budget_s

    def room_fresh(self) -> bool:
        """Whether a run on a fresh system fits in what is left of the budget."""
        fresh_s = self.fresh_s[-1] if self.fresh_s else FRESH_RUN_S_GUESS
        return self.elapsed_s() + fresh_s <= self.budget_s

    def attempt(self, runner: Runner, phase: str, candidate: Candidate,
                fresh: bool = False) -> Verdict:  # fmt: skip
        verdict = runner.run(to_scenario(candidate, phase), candidate.seed, fresh)
        (self.fresh_s if verdict.fresh else self.reused_s).append(verdict.seconds)
        entry = {"run": len(self.journal) + 1, "phase": phase, "seed": candidate.seed,
                 "at_s": round(self.elapsed_s(), 1), "seconds": verdict.seconds,
                 "fresh_system": verdict.fresh, "verdict": verdict.kind,
                 "rules": list(verdict.rules), "faults": len(candidate.windows),
                 "timeline": candidate.summary(), "workload": _workload(candidate),
                 "shown": list(verdict.shown)}  # fmt: skip
        self.journal.append(entry)
        if self.say is not None:
            self.say(progress_line(entry, self.budget_s))
        return verdict

    def count(self, kind: str) -> int:
        return sum(e["verdict"] == kind for e in self.journal)


def _workload(c: Candidate) -> dict[str, Any]:
    return {"users": c.users, "processes": c.processes, "ops": c.ops, "hot_share": c.hot_share}


def progress_line(entry: dict[str, Any], budget_s: float) -> str:
    rules = f" ({', '.join(entry['rules'])})" if entry["rules"] else ""
    fresh = ", fresh system" if entry["fresh_system"] else ""
    return (f"run {entry['run']:>3}  {entry['at_s']:>6.1f}/{budget_s:.0f} s  "
            f"{entry['phase']:<7}  seed {entry['seed']:<10}  {entry['faults']} faults  "
            f"{entry['verdict']}{rules}  [{entry['seconds']} s{fresh}]")  # fmt: skip


def explore(budget_s: float, seed: int, mutation: str, out: Path,
            say: Callable[[str], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """The exploration's summary (also written, with its journal, to ``out``)."""
    x = Exploration(budget_s, seed, mutation, say)
    master, things = random.Random(seed), vocabulary()
    found: tuple[Candidate, Verdict, float] | None = None
    errors_in_a_row = 0
    minimal: Candidate | None = None
    confirmed, shrink_runs = False, 0
    with Runner(mutation) as runner:
        while x.room(runner) and errors_in_a_row < ERRORS_IN_A_ROW_MAX:
            candidate = generate(master.randrange(SEED_MAX), things)
            verdict = x.attempt(runner, "explore", candidate)
            errors_in_a_row = errors_in_a_row + 1 if verdict.kind == "error" else 0
            if verdict.kind == "violation":
                found = (candidate, verdict, x.elapsed_s())
                break
        if found is not None:
            first, verdict, _ = found

            def still_fails(c: Candidate) -> bool:
                v = x.attempt(runner, "shrink", c)
                return v.kind == "violation" and bool(set(v.rules) & set(verdict.rules))

            shrunk = shrink(first, still_fails, SHRINK_RUNS_MAX, lambda: x.room(runner))
            shrink_runs = shrunk.runs
            minimal, confirmed = _confirm_smallest(x, runner, shrunk.path or (shrunk.candidate,))
    summary = {
        "runs": len(x.journal),
        "violations_found": found is not None,
        "first_found_s": None if found is None else round(found[2], 1),
        "first_rules": None if found is None else list(found[1].rules),
        "minimal_scenario": None,
        "minimal_seed": None if minimal is None else minimal.seed,
        "minimal_faults": None if minimal is None else len(minimal.windows),
        "minimal_timeline": None if minimal is None else minimal.summary(),
        "confirmed": confirmed,
        "shrink_runs": shrink_runs,
        "steps_failed_runs": x.count("steps_failed"),
        "unsteady_runs": x.count("unsteady"),
        "error_runs": x.count("error"),
        "budget_s": budget_s,
        "took_s": round(x.elapsed_s(), 1),
        "seed": seed,
        "mutation": mutation or None,
    }
    return _write(out, summary, x.journal, found[0] if found else None, minimal)


def _confirm_smallest(x: Exploration, runner: Runner,
                      path: tuple[Candidate, ...]) -> tuple[Candidate, bool]:  # fmt: skip
    """The smallest candidate of the shrink's ``path`` that fails again on a fresh system, and
    True; the smallest of all and False when none of the last CONFIRM_CANDIDATES_MAX does (or
    the budget ends first)."""
    for i, candidate in enumerate(reversed(path[-CONFIRM_CANDIDATES_MAX:])):
        if i and not x.room_fresh():
            break
        if _confirm(x, runner, candidate):
            return candidate, True
    return path[-1], False


def _confirm(x: Exploration, runner: Runner, minimal: Candidate) -> bool:
    """Whether the minimal candidate fails again, on a fresh system: nothing an earlier run
    left can make it fail."""
    for tries in range(CONFIRM_TRIES_MAX):
        if tries and not x.room_fresh():
            break
        kind = x.attempt(runner, "confirm", minimal, fresh=True).kind
        if kind in ("violation", "pass"):
            return kind == "violation"
    return False


def _write(out: Path, summary: dict[str, Any], journal: list[dict[str, Any]],
           found: Candidate | None, minimal: Candidate | None) -> dict[str, Any]:  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    if found is not None and minimal is not None:
        (out / FOUND).write_text(to_toml(found, _description(found, summary, "found")))
        path = out / MINIMAL
        description = _description(minimal, summary, "shrunk to")
        path.write_text(to_toml(minimal, description))
        # The file must be the scenario that failed: read back as kizo chaos run reads it.
        loaded = scenarios.load(str(path), minimal.seed)
        if loaded != to_scenario(minimal, path.stem, description):
            raise RuntimeError(f"{path} does not read back as the scenario that failed")
        summary["minimal_scenario"] = str(path)
        summary["reproduce"] = (f"kizo chaos run {path} --seed {minimal.seed}"
                                + (f" --mutation {summary['mutation']}"
                                   if summary["mutation"] else ""))  # fmt: skip
    summary["journal"] = str(out / JOURNAL)
    (out / JOURNAL).write_text(json.dumps({**summary, "journal_runs": journal}, indent=1) + "\n")
    return summary


def _description(c: Candidate, summary: dict[str, Any], what: str) -> str:
    mutation = f" --mutation {summary['mutation']}" if summary["mutation"] else ""
    lines = [f"Drawn by kizo chaos explore --seed {summary['seed']}{mutation} and {what} "
             f"{len(c.windows)} fault window(s); run it with --seed {c.seed}{mutation}.",
             _workload_line(c),
             *(f"- {w}" for w in c.summary())]  # fmt: skip
    return "\n".join(lines)


def _workload_line(c: Candidate) -> str:
    return (f"Workload: {c.users} users, {c.processes} processes, {c.ops} operations each, "
            f"hot share {c.hot_share}.")  # fmt: skip


def main(budget_s: int, seed: int, mutation: str, out: Path | None, as_json: bool) -> int:
    """``kizo chaos explore``: exit 1 when a violation was found, 0 when none."""
    name = f"explore-seed{seed}" + (f"-{mutation}" if mutation else "")
    say = None if as_json else (lambda line: print(line, flush=True))
    summary = explore(float(budget_s), seed, mutation, out or RUNS_DIR / name, say)
    print(json.dumps(summary) if as_json else text(summary))
    return 1 if summary["violations_found"] else 0


def text(summary: dict[str, Any]) -> str:
    lines = [f"kizo chaos explore: {summary['runs']} runs in {summary['took_s']} s "
             f"(budget {summary['budget_s']:.0f} s), {summary['steps_failed_runs']} with steps "
             f"not run as planned, {summary['unsteady_runs']} unsteady, "
             f"{summary['error_runs']} not made"]  # fmt: skip
    if not summary["violations_found"]:
        return "\n".join([*lines, "  no violation found", f"  journal  {summary['journal']}"])
    lines += [f"  violation found after {summary['first_found_s']} s: "
              f"{', '.join(summary['first_rules'])}",
              f"  shrunk in {summary['shrink_runs']} runs to {summary['minimal_faults']} fault "
              f"window(s), {'confirmed' if summary['confirmed'] else 'NOT confirmed'} by a "
              "run more:",
              *(f"    {w}" for w in summary["minimal_timeline"]),
              f"  scenario {summary['minimal_scenario']}",
              f"  replay   {summary['reproduce']}",
              f"  journal  {summary['journal']}"]  # fmt: skip
    return "\n".join(lines)
