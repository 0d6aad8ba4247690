"""The app factory: it wires state, error handlers and blueprints; routes live in api.routes,
rules in api._service, errors in api._problems."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable

import asyncpg
import structlog
from quart import Quart, Response, g, request

from actors import Coalescer, QueueSet
from api import _metrics as metrics
from api import _service as svc
from api._auth import Passwords, RefreshTokens, ensure_key, require_secrets
from api._edges import REDIS_LOST, cors, install, ip_key, trust_forwarded
from api._hashing import HashingUnavailable
from api._http import BODY_MAX_BYTES, VISIBLE_ASCII, keyring
from api._problems import Problem, from_ledger
from api._state import STATE_KEY, State, state
from api.routes import BLUEPRINTS
from engine import LedgerError
from infra import logs
from infra.config import Config
from infra.db import create_pool, redis_client

__all__ = ["BACKEND_LOST", "BODY_MAX_BYTES", "create_app"]
log = structlog.get_logger("kizo.api")
# A lost or refused connection to PostgreSQL or Redis, or a query past its timeout.
BACKEND_LOST: tuple[type[Exception], ...] = (
    *REDIS_LOST,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    # A connection lost mid-transaction (PostgreSQL killed) can leave asyncpg's protocol state
    # confused ("cannot switch to state 12; another operation is in progress", asyncpg #1069):
    # the commit may or may not have landed, so it is a 503 to retry, not a 500 "nothing
    # changed". Found by the pg-crash chaos scenario.
    asyncpg.InternalClientError,
)
REQUEST_ID_MAX = 64
# A request's Redis command (an enqueue, a refresh token) fails after this: the API answers
# rather than hangs, and a payment's intent row is the outbox if its enqueue failed.
REDIS_TIMEOUT_S = 2.0


def create_app(config: Config | None = None) -> Quart:
    config = config or Config.from_env()
    require_secrets(config.auth)  # `kizo api` said so in one line already; this guards the rest
    if logs.configured_role() is None:  # a granian worker that was not forked from `kizo api`
        logs.configure("api")
    app = Quart("kizo-api", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = BODY_MAX_BYTES
    lifecycle(app, config)
    request_hooks(app)
    metrics.instrument(app)  # before the rate limiter's hook: its 429s are timed too
    error_handlers(app)
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)
    install(app, config.limits, config.pools, config.valkey_url(), user_key)
    cors(app, config.limits.cors_origins)
    trust_forwarded(app, config.limits.trusted_proxies)
    return app


def lifecycle(app: Quart, config: Config) -> None:
    """Startup (pools, keys, hashing processes, the enqueue coalescer) and shutdown, in reverse."""

    @app.before_serving
    async def startup() -> None:
        # No API statement should wait long for a lock; the one that may (a payment whose
        # idempotency key is in flight elsewhere) turns a longer wait into 409.
        lock_timeout = {"lock_timeout": f"{svc.IDEMPOTENCY_WAIT_MS}ms"}
        pool = await create_pool(config.pg_url(), min_size=2, max_size=10, command_timeout=10,
                                 acquire_timeout_s=config.pools.wait_s,
                                 server_settings=lock_timeout)  # fmt: skip
        keys = await ensure_key(pool, config.auth.keyring_key)
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
        queues = QueueSet(redis, config.pipeline.shards, pools.enqueue_concurrency_max)
        coalescer = Coalescer(queues, on_flush=metrics.enqueue_flushed)
        passwords = Passwords(config.auth)
        try:
            await passwords.warm_up()
        except HashingUnavailable as exc:  # payments need no hashing: serve, retry at sign-in
            log.warning("HASHING_UNAVAILABLE", error=str(exc))
        app.extensions[STATE_KEY] = State(
            config, pool, redis, coalescer, asyncio.create_task(coalescer.run()),
            passwords,
            RefreshTokens(redis, config.auth.refresh_ttl_s), keys,
            time.monotonic(),
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


def request_hooks(app: Quart) -> None:
    @app.before_request
    async def request_id() -> None:
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = (
            incoming
            if VISIBLE_ASCII.fullmatch(incoming) and len(incoming) <= REQUEST_ID_MAX
            else str(uuid.uuid4())
        )
        # Every event of this request carries its id (and, once known, its user and
        # transaction): a request runs in a task of its own, with its own context.
        structlog.contextvars.clear_contextvars()
        logs.bind(request_id=g.request_id)

    @app.after_request
    async def headers(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.get("request_id", "")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-store"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response


def error_handlers(app: Quart) -> None:
    """Every error becomes problem+json here, in one place."""

    @app.errorhandler(Problem)
    async def problem(exc: Problem) -> Response:
        return exc.response()

    @app.errorhandler(asyncpg.LockNotAvailableError)
    async def lock_wait(_exc: asyncpg.LockNotAvailableError) -> Response:
        return Problem(503, "Busy", "the request waited too long for a lock; nothing was changed",
                       headers={"Retry-After": "1"}).response()  # fmt: skip

    for lost in BACKEND_LOST:
        app.register_error_handler(lost, _unavailable)

    @app.errorhandler(LedgerError)
    async def ledger_error(exc: LedgerError) -> Response:
        return from_ledger(exc).response()

    for status, title in ((404, "Not found"), (405, "Method not allowed"),
                          (413, "Body too large")):  # fmt: skip
        app.register_error_handler(status, _status_handler(status, title))

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        log.error("unhandled", error=repr(exc))
        return Problem(
            500, "Internal error", "something went wrong; nothing was changed"
        ).response()


async def _unavailable(exc: Exception) -> Response:
    # The connection died mid-request: a payment's commit may or may not have landed, so
    # the client is told to retry with the same key, which replays it if it did.
    log.warning("backend_unavailable", error=repr(exc))
    return Problem(503, "Service unavailable",
                   "a backing service did not answer; a payment may or may not have been "
                   "recorded: retry with the same Idempotency-Key",
                   headers={"Retry-After": "1"}).response()  # fmt: skip


async def user_key() -> str:
    """The rate-limit key of a payment: its user when the token verifies, else its IP."""
    header = request.headers.get("Authorization", "")
    try:
        return f"user:{(await keyring()).verify(header[7:]).user_id}"
    except Problem:
        return await ip_key()


def _status_handler(status: int, title: str) -> Callable[[Exception], Awaitable[Response]]:
    async def handler(_exc: Exception) -> Response:
        return Problem(status, title, title.lower()).response()

    return handler
