"""``kizo bench api``: the REST API of a whole scratch system (``infra.system``), over HTTP.

Method (one run, one machine; the load generator shares the cores with the system):
1. setup, untimed: ``--users`` sign up, each deposits through the bank; all settle.
2. throughput: ``--clients`` closed-loop clients send transfers between random users for
   ``--seconds``, each with its own Idempotency-Key. Accepted payments/s and the latency of the
   202s; then, once every accepted transfer is final, settled/s from the first request to the
   last settlement; how many intents the API put in each SAQ enqueue (its /metrics); pgbench
   tpcb-like on the same server afterwards, for the ratio.
3. sign-in flood: payments at a fixed ``--rate``, open loop (latency counts from each request's
   scheduled time, so a stall cannot hide), in alternating windows without and with a flood of
   ``--flood`` concurrent sign-in loops using right passwords (each costs an Argon2id verify).
   After a flood window a drain gap is not counted in either. Rate limits are off, so the flood
   reaches Argon2: the case per-IP limits do not stop (a flood from many addresses).
"""

from __future__ import annotations

import asyncio
import random
import re
import time
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from infra.config import PoolsConfig
from infra.db import create_pool
from infra.http1 import HttpClient, HttpError, Reply
from infra.system import System, scratch_system
from kizo.bench_ledger import run_pgbench

PASSWORD = "bench-password-1"  # noqa: S105 (the bench users' own, made up)
DEPOSIT = 1_000_000
SETUP_CONCURRENCY = 16
SETTLE_WAIT_S_MAX = 180.0
DRAIN_GAP_S = 1.5
HTTP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ApiBenchParams:
    users: int = 200
    clients: int = 32
    seconds: int = 10
    rate: int = 100
    flood: int = 16
    windows: int = 8
    window_seconds: int = 4
    pgbench_seconds: int = 10
    seed: int = 1
    api_workers: int = 1  # API processes (KIZO_API_WORKERS): each has its own hashing budget


@dataclass
class User:
    email: str
    token: str
    account_id: str = ""


TIMEOUT = "timeout"  # no answer within HTTP_TIMEOUT_S
CONNECTION_ERROR = "connection_error"  # refused, reset or a broken answer
ACCEPTED = "202"


@dataclass
class Tally:
    """Every answer to one kind of request: its outcome (the HTTP status, ``timeout`` or
    ``connection_error``) and its latency, whatever the outcome; the 202s' latencies apart too.
    A benchmark that timed only its 202s would hide a 429, a 503 or a timeout."""

    outcomes: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    accepted_ms: list[float] = field(default_factory=list)

    def add(self, outcome: str, ms: float) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.latencies_ms.append(ms)
        if outcome == ACCEPTED:
            self.accepted_ms.append(ms)

    @property
    def statuses(self) -> dict[str, int]:
        """Outcomes by code, in a stable order: statuses by number, then the errors."""
        return dict(sorted(self.outcomes.items(), key=lambda kv: (not kv[0].isdigit(), kv[0])))

    def classes(self) -> dict[str, int]:
        """Counts by kind of answer; 429 and 503 apart from the other 4xx and 5xx."""
        counts = dict.fromkeys(
            (ACCEPTED, "other_2xx", "4xx", "429", "503", "5xx", TIMEOUT, CONNECTION_ERROR), 0
        )
        for outcome, n in self.outcomes.items():
            counts[_class_of(outcome)] += n
        return counts


def _class_of(outcome: str) -> str:
    if outcome in (ACCEPTED, "429", "503", TIMEOUT, CONNECTION_ERROR):
        return outcome
    return {"2": "other_2xx", "4": "4xx", "5": "5xx"}.get(outcome[:1], CONNECTION_ERROR)


