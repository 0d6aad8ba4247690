"""``kizo bench e2e``'s figures from a request log, its bars and the README section it writes
(no system runs here: the benchmark itself is `kizo bench e2e`, never a timed test)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kizo.bench_e2e import (
    README_END,
    README_START,
    E2eParams,
    Request,
    bars,
    best_step,
    readme_section,
    steps,
    summary,
    write_readme,
)


def _log(started: float, step_s: int, per_step: list[tuple[int, float, int]]) -> list[Request]:
    """Per step: requests per second of each route, payment latency, status of the payments."""
    out = []
    for i, (rate, ms, status) in enumerate(per_step):
        for k in range(rate * step_s):
            at = started + i * step_s + k / rate
            out += [Request(at, "dashboard", 200, ms / 2), Request(at, "transfer", status, ms)]
    return out


def test_steps_pick_the_fastest_step_whose_payment_p99_and_errors_pass_the_bar() -> None:
    p = E2eParams(steps=(10, 20, 40), step_s=10)
    log = _log(1000.0, 10, [(50, 20.0, 202), (80, 60.0, 202), (90, 300.0, 202)])
    rows = steps(log, 1000.0, p)
    assert [r["users"] for r in rows] == [10, 20, 40]
    assert [r["req_per_s"] for r in rows] == [100.0, 160.0, 180.0]
    best = best_step(rows)
    assert best is not None and best["users"] == 20  # 40 users were faster, but past the bar
    failing = steps(_log(1000.0, 10, [(50, 20.0, 202), (80, 60.0, 503)]), 1000.0, p)
    best = best_step(failing)
    assert best is not None and best["users"] == 10  # errors disqualify a step


def test_summary_counts_every_answer_that_is_not_the_promised_one() -> None:
    log = [Request(1.0, "signin", 200, 10.0), Request(1.1, "signin", 503, 1.0),
           Request(1.2, "deposit", 202, 5.0), Request(1.3, "deposit", 0, 30_000.0)]  # fmt: skip
    s = summary(log, 2.0)
    assert (s["errors"], s["errors_by_route_status"]) == (2, {"deposit 0": 1, "signin 503": 1})
    assert (s["signins_served_per_s"], s["req_per_s"]) == (0.5, 2.0)
    assert s["routes"]["deposit"]["statuses"] == {"0": 1, "202": 1}


def _report(seed_signins: float, p99: float) -> dict[str, Any]:
    hold = {"errors": 0, "payment_p99_ms": p99, "signins_served_per_s": seed_signins,
            "req_per_s": 120.0, "errors_by_route_status": {}}  # fmt: skip
    return {
        "started": "2026-12-02 01:00 UTC",
        "machine": {"cpus": 2, "cpu_model": "x", "memory_gib": 24, "python": "3.11"},
        "seed": {"hold": hold, "settlement": {"unsettled": 0},
                 "original": {"req_per_s": "28–29", "signins_served_per_s": 5.6,
                              "payment_p99_ms": "4,600", "unsettled": "13–16 %"}},
    }  # fmt: skip


def test_bars_follow_the_issue_thresholds() -> None:
    assert all(bars(_report(21.0, 60.0)).values())
    failed = bars(_report(16.0, 120.0))  # under 3 x 5.6 sign-ins/s, and p99 over 100 ms
    assert not failed["seed: sign-ins/s >= 3x original"]
    assert not failed["seed: payment p99 < 100 ms"]
    assert failed["seed: zero errors"]


def test_the_readme_section_is_replaced_between_its_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# Kizo\n\n## What works now\n\n## Not yet\n- more\n")
    write_readme(readme, readme_section(_report(21.0, 60.0)))
    first = readme.read_text()
    assert first.index(README_START) < first.index("## Not yet")
    assert "| | sign-ins served/s | 21.0 | 5.6 |" in first
    write_readme(readme, readme_section(_report(22.5, 60.0)))
    second = readme.read_text()
    assert second.count(README_START) == second.count(README_END) == 1
    assert "| | sign-ins served/s | 22.5 | 5.6 |" in second and "21.0" not in second
    assert second.endswith("## Not yet\n- more\n")
