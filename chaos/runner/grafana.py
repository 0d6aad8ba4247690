"""A chaos run's fault windows as Grafana annotations (region annotations through Grafana's HTTP
API, ``POST /api/annotations``), when ``KIZO_GRAFANA_URL`` is set: the incident view and the
overview then show each window even after the runner's own series have gone stale.

Posted once, when the run ends (a window is a region: it needs its end). Bounded: at most
``ANNOTATIONS_MAX`` per run, each request with a timeout. Grafana being down or refusing costs
the run nothing but a log line: the windows are in the journal and in Prometheus anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
import structlog

log = structlog.get_logger("kizo.chaos.runner.grafana")

ANNOTATIONS_MAX = 200
REQUEST_TIMEOUT_S = 5.0
DASHBOARD_UID = "kizo-incident"  # observability/dashboards.py


@dataclass(frozen=True)
class FaultWindow:
    """A fault's time on: what the runner's metrics close (chaos.runner.metrics) and Grafana
    draws as a region."""

    fault: str
    target: str
    start: float  # epoch seconds
    end: float


@dataclass(frozen=True)
class Grafana:
    url: str  # e.g. http://127.0.0.1:3000
    token: str = field(default="", repr=False)  # a service account token, "" for none

    def body(self, scenario: str, window: FaultWindow) -> dict[str, object]:
        return {
            "dashboardUID": DASHBOARD_UID,
            "time": int(window.start * 1000),
            "timeEnd": int(window.end * 1000),
            "tags": [
                "kizo",
                "chaos",
                f"scenario:{scenario}",
                f"fault:{window.fault}",
                f"target:{window.target}",
            ],
            "text": f"{window.fault} on {window.target} (chaos scenario {scenario})",
        }

    def annotate(self, scenario: str, windows: Sequence[FaultWindow]) -> int:
        """Post each window; how many Grafana accepted."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        posted = 0
        with httpx.Client(base_url=self.url.rstrip("/"), headers=headers,
                          timeout=REQUEST_TIMEOUT_S) as http:  # fmt: skip
            for window in windows[:ANNOTATIONS_MAX]:
                try:
                    answer = http.post("/api/annotations", json=self.body(scenario, window))
                except httpx.HTTPError as exc:
                    log.warning("grafana_unreachable", url=self.url, error=type(exc).__name__)
                    break
                if answer.status_code != 200:
                    log.warning("grafana_refused_annotation", status=answer.status_code,
                                answer=answer.text[:200])  # fmt: skip
                    break
                posted += 1
        log.info("grafana_annotations", posted=posted, windows=len(windows))
        return posted
