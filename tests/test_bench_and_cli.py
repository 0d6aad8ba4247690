"""The benchmark's real code path on a small run, and the CLI's behaviour as users meet it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from infra.servers import EmbeddedPostgres, free_port
from kizo.bench_ledger import LedgerBenchParams, bench_on_server
from tests._imports import recorded_modules, recording_env
from tests.conftest import ServerSet

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.asyncio
async def test_bench_ledger_measures_both_workloads_and_pgbench(servers: ServerSet) -> None:
    if servers.pg is None:
        pytest.skip("needs the embedded server (pgbench connects over TCP to it)")
    params = LedgerBenchParams(
        transfers=600, accounts=50, batch_size=50, clients=2, pgbench_seconds=1, pgbench_scale=1
    )
    report = await bench_on_server(servers.pg.host, servers.pg.port, params)
    for key in ("random_transfers_per_s", "hot_transfers_per_s", "pgbench_tps"):
        assert report[key] > 0
    # the report divides the unrounded rates; the figures it prints are rounded to 0.1
    assert report["random_vs_pgbench"] == pytest.approx(
        report["random_transfers_per_s"] / report["pgbench_tps"], abs=0.011
    )
    assert report["hot_transfers_per_s"] == min(
        report["hot_dest_transfers_per_s"], report["hot_source_transfers_per_s"]
    )
    assert report["params"]["transfers"] == 600


def test_bench_proxy_compares_pgbench_direct_and_through_a_proxy_process(
    servers: ServerSet,
) -> None:
    """The comparison's machinery on a tiny run; no figure is judged here."""
    if servers.pg is None:
        pytest.skip("needs the embedded server (pgbench connects over TCP to it)")
    from kizo.bench_proxy import ProxyBenchParams, bench_on_server

    params = ProxyBenchParams(clients=2, window_seconds=1, pairs=2, pgbench_scale=1)
    report = bench_on_server(servers.pg.host, servers.pg.port, params)
    for workload in ("tpcb_like", "select_only"):
        direct, proxied = report[f"{workload}_direct_tps"], report[f"{workload}_proxied_tps"]
        assert len(direct) == len(proxied) == 2 and min(direct + proxied) > 0
        assert report[f"{workload}_ratio"] > 0
        assert len(report[f"{workload}_ratios"]) == 2
    # The proxied windows went through the proxy: it passed bytes both ways.
    assert report["proxied_bytes"]["upstream"] > 0 and report["proxied_bytes"]["downstream"] > 0


def test_bench_api_compares_payment_latency_with_and_without_a_signin_flood() -> None:
    """The comparison's machinery on a small run; no figure is judged here (benchmarks print
    them, docs/benchmarks.md)."""
    from kizo.bench_api import ApiBenchParams, run

    params = ApiBenchParams(users=6, clients=4, seconds=1, rate=40, flood=3, windows=2,
                            window_seconds=1, pgbench_seconds=1)  # fmt: skip
    report = run(params)
    t, f = report["throughput"], report["signin_flood"]
    accepted = t["statuses"].get("202", 0)
    assert t["statuses"] == {"202": accepted} and t["settled"] == accepted > 0
    assert set(f["payment_statuses"]["base"]) == set(f["payment_statuses"]["flood"]) == {"202"}
    assert f["base_payments"] > 0 and f["flood_payments"] > 0
    # The ratio is of the unrounded p99s; the printed p99s are rounded to 0.1 ms.
    assert f["flood_vs_base_p99"] == pytest.approx(f["flood_p99_ms"] / f["base_p99_ms"], abs=0.03)
    assert f["signin_statuses"].get("200", 0) > 0
    assert set(f["signin_statuses"]) <= {"200", "503"}
    # Every answer is counted and timed, not only the 202s.
    assert t["answer_classes"]["202"] == accepted == sum(t["answer_classes"].values())
    assert t["all_latency_p99_ms"] >= t["latency_p50_ms"]
    assert f["base_answers"] == f["base_payments"] and f["flood_answers"] == f["flood_payments"]


