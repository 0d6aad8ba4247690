"""The mock bank's HTTP API (contract: docs/bank-api.md). A small Quart app with its own store.

Faults are injected on POST /collections and /payouts only; GET /payments and /statement stay
truthful so that Kizo can always recover the truth.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from quart import Quart, Response, request

from chaos.mockbank import store
from kizo.config import Config
from kizo.migrate import migrate

BODY_MAX_BYTES = 16 * 1024
STATEMENT_LIMIT_MAX = 1000
AMOUNT_MAX_MINOR = 10**15
LATENCY_MAX_MS = 10_000


class PaymentBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    account: str = Field(min_length=1, max_length=128)
    amount_minor: int = Field(gt=0, le=AMOUNT_MAX_MINOR)
    currency: str = Field(pattern=r"^[A-Z]{3}$")


class FaultsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    error_rate: float | None = Field(default=None, ge=0, le=1)
    latency_ms: int | None = Field(default=None, ge=0, le=LATENCY_MAX_MS)
    drop_rate: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = None


class BalanceBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    balance_minor: int = Field(ge=0, le=AMOUNT_MAX_MINOR)


@dataclass
class Faults:
    error_rate: float = 0.0
    latency_ms: int = 0
    drop_rate: float = 0.0
    seed: int | None = None
    rng: random.Random = field(default_factory=random.Random)

    def as_json(self) -> dict[str, Any]:
        return {
            "error_rate": self.error_rate,
            "latency_ms": self.latency_ms,
            "drop_rate": self.drop_rate,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class BankSettings:
    database_url: str
    opening_balance_minor: int
    # "Drop the answer": the payment is committed, then the caller waits this long for nothing.
    drop_hold_s: float


def bank_database_url(config: Config, env: dict[str, str]) -> str:
    explicit = env.get("BANK_DATABASE_URL")
    if explicit:
        return explicit
    base = config.pg_url()
    return base.rsplit("/", 1)[0] + "/bank"


def problem(status: int, title: str, detail: str, **extra: Any) -> Response:
    body = {
        "type": f"/problems/{title.lower().replace(' ', '-')}",
        "title": title,
        "status": status,
        "detail": detail,
        **extra,
    }
    return Response(json.dumps(body), status=status, content_type="application/problem+json")


def _json(body: object, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.payments = Counter(
            "bank_payments_total", "Payments made", ["kind", "status"], registry=self.registry
        )
        self.faults = Counter(
            "bank_faults_total", "Faults injected", ["fault"], registry=self.registry
        )
        self.latency = Histogram(
            "bank_request_seconds", "Payment request latency", ["kind"], registry=self.registry
        )


async def _read_json() -> tuple[Any, Response | None]:
    raw = await request.get_data(cache=False)
    if len(raw) > BODY_MAX_BYTES:
        return None, problem(413, "Body too large", f"at most {BODY_MAX_BYTES} bytes")
    try:
        return json.loads(raw), None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, problem(400, "Malformed JSON", "the body is not valid JSON")


def _validation_problem(exc: ValidationError) -> Response:
    errors = [
        {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()
    ]
    return problem(400, "Invalid request", "the request body is invalid", errors=errors)


def create_app(settings: BankSettings | None = None) -> Quart:
    """App factory (granian calls it without arguments: settings then come from the env)."""
    if settings is None:
        config = Config.from_env()
        settings = BankSettings(
            database_url=bank_database_url(config, dict(os.environ)),
            opening_balance_minor=int(
                os.environ.get("KIZO_BANK_OPENING_BALANCE_MINOR", "100000000")
            ),
            drop_hold_s=float(os.environ.get("KIZO_BANK_DROP_HOLD_S", "30")),
        )
    app = Quart("kizo-mockbank")
    app.config["MAX_CONTENT_LENGTH"] = BODY_MAX_BYTES
    faults = Faults()
    metrics = _Metrics()
    state: dict[str, asyncpg.Pool] = {}

    @app.before_serving
    async def startup() -> None:
        await _ensure_database(settings.database_url)
        pool = await asyncpg.create_pool(
            settings.database_url, min_size=1, max_size=8, command_timeout=10
        )
        assert pool is not None
        async with pool.acquire() as conn:
            await migrate(conn, store.MIGRATIONS)
        state["pool"] = pool

    @app.after_serving
    async def shutdown() -> None:
        await state["pool"].close()

    async def make_payment(kind: str) -> Response:
        started = time.perf_counter()
        key = request.headers.get("Idempotency-Key", "")
        if not 1 <= len(key) <= 255:
            return problem(
                400,
                "Missing idempotency key",
                "Idempotency-Key header of 1 to 255 characters is required",
            )
        body, error = await _read_json()
        if error is not None:
            return error
        try:
            parsed = PaymentBody.model_validate(body)
        except ValidationError as exc:
            return _validation_problem(exc)
        if faults.rng.random() < faults.error_rate:
            metrics.faults.labels("error").inc()
            return problem(503, "Bank unavailable", "injected fault: nothing was processed")
        req = store.PaymentRequest(key, kind, parsed.account, parsed.amount_minor, parsed.currency)
        try:
            created, payment = await store.pay(state["pool"], req, settings.opening_balance_minor)
        except store.KeyConflict as exc:
            return problem(422, "Idempotency key reused", str(exc))
        if created:
            metrics.payments.labels(kind, payment["status"]).inc()
        if faults.latency_ms:
            await asyncio.sleep(faults.latency_ms / 1000)
        if faults.rng.random() < faults.drop_rate:
            metrics.faults.labels("drop").inc()
            await asyncio.sleep(settings.drop_hold_s)
            return problem(504, "Answer dropped", "injected fault: processed, answer withheld")
        metrics.latency.labels(kind).observe(time.perf_counter() - started)
        return _json(payment, 201 if created else 200)

    @app.post("/collections")
    async def collections() -> Response:
        return await make_payment("collection")

    @app.post("/payouts")
    async def payouts() -> Response:
        return await make_payment("payout")

    @app.get("/payments/<key>")
    async def payment(key: str) -> Response:
        found = await store.get_payment(state["pool"], key)
        if found is None:
            return problem(404, "Unknown payment", "the bank never processed this key")
        return _json(found)

    @app.get("/statement")
    async def statement() -> Response:
        try:
            since = int(request.args.get("since", "0"))
            limit = int(request.args.get("limit", "500"))
        except ValueError:
            return problem(400, "Bad cursor", "since and limit must be integers")
        if since < 0 or not 1 <= limit <= STATEMENT_LIMIT_MAX:
            return problem(400, "Bad cursor", f"since >= 0, 1 <= limit <= {STATEMENT_LIMIT_MAX}")
        items, next_seq = await store.statement(state["pool"], since, limit)
        return _json({"items": items, "next_cursor": None if next_seq is None else str(next_seq)})

    @app.route("/admin/faults", methods=["GET", "PUT", "DELETE"])
    async def admin_faults() -> Response:
        if request.method == "DELETE":
            faults.error_rate, faults.latency_ms, faults.drop_rate, faults.seed = 0.0, 0, 0.0, None
        elif request.method == "PUT":
            body, error = await _read_json()
            if error is not None:
                return error
            try:
                parsed = FaultsBody.model_validate(body)
            except ValidationError as exc:
                return _validation_problem(exc)
            for name in ("error_rate", "latency_ms", "drop_rate"):
                if getattr(parsed, name) is not None:
                    setattr(faults, name, getattr(parsed, name))
            if parsed.seed is not None:
                faults.seed = parsed.seed
                faults.rng = random.Random(parsed.seed)
        return _json(faults.as_json())

    @app.route("/admin/accounts/<account>", methods=["GET", "PUT"])
    async def admin_account(account: str) -> Response:
        if request.method == "PUT":
            body, error = await _read_json()
            if error is not None:
                return error
            try:
                parsed = BalanceBody.model_validate(body)
            except ValidationError as exc:
                return _validation_problem(exc)
            await store.set_balance(state["pool"], account, parsed.balance_minor)
        balance = await store.get_balance(state["pool"], account)
        if balance is None:
            return problem(404, "Unknown account", "no such customer account")
        return _json({"account": account, "balance_minor": balance})

    @app.get("/health")
    async def health() -> Response:
        return _json({"status": "ok"})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(metrics.registry), content_type="text/plain; version=0.0.4")

    @app.errorhandler(404)
    async def not_found(_exc: Exception) -> Response:
        return problem(404, "Not found", "no such endpoint")

    @app.errorhandler(405)
    async def not_allowed(_exc: Exception) -> Response:
        return problem(405, "Method not allowed", "this endpoint does not take that method")

    @app.errorhandler(413)
    async def too_large(_exc: Exception) -> Response:
        return problem(413, "Body too large", f"at most {BODY_MAX_BYTES} bytes")

    return app


async def _ensure_database(url: str) -> None:
    """Create the bank's database on first start (it lives on the same server as Kizo's)."""
    base, name = url.rsplit("/", 1)
    name = name.split("?", 1)[0]
    try:
        conn = await asyncpg.connect(url, timeout=10)
    except asyncpg.InvalidCatalogNameError:
        admin = await asyncpg.connect(f"{base}/postgres", timeout=10)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        except asyncpg.DuplicateDatabaseError:
            pass
        finally:
            await admin.close()
    else:
        await conn.close()