async def answer(call: Awaitable[Reply]) -> tuple[str, Reply | None]:
    """The outcome of one request: its status, or why there was none."""
    try:
        reply = await call
    except TimeoutError:
        return TIMEOUT, None
    except (HttpError, OSError):
        return CONNECTION_ERROR, None
    return str(reply.status), reply


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def _signup(client: HttpClient, slots: asyncio.Semaphore) -> User:
    async with slots:
        email = f"bench-{uuid.uuid4().hex[:12]}@example.test"
        r = _ok(await client.post(
            "/api/v1/auth/signup", {"email": email, "password": PASSWORD, "name": "Bench"}
        ))  # fmt: skip
        user = User(email, r.json()["access_token"])
        r = _ok(await client.get("/api/v1/accounts/me", _auth(user)))
        user.account_id = r.json()["account_id"]
        _ok(await client.post("/api/v1/payments/deposit", {"amount": DEPOSIT},
                              {**_auth(user), "Idempotency-Key": f"fund-{email}"}))  # fmt: skip
        return user


def _ok(reply: Reply) -> Reply:
    if not 200 <= reply.status < 300:
        raise RuntimeError(f"setup request failed: {reply.status} {reply.body[:200]!r}")
    return reply


def _auth(user: User) -> dict[str, str]:
    return {"Authorization": f"Bearer {user.token}"}


async def _transfer(client: HttpClient, users: Sequence[User], rng: random.Random) -> str:
    source, dest = rng.sample(users, 2)
    outcome, _ = await answer(
        client.post(
            "/api/v1/payments/transfer",
            {"to": dest.account_id, "amount": rng.randint(1, 100)},
            {**_auth(source), "Idempotency-Key": str(uuid.uuid4())},
        )
    )
    return outcome


async def _wait_final(pool: asyncpg.Pool, started_wall: float) -> tuple[int, float]:
    """Wait (bounded) until nothing created since ``started_wall`` is pending; returns how many
    settled and the time of the last settlement."""
    deadline = time.monotonic() + SETTLE_WAIT_S_MAX
    since = "created_at >= to_timestamp($1)"
    while await pool.fetchval(
        f"SELECT count(*) FROM transactions WHERE {since} AND status IN ('pending','processing')",
        started_wall,
    ):
        if time.monotonic() > deadline:
            raise RuntimeError(f"payments not final after {SETTLE_WAIT_S_MAX}s: pipeline stuck")
        await asyncio.sleep(0.1)
    row = await pool.fetchrow(
        "SELECT count(*) FILTER (WHERE status = 'settled') AS n,"
        f" extract(epoch FROM max(settled_at)) AS last FROM transactions WHERE {since}",
        started_wall,
    )
    assert row is not None
    return int(row["n"]), float(row["last"] or started_wall)


async def _throughput(
    client: HttpClient, pool: asyncpg.Pool, users: Sequence[User], p: ApiBenchParams
) -> dict[str, Any]:
    tally = Tally()
    rng = random.Random(p.seed)
    started_wall, started = time.time(), time.monotonic()
    stop_at = started + p.seconds

    async def client_loop() -> None:
        while time.monotonic() < stop_at:
            t0 = time.monotonic()
            outcome = await _transfer(client, users, rng)
            tally.add(outcome, (time.monotonic() - t0) * 1000)

    await asyncio.gather(*(client_loop() for _ in range(p.clients)))
    elapsed = time.monotonic() - started
    settled, last = await _wait_final(pool, started_wall)
    return {
        "accepted_per_s": round(len(tally.accepted_ms) / elapsed, 1),
        "answered_per_s": round(len(tally.latencies_ms) / elapsed, 1),
        "latency_p50_ms": round(percentile(tally.accepted_ms, 0.5), 1),
        "latency_p99_ms": round(percentile(tally.accepted_ms, 0.99), 1),
        "all_latency_p50_ms": round(percentile(tally.latencies_ms, 0.5), 1),
        "all_latency_p99_ms": round(percentile(tally.latencies_ms, 0.99), 1),
        "statuses": tally.statuses,
        "answer_classes": tally.classes(),
        "settled": settled,
        "settled_per_s": round(settled / max(last - started_wall, 1e-9), 1),
    }


