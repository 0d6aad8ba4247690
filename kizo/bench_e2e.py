"""``kizo bench e2e``: the Node original's own load test against a scratch system, with its
figures side by side (docs/benchmarks.md, "kizo bench e2e").

Setup, untimed: ``users`` accounts with one password (hashed once, inserted directly), one
merchant everyone pays, and a treasury that funds every account through the API; all settle.
Profiles (loadtests/original_mix.py, locust headless; rate limits off, as the original has none):
- seed: ``seed_users`` users sign in every loop, think 1 s; ``ramp_s`` ramp, ``hold_s`` hold.
  Rates and latencies are of the hold.
- capacity: signed in once, no think; users stepped up (``steps``, ``step_s`` each). The
  figure is the highest step throughput whose payment p99 stays under ``PAYMENT_P99_BAR_MS``.
After each profile, the settlement truth: every accepted payment's key matched against the
ledger once nothing is pending (bounded wait). Every request is logged by the clients, so every
status counts (no answer = status 0).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from infra.config import PoolsConfig
from infra.db import create_pool
from infra.http1 import HttpClient, Reply
from infra.system import System, links_of, scratch_system
from kizo.bench_api import percentile

LOADTESTS = Path(__file__).resolve().parents[1] / "loadtests"
PASSWORD = "e2e-password-1"  # noqa: S105 (the bench users' own, made up)
FUND_MINOR = 100_000  # each loop deposits 100 and pays 10: never short
# The mock bank's opening balances must cover the treasury's one deposit of everyone's money.
BANK_OPENING_MINOR = 10**15
SETUP_CONCURRENCY = 16
SETTLE_WAIT_S_MAX = 180.0
LOCUST_GRACE_S = 120.0
PAYMENT_P99_BAR_MS = 100.0
PAYMENTS = ("deposit", "transfer")
# The Node original under this same driver (issue 12; /work/shared/FACTS.md, 2026-12-01).
ORIGINAL_SIGNINS_PER_S = 5.6
ORIGINAL: dict[str, dict[str, Any]] = {
    "seed": {"req_per_s": "28–29", "signins_served_per_s": 5.6, "signin_wait_s": "9–10 (p99)",
             "payment_p99_ms": "4,600", "unsettled": "13–16 % of transfers"},
    "capacity": {"req_per_s": "46–61", "payment_p50_ms": "1,400–2,000",
                 "payment_p99_ms": "4,300–5,000", "unsettled": "25–28 % of transfers"},
}  # fmt: skip


@dataclass(frozen=True)
class E2eParams:
    users: int = 2000
    seed_users: int = 100
    ramp_s: int = 20
    hold_s: int = 60
    steps: tuple[int, ...] = (10, 20, 40, 60, 80, 100)
    step_s: int = 15
    api_workers: int = 2  # 2 beat 1 on 2 cores (docs/benchmarks.md, kizo bench e2e)
    # Worker processes: with one, the worker's share of 2 busy cores (the scheduler shares by
    # process) left settlement behind the API under the capacity mix (docs/benchmarks.md).
    workers: int = 2
    profiles: tuple[str, ...] = ("seed", "capacity", "recovery")
    out: str = "bench-e2e"


@dataclass
class Setup:
    merchant: str
    emails_file: Path
    accounts: int


@dataclass
class Request:
    at: float  # epoch seconds at the start
    route: str
    status: int
    ms: float


@dataclass
class Run:
    profile: str
    started: float
    ended: float
    requests: list[Request]
    keys: list[str]
    cpu_s: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)


# Setup


async def _setup(system: System, p: E2eParams, tmp: Path) -> Setup:
    from api import _service as svc
    from api._auth import hash_now

    config = system.config
    stored = await asyncio.to_thread(hash_now, config.auth, PASSWORD)
    currency = config.ledger.currency
    pool = await create_pool(system.database_url, min_size=1, max_size=4,
                             acquire_timeout_s=PoolsConfig.wait_s)  # fmt: skip
    slots = asyncio.Semaphore(4)
    run_id = uuid.uuid4().hex[:8]

    async def user(label: str) -> Any:
        async with slots:
            return await svc.create_user(pool, f"{label}-{run_id}@example.test", label,
                                         stored, currency)  # fmt: skip

    try:
        merchant, treasury = await user("merchant"), await user("treasury")
        users = await asyncio.gather(*(user(f"u{i}") for i in range(p.users)))
        client = HttpClient(system.api_url, SETUP_CONCURRENCY + 2)
        try:
            await _fund(client, treasury.email, [u.account_id for u in users])
        finally:
            await client.aclose()
        await wait_final(pool, 0.0)
    finally:
        await pool.close()
    emails = tmp / "emails"
    emails.write_text("\n".join(u.email for u in users) + "\n")
    return Setup(str(merchant.account_id), emails, len(users))


async def _fund(client: HttpClient, treasury: str, accounts: Sequence[Any]) -> None:
    """The treasury deposits everyone's money, then pays each account its share."""
    r = _ok(await client.post("/api/v1/auth/signin", {"email": treasury, "password": PASSWORD}))
    auth = {"Authorization": f"Bearer {r.json()['access_token']}"}
    _ok(await client.post("/api/v1/payments/deposit", {"amount": FUND_MINOR * len(accounts)},
                          {**auth, "Idempotency-Key": "fund"}))  # fmt: skip
    for _ in range(600):  # bounded: 60 s for one deposit through the bank
        me = _ok(await client.get("/api/v1/accounts/me", auth)).json()
        if me["available"] >= FUND_MINOR * len(accounts):
            break
        await asyncio.sleep(0.1)
    else:
        raise RuntimeError("the treasury's deposit did not settle within 60 s")
    slots = asyncio.Semaphore(SETUP_CONCURRENCY)

    async def pay(account: Any) -> None:
        async with slots:
            _ok(await client.post("/api/v1/payments/transfer",
                                  {"to": str(account), "amount": FUND_MINOR},
                                  {**auth, "Idempotency-Key": f"fund-{account}"}))  # fmt: skip

    await asyncio.gather(*(pay(a) for a in accounts))


