"""Rate limits (quart-rate-limiter on Redis, shared by every API process) and CORS."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, cast

from quart import Quart, Response, request
from quart_rate_limiter import RateLimit, RateLimiter, RateLimitExceeded, rate_limit
from quart_rate_limiter.redis_store import RedisStore

from api._metrics import RATE_LIMITED, route
from api._problems import Problem
from api.routes import PAYMENTS, SIGNIN, SIGNUP
from infra.config import PoolsConfig, RateLimitConfig
from infra.db import redis_client

MINUTE = timedelta(minutes=1)
CORS_HEADERS = "Authorization, Content-Type, Idempotency-Key, X-Request-ID"
CORS_EXPOSE = "Idempotent-Replayed, X-Request-ID, Retry-After, RateLimit-Limit, RateLimit-Remaining"
CORS_MAX_AGE_S = 600
RATE_LIMIT_REDIS_TIMEOUT_S = 2.0  # a limit check is on every request's path: fail fast


class _Store(RedisStore):
    """RedisStore on a pool that waits when full (its own from_url pool is unbounded), closing
    its client with ``aclose`` (its ``close`` is deprecated in redis 5)."""

    def __init__(self, redis_url: str, pools: PoolsConfig) -> None:
        super().__init__(redis_url)
        self._url, self._pools = redis_url, pools

    async def before_serving(self) -> None:
        self._redis = redis_client(
            self._url,
            connections_max=self._pools.api_redis_connections_max,
            wait_s=self._pools.wait_s,
            socket_timeout_s=RATE_LIMIT_REDIS_TIMEOUT_S,
            connect_timeout_s=self._pools.redis_connect_timeout_s,
        )

    async def after_serving(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None


async def ip_key() -> str:
    return f"ip:{request.remote_addr or 'unknown'}"


async def email_key() -> str:
    """The email of a sign-in, so one account cannot be guessed at from many addresses."""
    try:
        body = json.loads(await request.get_data(cache=True))
        email = str(body.get("email", "")).lower()[:254] if isinstance(body, dict) else ""
    except (UnicodeDecodeError, json.JSONDecodeError):
        email = ""
    return f"email:{email}" if email else await ip_key()


def install(app: Quart, limits: RateLimitConfig, pools: PoolsConfig, redis_url: str,
            user_key: Callable[[], Awaitable[str]]) -> None:  # fmt: skip
    if not limits.enabled:
        return
    RateLimiter(app, key_function=ip_key, store=_Store(redis_url, pools),
                default_limits=[RateLimit(limits.default_per_ip, MINUTE)])  # fmt: skip

    def limit(endpoint: str, *rules: RateLimit) -> None:
        # The decorator marks a function, which the limiter reads per request. The views are
        # module-level functions shared by every app of the process (and the mark accumulates),
        # so this app's marks go on a wrapper of its own.
        view = cast("Callable[..., Awaitable[Any]]", app.view_functions[endpoint])

        async def limited(*args: Any, **kwargs: Any) -> Any:
            return await view(*args, **kwargs)

        app.view_functions[endpoint] = rate_limit(limits=list(rules))(limited)

    limit(
        SIGNIN,
        RateLimit(limits.signin_per_ip, MINUTE, ip_key),
        RateLimit(limits.signin_per_email, MINUTE, email_key),
    )
    limit(SIGNUP, RateLimit(limits.signup_per_ip, MINUTE, ip_key))
    for endpoint in PAYMENTS:
        limit(endpoint, RateLimit(limits.payments_per_user, MINUTE, user_key))
    for rule in app.url_map.iter_rules():  # every route is limited (per IP): 0, not absent
        RATE_LIMITED.labels(rule.rule)

    @app.errorhandler(RateLimitExceeded)
    async def too_many(exc: RateLimitExceeded) -> Response:
        RATE_LIMITED.labels(route()).inc()
        return Problem(
            429,
            "Too many requests",
            "slow down and retry later",
            headers={"Retry-After": str(exc.retry_after)},
        ).response()


def trust_forwarded(app: Quart, proxies: tuple[str, ...]) -> None:
    """Behind a gateway every connection comes from the gateway: take the client's address
    from X-Forwarded-For, but only when the peer is one of ``proxies``, and then the last
    address in it that is not a proxy itself (what the gateway saw), so a client cannot name
    itself. Per-IP rate limits count clients, not gateways."""
    if not proxies:
        return
    from granian.utils.proxies import wrap_asgi_with_proxy_headers

    app.asgi_app = wrap_asgi_with_proxy_headers(app.asgi_app, list(proxies))  # type: ignore[method-assign]


def cors(app: Quart, origins: tuple[str, ...]) -> None:
    """Only configured origins; credentials are allowed, so never a wildcard origin."""
    allowed = frozenset(origins)

    @app.after_request
    async def headers(response: Response) -> Response:
        origin = request.headers.get("Origin")
        if origin is None or origin not in allowed:
            return response
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE
        response.vary.add("Origin")
        if request.method == "OPTIONS":
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = CORS_HEADERS
            response.headers["Access-Control-Max-Age"] = str(CORS_MAX_AGE_S)
        return response
