"""``kizo chaos explore``: generative fault schedules, shrunk to a minimal scenario.

From a seed, the explorer draws short random timelines of fault windows from the whole
vocabulary the runner supports (every toxic on every proxy and stream, a proxy disabled, the
bank's faults, kill and pause of every process, PostgreSQL and Valkey crashed, Valkey wiped),
each with a small random workload, and runs them one after another within a time budget, each
judged as ``kizo chaos run`` judges it. The first that breaks a money rule (the checker, or
the steady-state hypothesis after the run) is shrunk greedily, as Hypothesis shrinks: fewer
windows, a smaller workload, shorter and earlier windows, plainer parameters, each candidate
kept only when it still fails. The smallest is run once more and written as a scenario file
that ``kizo chaos run FILE --seed N`` replays, beside a journal of every run (docs/chaos.md,
"Explorer").
"""

from chaos.explorer._explore import explore, main
from chaos.explorer._faults import BANK_FAULTS, KINDS, TOXICS, Kind, Vocabulary, Window, lock
from chaos.explorer._generate import (
    Candidate,
    generate,
    raw_steps,
    steps,
    to_scenario,
    to_toml,
    valid,
    workload,
)
from chaos.explorer._run import Verdict, judge, vocabulary
from chaos.explorer._shrink import Shrunk, shrink, simpler

__all__ = [
    "BANK_FAULTS", "KINDS", "TOXICS", "Candidate", "Kind", "Shrunk", "Verdict", "Vocabulary",
    "Window", "explore", "generate", "judge", "lock", "main", "raw_steps", "shrink", "simpler",
    "steps", "to_scenario", "to_toml", "valid", "vocabulary", "workload",
]  # fmt: skip
