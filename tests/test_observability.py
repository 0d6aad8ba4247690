"""Observability, on one live system (docs/observability.md): every process serves its part of
the metric catalogue, the API's counts add up over its two granian worker processes, no label
takes an unbounded value, the logs are JSON with their ids bound, and no secret is ever logged."""

from __future__ import annotations

import asyncio
import http.server
import json
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import asyncpg
import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from api._auth import KeyRing
from chaos.runner.grafana import Grafana
from chaos.runner.metrics import RunnerMetrics, serving
from chaos.runner.scenario import Step
from infra.config import Config
from infra.metrics import Target, targets_dir
from infra.processes import metrics_targets
from infra.system import System, scratch_system

CATALOGUE = Path(__file__).resolve().parents[1] / "docs" / "observability.md"
# Section of the catalogue -> the role whose /metrics must serve its metrics.
SECTIONS = {"API": "api", "Worker": "worker", "Janitor": "janitor", "Mock bank": "bank",
            "Fault proxy": "proxy", "Chaos runner": "chaos"}  # fmt: skip
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
PASSWORD = "observability horse battery"
SETTLE_S_MAX = 30.0
ME_READS = 12


@dataclass
class Run:
    """What the live run did, and every secret it handled."""

    system: System
    secrets: dict[str, str] = field(default_factory=dict)
    user_ids: list[str] = field(default_factory=list)
    txn_ids: list[str] = field(default_factory=list)
    rotate_output: str = ""


def catalogue() -> dict[str, set[str]]:
    """role -> the metric names docs/observability.md lists for it."""
    names: dict[str, set[str]] = {role: set() for role in SECTIONS.values()}
    role = None
    for line in CATALOGUE.read_text().splitlines():
        if line.startswith("### "):
            role = next((r for s, r in SECTIONS.items() if line[4:].startswith(s)), None)
        elif role and (m := re.match(r"\| `([a-z_]+)`", line)):
            names[role].add(m.group(1))
    return names


def scrape(address: str) -> dict[str, Any]:
    """Family name (and, for counters, name_total) -> family."""
    text = httpx.get(f"http://{address}/metrics", timeout=10).text
    families: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family
        if family.type == "counter":
            families[f"{family.name}_total"] = family
    return families


