"""The incident view: what a fault did, on one screen.

One definition of its panels (``INCIDENT``) serves both renderings: the Grafana dashboard
(observability/dashboards.py turns it into JSON) and ``kizo incident``, which draws the same
panels to a PNG from Prometheus range queries, for machines without Grafana. Fault windows come
from the chaos runner's ``kizo_chaos_fault_active`` and are shaded across every panel.

    kizo incident [--since 15m] [--until now] [--system chaos] [--prometheus URL] [--out PNG]
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from infra.commands import Command, UsageError
from infra.config import Config

RATE_WINDOW = "$__rate_interval"  # Grafana's; the PNG puts a fixed window in its place
SYSTEM = "$system"
FAULTS_EXPR = f'max by (fault, target) (kizo_chaos_fault_active{{system=~"{SYSTEM}"}})'
POINTS_MAX = 600  # per series, whatever the span: Prometheus refuses more than 11,000
QUERY_TIMEOUT_S = 10.0
SPAN_S_MAX = 7 * 24 * 3600
RATE_WINDOW_S = 30  # rates over four or more of kizo up's 5 s scrapes
_RELATIVE = re.compile(r"^([0-9]+)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Query:
    expr: str  # with $system and $__rate_interval, as Grafana takes them
    legend: str  # Grafana's legend format: {{label}} placeholders


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str  # Grafana's unit id: reqps, s, short, none
    queries: tuple[Query, ...]
    description: str = ""


def sel(metric: str, extra: str = "") -> str:
    inner = f'system=~"{SYSTEM}"' + (f", {extra}" if extra else "")
    return f"{metric}{{{inner}}}"


def rate(metric: str, extra: str = "") -> str:
    return f"rate({sel(metric, extra)}[{RATE_WINDOW}])"


def _share(metric: str, which: str) -> str:
    """The rate of ``metric``'s series matching ``which``: 0 rather than nothing while there
    are none, as long as ``metric`` itself moves."""
    return f"sum({rate(metric, which)}) or 0 * sum({rate(metric)})"


_5XX = 'status=~"5.."'
_BANK_UNKNOWN = 'outcome=~"unknown|unavailable"'
INCIDENT: tuple[Panel, ...] = (
    Panel(
        "Throughput",
        "reqps",
        (
            Query(f"sum({rate('kizo_intents_accepted_total')})", "accepted"),
            Query(f"sum({rate('kizo_intents_settled_total')})", "settled"),
            Query(f"sum({rate('kizo_intents_failed_total')})", "failed"),
        ),
        "Intents accepted (202) and made final per second.",
    ),
    Panel(
        "Errors",
        "reqps",
        (
            Query(_share("kizo_http_requests_total", _5XX), "5xx answers"),
            Query(_share("kizo_http_requests_total", 'status="429"'), "429 rate-limited"),
            Query(_share("kizo_bank_calls_total", _BANK_UNKNOWN), "bank unknown/unavailable"),
        ),
        "5xx and 429 answers per second, and bank calls whose outcome is unknown"
        " (0, not 'no data', while none fail).",
    ),
    Panel(
        "Settlement lag",
        "s",
        (
            Query(
                "histogram_quantile(0.99, sum by (le) "
                f"({rate('kizo_settlement_lag_seconds_bucket')}))",
                "p99",
            ),
            Query(
                "histogram_quantile(0.50, sum by (le) "
                f"({rate('kizo_settlement_lag_seconds_bucket')}))",
                "p50",
            ),
        ),
        "Accepted to final, by the ledger's clock.",
    ),
    Panel(
        "Backlog",
        "short",
        (
            Query(f"sum({sel('kizo_intents_pending')})", "pending in PostgreSQL"),
            Query(f"sum({sel('kizo_queue_depth')})", "queued in Redis"),
            Query(f"max({sel('kizo_intent_oldest_pending_age_seconds')})", "oldest pending (s)"),
        ),
        "The durable backlog, the queues, and the age of the oldest pending intent.",
    ),
    Panel(
        "Reconciliation and audit",
        "short",
        (
            Query(f"sum({sel('kizo_reconciliation_findings')})", "reconciliation findings"),
            Query(f"max({sel('kizo_needs_attention')})", "needs attention"),
            Query(f"max(abs({sel('kizo_ledger_imbalance_minor')}))", "ledger imbalance (minor)"),
        ),
        "Anything above zero here is money to look at.",
    ),
    Panel(
        "Janitor",
        "reqps",
        (
            Query(f"sum({rate('kizo_janitor_redriven_total')})", "re-driven"),
            Query(f"sum({rate('kizo_janitor_resolved_total')})", "resolved at the bank"),
            Query(f"sum({rate('kizo_janitor_flagged_total')})", "flagged"),
        ),
        "What the janitor did: re-drives, unknown outcomes resolved, intents flagged.",
    ),
)


def instantiate(expr: str, system: str = ".+", rate_window: str = "30s") -> str:
    """A panel's expression as Prometheus takes it outside Grafana."""
    return expr.replace(SYSTEM, system).replace(RATE_WINDOW, rate_window)


