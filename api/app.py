"""The Quart app: HTTP shapes only. Rules live in api._service, errors in api._problems."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import redis.exceptions
import structlog
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ValidationError
from quart import Quart, Response, g, request
from redis.asyncio import Redis

from actors.routing import Coalescer, QueueSet, Routed, actor_account
from api import _service as svc
from api._auth import Claims, KeyRing, Passwords, RefreshTokens, ensure_key
from api._edges import cors, install, ip_key
from api._hashing import HashingUnavailable
from api._models import Amount, RefreshBody, Signin, Signup, TransferBody
from api._openapi import DOCS_PAGE, document
from api._problems import Problem, from_ledger
from engine import LedgerError, Transaction, get_balance
from kizo.config import Config
from kizo.db import create_pool, redis_client
from kizo.migrate import pending_migrations

log = structlog.get_logger("kizo.api")
# A lost or refused connection to PostgreSQL or Redis, or a query past its timeout.
BACKEND_LOST: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)
BODY_MAX_BYTES = 64 * 1024
# A request's Redis command (an enqueue, a refresh token) fails after this: the API answers
# rather than hangs, and a payment's intent row is the outbox if its enqueue failed.
REDIS_TIMEOUT_S = 2.0
KEYRING_TTL_S = 5.0
M = TypeVar("M", bound=BaseModel)
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,189}\.[^@\s]{2,}$")
_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


@dataclass
class State:
    config: Config
    pool: asyncpg.Pool
    redis: Redis
    coalescer: Coalescer
    flusher: asyncio.Task[None]
    passwords: Passwords
    refresh: RefreshTokens
    keys: KeyRing
    keys_loaded_at: float
    registry: CollectorRegistry
    enqueue_failures: Counter


def _json(body: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    response = Response(json.dumps(body), status=status, content_type="application/json")
    response.headers.update(headers or {})
    return response


async def _body(model: type[M]) -> M:
    raw = await request.get_data(cache=True)
    if len(raw) > BODY_MAX_BYTES:
        raise Problem(413, "Body too large", f"at most {BODY_MAX_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise Problem(400, "Malformed JSON", "the body is not valid UTF-8 JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [{"field": ".".join(str(p) for p in e["loc"]) or "body", "message": e["msg"]}
                  for e in exc.errors()]  # fmt: skip
        raise Problem(
            422, "Invalid request", "the request body is invalid", errors=errors
        ) from None


def create_app(config: Config | None = None) -> Quart:
    config = config or Config.from_env()
    app = Quart("kizo-api")
    app.config["MAX_CONTENT_LENGTH"] = BODY_MAX_BYTES
    holder: dict[str, State] = {}

    def state() -> State:
        return holder["state"]

    @app.before_serving
    async def startup() -> None:
        # No API statement should wait long for a lock; the one that may (a payment whose
        # idempotency key is in flight elsewhere) turns a longer wait into 409.
        lock_timeout = {"lock_timeout": f"{svc.IDEMPOTENCY_WAIT_MS}ms"}
        pool = await create_pool(config.pg_url(), min_size=2, max_size=10, command_timeout=10,
                                 acquire_timeout_s=config.pools.wait_s,
                                 server_settings=lock_timeout)  # fmt: skip
        await ensure_key(pool)
        if config.mutation:
            log.warning(
                "MUTATION_ACTIVE",
                mutation=config.mutation,
                meaning="a broken build, on purpose, to test the chaos checker",
            )
        pools = config.pools
        redis = redis_client(config.valkey_url(), connections_max=pools.api_redis_connections_max,
                             wait_s=pools.wait_s, socket_timeout_s=REDIS_TIMEOUT_S,
                             connect_timeout_s=pools.redis_connect_timeout_s)  # fmt: skip
        registry = CollectorRegistry()
        queues = QueueSet(redis, config.pipeline.shards, pools.enqueue_concurrency_max)
        coalescer = Coalescer(queues)
        registry.register(_CoalescerCollector(coalescer))
        passwords = Passwords(config.auth)
        try:
            await passwords.warm_up()
        except HashingUnavailable as exc:  # payments need no hashing: serve, retry at sign-in
            log.warning("HASHING_UNAVAILABLE", error=str(exc))
        holder["state"] = State(
            config, pool, redis, coalescer, asyncio.create_task(coalescer.run()),
            passwords,
            RefreshTokens(redis, config.auth.refresh_ttl_s), await KeyRing.load(pool),
            time.monotonic(), registry,
            Counter("kizo_api_enqueue_failures_total", "Enqueues that failed (outbox relays)",
                    registry=registry),
        )  # fmt: skip

    @app.after_serving
    async def shutdown() -> None:
        s = state()
        s.flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await s.flusher
        await s.passwords.aclose()
        await s.redis.aclose()
        await s.pool.close()

    @app.before_request
    async def request_id() -> None:
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = (
            incoming if _KEY.match(incoming) and len(incoming) <= 64 else str(uuid.uuid4())
        )

    @app.after_request
    async def headers(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.get("request_id", "")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-store"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.errorhandler(Problem)
    async def problem(exc: Problem) -> Response:
        return exc.response()

    @app.errorhandler(asyncpg.LockNotAvailableError)
    async def lock_wait(_exc: asyncpg.LockNotAvailableError) -> Response:
        return Problem(503, "Busy", "the request waited too long for a lock; nothing was changed",
                       headers={"Retry-After": "1"}).response()  # fmt: skip

    async def unavailable(exc: Exception) -> Response:
        # The connection died mid-request: a payment's commit may or may not have landed, so
        # the client is told to retry with the same key, which replays it if it did.
        log.warning("backend_unavailable", error=repr(exc), request_id=g.get("request_id"))
        return Problem(503, "Service unavailable",
                       "a backing service did not answer; a payment may or may not have been "
                       "recorded: retry with the same Idempotency-Key",
                       headers={"Retry-After": "1"}).response()  # fmt: skip

    for lost in BACKEND_LOST:
        app.register_error_handler(lost, unavailable)

    @app.errorhandler(LedgerError)
    async def ledger_error(exc: LedgerError) -> Response:
        return from_ledger(exc).response()

    for status, title in ((404, "Not found"), (405, "Method not allowed"),
                          (413, "Body too large")):  # fmt: skip
        app.register_error_handler(status, _status_handler(status, title))

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        log.error("unhandled", error=repr(exc), request_id=g.get("request_id"))
        return Problem(
            500, "Internal error", "something went wrong; nothing was changed"
        ).response()

    async def keyring() -> KeyRing:
        """The key ring, re-read at most every KEYRING_TTL_S: ``kizo keys rotate`` reaches every
        running API process within that time, with no restart."""
        s = state()
        now = time.monotonic()
        if now - s.keys_loaded_at > KEYRING_TTL_S:
            s.keys, s.keys_loaded_at = await KeyRing.load(s.pool), now
        return s.keys

    async def auth() -> tuple[Claims, svc.User]:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            raise Problem(401, "Unauthorized", "a Bearer access token is required",
                          headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        claims = (await keyring()).verify(header[7:])
        return claims, await svc.get_user(state().pool, claims.user_id)

    async def tokens(user: svc.User, refresh: str | None = None) -> dict[str, Any]:
        s = state()
        ttl = s.config.auth.access_ttl_s
        return {"access_token": (await keyring()).sign(Claims(user.id, user.role), ttl),
                "refresh_token": refresh or await s.refresh.issue(user.id),
                "token_type": "Bearer", "expires_in": ttl}  # fmt: skip

    @app.post("/api/v1/auth/signup")
    async def signup() -> Response:
        body = await _body(Signup)
        if not _EMAIL.match(body.email):
            raise Problem(
                422,
                "Invalid request",
                "email is not an email address",
                errors=[{"field": "email", "message": "not an email address"}],
            )
        s = state()
        password_hash = await s.passwords.hash(body.password)
        user = await svc.create_user(s.pool, body.email, body.name, password_hash,
                                     s.config.ledger.currency)  # fmt: skip
        return _json({"user": user.as_json(), **await tokens(user)}, 201)

    @app.post("/api/v1/auth/signin")
    async def signin() -> Response:
        body = await _body(Signin)
        user, stored = await svc.find_login(state().pool, body.email)
        if not await state().passwords.verify(stored, body.password) or user is None:
            raise Problem(401, "Unauthorized", "wrong email or password")
        return _json(await tokens(user))

    @app.post("/api/v1/auth/refresh")
    async def refresh() -> Response:
        body = await _body(RefreshBody)
        user_id, new_token = await state().refresh.rotate(body.refresh_token)
        user = await svc.get_user(state().pool, user_id)
        return _json(await tokens(user, new_token))

    @app.post("/api/v1/auth/logout")
    async def logout() -> Response:
        body = await _body(RefreshBody)
        await state().refresh.revoke(body.refresh_token)
        return Response(status=204)

    @app.get("/api/v1/accounts/me")
    async def me() -> Response:
        _claims, user = await auth()
        view = await get_balance(state().pool, user.account_id)
        return _json({"account_id": str(view.account_id), "currency": view.currency,
                      "posted": view.posted, "pending": view.pending,
                      "available": view.available})  # fmt: skip

    async def payment(kind: str, model: type[Amount]) -> Response:
        with state().passwords.held_off():  # payments outrank sign-ins' hashing
            return await _payment(kind, model)

    async def _payment(kind: str, model: type[Amount]) -> Response:
        _claims, user = await auth()
        key = request.headers.get("Idempotency-Key")
        if key is None or not _KEY.match(key):
            raise Problem(
                400,
                "Idempotency key required",
                "send an Idempotency-Key header of 1 to 255 visible ASCII characters",
            )
        body = (await _body(model)).model_dump(exclude_none=True)
        s = state()
        stored = await svc.pay(
            s.pool,
            user,
            key,
            request.path,
            kind,
            body,
            s.config.ledger.currency,
            s.config.ledger.amount_max_minor,
            record_key=s.config.mutation != "idempotency_off",
        )
        if stored.txn is not None:
            await _enqueue(s, stored.txn)
        headers = {"Idempotent-Replayed": "true"} if stored.replayed else {}
        return _json(stored.body, stored.status, headers)

    @app.post("/api/v1/payments/deposit")
    async def deposit() -> Response:
        return await payment("deposit", Amount)

    @app.post("/api/v1/payments/withdraw")
    async def withdraw() -> Response:
        return await payment("withdrawal", Amount)

    @app.post("/api/v1/payments/transfer")
    async def transfer() -> Response:
        return await payment("transfer", TransferBody)

    @app.get("/api/v1/transactions")
    async def transactions() -> Response:
        _claims, user = await auth()
        raw_limit = request.args.get("limit", "50")
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= svc.PAGE_MAX:
            raise Problem(400, "Bad limit", f"limit must be an integer from 1 to {svc.PAGE_MAX}")
        page = await svc.list_transactions(state().pool, user, request.args.get("cursor"),
                                           int(raw_limit))  # fmt: skip
        return _json(page)

    @app.get("/api/v1/transactions/<txn_id>")
    async def transaction(txn_id: str) -> Response:
        _claims, user = await auth()
        try:
            parsed = uuid.UUID(txn_id)
        except ValueError:
            raise Problem(404, "Not found", "no such transaction") from None
        return _json(await svc.get_transaction(state().pool, user, parsed))

    @app.get("/api/v1/transactions/export.csv")
    async def export() -> Response:
        _claims, user = await auth()
        response = Response(svc.export_csv(state().pool, user), content_type="text/csv")
        response.headers["Content-Disposition"] = 'attachment; filename="transactions.csv"'
        return response

    @app.get("/api/v1/dashboard")
    async def dashboard() -> Response:
        _claims, user = await auth()
        return _json(await svc.dashboard(state().pool, user, state().config.ledger.currency))

    @app.get("/api/v1/admin/reconciliation")
    async def reconciliation() -> Response:
        claims, user = await auth()
        if user.role != "admin":  # the database's role, not the token's claim, decides
            raise Problem(403, "Forbidden", "admins only")
        del claims
        return _json({"items": await svc.findings(state().pool)})

    @app.get("/openapi.json")
    async def openapi() -> Response:
        return _json(document())

    @app.get("/docs")
    async def docs() -> Response:
        return Response(DOCS_PAGE, content_type="text/html; charset=utf-8")

    @app.get("/health")
    async def health() -> Response:
        return _json({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        return await _ready(state())

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state().registry),
                        content_type="text/plain; version=0.0.4")  # fmt: skip

    async def user_key() -> str:
        header = request.headers.get("Authorization", "")
        try:
            return f"user:{(await keyring()).verify(header[7:]).user_id}"
        except Problem:
            return await ip_key()

    install(app, config.limits, config.pools, config.valkey_url(), user_key)
    cors(app, config.limits.cors_origins)
    return app


class _CoalescerCollector(Collector):
    """How many SAQ enqueues the API made and how many intents they carried."""

    def __init__(self, coalescer: Coalescer) -> None:
        self.coalescer = coalescer

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily("kizo_api_enqueue_flushes", "SAQ enqueue round trips of the API",
                                  value=self.coalescer.flushes)  # fmt: skip
        yield CounterMetricFamily("kizo_api_enqueued_intents", "Intents enqueued by the API",
                                  value=self.coalescer.intents)  # fmt: skip


def _status_handler(status: int, title: str) -> Callable[[Exception], Awaitable[Response]]:
    async def handler(_exc: Exception) -> Response:
        return Problem(status, title, title.lower()).response()

    return handler


async def _enqueue(s: State, txn: Transaction) -> None:
    """After commit, so whatever goes wrong here the answer is still the 202 of a recorded
    intent: it stays pending and the janitor's relay enqueues it."""
    try:
        await s.coalescer.enqueue(Routed(txn.id, actor_account(txn.kind, txn.source_id,
                                                               txn.dest_id)))  # fmt: skip
    except Exception as exc:  # Redis down, timeouts, SAQ errors: the outbox covers them all
        s.enqueue_failures.inc()
        log.warning("enqueue_failed", txn=str(txn.id), error=repr(exc))


async def _ready(s: State) -> Response:
    checks: dict[str, str] = {}
    try:
        async with s.pool.acquire() as conn:
            checks["postgres"] = (
                "ok" if not await pending_migrations(conn) else "migrations pending"
            )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        checks["postgres"] = "unreachable"
    try:
        await s.redis.ping()
        checks["redis"] = "ok"
    except (redis.exceptions.RedisError, OSError):
        checks["redis"] = "unreachable"
    ok = all(v == "ok" for v in checks.values())
    return _json({"status": "ready" if ok else "not ready", "checks": checks}, 200 if ok else 503)
