"""The mock bank's HTTP API (contract: docs/bank-api.md): HTTP shapes only; SQL is in ``store``.

Faults are injected on POST /collections and /payouts only; GET /payments and /statement stay
truthful so that Kizo can always recover the truth.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import asyncpg
import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from quart import Quart, Response, g, request
from werkzeug.exceptions import HTTPException

from chaos.mockbank import store
from chaos.mockbank._drop import DROP_HEADER, ASGIApp, DropAnswers
from chaos.mockbank.faults import Faults, FaultsUpdate
from chaos.mockbank.settings import BankSettings

log = structlog.get_logger("kizo.mockbank")
M = TypeVar("M", bound=BaseModel)

BODY_MAX_BYTES = 16 * 1024
BODY_TIMEOUT_S = 10
STATEMENT_LIMIT_MAX = 1000
STATEMENT_LIMIT_DEFAULT = 500
AMOUNT_MAX_MINOR = 10**15
_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
_ACCOUNT = r"^[\x21-\x7e]{1,128}$"


class Problem(Exception):
    """An RFC 9457 answer; every error the bank gives is one of these."""

    def __init__(self, status: int, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.extra = status, title, detail, extra

    def response(self) -> Response:
        body = {
            "type": f"/problems/{self.title.lower().replace(' ', '-')}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            **self.extra,
        }
        return Response(
            json.dumps(body), status=self.status, content_type="application/problem+json"
        )


class PaymentBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    account: str = Field(pattern=_ACCOUNT)
    amount_minor: int = Field(gt=0, le=AMOUNT_MAX_MINOR)
    currency: str = Field(pattern=r"^[A-Z]{3}$")


class BalanceBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    balance_minor: int = Field(ge=0, le=AMOUNT_MAX_MINOR)


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.payments = Counter(
            "bank_payments_total", "Payments made", ["kind", "status"], registry=self.registry
        )
        self.faults = Counter(
            "bank_faults_injected_total", "Faults injected", ["fault"], registry=self.registry
        )
        self.latency = Histogram(
            "bank_request_duration_seconds",
            "Request latency, faults included",
            ["route", "method", "status"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )


@dataclass
class _Bank:
    settings: BankSettings
    pool: asyncpg.Pool
    faults: Faults
    metrics: _Metrics


def _json(body: object, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


async def _body(model: type[M]) -> M:
    raw = await request.get_data(cache=False)
    if len(raw) > BODY_MAX_BYTES:
        raise Problem(413, "Body too large", f"at most {BODY_MAX_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise Problem(400, "Malformed JSON", "the body is not valid UTF-8 JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]) or "body", "message": e["msg"]}
            for e in exc.errors()
        ]
        raise Problem(
            400, "Invalid request", "the request body is invalid", errors=errors
        ) from None


def _idempotency_key() -> str:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        raise Problem(400, "Missing idempotency key", "the Idempotency-Key header is required")
    if not _KEY.fullmatch(key):
        raise Problem(400, "Bad idempotency key", "1 to 255 printable ASCII characters")
    return key


def _account(account: str) -> str:
    if not re.fullmatch(_ACCOUNT, account):
        raise Problem(400, "Bad account", "1 to 128 printable ASCII characters")
    return account


async def _payment_request(bank: _Bank, kind: store.Kind) -> store.PaymentRequest:
    key = _idempotency_key()
    body = await _body(PaymentBody)
    if body.currency != bank.settings.currency:
        raise Problem(422, "Unsupported currency", f"this bank holds {bank.settings.currency} only")
    return store.PaymentRequest(key, kind, body.account, body.amount_minor, body.currency)


async def _make_payment(bank: _Bank, kind: store.Kind) -> Response:
    req = await _payment_request(bank, kind)
    decision = bank.faults.roll()
    if decision.lose:
        return await _lose(bank, req, decision.latency_ms)
    if decision.error:
        bank.metrics.faults.labels("error").inc()
        log.info("bank_fault", fault="error", key=req.key, kind=kind)
        await _delay(bank, decision.latency_ms)
        raise Problem(503, "Bank unavailable", "injected fault: nothing was processed; retry")
    s = bank.settings
    try:
        paid = await store.pay(bank.pool, req, s.opening_balance_minor, s.db_timeout_s)
    except store.KeyConflict as exc:
        raise Problem(422, "Idempotency key reused", str(exc)) from None
    payment = paid.payment
    if paid.created:
        bank.metrics.payments.labels(kind, payment["status"]).inc()
    log.info(
        "bank_payment",
        key=req.key,
        kind=kind,
        amount_minor=req.amount_minor,
        status=payment["status"],
        replay=not paid.created,
    )
    await _delay(bank, decision.latency_ms)
    response = _json(payment, 201 if paid.created else 200)
    if decision.drop:
        bank.metrics.faults.labels("drop").inc()
        response.headers[DROP_HEADER.decode()] = "1"
    return response


async def _lose(bank: _Bank, req: store.PaymentRequest, latency_ms: int) -> Response:
    """Read, then lost before the bank acted: no record, and the caller sees what a dropped
    answer looks like (the connection closed, or held past its timeout), so only asking by key
    (GET /payments/{key}: 404) tells the two apart."""
    bank.metrics.faults.labels("lose").inc()
    log.info("bank_fault", fault="lose", key=req.key, kind=req.kind)
    await _delay(bank, latency_ms)
    response = Problem(504, "Request lost", "injected fault: nothing was processed").response()
    response.headers[DROP_HEADER.decode()] = "lose"
    return response


async def _delay(bank: _Bank, latency_ms: int) -> None:
    if latency_ms > 0:
        bank.metrics.faults.labels("latency").inc()
        await asyncio.sleep(latency_ms / 1000)


def _statement_args() -> tuple[str | None, int]:
    raw_limit = request.args.get("limit", str(STATEMENT_LIMIT_DEFAULT))
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= STATEMENT_LIMIT_MAX:
        raise Problem(400, "Bad limit", f"limit must be an integer from 1 to {STATEMENT_LIMIT_MAX}")
    since = request.args.get("since")
    if since is not None:
        try:
            store.decode_cursor(since)
        except store.BadCursor as exc:
            raise Problem(400, "Bad cursor", str(exc)) from None
    return since, int(raw_limit)


def _routes(app: Quart, bank: _Bank) -> None:
    timeout_s = bank.settings.db_timeout_s

    @app.post("/collections")
    async def collections() -> Response:
        return await _make_payment(bank, "collection")

    @app.post("/payouts")
    async def payouts() -> Response:
        return await _make_payment(bank, "payout")

    @app.get("/payments/<path:key>")
    async def payment(key: str) -> Response:
        found = await store.get_payment(bank.pool, key, timeout_s)
        if found is None:
            raise Problem(404, "Unknown payment", "the bank never processed this key")
        return _json(found)

    @app.get("/statement")
    async def statement() -> Response:
        since, limit = _statement_args()
        items, next_cursor = await store.statement(bank.pool, since, limit, timeout_s)
        return _json({"items": items, "next_cursor": next_cursor})

    @app.get("/health")
    async def health() -> Response:
        await store.ping(bank.pool, timeout_s)
        return _json({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(bank.metrics.registry), content_type=CONTENT_TYPE_LATEST)


def _admin_routes(app: Quart, bank: _Bank) -> None:
    timeout_s = bank.settings.db_timeout_s

    @app.get("/admin/faults")
    async def show_faults() -> Response:
        return _json(bank.faults.as_json())

    @app.put("/admin/faults")
    async def set_faults() -> Response:
        bank.faults.update(await _body(FaultsUpdate))
        log.info("bank_faults_set", **bank.faults.as_json())
        return _json(bank.faults.as_json())

    @app.delete("/admin/faults")
    async def clear_faults() -> Response:
        bank.faults.clear()
        log.info("bank_faults_cleared")
        return _json(bank.faults.as_json())

    @app.get("/admin/accounts/<path:account>")
    async def show_account(account: str) -> Response:
        balance = await store.get_balance(bank.pool, _account(account), timeout_s)
        if balance is None:
            raise Problem(404, "Unknown account", "no such customer account")
        return _json({"account": account, "balance_minor": balance})

    @app.put("/admin/accounts/<path:account>")
    async def set_account(account: str) -> Response:
        body = await _body(BalanceBody)
        await store.set_balance(bank.pool, _account(account), body.balance_minor, timeout_s)
        return _json({"account": account, "balance_minor": body.balance_minor})


def _error_handlers(app: Quart) -> None:
    @app.errorhandler(Problem)
    async def problem(exc: Problem) -> Response:
        return exc.response()

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        return Problem(status, exc.name, exc.description or exc.name).response()

    @app.errorhandler(asyncpg.PostgresError)
    @app.errorhandler(asyncpg.InterfaceError)
    @app.errorhandler(OSError)
    @app.errorhandler(TimeoutError)
    async def database_error(exc: Exception) -> Response:
        # Not a definite "not done" (that is 503): a commit may have happened. The key's record
        # (GET /payments/{key}) is the truth, and a retry with the same key is always safe.
        log.warning("bank_database_error", error=exc.__class__.__name__)
        detail = "the outcome is unknown; ask GET /payments/{key} or retry with the same key"
        return Problem(500, "Bank database error", detail).response()


def _instrument(app: Quart, metrics: _Metrics) -> None:
    @app.before_request
    async def started() -> None:
        g.started = time.perf_counter()

    @app.after_request
    async def observed(response: Response) -> Response:
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        elapsed_s = time.perf_counter() - g.get("started", time.perf_counter())
        metrics.latency.labels(rule, request.method, str(response.status_code)).observe(elapsed_s)
        return response


def create_app(settings: BankSettings, pool: asyncpg.Pool) -> Quart:
    """The Quart app on an open pool (the caller owns it and the database behind it)."""
    app = Quart("kizo-mockbank")
    app.config.update(MAX_CONTENT_LENGTH=BODY_MAX_BYTES, BODY_TIMEOUT=BODY_TIMEOUT_S)
    bank = _Bank(settings, pool, Faults(), _Metrics())
    _routes(app, bank)
    _admin_routes(app, bank)
    _error_handlers(app)
    _instrument(app, bank.metrics)
    return app


def create_asgi(settings: BankSettings, pool: asyncpg.Pool) -> ASGIApp:
    """What granian serves: the app behind the layer that carries out dropped answers."""
    # Quart types its ASGI messages precisely; the drop layer only passes them through.
    app = cast(ASGIApp, create_app(settings, pool))
    return DropAnswers(app, settings.drop_mode, settings.drop_hold_s)