@pytest.mark.asyncio
async def test_bench_api_counts_and_times_every_answer_errors_and_timeouts_included() -> None:
    from infra.http1 import HttpClient
    from kizo.bench_api import Tally, answer

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        path = head.split(b" ", 2)[1].decode()
        if path == "/hang":
            await asyncio.sleep(3600)  # no answer: the client's timeout
        writer.write(f"HTTP/1.1 {path[1:]} X\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = HttpClient(f"http://127.0.0.1:{port}", connections=8, timeout_s=0.5)
    refused = HttpClient(f"http://127.0.0.1:{free_port()}", connections=1, timeout_s=0.5)
    tally = Tally()
    try:
        for path in ("/202", "/202", "/404", "/429", "/500", "/503", "/hang"):
            tally.add((await answer(client.get(path)))[0], 1.0)
        tally.add((await answer(refused.get("/")))[0], 1.0)
    finally:
        await client.aclose()
        server.close()
    assert tally.statuses == {"202": 2, "404": 1, "429": 1, "500": 1, "503": 1,
                              "connection_error": 1, "timeout": 1}  # fmt: skip
    assert tally.classes() == {"202": 2, "other_2xx": 0, "4xx": 1, "429": 1, "503": 1, "5xx": 1,
                               "timeout": 1, "connection_error": 1}  # fmt: skip
    assert (len(tally.latencies_ms), len(tally.accepted_ms)) == (8, 2)


def _kizo(
    *args: str, env: dict[str, str] | None = None, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kizo.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["bench", "ledger", "--transfers", "-5"], {}, "--transfers"),
        (["bench", "nothing"], {}, "invalid choice"),
        (["migrate"], {"KIZO_SHARDS": "many"}, "KIZO_SHARDS must be an integer"),
        (["migrate"], {"KIZO_CURRENCY": "dollars"}, "KIZO_CURRENCY"),
        (["migrate"], {"KIZO_BANK_URL": "ftp://bank"}, "KIZO_BANK_URL must be an http"),
        (["chaos", "run"], {}, "needs a scenario"),
        (["chaos", "run", "no-such"], {}, "no scenario 'no-such'"),
        (["no-such-command"], {}, "invalid choice"),
        (["chaos", "bank", "--users", "1"], {}, "argument --users: must be between 2 and 500"),
        (["chaos", "bank", "--mutation", "everything"], {}, "invalid choice"),
        (["bench", "api", "--flood", "0"], {}, "--flood"),
        (["proxy"], {"KIZO_PROXY_FILE": "/nonexistent/proxies.json"}, "cannot read"),
        (["proxy"], {"KIZO_PROXY_FILE": str(ROOT / "pyproject.toml")}, "cannot read"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    args: list[str], env: dict[str, str], message: str
) -> None:
    result = _kizo(*args, env=env)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


_NOWHERE = {"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/kizo",
            "REDIS_URL": "redis://127.0.0.1:1/0"}  # fmt: skip


@pytest.mark.parametrize("args", [["worker"], ["janitor", "--once"], ["migrate"], ["bank"]])
def test_a_server_that_does_not_answer_is_one_line_and_exit_1(args: list[str]) -> None:
    result = _kizo(*args, env=_NOWHERE)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Connection refused" in result.stderr


@pytest.mark.parametrize("args", [["chaos", "list"], ["--help"], ["chaos", "--help"]])
def test_a_reader_that_closed_the_pipe_gets_a_quiet_exit(args: list[str]) -> None:
    # As `kizo chaos list | head -1`, with the reader gone before the first byte: not a
    # server problem, nothing on stderr, exit 0.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "kizo.cli", *args], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=60, cwd=ROOT,
                                check=False)  # fmt: skip
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (0, "")


def _descendants_alive(pid: int) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if p.is_running()]
    except psutil.NoSuchProcess:
        return []


def _prometheus_scrapes_every_child(url: str) -> None:
    """kizo up's Prometheus found its children through file_sd and scrapes them (bounded)."""
    wanted = {"api", "worker-0", "janitor", "bank", "proxy"}
    healthy: set[str] = set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and healthy != wanted:
        targets = httpx.get(f"{url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        healthy = {t["labels"]["process"] for t in targets
                   if t["health"] == "up" and t["labels"].get("system") == "up"}  # fmt: skip
        time.sleep(0.5)
    assert healthy == wanted


def _valkey_answers_through_the_fault_proxy(env: dict[str, str]) -> None:
    """``kizo up``'s fault proxy serves the file's proxies, upstreams set to this system."""
    proxies = httpx.get(f"http://127.0.0.1:{env['KIZO_PROXY_API_PORT']}/proxies").json()
    assert sorted(proxies) == ["bank", "postgres", "redis"]
    assert proxies["redis"]["upstream"] == f"127.0.0.1:{env['KIZO_REDIS_PORT']}"
    assert proxies["postgres"]["upstream"] == f"127.0.0.1:{env['KIZO_PG_PORT']}"
    port = int(proxies["redis"]["listen"].rsplit(":", 1)[1])
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    try:
        assert client.ping() is True
    finally:
        client.close()


def _deposit_settles_end_to_end(api: str) -> None:
    """Through the live system: HTTP -> intent -> SAQ -> worker -> bank -> ledger."""
    with httpx.Client(base_url=api, timeout=10) as http:
        signup = http.post(
            "/api/v1/auth/signup",
            json={"email": "e2e@example.test", "password": "long enough pw", "name": "E"},
        )
        assert signup.status_code == 201, signup.text
        auth = {"Authorization": f"Bearer {signup.json()['access_token']}"}
        deposit = http.post(
            "/api/v1/payments/deposit",
            json={"amount": 4200},
            headers=auth | {"Idempotency-Key": "e2e-1"},
        )
        assert deposit.status_code == 202
        deadline = time.monotonic() + 30
        while http.get("/api/v1/accounts/me", headers=auth).json()["available"] != 4200:
            assert time.monotonic() < deadline, "the deposit did not settle"
            time.sleep(0.1)
        txn = http.get(f"/api/v1/transactions/{deposit.json()['id']}", headers=auth).json()
        assert txn["status"] == "settled"


