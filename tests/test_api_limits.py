"""Rate limits shared by API processes through Valkey, and CORS for configured origins."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from quart.typing import TestClientProtocol as Client

from api.app import create_app
from infra.config import Config, ConfigError, RateLimitConfig
from infra.servers import free_port
from tests.conftest import TEST_SECRETS, ServerSet, kizo_env, stop_process, unique_email, wait_http
from tests.test_api import pay_while_valkey_is_down


@pytest_asyncio.fixture
async def limited(servers: ServerSet, db_url: str, redis_client: object) -> AsyncIterator[Client]:
    config = dataclasses.replace(
        Config.from_env(TEST_SECRETS),
        database_url=db_url,
        redis_url=servers.redis_url,
        limits=RateLimitConfig(signin_per_email=3, cors_origins=("https://dash.example",)),
    )
    app = create_app(config)
    async with app.test_app() as test_app:
        yield test_app.test_client()


async def _wrong_signins(client: Client, count: int) -> list[Any]:
    """``count`` sign-ins with a wrong password for one new email, one after the other."""
    email = unique_email()
    return [
        await client.post("/api/v1/auth/signin",
                          json={"email": email, "password": "wrong password"})
        for _ in range(count)
    ]  # fmt: skip


@pytest.mark.asyncio
async def test_signin_per_email_limit_answers_429_problem(limited: Client) -> None:
    answers = await _wrong_signins(limited, 4)
    assert [a.status_code for a in answers] == [401, 401, 401, 429]
    response = answers[-1]
    assert response.headers["content-type"] == "application/problem+json"
    assert int(response.headers["Retry-After"]) > 0


@pytest.mark.asyncio
async def test_cors_preflight_for_allowed_origins_only(limited: Client) -> None:
    preflight = {
        "Origin": "https://dash.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, idempotency-key",
    }
    allowed = await limited.options("/api/v1/payments/deposit", headers=preflight)
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://dash.example"
    assert allowed.headers["Access-Control-Allow-Credentials"] == "true"
    assert "Idempotency-Key" in allowed.headers["Access-Control-Allow-Headers"]
    other = await limited.options(
        "/api/v1/payments/deposit", headers=preflight | {"Origin": "https://evil.example"}
    )
    assert "Access-Control-Allow-Origin" not in other.headers
    simple = await limited.get("/health", headers={"Origin": "https://dash.example"})
    assert simple.headers["Access-Control-Allow-Origin"] == "https://dash.example"
    assert "Origin" in simple.headers["Vary"]


@pytest.fixture
def two_api_processes(servers: ServerSet, db_url: str) -> Iterator[list[str]]:
    urls, procs = [], []
    try:
        for _ in range(2):
            port = free_port()
            env = kizo_env(servers, db_url, KIZO_API_PORT=str(port), KIZO_RATE_SIGNUP_PER_IP="3")
            procs.append(subprocess.Popen([sys.executable, "-m", "kizo.cli", "api"], env=env))
            urls.append(f"http://127.0.0.1:{port}")
            wait_http(f"{urls[-1]}/health", proc=procs[-1])
        yield urls
    finally:
        for proc in procs:
            stop_process(proc)


@pytest.mark.asyncio
async def test_limits_are_shared_across_api_processes(
    two_api_processes: list[str], redis_client: object
) -> None:
    codes = []
    async with httpx.AsyncClient(timeout=10) as http:
        for n in range(4):  # alternate between the two processes
            response = await http.post(
                f"{two_api_processes[n % 2]}/api/v1/auth/signup",
                json={"email": unique_email(), "password": "long enough pw", "name": "L"},
            )
            codes.append(response.status_code)
            await asyncio.sleep(0)
    assert codes == [201, 201, 201, 429]


GATEWAY = ("127.0.0.1", 50_000)  # the peer of every request: the gateway


def _documentation_address() -> str:
    """A client address of its own (IPv6 documentation range), so no other test shares its
    per-IP count."""
    return str(ipaddress.IPv6Address(f"2001:db8::{secrets.token_hex(2)}:{secrets.token_hex(2)}"))


async def _signups(client: Client, forwarded_for: str, count: int) -> list[int]:
    codes = []
    for _ in range(count):
        response = await client.post(
            "/api/v1/auth/signup",
            json={"email": unique_email(), "password": "long enough pw", "name": "G"},
            headers={"X-Forwarded-For": forwarded_for},
            scope_base={"client": GATEWAY},
        )
        codes.append(response.status_code)
    return codes


@pytest.mark.asyncio
async def test_behind_a_trusted_gateway_each_client_has_its_own_per_ip_limit(
    servers: ServerSet, db_url: str, redis_client: object
) -> None:
    config = dataclasses.replace(
        Config.from_env({**TEST_SECRETS, "KIZO_TRUSTED_PROXIES": "127.0.0.1, ::1"}),
        database_url=db_url,
        redis_url=servers.redis_url,
    )
    config = dataclasses.replace(config, limits=dataclasses.replace(config.limits, signup_per_ip=2))
    first, second = _documentation_address(), _documentation_address()
    app = create_app(config)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        # The gateway appends the address it saw: a client cannot name another in front of it.
        assert await _signups(client, f"{second}, {first}", 3) == [201, 201, 429]
        assert await _signups(client, second, 2) == [201, 201]


def test_trusted_proxies_must_be_addresses_or_networks() -> None:
    parsed = Config.from_env({"KIZO_TRUSTED_PROXIES": " 10.89.0.0/24 ,::1"}).limits
    assert parsed.trusted_proxies == ("10.89.0.0/24", "::1/128")
    with pytest.raises(ConfigError, match="KIZO_TRUSTED_PROXIES"):
        Config.from_env({"KIZO_TRUSTED_PROXIES": "gateway"})


@pytest.mark.asyncio
async def test_a_limit_admits_exactly_its_count_under_concurrent_requests(
    two_api_processes: list[str], redis_client: object
) -> None:
    # Twelve sign-ups at once, from one address, spread over two processes, against 3 a
    # minute: one script per request checks and moves every limit atomically, so exactly
    # three pass (a read-then-write store admitted a few more under such a race).
    async with httpx.AsyncClient(timeout=20) as http:
        answers = await asyncio.gather(*(
            http.post(f"{two_api_processes[n % 2]}/api/v1/auth/signup",
                      json={"email": unique_email(), "password": "long enough pw", "name": "C"})
            for n in range(12)
        ))  # fmt: skip
    codes = sorted(a.status_code for a in answers)
    assert codes == [201] * 3 + [429] * 9
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.headers["content-type"] == "application/problem+json"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["RateLimit-Limit"] == "3"
    assert refused.headers["RateLimit-Remaining"] == "0"


@pytest.mark.asyncio
async def test_answers_carry_the_limit_and_what_is_left_of_it(limited: Client) -> None:
    left = []
    for response in await _wrong_signins(limited, 3):
        assert response.headers["RateLimit-Limit"] == "30"  # the first limit: per IP
        left.append(int(response.headers["RateLimit-Remaining"]))
        assert 0 <= int(response.headers["RateLimit-Reset"]) <= 60
    assert left[0] > left[1] > left[2]
    health = await limited.get("/health")
    assert health.headers["RateLimit-Limit"] == "1200"  # every route: the default per IP


@pytest.mark.asyncio
async def test_without_redis_a_payment_is_still_accepted_unlimited(
    limited: Client, servers: ServerSet, db_url: str
) -> None:
    response = await pay_while_valkey_is_down(limited, servers, 26, "limits-redis-down")
    assert response.status_code == 202  # the limit failed open; the intent row is the outbox
    assert "RateLimit-Limit" not in response.headers