# --- the PNG ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    legend: str
    times: tuple[float, ...]
    values: tuple[float, ...]


def _legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


Samples = list[tuple[dict[str, str], list[tuple[float, float]]]]


def query_range(http: httpx.Client, base: str, expr: str, start: float, end: float,
                step_s: float) -> Samples:  # fmt: skip
    """One range query: (labels, [(time, value)]) per series; a query Prometheus refuses raises
    ValueError with its error."""
    r = http.get(f"{base}/api/v1/query_range",
                 params={"query": expr, "start": start, "end": end, "step": step_s})  # fmt: skip
    body = r.json()
    if body.get("status") != "success":
        raise ValueError(f"{body.get('errorType', r.status_code)}: {body.get('error', '')}")
    return [({k: v for k, v in s["metric"].items() if k != "__name__"},
             [(float(t), float(v)) for t, v in s["values"]])
            for s in body["data"]["result"]]  # fmt: skip


def fault_windows(samples: Samples, step_s: float) -> list[tuple[str, float, float]]:
    """(label, start, end) for every run of samples at 1, joined across gaps of one step."""
    windows = []
    for labels, points in samples:
        name = f"{labels.get('fault', '?')} {labels.get('target', '')}".strip()
        start = last = None
        for t, v in points:
            if v >= 1 and start is not None and last is not None and t - last <= 1.5 * step_s:
                last = t
            elif v >= 1:
                if start is not None and last is not None:
                    windows.append((name, start, last + step_s))
                start = last = t
        if start is not None and last is not None:
            windows.append((name, start, last + step_s))
    return sorted(windows, key=lambda w: w[1])


def collect(base: str, start: float, end: float, system: str, rate_window_s: int = RATE_WINDOW_S,
            ) -> tuple[list[list[Series]], list[tuple[str, float, float]], float]:  # fmt: skip
    step_s = max(1.0, math.ceil((end - start) / POINTS_MAX))
    # Four scrapes at least (Prometheus needs two samples for a rate), and four steps.
    window = f"{max(rate_window_s, int(4 * step_s))}s"
    with httpx.Client(timeout=QUERY_TIMEOUT_S) as http:
        panels = []
        for panel in INCIDENT:
            series = []
            for q in panel.queries:
                for labels, points in query_range(http, base, instantiate(q.expr, system, window),
                                                  start, end, step_s):  # fmt: skip
                    series.append(Series(_legend(q.legend, labels) or q.legend,
                                         tuple(p[0] for p in points),
                                         tuple(p[1] for p in points)))  # fmt: skip
            panels.append(series)
        faults = query_range(http, base, faults_over(system, step_s), start, end, step_s)
    return panels, fault_windows(faults, step_s), step_s


