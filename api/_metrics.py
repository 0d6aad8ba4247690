"""The API's metrics (docs/observability.md). Module-level, in the default registry: under
``kizo api`` prometheus-client's multiprocess mode sums them over granian's worker processes,
so none is read at scrape time from this process's state (no callbacks, no custom collectors)."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram
from quart import Quart, Response, g, request

from infra.metrics import LATENCY_BUCKETS_S, kind_label, method_label

UNMATCHED = "unmatched"

REQUESTS = Counter("kizo_http_requests", "HTTP requests answered",
                   ["route", "method", "status"])  # fmt: skip
DURATION = Histogram("kizo_http_request_duration_seconds", "HTTP request latency",
                     ["route", "method"], buckets=LATENCY_BUCKETS_S)  # fmt: skip
ACCEPTED = Counter("kizo_intents_accepted", "Payment intents recorded and answered 202", ["kind"])
ENQUEUE_FLUSHES = Counter("kizo_api_enqueue_flushes", "SAQ enqueue round trips of the API")
ENQUEUED_INTENTS = Counter("kizo_api_enqueued_intents", "Intents enqueued by the API")
ENQUEUE_FAILURES = Counter("kizo_api_enqueue_failures", "Enqueues that failed (outbox relays)")
RATE_LIMIT_UNAVAILABLE = Counter(
    "kizo_rate_limit_unavailable", "Requests admitted unlimited: Redis did not answer the limit"
)
RATE_LIMITED = Counter("kizo_rate_limit_rejections", "Requests refused by a rate limit", ["route"])
HASHING_QUEUE = Gauge("kizo_hashing_queue", "Hashes waiting for a hashing process",
                      multiprocess_mode="livesum")  # fmt: skip
HASHING_BUSY = Gauge("kizo_hashing_busy", "Hashing processes working",
                     multiprocess_mode="livesum")  # fmt: skip
HASHING_URGENT = Counter(
    "kizo_hashing_urgent", "Sign-ins hashed without rests: they waited KIZO_SIGNIN_URGENT_S"
)
HASHING_PAUSES = Counter("kizo_hashing_pauses", "Running hashes paused for payments")
HASHING_REJECTED = Counter("kizo_hashing_rejected",
                           "Sign-ins refused: not servable by the deadline")  # fmt: skip
HASHING_DURATION = Histogram("kizo_hashing_duration_seconds", "One hash or verify, queue included",
                             ["op"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                                              5.0, 10.0))  # fmt: skip


# Labelled series exist from the start (0, not absent), where the label values are known now.
for _kind in ("deposit", "withdrawal", "transfer"):
    ACCEPTED.labels(_kind)
for _op in ("hash", "verify"):
    HASHING_DURATION.labels(_op)


def route() -> str:
    """The matched URL rule (a template, never the raw path: bounded label values)."""
    rule = request.url_rule
    return rule.rule if rule is not None else UNMATCHED


def accepted(kind: str) -> None:
    ACCEPTED.labels(kind_label(kind)).inc()


def enqueue_flushed(intents: int) -> None:
    ENQUEUE_FLUSHES.inc()
    ENQUEUED_INTENTS.inc(intents)


def instrument(app: Quart) -> None:
    """Count and time every request, by route template, method and status."""

    @app.before_request
    async def started() -> None:
        g.started_s = time.perf_counter()

    @app.after_request
    async def observed(response: Response) -> Response:
        elapsed_s = time.perf_counter() - g.get("started_s", time.perf_counter())
        name, method = route(), method_label(request.method)
        REQUESTS.labels(name, method, str(response.status_code)).inc()
        DURATION.labels(name, method).observe(elapsed_s)
        return response