async def _flood_phase(
    client: HttpClient, users: Sequence[User], p: ApiBenchParams
) -> dict[str, Any]:
    rng = random.Random(p.seed + 1)
    phase = {"name": "gap"}
    tallies = {"base": Tally(), "flood": Tally()}
    signins = Tally()
    flooding = asyncio.Event()
    in_flight: set[asyncio.Task[None]] = set()

    async def payment(window: str, scheduled: float) -> None:
        outcome = await _transfer(client, users, rng)
        if window in tallies:
            tallies[window].add(outcome, (time.monotonic() - scheduled) * 1000)

    paying = asyncio.Event()
    paying.set()

    async def payer(until: float) -> None:
        # Until the windows are over (bounded by ``until`` all the same).
        interval = 1 / p.rate
        n, started = 0, time.monotonic()
        while paying.is_set() and (scheduled := started + n * interval) < until:
            await asyncio.sleep(max(0.0, scheduled - time.monotonic()))
            task = asyncio.create_task(payment(phase["name"], scheduled))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            n += 1

    async def flooder(k: int) -> None:
        user = users[k % len(users)]
        while flooding.is_set():
            t0 = time.monotonic()
            outcome, _ = await answer(
                client.post("/api/v1/auth/signin", {"email": user.email, "password": PASSWORD})
            )
            signins.add(outcome, (time.monotonic() - t0) * 1000)

    window = p.window_seconds
    bound = p.windows * (2 * window + DRAIN_GAP_S + HTTP_TIMEOUT_S) + DRAIN_GAP_S
    payments = asyncio.create_task(payer(time.monotonic() + bound))
    flood_s = 0.0
    await asyncio.sleep(DRAIN_GAP_S)  # warm up, not counted
    for _ in range(p.windows):
        phase["name"] = "base"
        await asyncio.sleep(window)
        phase["name"] = "flood"
        flooding.set()
        flood_started = time.monotonic()
        floods = [asyncio.create_task(flooder(k)) for k in range(p.flood)]
        await asyncio.sleep(window)
        flooding.clear()
        phase["name"] = "gap"
        await asyncio.gather(*floods)  # each finishes its sign-in in flight
        flood_s += time.monotonic() - flood_started
        await asyncio.sleep(DRAIN_GAP_S)
    paying.clear()
    await payments
    await asyncio.gather(*in_flight)
    base, flood = tallies["base"], tallies["flood"]
    return {
        "rate_per_s": p.rate,
        **_window("base", base),
        **_window("flood", flood),
        "flood_vs_base_p99": _ratio(flood.accepted_ms, base.accepted_ms),
        "flood_vs_base_all_p99": _ratio(flood.latencies_ms, base.latencies_ms),
        "payment_statuses": {w: t.statuses for w, t in tallies.items()},
        "payment_classes": {w: t.classes() for w, t in tallies.items()},
        "signins_ok_per_s": round(signins.outcomes.get("200", 0) / max(flood_s, 1e-9), 1),
        "signin_statuses": signins.statuses,
        "signin_p99_ms": round(percentile(signins.latencies_ms, 0.99), 1),
    }


def _window(name: str, tally: Tally) -> dict[str, Any]:
    """One window's payments: the 202s (counts and latency, as before), and every answer."""
    return {
        f"{name}_payments": len(tally.accepted_ms),
        f"{name}_p50_ms": round(percentile(tally.accepted_ms, 0.5), 1),
        f"{name}_p99_ms": round(percentile(tally.accepted_ms, 0.99), 1),
        f"{name}_answers": len(tally.latencies_ms),
        f"{name}_all_p50_ms": round(percentile(tally.latencies_ms, 0.5), 1),
        f"{name}_all_p99_ms": round(percentile(tally.latencies_ms, 0.99), 1),
    }


def _ratio(flood_ms: Sequence[float], base_ms: Sequence[float]) -> float:
    """Of the unrounded p99s."""
    return round(percentile(flood_ms, 0.99) / percentile(base_ms, 0.99), 2)


async def _coalescing(client: HttpClient) -> float:
    """Intents per SAQ enqueue made by the API (its /metrics)."""
    text = (await client.get("/metrics")).body.decode()
    flushes = re.search(r"^kizo_api_enqueue_flushes_total ([0-9.e+]+)$", text, re.M)
    intents = re.search(r"^kizo_api_enqueued_intents_total ([0-9.e+]+)$", text, re.M)
    if flushes is None or intents is None:
        raise RuntimeError("the API's /metrics lacks the enqueue counters")
    return float(intents.group(1)) / max(float(flushes.group(1)), 1.0)


