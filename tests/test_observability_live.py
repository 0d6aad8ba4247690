"""The observability stack end to end: a real Prometheus (Debian's, unpacked by `make test`)
discovers a chaos run's processes through file_sd and scrapes them while combined-storm
attacks the system. Then every dashboard expression and every rule is evaluated against what it
stored: none errors, the dashboards' panels all have data, every metric a rule reads was
there, and the run's fault windows are in the incident view's data and its PNG."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from infra import incident, prometheus
from infra.servers import free_port
from tests.test_dashboards import _boards, _generator

SCENARIO = "combined-storm"  # a 5xx spell, bank drops, re-drives, a worker killed: every panel
RUN_TIMEOUT_S = 240
STEP_S = 2.0
RATE_WINDOW = "10s"  # ten 1 s scrapes


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One chaos run under a Prometheus scraping every second; its URL and the run's span."""
    if prometheus.binary("prometheus") is None:
        pytest.fail("no prometheus binary: `make test` unpacks Debian's under .tools")
    root = tmp_path_factory.mktemp("observed")
    server = prometheus.Prometheus(root / "home", free_port(), scrape_interval_s=1,
                                   evaluation_interval_s=2)  # fmt: skip
    server.start()
    try:
        started = time.time()
        done = subprocess.run(
            [sys.executable, "-m", "kizo.cli", "chaos", "run", SCENARIO, "--seed", "1", "--json"],
            cwd=root, env={**os.environ, "KIZO_HOME": str(root / "home"),
                           "KIZO_PROMETHEUS_PORT": str(server.port)}, capture_output=True,
            text=True, timeout=RUN_TIMEOUT_S, check=False,
        )  # fmt: skip
        ended = time.time()
        # Exit 1 is allowed: on a loaded machine a restart may make a step late, which fails
        # the run's strict timeline but not what this module looks at. No money rule may break.
        assert done.returncode in (0, 1), done.stderr[-2000:]
        report = json.loads(done.stdout)
        assert report["violations"] == 0, done.stdout
        time.sleep(2)  # the last scrapes and a rule evaluation land
        yield {"url": server.url, "start": started, "end": ended, "root": root, "report": report}
    finally:
        server.stop()


def _range(url: str, expr: str, start: float, end: float) -> incident.Samples:
    with httpx.Client(timeout=10) as http:
        return incident.query_range(http, url, expr, start, end, STEP_S)


def test_prometheus_found_every_process_of_the_run(observed: dict[str, Any]) -> None:
    roles = _range(observed["url"], 'group by (role) (up{system="chaos"} == 1)',
                   observed["start"], observed["end"])  # fmt: skip
    assert {labels["role"] for labels, _ in roles} >= {"api", "worker", "janitor", "bank",
                                                        "proxy", "chaos"}  # fmt: skip


def test_every_dashboard_expression_evaluates_and_has_data(observed: dict[str, Any]) -> None:
    expressions = [e for board in _boards().values() for e in _generator().expressions(board)]
    assert len(expressions) >= 25
    empty = []
    for expr in expressions:
        query = incident.instantiate(expr, "chaos", RATE_WINDOW)
        if not _range(observed["url"], query, observed["start"], observed["end"]):
            empty.append(query)
    assert not empty, f"no data while the system was busy: {empty}"


def _rules(url: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{url}/api/v1/rules", timeout=10).json()
    return [rule for group in body["data"]["groups"] for rule in group["rules"]]


def test_every_rule_evaluates_without_error(observed: dict[str, Any]) -> None:
    rules = _rules(observed["url"])
    assert len(rules) >= 25
    failing = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not failing


def test_recording_rules_have_data_and_alerts_have_their_inputs(observed: dict[str, Any]) -> None:
    url, start, end = observed["url"], observed["start"], observed["end"]
    rules = _rules(url)
    empty = [r["name"] for r in rules
             if r["type"] == "recording" and not _range(url, f'{r["name"]}{{system="chaos"}}',
                                                        start, end)]  # fmt: skip
    assert not empty, f"recording rules without data: {empty}"
    # An alert returns data only while it fires; what must be there is every series it reads.
    read = re.compile(r"(?<![:\w])(kizo_[a-z_]+|up)(?=[{\s)\[])")
    metrics = {m for r in rules if r["type"] == "alerting" for m in read.findall(r["query"])}
    assert len(metrics) >= 6
    missing = [m for m in sorted(metrics) if not _range(url, f'group({m}{{system="chaos"}})',
                                                        start, end)]  # fmt: skip
    assert not missing, f"alerts read series that were never there: {missing}"


def test_the_fault_windows_are_in_the_incident_views_data_and_png(observed: dict[str, Any]) -> None:
    url, start, end = observed["url"], observed["start"], observed["end"]
    faults = _range(url, incident.faults_over("chaos", STEP_S), start, end)
    windows = incident.fault_windows(faults, STEP_S)
    names = {name for name, _, _ in windows}
    assert {"latency postgres", "disabled redis", "killed worker-0", "bank_faults bank"} <= names
    out = observed["root"] / "incident.png"
    iso = [dt.datetime.fromtimestamp(t, dt.UTC).isoformat() for t in (start - 5, end + 5)]
    done = subprocess.run(
        [sys.executable, "-m", "kizo.cli", "incident", "--since", iso[0], "--until", iso[1],
         "--system", "chaos", "--prometheus", url, "--out", str(out)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = int(re.search(r"\((\d+) fault windows\)", done.stdout).group(1))  # type: ignore[union-attr]
    assert found >= len(names)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 30_000


def test_the_run_drew_its_own_incident_view_from_that_prometheus(observed: dict[str, Any]) -> None:
    drawn = observed["root"] / Path(observed["report"]["incident_view"])  # relative to the run
    assert drawn == observed["root"] / "chaos-runs" / f"{SCENARIO}-seed1" / "incident.png"
    assert drawn.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and drawn.stat().st_size > 30_000
