"""The janitor process: a pass every interval (or once), metrics on its own port."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator

import asyncpg
import structlog
from prometheus_client import Counter, Gauge, start_http_server

from actors.bank_client import BankClient
from actors.janitor import JanitorDeps, PassSummary, run_pass
from actors.routing import QueueSet
from infra.config import MUTATION_HELP, Config
from infra.db import create_pool, redis_client

log = structlog.get_logger("kizo.janitor")

# The audit scans whole tables: longer than any request's statement, still bounded.
JANITOR_STATEMENT_TIMEOUT_S = 60

FINDINGS = Gauge("kizo_janitor_findings", "Open findings of the last pass", ["kind"])
NEEDS_ATTENTION = Gauge("kizo_needs_attention", "Pending intents past their re-drive limit")
REARMED = Counter(
    "kizo_janitor_rearmed_total", "Flagged intents given a fresh re-drive budget by the janitor"
)
REDRIVEN = Counter("kizo_janitor_redriven_total", "Intents re-enqueued")
RESOLVED = Counter("kizo_janitor_resolved_total", "Unknown bank outcomes resolved")
PASSES = Counter("kizo_janitor_passes_total", "Janitor passes", ["result"])


def _publish(summary: PassSummary) -> None:
    FINDINGS.clear()
    for finding in summary.findings:
        FINDINGS.labels(finding.kind).inc()
    NEEDS_ATTENTION.set(summary.needs_attention)
    REARMED.inc(summary.rearmed)
    REDRIVEN.inc(summary.redriven)
    RESOLVED.inc(summary.resolved)
    PASSES.labels("clean" if not summary.findings else "findings").inc()


@contextlib.asynccontextmanager
async def open_deps(config: Config) -> AsyncIterator[JanitorDeps]:
    """The janitor's pools and clients, sized by ``config.pools``; closed on exit."""
    p, pools = config.pipeline, config.pools
    pool = await create_pool(
        config.pg_url(),
        min_size=1,
        max_size=pools.janitor_pg_connections_max,
        acquire_timeout_s=pools.wait_s,
        command_timeout=JANITOR_STATEMENT_TIMEOUT_S,
    )
    redis = redis_client(
        config.valkey_url(),
        connections_max=pools.janitor_redis_connections_max,
        wait_s=pools.wait_s,
        socket_timeout_s=pools.redis_socket_timeout_s,
        connect_timeout_s=pools.redis_connect_timeout_s,
    )
    bank = BankClient(
        config.bank_url(),
        timeout_s=p.bank_timeout_s,
        retries_max=p.bank_retries_max,
        key_per_request=config.mutation == "bank_key_off",
        unknown_as_failed=config.mutation == "unknown_as_failed",
    )
    try:
        yield JanitorDeps(pool, QueueSet(redis, p.shards, pools.enqueue_concurrency_max), bank, p)
    finally:
        await bank.aclose()
        await redis.aclose()
        await pool.close()


async def main(config: Config, *, once: bool) -> int:
    p = config.pipeline
    if config.mutation:
        log.warning(
            "MUTATION_ACTIVE", mutation=config.mutation, meaning=MUTATION_HELP[config.mutation]
        )
    async with open_deps(config) as deps:
        if once:
            summary = await run_pass(deps)
            print(summary.line())
            for f in summary.findings:
                print(f"finding {f.kind} {f.subject}: {f.detail}")
            return 1 if summary.findings else 0
        start_http_server(p.janitor_metrics_port, addr=config.host)
        await _loop(deps, p.janitor_interval_s)
        return 0


async def _loop(deps: JanitorDeps, interval_s: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    while not stop.is_set():
        try:
            summary = await run_pass(deps)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("janitor_pass_failed", error=repr(exc))
        else:
            _publish(summary)
            log.info(summary.line())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
