"""The janitor process: a pass every interval (or once), metrics on its own port."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import time
from collections import Counter as Tally
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import redis.exceptions
import structlog
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from actors.bank_client import BankClient
from actors.janitor import RECONCILIATION_KINDS, Finding, JanitorDeps, PassSummary, run_pass
from actors.routing import QueueSet
from infra.config import MUTATION_HELP, Config
from infra.db import create_pool, redis_client

log = structlog.get_logger("kizo.janitor")

# The audit scans whole tables: longer than any request's statement, still bounded.
JANITOR_STATEMENT_TIMEOUT_S = 60
IMBALANCE_FINDING = "audit:ledger_unbalanced"  # detail: "all postings sum to <n>"
FINDINGS_LOGGED_MAX = 20  # per pass: open findings recur every pass until resolved

FINDINGS = Gauge("kizo_janitor_findings", "Open findings of the last pass", ["kind"])
RECONCILIATION = Gauge("kizo_reconciliation_findings", "Open reconciliation findings",
                       ["kind"])  # fmt: skip
AUDIT_OK = Gauge("kizo_ledger_audit_ok", "1 when the last audit found nothing")
IMBALANCE = Gauge("kizo_ledger_imbalance_minor", "What all postings sum to (0 when sound)")
NEEDS_ATTENTION = Gauge("kizo_needs_attention", "Pending intents past their re-drive limit")
REARMED = Counter(
    "kizo_janitor_rearmed_total", "Flagged intents given a fresh re-drive budget by the janitor"
)
UNRESOLVED = Gauge("kizo_janitor_unresolved", "Processing intents the last pass left unknown")
REDRIVEN = Counter("kizo_janitor_redriven_total", "Intents re-enqueued")
FLAGGED = Counter("kizo_janitor_flagged_total", "Intents newly flagged needs_attention")
RESOLVED = Counter("kizo_janitor_resolved_total", "Unknown bank outcomes resolved")
PASSES = Counter("kizo_janitor_passes_total", "Janitor passes", ["result"])
LAST_PASS = Gauge("kizo_janitor_last_pass_timestamp_seconds", "When the last pass ended")
PASS_DURATION = Histogram("kizo_janitor_pass_duration_seconds", "One janitor pass",
                          buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                                   30.0, 60.0))  # fmt: skip
PENDING = Gauge("kizo_intents_pending", "Intents pending or processing")
OLDEST_PENDING = Gauge("kizo_intent_oldest_pending_age_seconds", "Age of the oldest of those")
QUEUE_DEPTH = Gauge("kizo_queue_depth", "Jobs queued in the shard's SAQ queue", ["shard"])
QUEUE_OLDEST = Gauge("kizo_queue_oldest_job_age_seconds", "Age of the shard's oldest queued job",
                     ["shard"])  # fmt: skip
SAMPLE_FAILURES = Counter("kizo_janitor_sample_failures_total", "Backlog samples not taken",
                          ["source"])  # fmt: skip
for _source in ("postgres", "redis"):
    SAMPLE_FAILURES.labels(_source)
# Served by the open-intents partial index (transactions_open_idx).
_BACKLOG = """
SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8
FROM transactions WHERE status IN ('pending', 'processing')
"""


def _publish(summary: PassSummary) -> None:
    kinds = Tally(f.kind for f in summary.findings)
    FINDINGS.clear()
    for kind, n in kinds.items():
        FINDINGS.labels(kind).set(n)
    for kind in RECONCILIATION_KINDS:
        RECONCILIATION.labels(kind).set(kinds[kind])
    audit = [f for f in summary.findings if f.kind.startswith("audit:")]
    AUDIT_OK.set(0 if audit else 1)
    IMBALANCE.set(_imbalance(audit))
    NEEDS_ATTENTION.set(summary.needs_attention)
    REARMED.inc(summary.rearmed)
    UNRESOLVED.set(summary.unresolved)
    REDRIVEN.inc(summary.redriven)
    FLAGGED.inc(summary.flagged)
    RESOLVED.inc(summary.resolved)
    PASSES.labels("clean" if not summary.findings else "findings").inc()
    PASS_DURATION.observe(summary.duration_ms / 1000)


def _imbalance(audit: Sequence[Finding]) -> int:
    """The ledger's imbalance, from the audit's own check (no second scan of the postings)."""
    for finding in audit:
        if finding.kind == IMBALANCE_FINDING:
            return int(finding.detail.rsplit(" ", 1)[-1])
    return 0


def pass_fields(summary: PassSummary) -> dict[str, object]:
    """The pass as log fields (the findings as a count: each has its own event)."""
    fields = dataclasses.asdict(summary)
    fields["findings"] = len(summary.findings)
    fields["duration_ms"] = round(summary.duration_ms)
    return fields


async def sample_backlog(deps: JanitorDeps) -> None:
    """The durable backlog (PostgreSQL) and each shard's queue (Redis); a source that does not
    answer keeps its gauges' last values and counts a failure."""
    try:
        row = await deps.pool.fetchrow(_BACKLOG)
        assert row is not None
        PENDING.set(row[0])
        OLDEST_PENDING.set(row[1])
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        SAMPLE_FAILURES.labels("postgres").inc()
    now_ms = time.time() * 1000
    try:
        for shard, queue in enumerate(deps.queues.queues):
            depth, oldest = await _queue_sample(queue)
            QUEUE_DEPTH.labels(str(shard)).set(depth)
            QUEUE_OLDEST.labels(str(shard)).set(max(0.0, (now_ms - oldest) / 1000) if oldest else 0)
    except (OSError, redis.exceptions.RedisError):
        SAMPLE_FAILURES.labels("redis").inc()


async def _queue_sample(queue: Any) -> tuple[int, float]:
    """Jobs queued, and when the oldest was enqueued (ms since epoch; 0 when none). SAQ pushes
    on the right and takes from the left: the oldest is at index 0."""
    depth = int(await queue.count("queued"))
    if depth == 0:
        return 0, 0.0
    oldest_id = await queue.redis.lindex(queue.namespace("queued"), 0)
    if oldest_id is None:
        return depth, 0.0
    job = await queue.job(queue.job_key_from_id(oldest_id.decode()))
    return depth, float(job.queued) if job is not None else 0.0


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
        unknown_as_succeeded=config.mutation == "unknown_as_succeeded",
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
            PASSES.labels("error").inc()
            log.warning("janitor_pass_failed", error=repr(exc))
        else:
            _publish(summary)
            log.info("janitor_pass", **pass_fields(summary))
            for f in summary.findings[:FINDINGS_LOGGED_MAX]:
                log.warning("janitor_finding", kind=f.kind, subject=f.subject, detail=f.detail)
        LAST_PASS.set_to_current_time()
        await sample_backlog(deps)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
