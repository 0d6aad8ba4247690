"""``kizo loadtest``: locust (loadtests/locustfile.py) against a scratch system, then the question
the seed system's "100 % success" never asked: did every accepted payment settle?

Steps: a scratch system (rate limits off); one merchant user (the hot recipient); locust
headless with ``--users`` users for ``--seconds``; then a bounded wait until the ledger has no
pending transaction, and a count of what the ledger holds against what locust was told.
Exit code 0 when every request got the promised answer and every accepted payment settled,
1 otherwise, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from infra.commands import Command, bounded_int
from infra.config import Config

LOCUSTFILE = Path(__file__).resolve().parents[1] / "loadtests" / "locustfile.py"
SETTLE_WAIT_S_MAX = 120.0
LOCUST_GRACE_S = 60.0


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=bounded_int(2, 500), default=50)
    parser.add_argument("--seconds", type=bounded_int(2, 600), default=30)
    parser.add_argument("--spawn-rate", type=bounded_int(1, 500), default=10)
    parser.add_argument("--merchant-share", type=bounded_int(0, 100), default=20,
                        help="percent of transfers paid to one merchant (a hot row)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _stats(prefix: Path) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    with Path(f"{prefix}_stats.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            rows[row["Name"]] = {
                "requests": int(row["Request Count"]),
                "failures": int(row["Failure Count"]),
                "per_s": round(float(row["Requests/s"]), 1),
                "p50_ms": float(row["50%"] or "nan"),
                "p99_ms": float(row["99%"] or "nan"),
            }
    return rows


def _failures(prefix: Path) -> list[str]:
    path = Path(f"{prefix}_failures.csv")
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [f"{r['Name']}: {r['Error']} (×{r['Occurrences']})" for r in csv.DictReader(f)]


async def _ledger(database_url: str) -> tuple[dict[str, int], dict[str, str]]:
    """After a bounded wait for pending work: counts by kind and status, and each transfer's
    idempotency key -> status."""
    import asyncio

    import asyncpg

    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        deadline = time.monotonic() + SETTLE_WAIT_S_MAX
        while await conn.fetchval("SELECT count(*) FROM transactions WHERE status = 'pending'"):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
        rows = await conn.fetch("SELECT kind, status, count(*) AS n FROM transactions"
                                " GROUP BY kind, status")  # fmt: skip
        keyed = await conn.fetch(
            "SELECT k.key, t.status FROM transactions t JOIN idempotency_keys k"
            " ON k.transaction_id = t.id WHERE t.kind = 'transfer'"
        )
        counts = {f"{r['kind']} {r['status']}": int(r["n"]) for r in rows}
        return counts, {r["key"]: r["status"] for r in keyed}
    finally:
        await conn.close()


def _merchant(api_url: str) -> str:
    import httpx

    body = {"email": f"merchant-{uuid.uuid4().hex[:8]}@example.test",
            "password": "merchant-password-1", "name": "Merchant"}  # fmt: skip
    r = httpx.post(f"{api_url}/api/v1/auth/signup", json=body, timeout=30)
    r.raise_for_status()
    return str(r.json()["user"]["account_id"])


def run(users: int, seconds: int, spawn_rate: int, merchant_share: int) -> dict[str, Any]:
    from infra import aio
    from infra.system import scratch_system

    with scratch_system({"KIZO_RATE_LIMITS": "off"}) as system, \
            tempfile.TemporaryDirectory(prefix="kizo-load-") as tmp:  # fmt: skip
        keys_file = Path(tmp) / "accepted-keys"
        env = {**os.environ, "KIZO_LOAD_MERCHANT": _merchant(system.api_url),
               "KIZO_LOAD_MERCHANT_SHARE": str(merchant_share / 100),
               "KIZO_LOAD_KEYS_FILE": str(keys_file)}  # fmt: skip
        prefix = Path(tmp) / "locust"
        started = time.monotonic()
        locust = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
             "--host", system.api_url, "-u", str(users), "-r", str(spawn_rate),
             "-t", f"{seconds}s", "--csv", str(prefix), "--only-summary", "--loglevel", "ERROR",
             "--stop-timeout", "5"],
            env=env, capture_output=True, text=True, timeout=seconds + LOCUST_GRACE_S,
            check=False,
        )  # fmt: skip
        ran_s = time.monotonic() - started
        if not Path(f"{prefix}_stats.csv").exists():
            raise RuntimeError(f"locust did not run: {locust.stderr.strip()[-500:]}")
        stats, failures = _stats(prefix), _failures(prefix)
        accepted = set(keys_file.read_text().split()) if keys_file.exists() else set()
        ledger, by_key = aio.run(_ledger(system.database_url))
    settled = sum(1 for key in accepted if by_key.get(key) == "settled")
    return {
        "params": {
            "users": users,
            "seconds": seconds,
            "spawn_rate": spawn_rate,
            "merchant_share_pct": merchant_share,
        },
        "ran_s": round(ran_s, 1),
        "requests": stats,
        "failures": failures,
        # The clients' own record of their 202s (locust's CSV counts are written before its
        # last requests finish), matched key by key against the ledger.
        "transfers_accepted": len(accepted),
        "transfers_settled": settled,
        "transfers_accepted_not_in_ledger": len(accepted - by_key.keys()),
        # Cut off by locust's stop: recorded by the API, the client never saw the answer.
        "transfers_unreported": len(by_key.keys() - accepted),
        "transfers_pending_after_wait": ledger.get("transfer pending", 0),
        "transfers_failed": ledger.get("transfer failed", 0),
        "settled_share_pct": round(100 * settled / len(accepted), 2) if accepted else None,
        "ledger": ledger,
    }


def text(report: dict[str, Any]) -> str:
    p = report["params"]
    lines = [
        f"kizo loadtest ({p['users']} users, {p['seconds']} s, "
        f"{p['merchant_share_pct']} % of transfers to one merchant)",
        f"  {'request':<20} {'count':>7} {'fail':>5} {'per s':>7} {'p50 ms':>7} {'p99 ms':>7}",
    ]
    for name, s in sorted(report["requests"].items()):
        lines.append(f"  {name:<20} {s['requests']:>7} {s['failures']:>5} {s['per_s']:>7} "
                     f"{s['p50_ms']:>7} {s['p99_ms']:>7}")  # fmt: skip
    lines += [
        f"  transfers accepted (202)        {report['transfers_accepted']}",
        f"  transfers settled               {report['transfers_settled']}"
        f" ({report['settled_share_pct']} %)",
        f"  accepted, not in the ledger     {report['transfers_accepted_not_in_ledger']}",
        f"  in the ledger, answer unseen    {report['transfers_unreported']}",
        f"  transfers pending after wait    {report['transfers_pending_after_wait']}",
        f"  transfers failed                {report['transfers_failed']}",
    ]
    lines += [f"  failure: {f}" for f in report["failures"]]
    return "\n".join(lines)


def ok(report: dict[str, Any]) -> bool:
    """Every request answered as promised, every accepted transfer settled, nothing extra."""
    return (
        not report["failures"]
        and report["transfers_pending_after_wait"] == 0
        and report["transfers_failed"] == 0
        and report["transfers_settled"] == report["transfers_accepted"] > 0
        and report["transfers_accepted_not_in_ledger"] == 0
    )


def _loadtest(_config: Config, args: argparse.Namespace) -> int:
    report = run(args.users, args.seconds, args.spawn_rate, args.merchant_share)
    print(json.dumps(report) if args.json else text(report))
    return 0 if ok(report) else 1


COMMANDS = [
    Command("loadtest", _loadtest, _configure),
]
