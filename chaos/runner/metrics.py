"""The chaos runner's metrics: which scenario runs, how far its timeline is, which faults are on.

The runner lives only as long as ``kizo chaos run``, so it serves ``/metrics`` on a port of its
own for the run's duration (a daemon thread) and lists itself, with every process of the
scratch system it attacks, in a file_sd file under the caller's ``KIZO_HOME``; the file goes
when the run ends (docs/observability.md). A fault window opens with the step that injects a
fault and closes with the one that lifts it, ``heal``, or the end of the run.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, start_http_server

from chaos.runner.grafana import FaultWindow
from infra.metrics import Target, remove_targets, targets_dir, write_targets

if TYPE_CHECKING:
    from chaos.runner.grafana import Grafana
    from chaos.runner.scenario import Step

NO_SCENARIO = "none"
DEFAULT_STREAM = "downstream"  # Toxiproxy's default stream, and so its default toxic name
# action -> the fault it opens; the actions that close one say which fault they close.
OPENS = {"disable": "disabled", "bank_faults": "bank_faults", "kill": "killed", "pause": "paused"}
CLOSES = {"enable": "disabled", "restart": "killed", "resume": "paused"}

RUN_ACTIVE = Gauge("kizo_chaos_run_active", "1 while the run's workload and faults are on",
                   ["scenario"])  # fmt: skip
RUN_START = Gauge("kizo_chaos_run_start_timestamp_seconds", "When the run started",
                  ["scenario"])  # fmt: skip
STEP = Gauge("kizo_chaos_step", "Steps of the scenario applied so far", ["scenario"])
PLANNED = Gauge("kizo_chaos_steps_planned", "Steps the scenario has", ["scenario"])
STEPS = Counter("kizo_chaos_steps", "Steps applied", ["scenario", "action", "result"])
FAULT = Gauge("kizo_chaos_fault_active", "1 while the fault window is open",
              ["scenario", "fault", "target"])  # fmt: skip
WINDOWS = Counter("kizo_chaos_fault_windows", "Fault windows opened",
                  ["scenario", "fault", "target"])  # fmt: skip


@dataclass
class RunnerMetrics:
    """Follows one run's timeline (``observe`` is the Timeline's hook)."""

    scenario: str
    open: dict[tuple[str, str], str] = field(default_factory=dict)  # (proxy, toxic) -> type
    windows: set[tuple[str, str]] = field(default_factory=set)  # (fault, target) now open
    opened_at: dict[tuple[str, str], float] = field(default_factory=dict)  # epoch seconds
    closed: list[FaultWindow] = field(default_factory=list)  # every window, once it closed

    def started(self, planned: int) -> None:
        RUN_ACTIVE.labels(self.scenario).set(1)
        RUN_START.labels(self.scenario).set(time.time())
        PLANNED.labels(self.scenario).set(planned)
        STEP.labels(self.scenario).set(0)

    def observe(self, step: Step, status: int | str) -> None:
        ok = not (isinstance(status, str) and status.startswith("error"))
        STEP.labels(self.scenario).inc()
        STEPS.labels(self.scenario, step.action, "ok" if ok else "error").inc()
        if ok:
            self._follow(step)

    def ended(self) -> None:
        for window in list(self.windows):
            self._close(*window)
        RUN_ACTIVE.labels(self.scenario).set(0)

    def _follow(self, step: Step) -> None:
        action, target = step.action, step.target
        if action == "toxic":
            kind = str(step.body.get("type", "unknown"))
            name = str(step.body.get("name") or f"{kind}_{step.body.get('stream', DEFAULT_STREAM)}")
            self.open[(target, name)] = kind
            self._open(kind, target)
        elif action == "remove_toxic":
            kind = self.open.pop((target, str(step.body.get("name"))), "")
            if kind and kind not in {k for (p, _), k in self.open.items() if p == target}:
                self._close(kind, target)
        elif action in OPENS:
            self._open(OPENS[action], "bank" if action == "bank_faults" else target)
        elif action in CLOSES:
            self._close(CLOSES[action], target)
        elif action == "heal":
            self.open.clear()
            for window in list(self.windows):
                self._close(*window)

    def _open(self, fault: str, target: str) -> None:
        if (fault, target) not in self.windows:
            self.windows.add((fault, target))
            self.opened_at[(fault, target)] = time.time()
            WINDOWS.labels(self.scenario, fault, target).inc()
        FAULT.labels(self.scenario, fault, target).set(1)

    def _close(self, fault: str, target: str) -> None:
        if (fault, target) in self.windows:
            start = self.opened_at.pop((fault, target), time.time())
            self.closed.append(FaultWindow(fault, target, start, time.time()))
        self.windows.discard((fault, target))
        FAULT.labels(self.scenario, fault, target).set(0)


@contextlib.contextmanager
def serving(scenario: str | None, planned: int, host: str, port: int, home: Path | None,
            system_targets: list[Target],
            grafana: Grafana | None = None) -> Iterator[RunnerMetrics]:  # fmt: skip
    """Serve the runner's metrics for the body's duration and, when ``home`` is given, list the
    runner and the system under attack in ``home``'s file_sd directory; at the end, each fault
    window becomes a Grafana annotation when ``grafana`` is given."""
    server, thread = start_http_server(port, addr=host)
    runner = RunnerMetrics(scenario or NO_SCENARIO)
    path = None
    if home is not None:
        path = targets_dir(home) / f"chaos-{os.getpid()}.json"
        me = Target("chaos", "chaos", f"{host}:{server.server_port}")
        write_targets(path, [me, *system_targets], "chaos")
    runner.started(planned)
    try:
        yield runner
    finally:
        runner.ended()
        if grafana is not None:
            grafana.annotate(runner.scenario, runner.closed)
        if path is not None:
            remove_targets(path)
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
