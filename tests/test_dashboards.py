"""Grafana dashboards as code and the incident view's PNG renderer, without a server: the
committed JSON is what observability/dashboards.py generates, it is well-formed for Grafana's
provisioning, and `kizo incident` says what is wrong in one line."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from infra import incident
from infra.commands import UsageError

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "observability" / "grafana"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kizo_dashboards", ROOT / "observability" /
                                                  "dashboards.py")  # fmt: skip
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _boards() -> dict[str, Any]:
    return {p.name: json.loads(p.read_text()) for p in (GRAFANA / "dashboards").glob("*.json")}


def test_the_committed_dashboards_are_the_generated_ones() -> None:
    rendered = _generator().render()
    assert set(rendered) == {"overview.json", "incident.json"}
    for name, text in rendered.items():
        assert (GRAFANA / "dashboards" / name).read_text() == text, f"run make dashboards ({name})"


def test_every_panel_queries_the_provisioned_prometheus_with_unique_refs() -> None:
    provisioned = (GRAFANA / "provisioning" / "datasources" / "kizo.yml").read_text()
    assert "uid: kizo-prometheus" in provisioned
    for name, board in _boards().items():
        panels = board["panels"]
        assert isinstance(panels, list) and len(panels) >= 6, name
        for panel in panels:
            assert panel["datasource"]["uid"] == "kizo-prometheus", (name, panel["title"])
            refs = [t["refId"] for t in panel["targets"]]
            assert refs and len(set(refs)) == len(refs) and all(refs), (name, panel["title"])


def test_the_incident_view_is_kizo_incidents_panels_under_the_fault_windows() -> None:
    board = _boards()["incident.json"]
    titles = [p["title"] for p in board["panels"]]
    assert titles == ["Faults injected", *(p.title for p in incident.INCIDENT)]
    faults = board["annotations"]["list"]
    assert [a["expr"] for a in faults if a.get("name") == "Faults"] == [
        f"{incident.FAULTS_EXPR} == 1"
    ]
    overview = _generator().expressions(_boards()["overview.json"])
    assert any("kizo_http_request_duration_seconds_bucket" in e for e in overview)


def test_times_are_now_spans_or_rfc3339_with_an_offset() -> None:
    now = 1_000_000.0
    assert incident.parse_time("now", now) == now
    assert incident.parse_time("15m", now) == now - 900
    assert incident.parse_time("2h", now) == now - 7200
    assert incident.parse_time("1970-01-12T13:46:40+00:00", now) == now
    for bad in ("yesterday", "15", "-5m", "2026-12-01T10:00:00"):
        with pytest.raises(UsageError):
            incident.parse_time(bad, now)


def test_fault_windows_join_consecutive_samples_and_split_on_gaps() -> None:
    samples = [({"fault": "latency", "target": "postgres"},
                [(0.0, 0.0), (5.0, 1.0), (10.0, 1.0), (15.0, 0.0), (20.0, 1.0)]),
               ({"fault": "killed", "target": "worker-0"}, [(10.0, 1.0)])]  # fmt: skip
    assert incident.fault_windows(samples, 5.0) == [
        ("latency postgres", 5.0, 15.0),
        ("killed worker-0", 10.0, 15.0),
        ("latency postgres", 20.0, 25.0),
    ]


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["--since", "whenever"], 2, "not a time"),
        (["--since", "now", "--until", "1h"], 2, "--since must come before --until"),
        (["--prometheus", "http://127.0.0.1:9"], 1, "did not answer"),
    ],
)
def test_bad_usage_and_no_prometheus_are_one_line_errors(
    args: list[str], code: int, says: str, tmp_path: Path
) -> None:
    done = subprocess.run([sys.executable, "-m", "kizo.cli", "incident", *args, "--out",
                           str(tmp_path / "x.png")], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == code, done.stderr
    assert says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "x.png").exists()