def faults_over(system: str, step_s: float) -> str:
    """The faults active at any scrape within each step, not only at the step's instant: a
    fault shorter than a step (a two-second Redis outage) must not fall between the points."""
    inner = f'kizo_chaos_fault_active{{system=~"{system}"}}[{max(1, math.ceil(step_s))}s]'
    return f"max by (fault, target) (max_over_time({inner}))"


Window = tuple[str, float, float]  # a fault's name, its start and end (epoch seconds)


def draw(path: Path, title: str, panels: Sequence[Sequence[Series]],
         windows: Sequence[Window], start: float, end: float) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(INCIDENT), 1, figsize=(11, 2.0 * len(INCIDENT) + 0.8),
                             sharex=True, constrained_layout=True)  # fmt: skip
    colours = plt.get_cmap("tab10")
    names = sorted({w[0] for w in windows})
    for ax, panel, series in zip(axes, INCIDENT, panels, strict=True):
        for s in series:
            ax.plot([t - start for t in s.times], s.values, label=s.legend, linewidth=1.3)
        for name, a, b in windows:
            ax.axvspan(a - start, b - start, color=colours(names.index(name) % 10), alpha=0.15)
        ax.set_title(panel.title, loc="left", fontsize=10)
        ax.set_ylabel({"reqps": "per s", "s": "seconds"}.get(panel.unit, ""), fontsize=8)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=7, loc="upper right")
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="grey")
    top = axes[0]
    for name, a, _ in windows:
        top.annotate(name, xy=((a - start), 1.0), xycoords=("data", "axes fraction"),
                     fontsize=7, va="bottom", color=colours(names.index(name) % 10))  # fmt: skip
    axes[-1].set_xlabel("seconds since " + _clock(start))
    axes[-1].set_xlim(0, end - start)
    fig.suptitle(title, fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def render(base: str, start: float, end: float, system: str, path: Path, title: str,
           rate_window_s: int = RATE_WINDOW_S) -> int:  # fmt: skip
    """Query and draw; the number of fault windows found."""
    panels, windows, _ = collect(base, start, end, system, rate_window_s)
    draw(path, title, panels, windows, start, end)
    return len(windows)


def _clock(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def parse_time(text: str, now: float) -> float:
    """``now``, a span back from now (``15m``, ``2h``), or an RFC 3339 time with its offset."""
    if text == "now":
        return now
    relative = _RELATIVE.fullmatch(text)
    if relative:
        return now - int(relative.group(1)) * _UNIT_S[relative.group(2)]
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"not a time: {text!r} (now, 15m, 2h, or 2026-12-01T10:00:00+00:00)"
        ) from None
    if parsed.tzinfo is None:
        raise UsageError(f"a time needs its offset: {text!r} (e.g. +00:00)")
    return parsed.timestamp()


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", default="15m", help="now, 15m, 2h or an RFC 3339 time")
    parser.add_argument("--until", default="now")
    parser.add_argument("--system", default=".+", help="the system label: up, chaos (a regex)")
    parser.add_argument("--prometheus", default="", help="Prometheus' URL (default: kizo up's)")
    parser.add_argument("--out", default="incident.png", help="the PNG to write")


def _incident(config: Config, args: argparse.Namespace) -> int:
    import time

    now = time.time()
    start, end = parse_time(args.since, now), parse_time(args.until, now)
    if not 0 < end - start <= SPAN_S_MAX:
        raise UsageError("--since must come before --until, at most 7 days before")
    base = (args.prometheus or f"http://{config.host}:{config.prometheus_port}").rstrip("/")
    title = f"Kizo incident view, system {args.system}: {_clock(start)} to {_clock(end)}"
    try:
        found = render(base, start, end, args.system, Path(args.out), title)
    except httpx.HTTPError as exc:
        why = f"Prometheus at {base} did not answer ({exc.__class__.__name__})"
    except ValueError as exc:
        why = f"Prometheus refused a query: {exc}"
    else:
        print(f"kizo incident: {args.out} ({found} fault windows)")
        return 0
    print(f"kizo incident: {why}", file=sys.stderr)
    return 1


COMMANDS = [Command("incident", _incident, _configure)]
