"""A chaos run's journal: what a person needs to read the run in a minute, written as JSON (and
drawn as a PNG, ``chaos.runner.chart``) in the run's directory.

The run's clock starts when the load starts (the fault timeline's zero): the history's
timestamps and the sampler's (``time.monotonic``) are put on it, and so are the ledger's
(PostgreSQL's wall clock) through the sampler's readings of that clock beside its own: when
the wall clock moves against the monotonic one during a run (it did by about 5 s in one run
here: a step, or the machine paused), one pair of readings at the start would shift every
settlement after it and inflate its lag. ``Probe`` collects during the run; the rest is pure
and builds the journal's sections from what was collected:

- ``timeline`` (the report's own), ``rollback`` (when the heal after the load ran);
- ``operations``: counts by outcome (ok 2xx, fail 4xx, unknown: no answer or 5xx) and status;
- ``checker``: the verdict, and each rule with its count of violations;
- ``convergence``: seconds from the end of the rollback until the last transaction of the
  workload's users became final, from the ledger's own ``settled_at``/``failed_at``;
- ``fault_windows``: from each fault step to the step that removes it, or to the rollback;
- ``figures``: ops/s, settlement lag (``settled_at - created_at``) p50/p99/max, peaks;
- ``series``: per ``interval_s`` bin, answered operations and errors per second (from the
  history) and the settlement lag of what settled in the bin (from the ledger); ``samples``:
  the sampler's backlog (open transactions, queued jobs), ``None`` where a server was down.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chaos.checker import RULES, Op
from chaos.runner.sampler import Sample, Sampler
from chaos.runner.workload import Member, Recorder

if TYPE_CHECKING:
    from chaos.runner.scenario import Step
    from infra.system import System

JOURNAL = "journal.json"
CHART = "report.png"
SERIES_BINS_MAX = 1200
LEDGER_TIMEOUT_S = 30.0
CLOCK_MOVED_S_SHOWN = 0.2


@dataclass(frozen=True)
class TxnTimes:
    """One transaction's times, in seconds of wall clock (epoch)."""

    created: float
    final: float | None  # settled_at or failed_at; None: still open
    settled: bool


class Probe:
    """Collects a run's clocks and samples; ``finish`` turns them into journal sections."""

    def __init__(self, system: System) -> None:
        self.recorder = Recorder()  # the workload's history, its timestamps on our clock
        self.database_url = system.database_url
        self.sampler = Sampler(system.database_url, system.redis_url,
                               system.config.pipeline.shards)  # fmt: skip
        self.load_at = self.recorder.started  # replaced when the load starts
        self.load_wall = time.time()
        self.load_ended_at: float | None = None
        self.healed_at: float | None = None

    def load_started(self) -> None:
        self.load_at, self.load_wall = time.monotonic(), time.time()
        self.sampler.start()

    def load_ended(self) -> None:
        self.load_ended_at = time.monotonic()

    def healed(self) -> None:
        self.healed_at = time.monotonic()

    def stop(self) -> None:
        """Stop the sampler (idempotent); ``run`` calls it whatever happened."""
        self.sampler.stop()

    async def finish(self, history: Sequence[Op], members: Sequence[Member],
                     steps: Sequence[Step], applied: Sequence[Mapping[str, Any]],
                     ) -> dict[str, Any]:  # fmt: skip
        """The journal's sections; call it after convergence (it reads the ledger's times)."""
        import trio
        import trio_asyncio

        async with trio_asyncio.open_loop():
            txns = await trio_asyncio.aio_as_trio(_ledger_times)(self.database_url, members)
        await trio.to_thread.run_sync(self.stop)
        return sections(history, txns, self.sampler.samples, self._clock(), steps, applied,
                        self.sampler.stats())  # fmt: skip

    def _clock(self) -> Clock:
        def rel(at: float | None) -> float | None:
            return None if at is None else at - self.load_at

        offset_s = self.recorder.started - self.load_at  # history times -> run times
        readings = tuple((s.at, s.db_offset_s) for s in self.sampler.samples
                         if s.db_offset_s is not None)  # fmt: skip
        return Clock(self.load_at, self.load_wall, offset_s, rel(self.load_ended_at),
                     rel(self.healed_at), readings)  # fmt: skip


