"""``kizo chaos``: the Jepsen-style bank workload and its checker, on a scratch system.

    kizo chaos bank [--users --processes --ops]   the workload, no faults
    kizo chaos run SCENARIO                        the workload under a scenario's faults, with
                                                   PostgreSQL, Redis and the bank behind the
                                                   fault proxy (chaos/scenarios/*.toml)
    kizo chaos run --all [--seeds 1,2,3]           every scenario with each seed, then a table
    kizo chaos list                                the scenarios
    kizo chaos explore --budget SECONDS            random fault timelines until one breaks a
                                                   money rule, shrunk to a minimal scenario
                                                   file (chaos.explorer)

Each run writes its journal (JSON) and chart (PNG) to ``--out`` (chaos.runner.report; default
``chaos-runs/<scenario>-seed<N>[-<mutation>]/``; with ``--all``, the parent of those).

Exit code 0 when the checker finds nothing, 1 when it finds violations (they are printed) or
a scenario step could not run when planned (skipped, late by more than
``chaos.runner.scenario.STEP_LATE_S_MAX``, or refused, a method probe out of tolerance included), or
its steady-state hypothesis deviates (before the method: the method does not run; after
convergence: the run fails), 2 on bad usage.
``--mutation`` runs a deliberately broken build, to see the checker fail.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from chaos.runner import RUNS_DIR
from infra.commands import Command, UsageError, bounded_int
from infra.config import MUTATIONS, Config

EXPLORE_BUDGET_S = (10, 86_400)


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=["bank", "run", "list", "explore"], help="what to do")
    parser.add_argument("scenario", nargs="?", help="with run: a scenario's name or .toml path")
    parser.add_argument("--seed", type=bounded_int(0, 2**31), default=1)
    parser.add_argument("--users", type=bounded_int(2, 500), default=12)
    parser.add_argument("--processes", type=bounded_int(1, 64), default=8)
    parser.add_argument("--ops", type=bounded_int(1, 10_000), default=120,
                        help="operations per process")  # fmt: skip
    parser.add_argument("--mutation", choices=[m for m in MUTATIONS if m], default="",
                        help="run a deliberately broken build")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"the run's directory (default {RUNS_DIR}/NAME-seedN)")  # fmt: skip
    parser.add_argument("--all", action="store_true", help="with run: every scenario")
    parser.add_argument("--seeds", default=None, help="with run --all: seeds, e.g. 1,2,3")
    parser.add_argument("--budget", type=bounded_int(*EXPLORE_BUDGET_S), default=None,
                        help="with explore: seconds of wall clock, shrinking included")  # fmt: skip


def _chaos(_config: Config, args: argparse.Namespace) -> int:
    from chaos.runner import failed, report_dir, run, text
    from chaos.runner import scenario as scenarios
    from chaos.runner.workload import WorkloadParams

    if (args.what == "explore") != (args.budget is not None):
        raise UsageError("kizo chaos explore needs --budget SECONDS, and only it takes one")
    if args.what == "explore":
        from chaos import explorer

        if args.scenario or args.all or args.seeds is not None:
            raise UsageError("kizo chaos explore draws its own scenarios: no name, --all, --seeds")
        return explorer.main(args.budget, args.seed, args.mutation, args.out, args.json)
    if args.what == "list":
        for name in scenarios.names():
            print(f"{name:<16} {scenarios.load(name, args.seed).title}")
        return 0
    if args.all or args.seeds is not None:
        from chaos.runner import matrix

        return matrix.main(args, args.out or RUNS_DIR, _config)
    scenario = None
    if args.what == "run":
        if not args.scenario:
            raise UsageError("kizo chaos run needs a scenario (see kizo chaos list)")
        try:
            scenario = scenarios.load(args.scenario, args.seed)
        except scenarios.ScenarioError as exc:
            raise UsageError(str(exc)) from None
        params = scenario.workload
    elif args.scenario:
        raise UsageError("kizo chaos bank takes no scenario (use kizo chaos run)")
    else:
        params = WorkloadParams(users=args.users, processes=args.processes,
                                ops_per_process=args.ops, seed=args.seed)  # fmt: skip
    named = None if scenario is None else scenario.name
    out = args.out or report_dir(RUNS_DIR, named, args.seed, args.mutation)
    report = run(params, scenario, args.seed, args.mutation, out, _config)
    print(json.dumps(report) if args.json else text(report))
    return 1 if failed(report) else 0


COMMANDS = [
    Command("chaos", _chaos, _configure),
]
