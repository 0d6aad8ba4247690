"""``kizo bench proxy``: what the fault proxy costs, with no toxics, against pgbench direct.

Setup (untimed): an embedded PostgreSQL of our own, one pgbench database, and a ``kizo proxy``
process (as users run it: its own process, driven over its Toxiproxy HTTP API) with one proxy in
front of the server. Timed: for each workload (tpcb-like, select-only) ``pairs`` pairs of
pgbench windows, ``clients`` clients each, one direct and one through the proxy, alternating, so
the noisy shared machine weighs on both sides alike. The figure per workload is the median of
the pairs' ratios (proxied TPS / direct TPS).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from infra import aio
from infra.processes import Child, start_child
from infra.servers import EmbeddedPostgres, free_port, stop_process
from kizo.bench_ledger import admin_sql, pgbench_init, pgbench_tps

HOST = "127.0.0.1"
API_TIMEOUT_S = 10.0
WORKLOADS = ("tpcb_like", "select_only")


@dataclass(frozen=True)
class ProxyBenchParams:
    clients: int = 8
    window_seconds: int = 4
    pairs: int = 3
    pgbench_scale: int = 10


def _api(base: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    reply = httpx.request(method, f"{base}{path}", json=body, timeout=API_TIMEOUT_S)
    reply.raise_for_status()
    return reply.json() if reply.content else None


def _start_proxy(stack: ExitStack, home: str, upstream: str) -> tuple[str, int]:
    """A ``kizo proxy`` process with one proxy, ``pg``, in front of the server; returns the API's
    address and the proxy's port."""
    api_port = free_port()
    env = dict(os.environ, KIZO_PROXY_API_PORT=str(api_port), KIZO_PROXY_FILE="none",
               KIZO_HOST=HOST)  # fmt: skip
    log = stack.enter_context(open(Path(home) / "proxy.log", "wb"))  # noqa: SIM115 (the stack closes it)
    base = f"http://{HOST}:{api_port}"
    proc = start_child(Child("proxy", ["proxy"], f"{base}/version"), env, log)
    stack.callback(stop_process, proc)
    created = _api(base, "POST", "/proxies", {"name": "pg", "listen": f"{HOST}:0",
                                              "upstream": upstream})  # fmt: skip
    return base, int(str(created["listen"]).rsplit(":", 1)[1])


def _windows(host: str, pg_port: int, proxy_port: int, database: str, p: ProxyBenchParams
             ) -> dict[str, dict[str, list[float]]]:  # fmt: skip
    """TPS of every window: ``{workload: {"direct": [...], "proxied": [...]}}``."""
    tps: dict[str, dict[str, list[float]]] = {}
    for workload in WORKLOADS:
        runs: dict[str, list[float]] = {"direct": [], "proxied": []}
        for _ in range(p.pairs):
            for side, port in (("direct", pg_port), ("proxied", proxy_port)):
                runs[side].append(pgbench_tps(host, port, database, p.clients, p.window_seconds,
                                              select_only=workload == "select_only"))  # fmt: skip
        tps[workload] = runs
    return tps


def report_of(tps: dict[str, dict[str, list[float]]], p: ProxyBenchParams,
              proxied_bytes: dict[str, int]) -> dict[str, Any]:  # fmt: skip
    report: dict[str, Any] = {}
    for workload, runs in tps.items():
        ratios = [b / a for a, b in zip(runs["direct"], runs["proxied"], strict=True)]
        report[f"{workload}_ratio"] = round(statistics.median(ratios), 2)
        report[f"{workload}_ratios"] = [round(r, 2) for r in ratios]
        report[f"{workload}_direct_tps"] = [round(t, 1) for t in runs["direct"]]
        report[f"{workload}_proxied_tps"] = [round(t, 1) for t in runs["proxied"]]
    report["proxied_bytes"] = proxied_bytes
    report["params"] = {"clients": p.clients, "window_seconds": p.window_seconds,
                        "pairs": p.pairs, "pgbench_scale": p.pgbench_scale}  # fmt: skip
    return report


def _proxied_bytes(metrics: str) -> dict[str, int]:
    """The proxy's own byte counters, from its metrics (a check that the traffic went through
    it)."""
    counted: dict[str, int] = {}
    for line in metrics.splitlines():
        if line.startswith("kizo_proxy_bytes_total{"):
            stream = line.split('stream="', 1)[1].split('"', 1)[0]
            counted[stream] = int(float(line.rsplit(" ", 1)[1]))
    return counted


def _metrics(base: str) -> str:
    reply = httpx.get(f"{base}/metrics", timeout=API_TIMEOUT_S)
    reply.raise_for_status()
    return reply.text


def bench_on_server(host: str, port: int, p: ProxyBenchParams) -> dict[str, Any]:
    """The windows against the server at ``host:port``, in a pgbench database of their own
    (dropped after), through a ``kizo proxy`` process started for them."""
    base = f"postgresql://postgres@{host}:{port}"
    database = f"kizo_pgbench_{uuid.uuid4().hex[:8]}"
    aio.run(admin_sql(base, f"CREATE DATABASE {database}"))
    try:
        pgbench_init(host, port, database, p.pgbench_scale)
        with tempfile.TemporaryDirectory(prefix="kizo-bench-proxy-") as home, ExitStack() as stack:
            api, proxy_port = _start_proxy(stack, home, f"{host}:{port}")
            tps = _windows(host, port, proxy_port, database, p)
            return report_of(tps, p, _proxied_bytes(_metrics(api)))
    finally:
        aio.run(admin_sql(base, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))


def run(p: ProxyBenchParams) -> dict[str, Any]:
    """On an embedded server of our own."""
    with tempfile.TemporaryDirectory(prefix="kizo-bench-") as home:
        pg = EmbeddedPostgres(Path(home) / "pgdata", free_port())
        try:
            pg.start()
            return bench_on_server(pg.host, pg.port, p)
        finally:
            pg.stop()
            pg.remove_data()  # run by root, the data lives outside the temporary directory


def table(report: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={v}" for k, v in report["params"].items())
    lines = [f"kizo bench proxy, no toxics ({params})"]
    for workload in WORKLOADS:
        lines.append(f"  {workload:<12} proxied / direct {report[f'{workload}_ratio']:.2f}"
                     f"  (pairs {report[f'{workload}_ratios']})")  # fmt: skip
        lines.append(f"  {'':<12} direct TPS  {report[f'{workload}_direct_tps']}")
        lines.append(f"  {'':<12} proxied TPS {report[f'{workload}_proxied_tps']}")
    return "\n".join(lines)