@dataclass(frozen=True)
class Clock:
    load_at: float  # time.monotonic() when the load started: the run's zero
    load_wall: float  # time.time() at the same moment (when the database's clock was not read)
    history_offset_s: float  # add to an Op's invoked_s / completed_s
    load_ended_s: float | None
    healed_s: float | None  # the rollback's end (the load's end when there is none)
    # (time.monotonic(), PostgreSQL's epoch seconds minus it), in time order: the sampler's
    db_readings: tuple[tuple[float, float], ...] = ()

    def from_wall(self, epoch: float) -> float:
        """A ledger timestamp on the run's clock, by the reading of the database's clock in
        force at that time (the last one taken before it; the first one before any)."""
        if not self.db_readings:
            return epoch - self.load_wall
        offset_s = self.db_readings[0][1]
        for at, reading_s in self.db_readings:
            if at + reading_s > epoch:
                break
            offset_s = reading_s
        return epoch - offset_s - self.load_at

    def section(self) -> dict[str, Any]:
        """How far the database's clock moved against the monotonic one during the run."""
        offsets = [o for _, o in self.db_readings]
        return {
            "db_readings": len(offsets),
            "db_clock_moved_s": round(max(offsets) - min(offsets), 3) if offsets else None,
        }

    def from_monotonic(self, at: float) -> float:
        return at - self.load_at


async def _ledger_times(database_url: str, members: Sequence[Member]) -> list[TxnTimes]:
    import asyncpg

    accounts = [uuid.UUID(m.account_id) for m in members]
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT created_at, coalesce(settled_at, failed_at) AS final_at, status"
            " FROM transactions WHERE source_id = ANY($1) OR dest_id = ANY($1)",
            accounts,
            timeout=LEDGER_TIMEOUT_S,
        )
    finally:
        await conn.close()
    return [TxnTimes(r["created_at"].timestamp(),
                     None if r["final_at"] is None else r["final_at"].timestamp(),
                     r["status"] == "settled") for r in rows]  # fmt: skip


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest rank: the smallest value with at least ``q`` of the values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def sections(history: Sequence[Op], txns: Sequence[TxnTimes], samples: Sequence[Sample],
             clock: Clock, steps: Sequence[Step], applied: Sequence[Mapping[str, Any]],
             sampler_stats: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Every section ``Probe`` contributes to the journal."""
    healed_s = clock.healed_s if clock.healed_s is not None else 0.0
    convergence = _convergence(txns, clock, healed_s)
    sample_ts = [round(clock.from_monotonic(s.at), 2) for s in samples]
    end_s = max([healed_s, *sample_ts,
                 *(clock.history_offset_s + op.completed_s for op in history),
                 *(clock.from_wall(t.final) for t in txns if t.final is not None)])  # fmt: skip
    return {
        "rollback": {"load_ended_s": _round(clock.load_ended_s), "healed_s": _round(healed_s)},
        "clock": clock.section(),
        "operations": operations(history),
        "convergence": convergence,
        "fault_windows": fault_windows(steps, applied, healed_s),
        "figures": figures(history, txns, samples, clock),
        "series": series(history, txns, clock, end_s),
        "samples": {
            "t_s": sample_ts,
            "backlog": [s.backlog for s in samples],
            "queued": [s.queued for s in samples],
        },
        "sampler": dict(sampler_stats),
    }


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def _convergence(txns: Sequence[TxnTimes], clock: Clock, healed_s: float) -> dict[str, Any]:
    """From the rollback's end until the last transaction became final (0 when all were final
    before it ended); ``None`` when some never did within the run's bound."""
    still_open = sum(t.final is None for t in txns)
    finals = [clock.from_wall(t.final) for t in txns if t.final is not None]
    last_s = max(finals, default=None)
    seconds = None if still_open or last_s is None else max(0.0, last_s - healed_s)
    return {
        "seconds": _round(seconds),
        "healed_s": round(healed_s, 2),
        "last_final_s": _round(last_s),
        "transactions": len(txns),
        "still_open": still_open,
    }


def operations(history: Sequence[Op]) -> dict[str, Any]:
    outcomes = Counter({"ok": "ok", "fail": "fail"}.get(op.outcome, "unknown") for op in history)
    statuses = Counter("none" if op.status is None else str(op.status) for op in history)
    return {
        "total": len(history),
        "by_outcome": {k: outcomes.get(k, 0) for k in ("ok", "fail", "unknown")},
        "by_status": dict(sorted(statuses.items())),
    }


def _lags_ms(txns: Sequence[TxnTimes]) -> list[float]:
    return [(t.final - t.created) * 1000 for t in txns if t.settled and t.final is not None]


def _other_5xx(status: int | None) -> bool:
    return status is not None and status >= 500 and status != 503