def _ok(reply: Reply) -> Reply:
    if not 200 <= reply.status < 300:
        raise RuntimeError(f"setup request failed: {reply.status} {reply.body[:200]!r}")
    return reply


async def wait_final(pool: asyncpg.Pool, since: float) -> float:
    """Wait (bounded) until nothing created since ``since`` (epoch s) is pending; returns
    the seconds waited."""
    started = time.monotonic()
    await _until_none_open(pool, ">=", since)
    return time.monotonic() - started


async def _until_none_open(pool: asyncpg.Pool, created: str, wall: float) -> None:
    """Wait (bounded) until no transaction created ``created`` (">=" or "<") the epoch
    second ``wall`` is pending or processing."""
    assert created in (">=", "<")
    started = time.monotonic()
    while await pool.fetchval(
        f"SELECT count(*) FROM transactions WHERE created_at {created} to_timestamp($1)"
        " AND status IN ('pending', 'processing')", wall,
    ):  # fmt: skip
        if time.monotonic() - started > SETTLE_WAIT_S_MAX:
            break
        await asyncio.sleep(0.1)


# One profile


def cpu_by_process(system: System) -> dict[str, float]:
    """CPU seconds (user + system) so far of every process of the system, by role: the
    descendants of this process (servers and children), each counted under the child of
    ``system.procs`` it descends from; PostgreSQL, Valkey and hashing processes apart."""
    roles = {proc.pid: child.name for child, proc in system.procs}
    totals: dict[str, float] = defaultdict(float)
    for proc in psutil.Process().children(recursive=True):
        try:
            role = _role(proc, roles)
            times = proc.cpu_times()
        except psutil.Error:
            continue
        if role:
            totals[role] += times.user + times.system
    return dict(totals)


def _role(proc: psutil.Process, roles: dict[int, str]) -> str:
    cmd = " ".join(proc.cmdline())
    if "api._hashing" in cmd:
        return "hashing"
    if "postgres" in proc.name() or "postgres" in cmd.split(" ", 1)[0]:
        return "postgres"
    if "valkey" in proc.name():
        return "valkey"
    for ancestor in (proc, *proc.parents()):
        if ancestor.pid in roles:
            return roles[ancestor.pid].split("-")[0]
    return ""


def _locust_cmd(profile: str, p: E2eParams, system: System) -> tuple[list[str], float]:
    base = [sys.executable, "-m", "locust", "--headless", "--host", system.api_url,
            "--only-summary", "--loglevel", "ERROR", "--stop-timeout", "10"]  # fmt: skip
    if profile == "seed":
        seconds = p.ramp_s + p.hold_s
        spawn = max(1, round(p.seed_users / p.ramp_s))
        return [*base, "-f", str(LOADTESTS / "original_mix.py"), "-u", str(p.seed_users),
                "-r", str(spawn), "-t", f"{seconds}s", "SeedUser"], seconds  # fmt: skip
    return [*base, "-f", str(LOADTESTS / "capacity.py")], len(p.steps) * p.step_s


