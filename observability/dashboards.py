"""Kizo's Grafana dashboards, kept as code (grafana-foundation-sdk): writes
observability/grafana/dashboards/{overview,incident}.json. Run `make dashboards` after a change;
tests/test_dashboards.py fails while the JSON and this file disagree.

- overview: throughput, latency p50/p99 per route, settlement lag, backlog, errors, saturation;
- incident: the panels of infra.incident.INCIDENT (the same ones `kizo incident` draws to a PNG)
  under the chaos runner's fault windows, shown as annotations (shaded regions on every panel)
  and as a state timeline of their own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import prometheus as gp
from grafana_foundation_sdk.builders import statetimeline, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from infra.incident import FAULTS_EXPR, INCIDENT, RATE_WINDOW, Panel, Query, rate, sel

OUT = Path(__file__).resolve().parent / "grafana" / "dashboards"
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="kizo-prometheus")
REFRESH = "10s"


def _system_variable() -> gd.QueryVariable:
    return (gd.QueryVariable("system").label("System").datasource(DATASOURCE)
            .query("label_values(up{job=\"kizo\"}, system)")
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .include_all(True).all_value(".+").multi(False))  # fmt: skip


def _series(panel: Panel, width: int = 12) -> timeseries.Panel:
    built = (timeseries.Panel().title(panel.title).description(panel.description)
             .datasource(DATASOURCE).unit(panel.unit).height(7).span(width).min(0)
             .fill_opacity(8).line_width(1))  # fmt: skip
    for ref, q in zip("ABCDEFGH", panel.queries, strict=False):
        built = built.with_target(
            gp.Dataquery().expr(q.expr).legend_format(q.legend).range().ref_id(ref)
        )
    return built


def _faults_timeline() -> statetimeline.Panel:
    return (statetimeline.Panel().title("Faults injected").datasource(DATASOURCE)
            .description("Each fault window of a chaos run (kizo_chaos_fault_active).")
            .height(5).span(24)
            .with_target(gp.Dataquery().expr(FAULTS_EXPR).legend_format("{{fault}} {{target}}")
                         .range().ref_id("A")))  # fmt: skip


def _fault_annotation() -> gd.AnnotationQuery:
    return (gd.AnnotationQuery().name("Faults").datasource(DATASOURCE).enable(True)
            .icon_color("red").expr(f"{FAULTS_EXPR} == 1"))  # fmt: skip


OVERVIEW: tuple[Panel, ...] = (
    INCIDENT[0],
    Panel(
        "Requests by route",
        "reqps",
        (
            Query(
                f"sum by (route, status) ({rate('kizo_http_requests_total')})",
                "{{route}} {{status}}",
            ),
        ),
        "HTTP requests answered per second, by route template and status.",
    ),
    Panel(
        "Latency p99 by route",
        "s",
        (
            Query(
                "histogram_quantile(0.99, sum by (route, le) "
                f"({rate('kizo_http_request_duration_seconds_bucket')}))",
                "{{route}}",
            ),
        ),
    ),
    Panel(
        "Latency p50 by route",
        "s",
        (
            Query(
                "histogram_quantile(0.50, sum by (route, le) "
                f"({rate('kizo_http_request_duration_seconds_bucket')}))",
                "{{route}}",
            ),
        ),
    ),
    INCIDENT[2],
    INCIDENT[3],
    INCIDENT[1],
    Panel(
        "Settlement SLO: share of intents over 5 s",
        "percentunit",
        (
            Query('system:kizo_settlement_slow:ratio_rate5m{system=~"$system"}', "5 min"),
            Query('system:kizo_settlement_slow:ratio_rate1h{system=~"$system"}', "1 h"),
        ),
        "The objective is at most 1 % (observability/rules/slo.yml).",
    ),
    Panel(
        "Saturation: hashing, mailboxes, batches",
        "short",
        (
            Query(f"sum({sel('kizo_hashing_queue')})", "hashing queue"),
            Query(f"sum({sel('kizo_actor_mailbox_messages')})", "mailbox messages"),
            Query(f"sum({sel('kizo_actors_active')})", "actors active"),
        ),
        "Work waiting inside the processes.",
    ),
    Panel(
        "Batch apply time p99",
        "s",
        (
            Query(
                "histogram_quantile(0.99, sum by (le) "
                f"({rate('kizo_commit_group_duration_seconds_bucket')}))",
                "group commit",
            ),
            Query(
                "histogram_quantile(0.99, sum by (le) "
                f"({rate('kizo_actor_batch_duration_seconds_bucket')}))",
                "actor batch",
            ),
        ),
    ),
    Panel(
        "Process CPU",
        "percentunit",
        (Query(f"sum by (process) ({rate('process_cpu_seconds_total')})", "{{process}}"),),
        "CPU seconds per second, per process that reports it.",
    ),
    INCIDENT[4],
)


def overview() -> gd.Dashboard:
    board = (gd.Dashboard("Kizo overview").uid("kizo-overview").tags(["kizo"])
             .refresh(REFRESH).time("now-30m", "now").with_variable(_system_variable())
             .annotation(_fault_annotation()))  # fmt: skip
    for panel in OVERVIEW:
        board = board.with_panel(_series(panel))
    return board


def incident() -> gd.Dashboard:
    board = (gd.Dashboard("Kizo incident view").uid("kizo-incident").tags(["kizo", "chaos"])
             .description("What a fault did: fault windows shaded over errors, settlement lag, "
                          "backlog, reconciliation and the janitor. `kizo incident` draws the "
                          "same panels to a PNG.")
             .refresh(REFRESH).time("now-15m", "now").with_variable(_system_variable())
             .annotation(_fault_annotation()).with_panel(_faults_timeline()))  # fmt: skip
    for panel in INCIDENT:
        board = board.with_panel(_series(panel))
    return board


def _finish(model: dict[str, Any]) -> dict[str, Any]:
    """What the SDK has no builder for: how Grafana turns the fault series into regions."""
    for item in model.get("annotations", {}).get("list", []):
        if item.get("name") == "Faults":
            item.update({"step": "5s", "titleFormat": "{{fault}} on {{target}}",
                         "tagKeys": "fault,target", "useValueForTime": False})  # fmt: skip
    return model


def render() -> dict[str, str]:
    """file name -> its JSON text."""
    boards = {"overview.json": overview(), "incident.json": incident()}
    return {
        name: json.dumps(_finish(json.loads(json.dumps(b.build(), cls=JSONEncoder))), indent=2,
                         sort_keys=True) + "\n"
        for name, b in boards.items()
    }  # fmt: skip


def expressions(model: dict[str, Any]) -> list[str]:
    """Every PromQL expression a dashboard's JSON holds (panels, annotations, variables)."""
    found = [t["expr"] for p in model.get("panels", []) for t in p.get("targets", [])]
    found += [a["expr"] for a in model.get("annotations", {}).get("list", []) if "expr" in a]
    return found


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    assert RATE_WINDOW in json.dumps(render())
    raise SystemExit(main())
