"""Shared by the API tests that need an app of their own: one in-process app on the real
PostgreSQL and Valkey, signing up, and what "state" means when a test asserts it did not change."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from quart.typing import TestClientProtocol as Client
from redis.asyncio import Redis

from api.app import create_app
from infra.config import Config, RateLimitConfig
from tests.conftest import TEST_SECRETS, ServerSet, unique_email

PASSWORD = "correct horse battery"


def api_config(servers: ServerSet, db_url: str, limits: RateLimitConfig | None = None,
               keyring_reload_s: float | None = None) -> Config:  # fmt: skip
    """The suite's API configuration on its servers: rate limits off unless given, the key
    ring reloaded every ``keyring_reload_s`` when given (the default is 5 s)."""
    config = dataclasses.replace(
        Config.from_env(TEST_SECRETS),
        database_url=db_url,
        redis_url=servers.redis_url,
        limits=limits or RateLimitConfig(enabled=False),
    )
    if keyring_reload_s is None:
        return config
    auth = dataclasses.replace(config.auth, keyring_reload_s=keyring_reload_s)
    return dataclasses.replace(config, auth=auth)


@contextlib.asynccontextmanager
async def api_client(
    servers: ServerSet,
    db_url: str,
    limits: RateLimitConfig,
) -> AsyncIterator[Client]:
    app = create_app(api_config(servers, db_url, limits))
    async with app.test_app() as test_app:
        yield test_app.test_client()


async def signup(client: Client, email: str | None = None, name: str = "A") -> dict[str, Any]:
    response = await client.post(
        "/api/v1/auth/signup",
        json={"email": email or unique_email(), "password": PASSWORD, "name": name},
    )
    assert response.status_code == 201, await response.get_data()
    return dict(await response.get_json())


def bearer(tokens: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens['access_token']}"}


async def snapshot(conn: asyncpg.Connection, redis: Redis) -> tuple[object, ...]:
    """Everything a request could change: rows of every table a route writes, the balances,
    and the refresh tokens in Redis (rate-limit counters are not state: they count requests)."""
    row = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM users) AS users,"
        " (SELECT count(*) FROM accounts) AS accounts,"
        " (SELECT count(*) FROM transactions) AS transactions,"
        " (SELECT count(*) FROM postings) AS postings,"
        " (SELECT count(*) FROM idempotency_keys) AS keys,"
        " (SELECT count(*) FROM signing_keys) AS signing_keys,"
        " (SELECT coalesce(sum(posted), 0) || '/' || coalesce(sum(pending), 0) FROM balances)"
        " AS balances"
    )
    assert row is not None
    tokens = [key async for key in redis.scan_iter(match="kizo:refresh*", count=1000)]
    return (*row.values(), len(tokens))