async def _measure(system: System, p: ApiBenchParams) -> dict[str, Any]:
    pool = await create_pool(
        system.database_url, min_size=1, max_size=2, acquire_timeout_s=PoolsConfig.wait_s
    )
    client = HttpClient(system.api_url, p.clients + p.flood + p.rate + 16, HTTP_TIMEOUT_S)
    try:
        slots = asyncio.Semaphore(SETUP_CONCURRENCY)
        users = await asyncio.gather(*(_signup(client, slots) for _ in range(p.users)))
        await _wait_final(pool, 0.0)
        before = await _coalescing(client)
        throughput = await _throughput(client, pool, users, p)
        throughput["intents_per_enqueue"] = round(await _coalescing(client), 1)
        throughput["intents_per_enqueue_setup"] = round(before, 1)
        flood = await _flood_phase(client, users, p)
        await _wait_final(pool, 0.0)
        await pool.execute("CREATE DATABASE pgbench")
    finally:
        await client.aclose()
        await pool.close()
    tps = await asyncio.to_thread(
        run_pgbench, system.config.host, system.config.pg_port, "pgbench", 4,
        p.pgbench_seconds, 10,
    )  # fmt: skip
    throughput["pgbench_tps"] = round(tps, 1)
    throughput["accepted_vs_pgbench"] = round(throughput["accepted_per_s"] / tps, 2)
    throughput["settled_vs_pgbench"] = round(throughput["settled_per_s"] / tps, 2)
    return {
        "throughput": throughput,
        "signin_flood": flood,
        "params": {k: getattr(p, k) for k in p.__dataclass_fields__},
    }


def run(p: ApiBenchParams) -> dict[str, Any]:
    from infra import aio

    overrides = {"KIZO_RATE_LIMITS": "off", "KIZO_JANITOR_INTERVAL_S": "30",
                 "KIZO_API_WORKERS": str(p.api_workers)}  # fmt: skip
    with scratch_system(overrides) as system:
        return aio.run(_measure(system, p))


def table(report: dict[str, Any]) -> str:
    t, f = report["throughput"], report["signin_flood"]
    rows = [
        ("accepted payments/s (202)", t["accepted_per_s"]),
        ("  202s: latency p50 / p99 ms", f"{t['latency_p50_ms']} / {t['latency_p99_ms']}"),
        ("  every answer: p50 / p99 ms", f"{t['all_latency_p50_ms']} / {t['all_latency_p99_ms']}"),
        ("  answers by status", t["statuses"]),
        ("settled transfers/s", t["settled_per_s"]),
        ("intents per SAQ enqueue", t["intents_per_enqueue"]),
        ("pgbench tpcb-like TPS", t["pgbench_tps"]),
        ("accepted / pgbench", t["accepted_vs_pgbench"]),
        ("settled / pgbench", t["settled_vs_pgbench"]),
        (f"payments at {f['rate_per_s']}/s, 202s p50/p99 ms",
         f"{f['base_p50_ms']} / {f['base_p99_ms']}"),
        ("  under sign-in flood", f"{f['flood_p50_ms']} / {f['flood_p99_ms']}"),
        ("  flood p99 / base p99 (202s)", f["flood_vs_base_p99"]),
        ("  every answer: base / flood p99 ms",
         f"{f['base_all_p99_ms']} / {f['flood_all_p99_ms']}"),
        ("  flood p99 / base p99 (every answer)", f["flood_vs_base_all_p99"]),
        ("  payment answers by status", f["payment_statuses"]),
        ("sign-ins ok/s under flood", f["signins_ok_per_s"]),
        ("  sign-in answers by status", f["signin_statuses"]),
    ]  # fmt: skip
    params = ", ".join(f"{k}={v}" for k, v in report["params"].items())
    return "\n".join([f"kizo bench api ({params})"] + [f"  {k:<38} {v}" for k, v in rows])