def figures(history: Sequence[Op], txns: Sequence[TxnTimes], samples: Sequence[Sample],
            clock: Clock) -> dict[str, Any]:  # fmt: skip
    lags = _lags_ms(txns)
    load_s = clock.load_ended_s
    during = [op for op in history if clock.history_offset_s + op.invoked_s >= 0]
    answered = sum(op.status is not None for op in during)
    backlogs = [s.backlog for s in samples if s.backlog is not None]
    queued = [s.queued for s in samples if s.queued is not None]
    return {
        "load_s": _round(load_s),
        "answered_per_s": round(answered / load_s, 1) if load_s else None,
        "lag_ms": {
            "p50": _round(percentile(lags, 0.5), 1),
            "p99": _round(percentile(lags, 0.99), 1),
            "max": _round(max(lags, default=None), 1),
            "settled": len(lags),
        },
        "failed_transactions": sum(not t.settled and t.final is not None for t in txns),
        "unknown_ops": sum(op.status is None for op in history),
        "answers_5xx": sum(_other_5xx(op.status) for op in history),
        "answers_503": sum(op.status == 503 for op in history),
        "backlog_peak": max(backlogs, default=None),
        "queued_peak": max(queued, default=None),
    }


def series(history: Sequence[Op], txns: Sequence[TxnTimes], clock: Clock,
           end_s: float, interval_s: float = 0.5) -> dict[str, Any]:  # fmt: skip
    """Per bin of ``interval_s`` (wider when the run is too long for ``SERIES_BINS_MAX``)."""
    bins = max(1, math.ceil(end_s / interval_s))
    if bins > SERIES_BINS_MAX:
        bins, interval_s = SERIES_BINS_MAX, end_s / SERIES_BINS_MAX

    def index(t_s: float) -> int | None:
        i = math.floor(t_s / interval_s)
        return i if 0 <= i < bins else None

    counts = {k: [0] * bins for k in ("answered", "errors_5xx", "errors_503", "unknown")}
    for op in history:
        i = index(clock.history_offset_s + op.completed_s)
        if i is None:
            continue
        if op.status is None:
            counts["unknown"][i] += 1
        else:
            counts["answered"][i] += 1
            if op.status == 503:
                counts["errors_503"][i] += 1
            elif op.status >= 500:
                counts["errors_5xx"][i] += 1
    lags: list[list[float]] = [[] for _ in range(bins)]
    for t in txns:
        if t.settled and t.final is not None and (i := index(clock.from_wall(t.final))) is not None:
            lags[i].append((t.final - t.created) * 1000)
    return {
        "interval_s": round(interval_s, 3),
        "t_s": [round(i * interval_s, 2) for i in range(bins)],
        **{f"{k}_per_s": [round(n / interval_s, 1) for n in v] for k, v in counts.items()},
        "settled_per_s": [round(len(b) / interval_s, 1) for b in lags],
        "lag_p50_ms": [_round(percentile(b, 0.5), 1) for b in lags],
        "lag_p99_ms": [_round(percentile(b, 0.99), 1) for b in lags],
    }


def fault_windows(steps: Sequence[Step], applied: Sequence[Mapping[str, Any]],
                  healed_s: float) -> list[dict[str, Any]]:  # fmt: skip
    """Each fault from the start of its step to the end of the step that removes it (a
    restart has ended when its process serves again), or to the heal: a ``heal`` step, else
    the rollback after the load. A refused step opens or closes nothing."""
    open_: dict[str, dict[str, Any]] = {}
    windows: list[dict[str, Any]] = []

    def close(key: str, end_s: float, by: str) -> None:
        window = open_.pop(key, None)
        if window is not None:
            windows.append({**window, "end_s": round(end_s, 2), "ended_by": by})

    for step, done in zip(steps, applied, strict=False):
        if str(done.get("status", "")).startswith("error"):
            continue
        start_s = float(done["actual_s"])
        end_s = start_s + float(done.get("took_s", 0.0))
        key, label, opens = _fault(step)
        if step.action == "heal":
            for k in list(open_):
                close(k, end_s, "heal")
            continue
        close(key, end_s, step.describe())
        if opens:
            open_[key] = {"label": label, "start_s": round(start_s, 2), "step": step.describe()}
    for k in list(open_):
        close(k, healed_s, "rollback")
    return sorted(windows, key=lambda w: (w["start_s"], w["label"]))


