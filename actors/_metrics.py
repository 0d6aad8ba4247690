"""The worker's and the janitor's metrics (docs/observability.md), in each process's default
registry: one endpoint per process, so nothing here has to add up across processes.

Cheap on the hot path: a worker settles thousands of intents a second, so everything is
observed per actor batch or per group commit, with the label children resolved once here.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable, Sequence

from prometheus_client import Counter, Gauge, Histogram

from engine import Outcome
from infra.metrics import (
    FAILURE_REASONS,
    KINDS,
    LAG_BUCKETS_S,
    LATENCY_BUCKETS_S,
    SIZE_BUCKETS,
    kind_label,
    reason_label,
)

SHARDS_OWNED = Gauge("kizo_worker_shards_owned", "Shards this worker consumes")
BATCH_SIZE = Histogram("kizo_actor_batch_size", "Messages per actor batch", buckets=SIZE_BUCKETS)
BATCH_DURATION = Histogram("kizo_actor_batch_duration_seconds",
                           "One actor batch, ledger and bank included",
                           buckets=LATENCY_BUCKETS_S)  # fmt: skip
BATCHES_FAILED = Counter("kizo_actor_batches_failed", "Actor batches that raised")
GROUP_OPS = Histogram("kizo_commit_group_ops", "Ledger ops per group commit",
                      buckets=SIZE_BUCKETS)  # fmt: skip
GROUP_DURATION = Histogram("kizo_commit_group_duration_seconds",
                           "One group's apply_batch, retries included",
                           buckets=LATENCY_BUCKETS_S)  # fmt: skip
GROUPS_FAILED = Counter("kizo_commit_groups_failed", "Group commits that raised")
SETTLED = Counter("kizo_intents_settled", "Intents moved to settled", ["kind"])
FAILED = Counter("kizo_intents_failed", "Intents moved to failed", ["kind", "reason"])
LAG = Histogram("kizo_settlement_lag_seconds", "Accepted to final, by PostgreSQL's clock",
                ["kind"], buckets=LAG_BUCKETS_S)  # fmt: skip
BANK_CALLS = Counter("kizo_bank_calls", "Calls to the bank", ["call", "outcome"])
BANK_DURATION = Histogram("kizo_bank_call_duration_seconds", "One bank call, retries included",
                          ["call"], buckets=LATENCY_BUCKETS_S)  # fmt: skip

_LAG = {kind: LAG.labels(kind) for kind in (*KINDS, "other")}
# Labelled series exist from the start (0, not absent) where the label values are known now.
for _kind in KINDS:
    SETTLED.labels(_kind)
    for _reason in (*FAILURE_REASONS, "other"):
        FAILED.labels(_kind, _reason)


def record_final(outcomes: Sequence[Outcome]) -> None:
    """Count the intents these outcomes made final, and observe their settlement lag: one
    ``inc`` per label set, one ``observe`` per final intent, nothing for the rest."""
    settled: Tally[str] = Tally()
    failed: Tally[tuple[str, str]] = Tally()
    for outcome in outcomes:
        if outcome.age_s is None:  # not made final by this op
            continue
        kind = kind_label(outcome.kind)
        _LAG[kind].observe(outcome.age_s)
        if outcome.status == "settled":
            settled[kind] += 1
        else:
            failed[(kind, reason_label(outcome.failure_reason))] += 1
    _add(SETTLED, settled.items())
    _add(FAILED, failed.items())


def _add(counter: Counter, counts: Iterable[tuple[str | tuple[str, str], int]]) -> None:
    for labels, n in counts:
        counter.labels(*((labels,) if isinstance(labels, str) else labels)).inc(n)
