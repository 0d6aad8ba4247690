"""The Prometheus configuration and rules: valid for promtool, their unit tests pass (and can
fail), and each names only catalogued metrics and has a runbook."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from infra import prometheus

OBS = prometheus.OBSERVABILITY_DIR
RULES = sorted((OBS / "rules").glob("*.yml"))
RULE_TESTS = sorted((OBS / "rules" / "tests").glob("*.yml"))
DOCS = OBS.parent / "docs"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = prometheus.binary("promtool")
    assert found, "promtool is missing: `make test` unpacks Debian's prometheus under .tools"
    return found


def run(*args: str, cwd: Path = OBS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def test_the_committed_configuration_is_the_rendered_one() -> None:
    assert (OBS / "prometheus.yml").read_text() == prometheus.render()


def test_promtool_finds_the_configuration_and_its_rules_valid(promtool: str) -> None:
    done = run(promtool, "check", "config", "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(RULES)} rule files found" in done.stdout + done.stderr


def test_a_local_configuration_points_at_this_checkouts_rules(promtool: str,
                                                              tmp_path: Path) -> None:  # fmt: skip
    path = prometheus.write_local(tmp_path)
    done = run(promtool, "check", "config", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert str(tmp_path / "prometheus" / "targets" / "*.json") in path.read_text()


def test_rules_are_valid(promtool: str) -> None:
    assert RULES
    done = run(promtool, "check", "rules", *map(str, RULES))
    assert done.returncode == 0, done.stdout + done.stderr


def test_rule_unit_tests_pass(promtool: str) -> None:
    assert RULE_TESTS
    done = run(promtool, "test", "rules", *map(str, RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_rule_unit_tests_catch_a_broken_alert(promtool: str, tmp_path: Path) -> None:
    """The unit tests bite: an imbalance alert that waits for 1 minor unit, not any, fails them."""
    rules, tests = tmp_path / "rules", tmp_path / "rules" / "tests"
    tests.mkdir(parents=True)
    money = (OBS / "rules" / "money.yml").read_text()
    broken = money.replace("(abs(kizo_ledger_imbalance_minor)) != 0",
                           "(abs(kizo_ledger_imbalance_minor)) > 1000")  # fmt: skip
    assert broken != money
    (rules / "money.yml").write_text(broken)
    shutil.copy(OBS / "rules" / "tests" / "money_test.yml", tests / "money_test.yml")
    done = run(promtool, "test", "rules", str(tests / "money_test.yml"), cwd=tmp_path)
    assert done.returncode != 0
    assert "KizoLedgerImbalance" in done.stdout + done.stderr


def _alerts() -> list[str]:
    return [m for path in RULES for m in re.findall(r"^\s+- alert: (\w+)$", path.read_text(), re.M)]


def test_every_alert_has_a_runbook_in_the_operations_guide() -> None:
    guide = (DOCS / "operations.md").read_text()
    headings = {h.strip().lower() for h in re.findall(r"^#+ (\w+)\s*$", guide, re.M)}
    alerts = _alerts()
    assert len(alerts) >= 10
    missing = [a for a in alerts if a.lower() not in headings]
    assert not missing, f"alerts without a runbook section in docs/operations.md: {missing}"
    for path in RULES:
        for anchor in re.findall(r"docs/operations\.md#(\w+)", path.read_text()):
            assert anchor in headings, f"{path.name} links to a missing runbook #{anchor}"


def test_rules_use_only_catalogued_metrics() -> None:
    catalogue = (DOCS / "observability.md").read_text()
    names = {n for path in RULES for n in re.findall(r"(?<![:\w])(kizo_[a-z_]+)", path.read_text())}
    assert names
    # A histogram's series (_bucket, _count, _sum) belong to the metric the catalogue names.
    bare = {re.sub(r"_(bucket|count|sum)$", "", n) for n in names}
    missing = sorted(n for n in bare if f"`{n}`" not in catalogue)
    assert not missing, f"rules use metrics missing from docs/observability.md: {missing}"