def _fault(step: Step) -> tuple[str, str, bool]:
    """The step's fault (a key shared by the steps that start and end it), its label, and
    whether the step starts it (else it ends it)."""
    body, target = step.body, step.target
    if step.action in ("toxic", "remove_toxic"):
        name = body.get("name") or f"{body.get('type')}_{body.get('stream', 'downstream')}"
        label = f"{target} {body.get('type', name)}"
        return f"toxic {target}/{name}", label, step.action == "toxic"
    if step.action in ("disable", "enable"):
        return f"off {target}", f"{target} off", step.action == "disable"
    if step.action in ("kill", "restart"):
        return f"down {target}", f"{target} killed", step.action == "kill"
    if step.action in ("pause", "resume"):
        return f"paused {target}", f"{target} paused", step.action == "pause"
    if step.action == "bank_faults":
        parts = [f"{k.removesuffix('_rate')} {float(v):.0%}" for k, v in body.items()
                 if k.endswith("_rate") and v] + (
                 [f"+{body['latency_ms']} ms"] if body.get("latency_ms") else [])  # fmt: skip
        return "bank faults", f"bank {', '.join(parts)}", bool(parts)
    return step.action, step.action, False


def checker_section(report: Mapping[str, Any], failed: bool) -> dict[str, Any]:
    """The verdict and each rule with its count (``audit`` counts every audit finding)."""
    fired: Mapping[str, int] = report.get("violation_rules", {})
    audit = sum(n for rule, n in fired.items() if rule.startswith("audit:"))
    return {
        "verdict": "fail" if failed else "pass",
        "violations": report.get("violations", 0),
        "steps_failed": len(report.get("steps_failed", [])),
        "rules": {**{rule: fired.get(rule, 0) for rule in RULES}, "audit": audit},
    }


def run_dir(base: Path, scenario: str | None, seed: int, mutation: str | None) -> Path:
    """``<base>/<scenario>-seed<N>[-<mutation>]`` (``bank`` for the plain workload)."""
    name = f"{scenario or 'bank'}-seed{seed}" + (f"-{mutation}" if mutation else "")
    return base / name


def write(report: dict[str, Any], out: Path) -> dict[str, Any]:
    """The journal and its chart in ``out`` (created); the report, with their paths."""
    from chaos.runner import chart

    out.mkdir(parents=True, exist_ok=True)
    report["files"] = {"journal": str(out / JOURNAL), "chart": str(out / CHART)}
    chart.draw(report, out / CHART)
    (out / JOURNAL).write_text(json.dumps(report, indent=1) + "\n")
    return report


def figure_lines(report: Mapping[str, Any]) -> list[str]:
    """The terminal summary's lines for convergence, lag, backlog and sampling."""
    lines: list[str] = []
    conv = report.get("convergence")
    if conv is not None:
        if conv["seconds"] is None:
            lines.append(f"  convergence       none: {conv['still_open']} of "
                         f"{conv['transactions']} transactions still open")  # fmt: skip
        else:
            lines.append(f"  convergence       {conv['seconds']:.2f} s after the heal at "
                         f"{conv['healed_s']:.2f} s "
                         f"(all {conv['transactions']} final)")  # fmt: skip
    figs = report.get("figures")
    if figs is not None:
        lag = figs["lag_ms"]
        if lag["settled"]:
            lines.append(f"  settlement lag    p50 {lag['p50']:.0f} ms, p99 {lag['p99']:.0f} ms, "
                         f"max {lag['max']:.0f} ms ({lag['settled']} settled)")  # fmt: skip
        lines.append(f"  backlog peak      {_or_dash(figs['backlog_peak'])} open, "
                     f"{_or_dash(figs['queued_peak'])} queued jobs")  # fmt: skip
    moved = (report.get("clock") or {}).get("db_clock_moved_s")
    if moved is not None and moved > CLOCK_MOVED_S_SHOWN:
        lines.append(f"  clock             the wall clock moved {moved:.2f} s during the run "
                     "(the ledger's times are mapped by the sampler's readings)")  # fmt: skip
    sampler = report.get("sampler")
    if sampler is not None:
        gaps = max(sampler["backlog_gaps"], sampler["queued_gaps"])
        lines.append(f"  sampler           {sampler['samples']} samples every "
                     f"{sampler['interval_s']} s, {gaps} with a gap, "
                     f"{sampler['cpu_ms_total'] / 1000:.2f} s CPU")  # fmt: skip
    return lines


def file_lines(report: Mapping[str, Any]) -> list[str]:
    files = report.get("files")
    if files is None:
        return []
    lines = [f"  journal           {files['journal']}", f"  chart             {files['chart']}"]
    if report.get("incident_view"):  # drawn from Prometheus' record of the run
        lines.append(f"  incident view     {report['incident_view']}")
    return lines


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)