def run_profile(system: System, setup: Setup, profile: str, p: E2eParams, tmp: Path) -> Run:
    log, keys = tmp / f"{profile}.requests.csv", tmp / f"{profile}.keys"
    env = {**os.environ, "KIZO_LOAD_USERS_FILE": str(setup.emails_file),
           "KIZO_LOAD_PASSWORD": PASSWORD, "KIZO_LOAD_MERCHANT": setup.merchant,
           "KIZO_LOAD_LOG": str(log), "KIZO_LOAD_KEYS_FILE": str(keys),
           "KIZO_LOAD_STEPS": ",".join(map(str, p.steps)),
           "KIZO_LOAD_STEP_S": str(p.step_s)}  # fmt: skip
    cmd, seconds = _locust_cmd(profile, p, system)
    cpu_before, locust_before = cpu_by_process(system), _children_cpu_s()
    started = time.time()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          timeout=seconds + LOCUST_GRACE_S, check=False)  # fmt: skip
    ended = time.time()
    cpu_after = cpu_by_process(system)
    if not log.exists():
        raise RuntimeError(f"locust did not run: {done.stderr.strip()[-800:]}")
    cpu = {k: round(v - cpu_before.get(k, 0.0), 1) for k, v in sorted(cpu_after.items())}
    cpu["locust"] = round(_children_cpu_s() - locust_before, 1)
    requests = [_parse(line) for line in log.read_text().splitlines() if line]
    accepted = keys.read_text().split() if keys.exists() else []
    return Run(profile, started, ended, requests, accepted, cpu)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _parse(line: str) -> Request:
    at, route, status, ms = line.split(",")
    return Request(float(at), route, int(status), float(ms))


async def settlement_truth(database_url: str, run: Run) -> dict[str, Any]:
    """Every accepted payment's key against the ledger, once nothing is pending (bounded)."""
    pool = await create_pool(database_url, min_size=1, max_size=2,
                             acquire_timeout_s=PoolsConfig.wait_s)  # fmt: skip
    try:
        waited_s = await wait_final(pool, run.started)
        rows = await pool.fetch(
            "SELECT k.key, t.status, t.failure_reason,"
            " extract(epoch FROM t.settled_at - t.created_at) AS lag"
            " FROM idempotency_keys k JOIN transactions t ON t.id = k.transaction_id"
            " WHERE k.key = ANY($1::text[])", run.keys,
        )  # fmt: skip
    finally:
        await pool.close()
    statuses = Counter(r["status"] for r in rows)
    lags_ms = [float(r["lag"]) * 1000 for r in rows if r["lag"] is not None]
    return {
        "accepted": len(run.keys),
        "settled": statuses.get("settled", 0),
        "failed": statuses.get("failed", 0),
        "failure_reasons": dict(Counter(r["failure_reason"] for r in rows if r["failure_reason"])),
        "unsettled": len(run.keys) - statuses.get("settled", 0),
        "not_in_ledger": len(run.keys) - len(rows),
        "final_after_s": round(waited_s, 1),
        "lag_p50_ms": round(percentile(lags_ms, 0.5), 1),
        "lag_p99_ms": round(percentile(lags_ms, 0.99), 1),
    }


# Figures


def routes(requests: Sequence[Request], seconds: float) -> dict[str, dict[str, Any]]:
    """Per route: count, per second, p50/p95/p99 of every answer, counts by status."""
    by_route: dict[str, list[Request]] = defaultdict(list)
    for r in requests:
        by_route[r.route].append(r)
    out = {}
    for route, rs in sorted(by_route.items()):
        ms = [r.ms for r in rs]
        out[route] = {
            "count": len(rs), "per_s": round(len(rs) / seconds, 1),
            "p50_ms": round(percentile(ms, 0.5), 1), "p95_ms": round(percentile(ms, 0.95), 1),
            "p99_ms": round(percentile(ms, 0.99), 1),
            "statuses": dict(sorted(Counter(str(r.status) for r in rs).items())),
        }  # fmt: skip
    return out


