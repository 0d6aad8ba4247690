"""The scenario runner: scenario files and their timeline (``scenario``), the bank workload
(``workload``), the steady-state hypothesis (``hypothesis``), one run on a scratch system
(``run``), the matrix of scenarios × seeds (``matrix``), and what a run records and draws
(``report``, ``sampler``, ``chart``, ``metrics``, ``grafana``)."""

from chaos.runner._run import (
    CHAOS_OVERRIDES,
    DEAD_WORKER_JOBS_REDONE_S,
    RUNS_DIR,
    failed,
    report_dir,
    run,
    run_on,
    system_overrides,
    text,
)

__all__ = [
    "CHAOS_OVERRIDES",
    "DEAD_WORKER_JOBS_REDONE_S",
    "RUNS_DIR",
    "failed",
    "report_dir",
    "run",
    "run_on",
    "system_overrides",
    "text",
]