def test_kizo_up_starts_prints_ready_and_ctrl_c_stops_everything() -> None:
    home = tempfile.mkdtemp(prefix="kizo-up-")
    shipped = json.loads((ROOT / "toxiproxy" / "toxiproxy.json").read_text())
    proxy_file = Path(home) / "proxies.json"  # the shipped proxies on free ports
    proxy_file.write_text(
        json.dumps([{**p, "listen": f"127.0.0.1:{free_port()}"} for p in shipped])
    )
    env = {
        **os.environ,
        "KIZO_HOME": home,
        "KIZO_PG_PORT": str(free_port()),
        "KIZO_REDIS_PORT": str(free_port()),
        "KIZO_API_PORT": str(free_port()),
        "KIZO_BANK_PORT": str(free_port()),
        "KIZO_JANITOR_METRICS_PORT": str(free_port()),
        "KIZO_WORKER_METRICS_PORT": str(free_port()),
        "KIZO_PROXY_API_PORT": str(free_port()),
        "KIZO_PROMETHEUS_PORT": str(free_port()),
        "KIZO_PROXY_FILE": str(proxy_file),
        "KIZO_PG_FSYNC": "off",
    }
    for name in ("DATABASE_URL", "REDIS_URL", "KIZO_PEPPER", "KIZO_KEYRING_KEY"):
        env.pop(name, None)  # embedded servers, and the secrets kizo up makes for them
    records = Path(home) / "modules"
    records.mkdir()
    env = recording_env(records, env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kizo.cli", "up"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    servers: list[psutil.Process] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        output = "".join(lines)
        assert "ready" in output, output
        assert "PostgreSQL  postgresql://" in output
        api = f"http://127.0.0.1:{env['KIZO_API_PORT']}"
        for page in ("/app ", "/app/console ", "/docs "):  # the ready block names the pages
            assert f"{api}{page}" in output, output
            assert httpx.get(f"{api}{page.strip()}", timeout=10).status_code == 200
        assert "kizo admin create EMAIL" in output
        for child in ("proxy", "bank", "worker-0", "janitor", "api"):
            assert f"starting {child}" in output
        _deposit_settles_end_to_end(f"http://127.0.0.1:{env['KIZO_API_PORT']}")
        worker = httpx.get(f"http://127.0.0.1:{env['KIZO_WORKER_METRICS_PORT']}/metrics", timeout=5)
        assert "kizo_worker_shards_owned 8.0" in worker.text
        up_targets = Path(home) / "prometheus" / "targets" / "up.json"  # Prometheus's file_sd
        listed = {g["labels"]["process"]: g["targets"][0]
                  for g in json.loads(up_targets.read_text())}  # fmt: skip
        assert listed.keys() == {"proxy", "bank", "worker-0", "janitor", "api"}
        assert listed["worker-0"] == f"127.0.0.1:{env['KIZO_WORKER_METRICS_PORT']}"
        for secret in ("pepper", "keyring-key"):  # made by kizo up, readable by its user only
            assert stat.S_IMODE((Path(home) / secret).stat().st_mode) == 0o600
        _valkey_answers_through_the_fault_proxy(env)
        assert f"prometheus  http://127.0.0.1:{env['KIZO_PROMETHEUS_PORT']}" in output
        _prometheus_scrapes_every_child(f"http://127.0.0.1:{env['KIZO_PROMETHEUS_PORT']}")
        servers = _descendants_alive(proc.pid)
        names = " ".join(p.name() for p in servers)
        assert "postgres" in names
        assert "valkey" in names
        assert "prometheus" in names
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        assert not up_targets.exists()  # a stopped system is no target
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()  # a failed assertion above must not leave the pipe to the GC
        home_mode = stat.S_IMODE(Path(home).stat().st_mode)
        loaded = recorded_modules(records, proc.pid)
        EmbeddedPostgres(Path(home) / "pgdata", 0).remove_data()
        shutil.rmtree(home)
    assert proc.returncode == 0, rest
    assert "stopping servers" in rest
    assert home_mode == 0o700, "kizo up changed the permissions of its (private) home"
    # kizo up itself (its children include the bank and the proxy, which are the harness's)
    assert "kizo.supervisor" in loaded, loaded
    assert not [m for m in loaded if m.startswith("chaos")], f"kizo up loaded {sorted(loaded)}"
    _gone, alive = psutil.wait_procs(servers, timeout=30)
    assert alive == [], f"left running: {alive}"