def _expected(route: str) -> int:
    return 202 if route in PAYMENTS else 200


def summary(requests: Sequence[Request], seconds: float) -> dict[str, Any]:
    payments = [r.ms for r in requests if r.route in PAYMENTS]
    errors = Counter(f"{r.route} {r.status}" for r in requests if r.status != _expected(r.route))
    signins = sum(1 for r in requests if r.route == "signin" and r.status == 200)
    return {
        "seconds": round(seconds, 1),
        "requests": len(requests),
        "req_per_s": round(len(requests) / seconds, 1),
        "payment_p50_ms": round(percentile(payments, 0.5), 1),
        "payment_p99_ms": round(percentile(payments, 0.99), 1),
        "signins_served_per_s": round(signins / seconds, 1),
        "errors": sum(errors.values()),
        "errors_by_route_status": dict(sorted(errors.items())),
        "routes": routes(requests, seconds),
    }


def steps(requests: Sequence[Request], started: float, p: E2eParams) -> list[dict[str, Any]]:
    """The capacity profile per step of users; the first 3 s of each step (users joining,
    signing in) are left out."""
    out = []
    for i, users in enumerate(p.steps):
        lo, hi = started + i * p.step_s + 3, started + (i + 1) * p.step_s
        rs = [r for r in requests if lo <= r.at < hi and r.route != "signin"]
        if rs:
            out.append({"users": users, **{k: v for k, v in summary(rs, hi - lo).items()
                                           if k != "routes"}})  # fmt: skip
    return out


