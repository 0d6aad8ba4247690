"""Rate limits (GCRA in one Redis script, shared by every API process) and CORS."""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.exceptions
import structlog
from quart import Quart, Response, g, request
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from api._metrics import RATE_LIMIT_UNAVAILABLE, RATE_LIMITED, route
from api._problems import Problem
from api.routes import PAYMENTS, SIGNIN, SIGNUP
from infra.config import PoolsConfig, RateLimitConfig
from infra.db import redis_client

log = structlog.get_logger("kizo.api")
# A lost or refused connection to Redis, or a command past its timeout (api.app's
# BACKEND_LOST adds PostgreSQL's).
REDIS_LOST: tuple[type[Exception], ...] = (OSError, TimeoutError,
                                           redis.exceptions.ConnectionError,
                                           redis.exceptions.TimeoutError)  # fmt: skip

MINUTE_S = 60
CORS_HEADERS = "Authorization, Content-Type, Idempotency-Key, X-Request-ID"
CORS_EXPOSE = "Idempotent-Replayed, X-Request-ID, Retry-After, RateLimit-Limit, RateLimit-Remaining"
CORS_MAX_AGE_S = 600
RATE_LIMIT_REDIS_TIMEOUT_S = 2.0  # a limit check is on every request's path: fail fast
KEY_PREFIX = "kizo:rl:"

# GCRA (the generic cell rate algorithm) over every limit of one request, atomically, in one
# round trip. Per limit a key holds the theoretical arrival time (TAT, µs on Redis's clock, so
# API processes on several hosts agree); a request is admitted when, for every limit,
# TAT - (period - interval) <= now, and then each TAT moves one interval (period / count) on.
# Refused, nothing is written. Answers: admitted (1/0), the seconds to wait when refused, and
# the first limit's remaining count and seconds until it is whole again (the RateLimit-*
# headers). KEYS: one per limit; ARGV: period and interval (µs) per limit.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tats, wait = {}, 0
for i = 1, #KEYS do
    local period, interval = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
    local tat = math.max(tonumber(redis.call('GET', KEYS[i]) or now), now)
    tats[i] = tat
    wait = math.max(wait, tat - (period - interval) - now)
end
if wait <= 0 then
    for i = 1, #KEYS do
        local interval = tonumber(ARGV[2 * i])
        tats[i] = tats[i] + interval
        redis.call('SET', KEYS[i], tats[i], 'PX', math.ceil((tats[i] - now) / 1000))
    end
end
local period, interval = tonumber(ARGV[1]), tonumber(ARGV[2])
local remaining = math.floor((period - (tats[1] - now)) / interval)
return {wait <= 0 and 1 or 0, tostring(math.max(wait, 0) / 1000000),
        math.max(remaining, 0), tostring((tats[1] - now) / 1000000)}
"""

KeyFunction = Callable[[], Awaitable[str]]


@dataclass(frozen=True)
class Limit:
    count: int  # requests per period
    period_s: int
    key: KeyFunction  # whose requests count together: an IP, an email, a user

    @property
    def interval_us(self) -> int:
        return self.period_s * 1_000_000 // self.count


class Limiter:
    """The limits of each endpoint (its own, then the default per IP), checked before the
    view in one script call; the headers of the endpoint's first limit on its answer."""

    def __init__(self, redis_url: str, pools: PoolsConfig, default: Limit) -> None:
        self._url, self._pools, self._default = redis_url, pools, default
        self._by_endpoint: dict[str, list[Limit]] = {}
        self._redis: Redis | None = None
        self._script: AsyncScript | None = None

    def limit(self, endpoint: str, *limits: Limit) -> None:
        self._by_endpoint[endpoint] = [*limits]

    def limits(self, endpoint: str) -> list[Limit]:
        return [*self._by_endpoint.get(endpoint, []), self._default]

    async def start(self) -> None:
        self._redis = redis_client(
            self._url,
            connections_max=self._pools.api_redis_connections_max,
            wait_s=self._pools.wait_s,
            socket_timeout_s=RATE_LIMIT_REDIS_TIMEOUT_S,
            connect_timeout_s=self._pools.redis_connect_timeout_s,
        )
        self._script = self._redis.register_script(_GCRA)

    async def stop(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def check(self) -> None:
        """Admit this request or raise the 429; either way, g.rate_limit holds the headers.

        Without Redis the request is admitted, unlimited (and counted): a payment's intent is
        durable in PostgreSQL and answered 202 while Redis is away, which a limit that failed
        closed would turn into 503s; what needs Redis itself (refresh tokens) fails on its own,
        and sign-ins stay bounded by the hashing line."""
        endpoint = request.endpoint
        if endpoint is None or self._script is None:
            return
        limits = self.limits(endpoint)
        keys = [f"{KEY_PREFIX}{endpoint}:{lim.count}/{lim.period_s}:{await lim.key()}"
                for lim in limits]  # fmt: skip
        args = [v for lim in limits for v in (lim.period_s * 1_000_000, lim.interval_us)]
        try:
            answer = await self._script(keys, args)
        except REDIS_LOST as exc:  # open, not closed: see below
            RATE_LIMIT_UNAVAILABLE.inc()
            log.warning("rate_limit_unavailable", error=repr(exc))
            return
        admitted, wait_s, remaining, reset_s = answer
        g.rate_limit = {"RateLimit-Limit": str(limits[0].count),
                        "RateLimit-Remaining": str(remaining),
                        "RateLimit-Reset": str(math.ceil(float(reset_s)))}  # fmt: skip
        if not admitted:
            RATE_LIMITED.labels(route()).inc()
            raise Problem(429, "Too many requests", "slow down and retry later",
                          headers={"Retry-After": str(max(1, math.ceil(float(wait_s)))),
                                   **g.rate_limit})  # fmt: skip


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
            user_key: KeyFunction) -> None:  # fmt: skip
    if not limits.enabled:
        return
    limiter = Limiter(redis_url, pools, Limit(limits.default_per_ip, MINUTE_S, ip_key))
    limiter.limit(SIGNIN, Limit(limits.signin_per_ip, MINUTE_S, ip_key),
                  Limit(limits.signin_per_email, MINUTE_S, email_key))  # fmt: skip
    limiter.limit(SIGNUP, Limit(limits.signup_per_ip, MINUTE_S, ip_key))
    for endpoint in PAYMENTS:
        limiter.limit(endpoint, Limit(limits.payments_per_user, MINUTE_S, user_key))
    for rule in app.url_map.iter_rules():  # every route is limited (per IP): 0, not absent
        RATE_LIMITED.labels(rule.rule)
    app.before_serving(limiter.start)
    app.after_serving(limiter.stop)
    app.before_request(limiter.check)

    @app.after_request
    async def headers(response: Response) -> Response:
        response.headers.update(g.get("rate_limit", {}))
        return response


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