def value(families: dict[str, Any], name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` that carry ``labels``."""
    wanted = labels.items()
    unique = {id(f): f for f in families.values()}.values()
    return float(sum(s.value for f in unique for s in f.samples
                     if s.name == name and wanted <= s.labels.items()))  # fmt: skip


def fresh() -> httpx.Client:
    """No keep-alive: each request a new connection, which the kernel hands to either of the
    API's worker processes."""
    return httpx.Client(timeout=15, limits=httpx.Limits(max_keepalive_connections=0))


def _live_run(system: System) -> Run:
    run = Run(system)
    config = Config.from_env(system.env)
    run.secrets["pepper"] = config.auth.pepper
    run.secrets["keyring key"] = system.env["KIZO_KEYRING_KEY"]
    run.secrets["scratch mark"] = system.env["KIZO_SCRATCH_MARK"]
    run.secrets["password"] = PASSWORD
    api = f"{system.api_url}/api/v1"
    with fresh() as http:
        tokens = []
        for i in range(3):
            email = f"obs-{uuid.uuid4().hex[:8]}@example.com"
            body = {"email": email, "password": PASSWORD, "name": f"O{i}"}
            up = http.post(f"{api}/auth/signup", json=body)
            assert up.status_code == 201, up.text
            run.user_ids.append(up.json()["user"]["id"])
            signin = http.post(f"{api}/auth/signin", json={"email": email, "password": PASSWORD})
            assert signin.status_code == 200, signin.text
            pair = signin.json()
            refreshed = http.post(f"{api}/auth/refresh",
                                  json={"refresh_token": pair["refresh_token"]})  # fmt: skip
            assert refreshed.status_code == 200, refreshed.text
            for n, t in enumerate((up.json(), pair, refreshed.json())):
                run.secrets[f"access token {i}.{n}"] = t["access_token"]
                run.secrets[f"refresh token {i}.{n}"] = t["refresh_token"]
            tokens.append(refreshed.json())
        wrong = http.post(f"{api}/auth/signin", json={"email": email, "password": PASSWORD + "!"})
        assert wrong.status_code == 401
        auth = [{"Authorization": f"Bearer {t['access_token']}"} for t in tokens]
        first = http.get(f"{api}/accounts/me", headers=auth[1]).json()["account_id"]
        payments = [("deposit", {"amount": 5000}, auth[0]), ("deposit", {"amount": 700}, auth[1]),
                    ("transfer", {"to": first, "amount": 1200}, auth[0]),
                    ("withdraw", {"amount": 300}, auth[0])]  # fmt: skip
        for kind, body, headers in payments:
            paid = http.post(f"{api}/payments/{kind}", json=body,
                             headers={**headers, "Idempotency-Key": uuid.uuid4().hex})  # fmt: skip
            assert paid.status_code == 202, paid.text
            run.txn_ids.append(paid.json()["id"])
        for _ in range(ME_READS):
            assert http.get(f"{api}/accounts/me", headers=auth[2]).status_code == 200
        for txn in run.txn_ids[:2]:  # two ids, one route template
            assert http.get(f"{api}/transactions/{txn}", headers=auth[0]).status_code in (200, 404)
        assert http.get(f"{system.api_url}/no/such/{uuid.uuid4()}").status_code == 404
        http.post(f"{api}/auth/logout", json={"refresh_token": tokens[2]["refresh_token"]})
    rotated = subprocess.run([sys.executable, "-m", "kizo.cli", "keys", "rotate"], env=system.env,
                             capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    run.rotate_output = rotated.stdout + rotated.stderr
    for kid, secret in asyncio.run(_signing_keys(system.database_url, config.auth.keyring_key)):
        run.secrets[f"signing key {kid}"] = secret
    _wait_settled(system, run.txn_ids, auth[0])
    return run


async def _signing_keys(url: str, keyring_key: bytes) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return (await KeyRing.load(conn, keyring_key)).keys
    finally:
        await conn.close()


def _wait_settled(system: System, txn_ids: list[str], headers: dict[str, str]) -> None:
    """Until every payment is final and the janitor has passed since (bounded)."""

    async def open_intents() -> int:
        conn = await asyncpg.connect(system.database_url, timeout=10)
        try:
            return int(
                await conn.fetchval(
                    "SELECT count(*) FROM transactions WHERE id = ANY($1::uuid[])"
                    " AND status NOT IN ('settled', 'failed')",
                    [uuid.UUID(t) for t in txn_ids],
                )
            )
        finally:
            await conn.close()

    deadline = time.monotonic() + SETTLE_S_MAX
    while asyncio.run(open_intents()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert asyncio.run(open_intents()) == 0
    time.sleep(2.5)  # the janitor (every second here) publishes a pass after the settlement


@pytest.fixture(scope="module")
def live() -> Iterator[Run]:
    overrides = {"KIZO_API_WORKERS": "2", "KIZO_JANITOR_INTERVAL_S": "1"}
    with scratch_system(overrides) as system:
        # One proxy with a toxic, so the proxy's per-type gauge has a proxy to speak of.
        httpx.post(
            f"{system.proxy_url}/proxies",
            timeout=10,
            json={"name": "obs", "listen": "127.0.0.1:0", "upstream": "127.0.0.1:9"},
        ).raise_for_status()
        httpx.post(f"{system.proxy_url}/proxies/obs/toxics", timeout=10, json={
            "type": "latency", "attributes": {"latency": 1}}).raise_for_status()  # fmt: skip
        yield _live_run(system)


def _targets(system: System) -> dict[str, list[Target]]:
    by_role: dict[str, list[Target]] = {}
    for target in metrics_targets([child for child, _ in system.procs]):
        by_role.setdefault(target.role, []).append(target)
    return by_role


def test_every_process_serves_its_catalogue(live: Run) -> None:
    wanted = catalogue()
    assert all(wanted.values()), wanted
    for role, targets in _targets(live.system).items():
        for target in targets:
            families = scrape(target.address)
            missing = sorted(wanted[role] - families.keys())
            assert not missing, f"{target.process} lacks {missing}"


def test_the_pipeline_metrics_tell_what_happened(live: Run) -> None:
    targets = _targets(live.system)
    api = scrape(targets["api"][0].address)
    assert value(api, "kizo_intents_accepted_total", kind="deposit") == 2
    assert value(api, "kizo_intents_accepted_total", kind="transfer") == 1
    worker = scrape(targets["worker"][0].address)
    settled = value(worker, "kizo_intents_settled_total") + value(
        worker, "kizo_intents_failed_total"
    )
    assert settled >= 3  # the janitor may have finalised the withdrawal
    assert value(worker, "kizo_settlement_lag_seconds_count") >= 3
    assert value(worker, "kizo_commit_group_ops_count") >= 1
    assert value(worker, "kizo_bank_calls_total", call="collect", outcome="succeeded") == 2
    janitor = scrape(targets["janitor"][0].address)
    assert value(janitor, "kizo_ledger_audit_ok") == 1
    assert value(janitor, "kizo_ledger_imbalance_minor") == 0
    assert value(janitor, "kizo_janitor_passes_total") >= 1
    assert value(janitor, "kizo_janitor_last_pass_timestamp_seconds") > time.time() - 30
    assert value(janitor, "kizo_queue_depth", shard="0") == 0
    assert {s.labels["shard"] for s in janitor["kizo_queue_depth"].samples} == {
        str(s) for s in range(live.system.config.pipeline.shards)
    }
    proxy = scrape(targets["proxy"][0].address)
    assert value(proxy, "kizo_proxy_toxics_active", proxy="obs", type="latency") == 1
    assert value(proxy, "kizo_proxy_toxics_active", proxy="obs", type="timeout") == 0


def _served_by_pid(directory: Path) -> dict[str, float]:
    """Requests counted by each API process, read from its own multiprocess file."""
    served: dict[str, float] = {}
    for path in directory.glob("counter_*.db"):
        values = MmapedDict.read_all_values_from_file(str(path))  # type: ignore[no-untyped-call]
        served[path.stem.rsplit("_", 1)[-1]] = sum(
            v for key, v, _ts, _pos in values if json.loads(key)[1] == "kizo_http_requests_total"
        )
    return served


def test_the_api_counts_add_up_across_its_worker_processes(live: Run) -> None:
    address = live.system.api_url.removeprefix("http://")
    directory = live.system.config.home / "metrics" / f"api-{live.system.config.api_port}"
    health = 0
    with fresh() as http:  # until both workers have served (the kernel picks), bounded
        while len([n for n in _served_by_pid(directory).values() if n]) < 2 and health < 300:
            assert http.get(f"{live.system.api_url}/health").status_code == 200
            health += 1
    assert len([n for n in _served_by_pid(directory).values() if n]) == 2
    reads = []
    for _ in range(6):  # each scrape answered by either worker: the same sums
        families = scrape(address)
        reads.append((
            value(families, "kizo_http_requests_total", route="/api/v1/accounts/me", method="GET",
                  status="200"),
            value(families, "kizo_http_request_duration_seconds_count", route="/api/v1/accounts/me",
                  method="GET"),
            value(families, "kizo_http_requests_total", route="/health", method="GET"),
            value(families, "kizo_http_requests_total", route="/api/v1/auth/signup",
                  method="POST", status="201"),
        ))  # fmt: skip
    # ME_READS, plus the one that found the transfer's recipient; the health checks of the
    # system's start (at least one) and of this test.
    assert len(set(reads)) == 1, reads
    me, timed, healthy, signups = reads[0]
    assert (me, timed, signups) == (ME_READS + 1, ME_READS + 1, 3)
    assert healthy >= health + 1


def test_label_values_are_bounded(live: Run) -> None:
    """Route templates, never raw paths; no id of a user, account, transaction or job."""
    for targets in _targets(live.system).values():
        for target in targets:
            for family in scrape(target.address).values():
                for sample in family.samples:
                    for label, v in sample.labels.items():
                        assert not UUID.search(v), (target.process, sample.name, label, v)
    api = scrape(live.system.api_url.removeprefix("http://"))
    routes = {s.labels["route"] for s in api["kizo_http_requests_total"].samples}
    assert "/api/v1/transactions/<txn_id>" in routes
    assert "unmatched" in routes


def _log_lines(system: System) -> dict[str, list[str]]:
    logs = system.config.home / "logs"
    return {p.stem: p.read_text().splitlines() for p in sorted(logs.glob("*.log"))}


def test_every_process_logs_json_with_its_ids_bound(live: Run) -> None:
    events: list[dict[str, Any]] = []
    for process, lines in _log_lines(live.system).items():
        for line in filter(None, lines):
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                pytest.fail(f"{process} logged a line that is not JSON: {line[:200]}")
            assert {"timestamp", "level", "event", "process"} <= event.keys(), event
            events.append(event)
    accepted = [e for e in events if e["event"] == "payment_accepted"]
    assert len(accepted) == len(live.txn_ids)
    assert {e["txn_id"] for e in accepted} == set(live.txn_ids)
    assert all(e["user_id"] in live.user_ids and e["request_id"] for e in accepted)
    assert sum(e["event"] == "signed_in" for e in events) == 3
    passes = [e for e in events if e["event"] == "janitor_pass"]
    assert passes and {"redriven", "needs_attention", "findings", "duration_ms"} <= passes[0].keys()


def test_no_secret_is_ever_logged(live: Run) -> None:
    assert len(live.secrets) > 15
    texts = {**{p: "\n".join(lines) for p, lines in _log_lines(live.system).items()},
             "kizo keys rotate": live.rotate_output}  # fmt: skip
    assert sum(len(t) for t in texts.values()) > 1000  # there are logs to scan
    for process, text in texts.items():
        decoded = urllib.parse.unquote(text)
        for what, secret in live.secrets.items():
            assert secret not in text and secret not in decoded, f"{what} in {process}'s log"


def test_the_chaos_runner_serves_its_fault_windows(tmp_path: Path) -> None:
    system_target = Target("worker", "worker-0", "127.0.0.1:1")
    with serving("obs-scenario", 4, "127.0.0.1", 0, tmp_path, [system_target]) as runner:
        listed = json.loads(next(targets_dir(tmp_path).glob("chaos-*.json")).read_text())
        assert {g["labels"]["role"] for g in listed} == {"chaos", "worker"}
        assert all(g["labels"]["system"] == "chaos" for g in listed)
        address = next(g["targets"][0] for g in listed if g["labels"]["role"] == "chaos")
        _steps(runner)
        families = scrape(address)
        assert not catalogue()["chaos"] - families.keys()
        windows = {(s.labels["fault"], s.labels["target"]): s.value
                   for s in families["kizo_chaos_fault_active"].samples
                   if s.labels["scenario"] == "obs-scenario"}  # fmt: skip
        assert windows == {("latency", "postgres"): 0, ("killed", "worker-0"): 1,
                           ("bank_faults", "bank"): 1}  # fmt: skip
        assert value(families, "kizo_chaos_step", scenario="obs-scenario") == 4
        assert value(families, "kizo_chaos_run_active", scenario="obs-scenario") == 1
    assert not list(targets_dir(tmp_path).glob("*.json"))  # gone with the run


def _steps(runner: RunnerMetrics) -> None:
    toxic = {"type": "latency", "stream": "downstream", "attributes": {"latency": 30}}
    runner.observe(Step(0, "toxic", "postgres", toxic), 200)
    runner.observe(Step(1, "kill", "worker-0"), "killed")
    runner.observe(Step(2, "bank_faults", "", {"faults": {"error_rate": 0.1}}), 200)
    runner.observe(Step(3, "remove_toxic", "postgres", {"name": "latency_downstream"}), 204)


class _AnnotationsApi(http.server.BaseHTTPRequestHandler):
    """Grafana's POST /api/annotations as its HTTP API documents it: 200 with an id, 401
    without the expected token."""

    received: ClassVar[list[tuple[str, dict[str, Any]]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append((self.headers.get("Authorization", ""), body))
        ok = self.path == "/api/annotations" and self.headers.get("Authorization") == "Bearer t0k"
        answer = json.dumps({"id": len(self.received)} if ok else {"message": "Unauthorized"})
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(answer.encode())

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.mark.parametrize("token", ["t0k", "wrong"])
def test_fault_windows_become_grafana_region_annotations(tmp_path: Path, token: str) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AnnotationsApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _AnnotationsApi.received.clear()
    grafana = Grafana(f"http://127.0.0.1:{server.server_port}", token)
    try:
        with serving("obs-scenario", 4, "127.0.0.1", 0, None, [], grafana) as runner:
            _steps(runner)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    bodies = [body for _auth, body in _AnnotationsApi.received]
    if token != "t0k":  # refused: one attempt, the run unharmed
        assert len(bodies) == 1
        return
    assert {(b["text"].split(" ")[0], b["text"].split(" ")[2]) for b in bodies} == {
        ("latency", "postgres"), ("killed", "worker-0"), ("bank_faults", "bank")}  # fmt: skip
    for body in bodies:
        assert body["dashboardUID"] == "kizo-incident"
        assert 0 < body["time"] <= body["timeEnd"] and "scenario:obs-scenario" in body["tags"]