def best_step(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    within = [s for s in rows if s["payment_p99_ms"] < PAYMENT_P99_BAR_MS and s["errors"] == 0]
    return max(within, key=lambda s: s["req_per_s"]) if within else None


def plot(run: Run, path: Path) -> None:
    """Throughput (by route) and payment latency p50/p99, per second of the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = int(run.ended - run.started) + 1
    counts: dict[str, list[int]] = defaultdict(lambda: [0] * seconds)
    paid: list[list[float]] = [[] for _ in range(seconds)]
    for r in run.requests:
        s = min(seconds - 1, max(0, int(r.at - run.started)))
        counts[r.route][s] += 1
        if r.route in PAYMENTS:
            paid[s].append(r.ms)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    xs = list(range(seconds))
    for route, ys in sorted(counts.items()):
        top.plot(xs, ys, label=route, linewidth=1)
    top.plot(xs, [sum(c[s] for c in counts.values()) for s in xs], label="all", color="black")
    top.set_ylabel("requests/s")
    top.legend(loc="upper left", fontsize=8)
    top.set_title(f"kizo bench e2e: {run.profile}")
    bottom.plot(xs, [percentile(v, 0.5) for v in paid], label="payment p50")
    bottom.plot(xs, [percentile(v, 0.99) for v in paid], label="payment p99")
    bottom.axhline(PAYMENT_P99_BAR_MS, color="red", linestyle=":", label="100 ms")
    bottom.set_ylabel("ms")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# The run and its report


def _profile_report(system: System, setup: Setup, profile: str, p: E2eParams, tmp: Path,
                    out: Path) -> dict[str, Any]:  # fmt: skip
    from infra import aio

    run = run_profile(system, setup, profile, p, tmp)
    truth = aio.run(settlement_truth(system.database_url, run))
    plot(run, out / f"{profile}.png")
    if profile == "seed":
        since = run.started + p.ramp_s
        figures = summary([r for r in run.requests if r.at >= since], run.ended - since)
        report: dict[str, Any] = {"hold": figures}
    else:
        rows = steps(run.requests, run.started, p)
        report = {"steps": rows, "best": best_step(rows),
                  "all": summary(run.requests, run.ended - run.started)}  # fmt: skip
    return {**report, "settlement": truth, "cpu_s": run.cpu_s,
            "plot": f"{profile}.png", "original": ORIGINAL[profile]}  # fmt: skip


def bars(report: dict[str, Any]) -> dict[str, bool]:
    """The issue's bars, each true or false (a profile not run has none)."""
    out = {}
    if seed := report.get("seed"):
        h, t = seed["hold"], seed["settlement"]
        out["seed: zero errors"] = h["errors"] == 0
        out["seed: zero unsettled"] = t["unsettled"] == 0
        out["seed: payment p99 < 100 ms"] = h["payment_p99_ms"] < PAYMENT_P99_BAR_MS
        out["seed: sign-ins/s >= 3x original"] = (
            h["signins_served_per_s"] >= 3 * ORIGINAL_SIGNINS_PER_S
        )
    if cap := report.get("capacity"):
        best, t = cap["best"], cap["settlement"]
        out["capacity: >= 5x original req/s at payment p99 < 100 ms"] = (
            best is not None and best["req_per_s"] >= 5 * ORIGINAL_CAPACITY_HIGH
        )
        out["capacity: zero unsettled"] = t["unsettled"] == 0
        out["capacity: zero errors"] = cap["all"]["errors"] == 0
    if rec := report.get("recovery"):
        out[f"recovery: drained within {RECOVERY_BAR_S:.0f} s of healing a Redis outage"] = (
            rec["redis_outage"]["drained_after_heal_s"] <= RECOVERY_BAR_S
        )
        out[f"recovery: {BURST_PAYMENTS:,}-payment burst final within {BURST_BAR_S:.0f} s"] = (
            rec["burst"]["final_s"] <= BURST_BAR_S and rec["burst"]["settled"] == BURST_PAYMENTS
        )
    return out


RECOVERY_USERS_DEFAULT = 10  # "half capacity" when the capacity profile did not run
ORIGINAL_CAPACITY_HIGH = 61.0  # the higher end of the original's 46–61 req/s


def machine() -> dict[str, Any]:
    import platform

    return {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "kernel": platform.release(),
            "cpu_model": _cpu_model(),
            "load_1m_at_start": round(os.getloadavg()[0], 2)}  # fmt: skip


def _system_note(report: dict[str, Any]) -> str:
    params = report.get("params", {})
    if "api_workers" not in params:
        return ""
    return (f" System: {params['api_workers']} API processes,"
            f" {params.get('workers', 1)} worker processes.")  # fmt: skip


def _load_note(m: dict[str, Any]) -> str:
    """What else the machine was doing, as far as the load average at the start tells."""
    load = m.get("load_1m_at_start")
    return "" if load is None else f", load average {load} when the run started"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _overrides(p: E2eParams) -> dict[str, str]:
    """The system under test, the same for the profiles and for recovery."""
    return {"KIZO_RATE_LIMITS": "off", "KIZO_API_WORKERS": str(p.api_workers),
            "KIZO_WORKERS": str(p.workers),
            "KIZO_BANK_OPENING_BALANCE_MINOR": str(BANK_OPENING_MINOR)}  # fmt: skip


def run(p: E2eParams) -> dict[str, Any]:
    from infra import aio

    out = Path(p.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "params": asdict(p),
        "machine": machine(),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    with scratch_system(_overrides(p)) as system, \
            tempfile.TemporaryDirectory(prefix="kizo-e2e-") as tmp:  # fmt: skip
        setup = aio.run(_setup(system, p, Path(tmp)))
        report["accounts"] = setup.accounts
        burst_: dict[str, Any] = {}
        for profile in p.profiles:
            if profile != "recovery":
                report[profile] = _profile_report(system, setup, profile, p, Path(tmp), out)
        if "recovery" in p.profiles:  # the burst on this system: no proxy in the way
            burst_ = aio.run(burst(system, setup))
    if "recovery" in p.profiles:
        best = (report.get("capacity") or {}).get("best")
        users = max(1, best["users"] // 2) if best else RECOVERY_USERS_DEFAULT
        report["recovery"] = {**recovery(p, users), "burst": burst_}
    report["bars"] = bars(report)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown(report))
    return report


def _route_table(routes_: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| route | count | per s | p50 ms | p95 ms | p99 ms | statuses |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in routes_.items():
        statuses = ", ".join(f"{k}: {v}" for k, v in r["statuses"].items())
        lines.append(f"| {name} | {r['count']} | {r['per_s']} | {r['p50_ms']} | {r['p95_ms']}"
                     f" | {r['p99_ms']} | {statuses} |")  # fmt: skip
    return lines


def _truth_and_cpu(section: dict[str, Any]) -> list[str]:
    t = section["settlement"]
    cpu = ", ".join(f"{k} {v}" for k, v in section["cpu_s"].items())
    return [
        "", f"Settlement truth: {t['accepted']} payments accepted, {t['settled']} settled, "
        f"{t['unsettled']} unsettled ({t['failed']} failed, {t['not_in_ledger']} not in the "
        f"ledger); all final {t['final_after_s']} s after the load; settlement lag p50 "
        f"{t['lag_p50_ms']} ms, p99 {t['lag_p99_ms']} ms.",
        "", f"CPU seconds by process: {cpu}.", "", f"![{section['plot']}]({section['plot']})",
    ]  # fmt: skip


def markdown(report: dict[str, Any]) -> str:
    m, p = report["machine"], report["params"]
    lines = [
        f"# kizo bench e2e, {report['started']}", "",
        f"Machine: {m['cpus']} cores ({m['cpu_model']}), {m['memory_gib']} GiB, Python "
        f"{m['python']}, Linux {m['kernel']}; load generator (locust) on the same cores. "
        f"{report['accounts']} accounts, rate limits off, {p['api_workers']} API process(es),"
        f" {p.get('workers', 1)} worker process(es).",
    ]  # fmt: skip
    if seed := report.get("seed"):
        h, o = seed["hold"], seed["original"]
        lines += ["", f"## Seed profile ({p['seed_users']} users, sign in every loop, 1 s think;"
                  f" {p['ramp_s']} s ramp, figures of the {p['hold_s']} s hold)", "",
                  "| figure | Kizo | Node original |", "|---|---|---|",
                  f"| req/s | {h['req_per_s']} | {o['req_per_s']} |",
                  f"| sign-ins served/s | {h['signins_served_per_s']} |"
                  f" {o['signins_served_per_s']} |",
                  f"| payment p99 ms | {h['payment_p99_ms']} | {o['payment_p99_ms']} |",
                  f"| errors | {h['errors']} {h['errors_by_route_status'] or ''} | — |",
                  f"| unsettled | {seed['settlement']['unsettled']} | {o['unsettled']} |",
                  "", *_route_table(h["routes"]), *_truth_and_cpu(seed)]  # fmt: skip
    if cap := report.get("capacity"):
        best, o = cap["best"], cap["original"]
        lines += ["", f"## Capacity profile (signed in once, no think; users stepped "
                  f"{', '.join(map(str, p['steps']))}, {p['step_s']} s each)", "",
                  "| users | req/s | payment p50 ms | payment p99 ms | errors |",
                  "|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {s['users']} | {s['req_per_s']} | {s['payment_p50_ms']} | "
                  f"{s['payment_p99_ms']} | {s['errors']} |" for s in cap["steps"]]  # fmt: skip
        top = "none" if best is None else f"{best['req_per_s']} req/s at {best['users']} users"
        lines += ["", f"Highest throughput with payment p99 under {PAYMENT_P99_BAR_MS:.0f} ms and"
                  f" no error: {top} (the original: {o['req_per_s']} req/s, payment p50 "
                  f"{o['payment_p50_ms']} ms, p99 {o['payment_p99_ms']} ms, {o['unsettled']}"
                  " unsettled).", "", "Whole run, all steps:", "",
                  *_route_table(cap["all"]["routes"]), *_truth_and_cpu(cap)]  # fmt: skip
    if rec := report.get("recovery"):
        o, b = rec["redis_outage"], rec["burst"]
        lines += ["", "## Recovery (outage behind the fault proxy; burst after the profiles)", "",
                  f"- Redis outage: {o['figure']}; during the run {o['req_per_s']} req/s,"
                  f" answers other than promised: {o['errors'] or 'none'}; settlement truth:"
                  f" {o['settlement']['accepted']} accepted, {o['settlement']['unsettled']}"
                  " unsettled.",
                  f"- Burst: {b['figure']}; answers {b['statuses']}."]  # fmt: skip
    lines += ["", "## Bars", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in report["bars"].items()]
    return "\n".join(lines) + "\n"


def table(report: dict[str, Any]) -> str:
    return markdown(report)


README_START = "<!-- performance: written by `kizo bench e2e --readme README.md` -->"
README_END = "<!-- performance: end -->"
COMMAND = "kizo bench e2e --readme README.md"


def readme_section(report: dict[str, Any]) -> str:
    """README's Performance section: the machine, the headline figures, the command."""
    m = report["machine"]
    lines = [README_START, "## Performance", "",
             f"Measured {report['started']} by `{COMMAND}` (one command: a scratch system, the "
             "Node original's own load test in locust, the settlement check, the report in "
             "`bench-e2e/report.md`). Machine: "
             f"{m['cpus']} cores ({m['cpu_model']}), {m['memory_gib']} GiB, Python "
             f"{m['python']}; the load generator shares the cores"
             f"{_load_note(m)}; read the figures as ratios.{_system_note(report)}", "",
             "| profile | figure | Kizo | Node original |", "|---|---|---|---|"]  # fmt: skip
    if seed := report.get("seed"):
        h, o = seed["hold"], seed["original"]
        lines += [
            f"| seed (100 users sign in every loop, 1 s think) | req/s | {h['req_per_s']} |"
            f" {o['req_per_s']} |",
            f"| | sign-ins served/s | {h['signins_served_per_s']} | {o['signins_served_per_s']} |",
            f"| | payment p99 ms | {h['payment_p99_ms']} | {o['payment_p99_ms']} |",
            f"| | errors / unsettled | {h['errors']} / {seed['settlement']['unsettled']} |"
            f" 500s / {o['unsettled']} |",
        ]
    if cap := report.get("capacity"):
        best, o = cap["best"], cap["original"]
        rate = "—" if best is None else f"{best['req_per_s']} ({best['users']} users)"
        p99 = "—" if best is None else best["payment_p99_ms"]
        lines += [
            f"| capacity (signed in once, no think) | req/s, payment p99 < 100 ms | {rate} |"
            f" {o['req_per_s']} |",
            f"| | payment p99 ms there | {p99} | {o['payment_p99_ms']} |",
            f"| | errors / unsettled | {cap['all']['errors']} /"
            f" {cap['settlement']['unsettled']} | — / {o['unsettled']} |",
        ]
    for name, r in report.get("recovery", {}).items():
        lines.append(f"| recovery | {name.replace('_', ' ')} | {r['figure']} | — |")
    lines += ["", README_END]
    return "\n".join(lines)


def write_readme(path: Path, section: str) -> None:
    """Replace the section between the markers, or insert it before "## Not yet"."""
    text = path.read_text()
    if README_START in text and README_END in text:
        before, rest = text.split(README_START, 1)
        after = rest.split(README_END, 1)[1]
        text = before + section + after
    else:
        anchor = "## Not yet"
        text = text.replace(anchor, section + "\n\n" + anchor, 1)
    path.write_text(text)


# Recovery (issue 12, item 4): a scratch system behind the fault proxy.

OUTAGE_S = 10.0
BEFORE_OUTAGE_S = 10.0
AFTER_HEAL_S = 20.0
BURST_PAYMENTS = 20_000
BURST_CONNECTIONS = 64
BURST_USERS = 50
RECOVERY_BAR_S = 20.0
BURST_BAR_S = 60.0


async def _set_proxy(proxy_url: str, name: str, enabled: bool) -> None:
    """Every link of ``name`` (a service: each role has its own proxy to it) on or off."""
    client = HttpClient(proxy_url, 1)
    try:
        for link in links_of(name):
            r = await client.post(f"/proxies/{link}", {"enabled": enabled})
            if r.status != 200:
                raise RuntimeError(f"the fault proxy refused: {r.status} {r.body[:200]!r}")
    finally:
        await client.aclose()


async def _drain_after(database_url: str, healed_wall: float) -> float:
    """Seconds from the heal until nothing created before it is pending (bounded)."""
    pool = await create_pool(database_url, min_size=1, max_size=1,
                             acquire_timeout_s=PoolsConfig.wait_s)  # fmt: skip
    try:
        await _until_none_open(pool, "<", healed_wall)
        return time.time() - healed_wall
    finally:
        await pool.close()


def redis_outage(system: System, setup: Setup, users: int, tmp: Path) -> dict[str, Any]:
    """Capacity users at ``users`` (about half capacity); Redis cut for ``OUTAGE_S`` through
    the fault proxy after ``BEFORE_OUTAGE_S``; the backlog's drain time after the heal."""
    from infra import aio

    log, keys = tmp / "outage.requests.csv", tmp / "outage.keys"
    env = {**os.environ, "KIZO_LOAD_USERS_FILE": str(setup.emails_file),
           "KIZO_LOAD_PASSWORD": PASSWORD, "KIZO_LOAD_MERCHANT": setup.merchant,
           "KIZO_LOAD_LOG": str(log), "KIZO_LOAD_KEYS_FILE": str(keys)}  # fmt: skip
    seconds = BEFORE_OUTAGE_S + OUTAGE_S + AFTER_HEAL_S
    locust = subprocess.Popen(
        [sys.executable, "-m", "locust", "--headless", "--host", system.api_url,
         "--only-summary", "--loglevel", "ERROR", "-f", str(LOADTESTS / "original_mix.py"),
         "-u", str(users), "-r", str(users), "-t", f"{seconds:.0f}s", "CapacityUser"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(BEFORE_OUTAGE_S)
        aio.run(_set_proxy(system.proxy_url, "redis", False))
        time.sleep(OUTAGE_S)
        aio.run(_set_proxy(system.proxy_url, "redis", True))
        healed = time.time()
        drain_s = aio.run(_drain_after(system.database_url, healed))
        locust.wait(timeout=seconds + LOCUST_GRACE_S)
    finally:
        if locust.poll() is None:
            locust.kill()
            locust.wait()
    requests = [_parse(line) for line in log.read_text().splitlines() if line]
    run = Run("outage", healed - OUTAGE_S - BEFORE_OUTAGE_S, time.time(), requests,
              keys.read_text().split() if keys.exists() else [], {})  # fmt: skip
    truth = aio.run(settlement_truth(system.database_url, run))
    figures = summary(requests, seconds)
    return {"users": users, "outage_s": OUTAGE_S, "drained_after_heal_s": round(drain_s, 1),
            "req_per_s": figures["req_per_s"], "errors": figures["errors_by_route_status"],
            "settlement": truth,
            "figure": f"backlog drained {drain_s:.1f} s after healing a {OUTAGE_S:.0f} s Redis"
                      f" outage ({users} users; bar {RECOVERY_BAR_S:.0f} s)"}  # fmt: skip


async def burst(system: System, setup: Setup) -> dict[str, Any]:
    """``BURST_PAYMENTS`` transfers to the merchant, submitted as fast as ``BURST_CONNECTIONS``
    connections allow; the time until every one is final, from the first request."""
    client = HttpClient(system.api_url, BURST_CONNECTIONS)
    emails = setup.emails_file.read_text().split()[:BURST_USERS]
    try:
        tokens = [_ok(await client.post("/api/v1/auth/signin", {"email": e,
                  "password": PASSWORD})).json()["access_token"] for e in emails]  # fmt: skip
        started_wall, started = time.time(), time.monotonic()
        statuses: Counter[int] = Counter()
        slots = asyncio.Semaphore(BURST_CONNECTIONS)

        async def pay(i: int) -> None:
            async with slots:
                r = await client.post("/api/v1/payments/transfer",
                                      {"to": setup.merchant, "amount": 1},
                                      {"Authorization": f"Bearer {tokens[i % len(tokens)]}",
                                       "Idempotency-Key": f"burst-{i}"})  # fmt: skip
                statuses[r.status] += 1

        await asyncio.gather(*(pay(i) for i in range(BURST_PAYMENTS)))
        submitted_s = time.monotonic() - started
    finally:
        await client.aclose()
    pool = await create_pool(system.database_url, min_size=1, max_size=1,
                             acquire_timeout_s=PoolsConfig.wait_s)  # fmt: skip
    try:
        await wait_final(pool, started_wall)
        final_s = time.monotonic() - started
        row = await pool.fetchrow(
            "SELECT count(*) FILTER (WHERE status = 'settled') AS settled, count(*) AS n"
            " FROM transactions WHERE created_at >= to_timestamp($1)", started_wall,
        )  # fmt: skip
    finally:
        await pool.close()
    assert row is not None
    return {"payments": BURST_PAYMENTS, "statuses": {str(k): v for k, v in statuses.items()},
            "submitted_s": round(submitted_s, 1), "final_s": round(final_s, 1),
            "settled": row["settled"], "recorded": row["n"],
            "figure": f"{BURST_PAYMENTS:,} payments submitted in {submitted_s:.1f} s, all final"
                      f" {final_s:.1f} s after the first ({row['settled']:,} settled;"
                      f" bar {BURST_BAR_S:.0f} s)"}  # fmt: skip


def recovery(p: E2eParams, users: int) -> dict[str, Any]:
    from infra import aio

    small = E2eParams(users=max(BURST_USERS, min(p.users, 500)))
    with scratch_system(_overrides(p), behind_proxy=True) as system, \
            tempfile.TemporaryDirectory(prefix="kizo-e2e-") as tmp:  # fmt: skip
        setup = aio.run(_setup(system, small, Path(tmp)))
        return {"redis_outage": redis_outage(system, setup, users, Path(tmp))}
