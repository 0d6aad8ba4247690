"""One chaos run on a scratch system: the bank workload, a scenario's faults on their timeline,
healing, convergence, then the checker (chaos.checker) and the steady-state hypothesis; the
report, written with its chart and incident view. ``kizo chaos run`` (chaos.cli), the matrix
(chaos.runner.matrix) and the explorer (chaos.explorer) all run through here.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.config import Config

if TYPE_CHECKING:
    from collections.abc import Iterator

    from chaos.runner.metrics import RunnerMetrics
    from chaos.runner.report import Probe
    from chaos.runner.scenario import Scenario
    from chaos.runner.workload import WorkloadParams
    from infra.system import System

VIOLATIONS_SHOWN_MAX = 20
RUNS_DIR = Path("chaos-runs")
_BANK_FAULT = re.compile(r'^bank_faults_injected_total\{fault="([a-z_]+)"\} ([0-9.e+]+)$', re.M)
# Short janitor periods, so that a run converges in seconds after the faults heal.
CHAOS_OVERRIDES = {
    "KIZO_RATE_LIMITS": "off",
    "KIZO_JANITOR_INTERVAL_S": "1",
    "KIZO_REDRIVE_AFTER_S": "3",
    "KIZO_RESOLVE_AFTER_S": "3",
    "KIZO_BANK_TIMEOUT_S": "2",
}


def failed(report: dict[str, Any]) -> bool:
    """The run does not pass: violations, a fault step that did not run as planned, or the
    steady-state hypothesis deviating before or after."""
    hypothesis = report.get("hypothesis") or {}
    return bool(report["violations"] or report["steps_failed"] or hypothesis.get("failed"))


def report_dir(base: Path, scenario: str | None, seed: int, mutation: str | None) -> Path:
    from chaos.runner.report import run_dir

    return run_dir(base, scenario, seed, mutation)


def run(params: WorkloadParams, scenario: Scenario | None, seed: int, mutation: str = "",
        out: Path | None = None, caller: Config | None = None) -> dict[str, Any]:  # fmt: skip
    """One whole run on a scratch system; the report (also written to ``out``, with its
    chart, when given). With the ``caller``'s configuration, the runner serves its metrics on
    its ``KIZO_CHAOS_METRICS_PORT`` meanwhile, is scraped by a Prometheus (``kizo up``'s when
    it serves, else one of the run's own when the binary is here, unless
    ``KIZO_PROMETHEUS_PORT`` is 0), whose record of the run is drawn as the incident view
    beside the journal (``incident.png``), and posts the fault windows to its Grafana, if any
    (chaos.runner.metrics)."""
    from chaos.runner import report as journal
    from chaos.runner.grafana import Grafana
    from chaos.runner.metrics import serving
    from infra.processes import metrics_targets
    from infra.system import scratch_system

    overrides = system_overrides(mutation, scenario)
    with _prometheus(caller) as (targets_home, prometheus_url, rate_window_s):
        with scratch_system(overrides, behind_proxy=scenario is not None) as system, serving(
            scenario.name if scenario else None, len(scenario.method) if scenario else 0,
            system.config.host, caller.chaos_metrics_port if caller else 0, targets_home,
            metrics_targets([c for c, _ in system.procs]),
            Grafana(caller.grafana_url, caller.grafana_token) if caller and caller.grafana_url
            else None,
        ) as runner:  # fmt: skip
            started = time.time()
            report = run_on(system, params, scenario, seed, mutation, runner)
        if out is not None and prometheus_url is not None:
            report["incident_view"] = incident_png(prometheus_url, out, started, time.time(),
                                                   report, rate_window_s)  # fmt: skip
    return report if out is None else journal.write(report, out)


def system_overrides(mutation: str, scenario: Scenario | None = None) -> dict[str, str]:
    """The scratch system's settings for a run of ``scenario`` on the ``mutation``'s build."""
    overrides = dict(CHAOS_OVERRIDES)
    if mutation:
        overrides["KIZO_MUTATION"] = mutation
    if scenario is not None:
        overrides.update(scenario.configuration)
    return overrides


def run_on(system: System, params: WorkloadParams, scenario: Scenario | None, seed: int,
           mutation: str = "", runner: RunnerMetrics | None = None) -> dict[str, Any]:  # fmt: skip
    """One run on a system already up (started with ``system_overrides``; behind the proxy
    for a scenario): the report, its checker section included. The workload signs up its own
    users and the checker judges only them, so one system can serve run after run while each
    heals (chaos.explorer reuses one between clean runs)."""
    import trio

    from chaos.runner import report as journal

    probe = journal.Probe(system)
    try:
        report = trio.run(_execute, system, params, scenario, seed, probe, runner)
    finally:
        probe.stop()
    report = {"seed": seed, "mutation": mutation or None, **report}
    report["checker"] = journal.checker_section(report, failed(report))
    return report


@contextlib.contextmanager
def _prometheus(caller: Config | None) -> Iterator[tuple[Path | None, str | None, int]]:
    """Where the run lists its targets, the URL of the Prometheus that reads them (None:
    none), and the window its rates need (four scrapes). ``kizo up``'s when it serves; else
    a private one for the run, scraping every second, when the binary is here; none when
    ``KIZO_PROMETHEUS_PORT`` is 0."""
    from infra import prometheus
    from infra.readiness import NotReady, http_probe
    from infra.servers import ServerError, free_port

    if caller is None or not caller.prometheus_port:
        yield (None if caller is None else caller.home), None, 0
        return
    shared = f"http://{caller.host}:{caller.prometheus_port}"
    if http_probe(f"{shared}/-/ready")() is None:
        yield caller.home, shared, 4 * prometheus.SCRAPE_INTERVAL_S
        return
    if prometheus.binary("prometheus") is None:
        yield caller.home, None, 0
        return
    with tempfile.TemporaryDirectory(prefix="kizo-chaos-prometheus-") as tmp:
        private = prometheus.Prometheus(Path(tmp), free_port(caller.host), caller.host,
                                        scrape_interval_s=1, evaluation_interval_s=2)  # fmt: skip
        try:
            private.start()
        except (ServerError, NotReady):
            yield caller.home, None, 0
            return
        try:
            yield Path(tmp), private.url, 4 * private.scrape_interval_s
        finally:
            private.stop()


def incident_png(base: str, out: Path, start: float, end: float, report: dict[str, Any],
                 rate_window_s: int) -> str | None:  # fmt: skip
    """The incident view of the run, from the Prometheus at ``base``, as ``out``/incident.png;
    its path, or None when Prometheus cannot answer."""
    import httpx

    from infra import incident

    path = out / "incident.png"
    title = (f"{report['scenario'] or 'bank workload'}, seed {report['seed']}: "
             "the incident view, from Prometheus")  # fmt: skip
    try:
        incident.render(base, start - 2, end + 2, "chaos", path, title, rate_window_s)
    except (httpx.HTTPError, ValueError):
        return None
    return str(path)


async def _execute(system: System, params: WorkloadParams, scenario: Scenario | None,
                   seed: int, probe: Probe,
                   runner: RunnerMetrics | None = None) -> dict[str, Any]:  # fmt: skip
    import httpx
    import trio

    from chaos.checker import check
    from chaos.runner import workload as workload
    from chaos.runner.hypothesis import Prober, deviations
    from chaos.runner.scenario import Timeline

    prober = Prober(system.api_url, system.bank_url, system.database_url)
    timeline = Timeline(system.proxy_url, system.bank_url, seed, system.control, prober,
                        observe=runner.observe if runner is not None else None)  # fmt: skip
    hypothesis: dict[str, Any] = {}

    method_started: list[float] = []

    async def faults() -> None:
        probe.load_started()
        if scenario is not None:
            method_started.append(trio.current_time())
            await timeline.run(scenario.method, method_started[0])

    async def steady() -> bool:  # before the method, once the users exist
        assert scenario is not None
        hypothesis.update(title=scenario.hypothesis.title,
                          before=await prober.run(scenario.hypothesis.probes))  # fmt: skip
        failed = deviations(hypothesis["before"])
        hypothesis["failed"] = [f"not in steady state before the method (it did not run): {d}"
                                for d in failed]  # fmt: skip
        return not failed

    started = time.monotonic()
    try:
        history, members = await workload.run(system.api_url, params, faults,
                                              None if scenario is None else steady,
                                              recorder=probe.recorder)  # fmt: skip
    finally:
        probe.load_ended()
        if scenario is not None:  # the rollbacks, then heal, whatever happened
            async with httpx.AsyncClient(timeout=10) as http:
                await timeline.rollback(http, scenario.rollbacks)
        probe.healed()
    ran_s = time.monotonic() - started
    if method_started and (redone_at := _jobs_redone_at(timeline.applied)) is not None:
        await trio.sleep_until(method_started[0] + redone_at)
    state = await workload.converge_and_read(system.api_url, system.database_url, members,
                                             params, system.bank_url,
                                             system.redis_url)  # fmt: skip
    if scenario is not None and "before" in hypothesis:  # after healing and convergence
        hypothesis["after"] = await prober.run(scenario.hypothesis.probes)
        hypothesis["failed"] += [f"deviates after the run: {d}"
                                 for d in deviations(hypothesis["after"])]  # fmt: skip
    async with httpx.AsyncClient(timeout=10) as http:
        bank_metrics = (await http.get(f"{system.bank_url}/metrics")).text
    tolerated = scenario.tolerated if scenario is not None else frozenset()
    violations = check(history, state, tolerated)
    steps = () if scenario is None else scenario.method
    observed = await probe.finish(history, members, steps, timeline.applied)
    return {
        "scenario": None if scenario is None else scenario.name,
        "ops": len(history),
        "ops_per_s": round(len(history) / ran_s, 1),
        "by_kind_and_status": dict(
            sorted(Counter(f"{op.f} {op.status}" for op in history).items())
        ),
        "transactions": len(state.transactions),
        "bank_faults_injected": {
            m.group(1): int(float(m.group(2))) for m in _BANK_FAULT.finditer(bank_metrics)
        },
        "hypothesis": hypothesis or None,
        "timeline": timeline.applied,
        "rollbacks": timeline.rolled_back,
        # Steps the workload ended before (the rollback healed them anyway): a scenario whose
        # faults did not happen tested nothing, so the report says so.
        "steps_skipped": []
        if scenario is None
        else [s.describe() for s in scenario.method[len(timeline.applied) :]],
        # Skipped, late or refused: each one fails the run.
        "steps_failed": [] if scenario is None else timeline.failures(scenario.method),
        "violations": len(violations),
        "violation_rules": dict(Counter(v.rule for v in violations)),
        "violations_shown": [f"{v.rule}: {v.detail}" for v in violations][:VIOLATIONS_SHOWN_MAX],
        **observed,  # chaos.runner.report: convergence, lag, fault windows, series, samples
    }


# A worker that dies leaves its SAQ jobs "active" until their timeout (actors.routing
# JOB_TIMEOUT_S, 15 s); a live worker's sweep (actors.worker SWEEP_INTERVAL_S, 5 s) then runs
# them again. A run that killed a worker is checked only after that, plus a margin: a check
# taken sooner could pass a build whose re-run jobs move money again (final_state_guard_off).
# tests/test_chaos_scenarios.py keeps it above the worker's own two figures.
DEAD_WORKER_JOBS_REDONE_S = 15 + 5 + 2


def _jobs_redone_at(applied: list[dict[str, Any]]) -> float | None:
    """Seconds into the method by which the jobs of every worker it killed have run again."""
    kills = [s["actual_s"] for s in applied
             if s["step"].startswith("kill worker-") and s["status"] == "killed"]  # fmt: skip
    return max(kills) + DEAD_WORKER_JOBS_REDONE_S if kills else None


def text(report: dict[str, Any]) -> str:
    from chaos.runner.hypothesis import lines as hypothesis_lines

    what = f"scenario {report['scenario']}" if report["scenario"] else "bank workload"
    lines = [
        f"kizo chaos: {what} (seed {report['seed']}"
        + (f", mutation {report['mutation']}" if report["mutation"] else "")
        + ")",
        f"  operations        {report['ops']} ({report['ops_per_s']}/s)",
        f"  transactions      {report['transactions']}",
    ]
    lines += [f"    {k:<28} {n}" for k, n in report["by_kind_and_status"].items()]
    if report["bank_faults_injected"]:
        faults = ", ".join(f"{k} {n}" for k, n in sorted(report["bank_faults_injected"].items()))
        lines.append(f"  bank faults       {faults}")
    if report["timeline"]:
        lines.append("  faults            planned -> actual")
        lines += [f"    {s['at_s']:>6} s -> {s['actual_s']:>6} s  {s['step']} -> {s['status']}"
                  + (f" (took {s['took_s']} s)" if s.get("took_s", 0) >= 1 else "")
                  for s in report["timeline"]]  # fmt: skip
    lines += hypothesis_lines(report)
    if report["steps_failed"]:
        lines.append(f"  steps failed      {len(report['steps_failed'])} (the run fails)")
    lines += [f"    {s}" for s in report["steps_failed"]]
    from chaos.runner.report import figure_lines, file_lines

    lines += figure_lines(report)
    lines.append(f"  violations        {report['violations']}")
    lines += [f"    {rule:<28} {n}" for rule, n in sorted(report["violation_rules"].items())]
    if report["violations_shown"]:
        lines.append(f"  first {len(report['violations_shown'])}:")
    lines += [f"    {v}" for v in report["violations_shown"]]
    return "\n".join(lines + file_lines(report))
