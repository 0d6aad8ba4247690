"""No 5xx on bad input, anywhere: every query parameter, path parameter and header of the API,
fuzzed with hypothesis against the real app on the real PostgreSQL and Valkey. Every answer is
2xx or 4xx, every 4xx is RFC 9457 problem+json, and a refused request changes nothing (rows,
balances, idempotency records, refresh tokens). Example counts are small: the suite's time
matters, and schemathesis (test_api_schemathesis.py) fuzzes the bodies."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import asyncpg
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from quart.typing import TestClientProtocol as Client
from redis.asyncio import Redis
from werkzeug.datastructures import Headers

from infra.config import RateLimitConfig
from tests._api_helpers import api_client, bearer, signup, snapshot
from tests.conftest import ServerSet

# Limits on, but far above what the test sends: the limiter's key functions (which read the
# Authorization header and the body) run on every hostile request too.
GENEROUS = RateLimitConfig(
    signin_per_ip=10**6,
    signin_per_email=10**6,
    signup_per_ip=10**6,
    payments_per_user=10**6,
    default_per_ip=10**6,
    cors_origins=("https://dash.example",),
)
# KIZO_FUZZ_EXAMPLES raises it for a deeper run outside the suite (e.g. 5000).
FUZZ = settings(
    max_examples=int(os.environ.get("KIZO_FUZZ_EXAMPLES", "120")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass
class World:
    client: Client
    conn: asyncpg.Connection
    redis: Redis
    tokens: dict[str, Any]
    other_email: str
    txn_id: str


@pytest_asyncio.fixture
async def world(servers: ServerSet, db_url: str, redis_client: Redis) -> AsyncIterator[World]:
    async with api_client(servers, db_url, GENEROUS) as client:
        tokens, other = await signup(client), await signup(client)
        deposit = await client.post(
            "/api/v1/payments/deposit",
            json={"amount": 5},
            headers=bearer(tokens) | {"Idempotency-Key": "seed"},
        )
        assert deposit.status_code == 202
        conn = await asyncpg.connect(db_url)
        try:
            yield World(
                client,
                conn,
                redis_client,
                tokens,
                other["user"]["email"],
                (await deposit.get_json())["id"],
            )
        finally:
            await conn.close()


async def _checked(response: Any, method: str = "GET") -> int:
    """The status, after asserting the answer is no 5xx and a 4xx is a well-formed problem."""
    status = int(response.status_code)
    assert status < 500, (status, await response.get_data())
    if status >= 400 and method != "HEAD":  # a HEAD answer has the headers, not the body
        assert response.headers["Content-Type"] == "application/problem+json"
        body = json.loads(await response.get_data())
        assert isinstance(body["type"], str) and isinstance(body["title"], str)
        assert isinstance(body["detail"], str)
        assert body["status"] == status
    return status


# Text a client could send: any unicode but the control characters an HTTP server refuses in a
# header (header values travel as UTF-8 bytes and are read back as latin-1, as over the wire).
_CHAR = st.characters(exclude_categories=("Cc", "Cs")) | st.just("\t")
_TEXT = st.text(_CHAR, max_size=40)
_HUGE = st.builds(lambda c, n: c * n, st.sampled_from("9a=é𝄞%"), st.integers(1_000, 20_000))
_NUMBERS = st.integers(-(10**40), 10**40).map(str) | st.floats().map(str)
_ODD = st.sampled_from(
    [
        "",
        " ",
        "0",
        "-1",
        "201",
        "1e3",
        "0x10",
        " 5",
        "5 ",
        "²",
        "١٢",
        "0" * 5000,
        "null",
        "[]",
        "%00",
        "%FF",
        "export.csv",
        "..",
        "\t",
    ]
)
_OFFSETS = st.timedeltas(
    min_value=-dt.timedelta(hours=23, minutes=59), max_value=dt.timedelta(hours=23, minutes=59)
)
_STAMPS = st.datetimes(timezones=st.none() | st.builds(dt.timezone, _OFFSETS)).map(
    dt.datetime.isoformat
)
_IDS = st.uuids().map(str) | _TEXT


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


# Cursors: well-formed ones at any instant of the calendar, at any offset, naive or not, with
# ids good or bad; and the base64 of anything.
_CURSORS = st.builds(lambda t, i: _b64(f"{t}|{i}"), _STAMPS, _IDS) | _TEXT.map(_b64)
_VALUES = _TEXT | _HUGE | _NUMBERS | _ODD | _CURSORS


@st.composite
def _queries(draw: st.DrawFn) -> str:
    names = st.sampled_from(["cursor", "limit", "cursor", "limit", "x", "cursor[]"]) | _TEXT
    pairs = draw(st.lists(st.tuples(names, _VALUES), max_size=4))  # names may repeat
    raw = draw(st.sampled_from(["", "&limit=%FF", "&cursor=%C3%28", "&&", "&limit", "&=x"]))
    return urlencode(pairs, quote_via=quote) + raw


def _cursor_at(stamp: str) -> str:
    return "cursor=" + _b64(f"{stamp}|{uuid.uuid4()}")


@pytest.mark.asyncio
@FUZZ
@given(query=_queries())
@example(query=_cursor_at("9999-12-31T23:59:59-14:00"))  # measured: a 500 before
@example(query=_cursor_at("0001-01-01T00:00:00+14:00"))  # measured: a 500 before
@example(query=_cursor_at("2026-01-01T00:00:00"))  # naive: its meaning would depend on the zone
@example(query="limit=%C2%B2")  # "²": isdigit() but not int(): a 500 before
@example(query="limit=" + "1" * 5000)  # past int()'s 4300 digits: a 500 before
async def test_history_query_parameters(world: World, query: str) -> None:
    before = await snapshot(world.conn, world.redis)
    response = await world.client.get(f"/api/v1/transactions?{query}", headers=bearer(world.tokens))
    status = await _checked(response)
    if status == 200:
        page = await response.get_json()
        assert isinstance(page["items"], list) and "next_cursor" in page
    assert await snapshot(world.conn, world.redis) == before


@pytest.mark.asyncio
async def test_every_measured_bad_cursor_is_a_400_problem(world: World) -> None:
    """The cases of issue 9, named, so a regression reads as one."""
    for stamp in ("9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00", "2026-01-01T00:00:00"):
        response = await world.client.get(
            f"/api/v1/transactions?{_cursor_at(stamp)}", headers=bearer(world.tokens)
        )
        assert await _checked(response) == 400
        assert (await response.get_json())["title"] == "Bad cursor"


@pytest.mark.asyncio
@FUZZ
@given(txn_id=_VALUES | st.uuids().map(str) | st.just("REAL"))
async def test_transaction_path_parameter(world: World, txn_id: str) -> None:
    before = await snapshot(world.conn, world.redis)
    txn_id = world.txn_id if txn_id == "REAL" else txn_id
    path = f"/api/v1/transactions/{quote(txn_id, safe='')}"
    response = await world.client.get(path, headers=bearer(world.tokens))
    status = await _checked(response)
    if txn_id == world.txn_id:
        assert status == 200
    assert await snapshot(world.conn, world.redis) == before


# Every route but sign-in and sign-up (whose Argon2 hashing costs about 0.1 s an example: they
# have a test of their own with fewer examples, below), and methods a route does not serve.
_ROUTES: list[tuple[str, str, object]] = [
    ("POST", "/api/v1/payments/deposit", {"amount": 1}),
    ("POST", "/api/v1/payments/withdraw", {"amount": 1}),
    ("POST", "/api/v1/payments/transfer", "TRANSFER"),
    ("POST", "/api/v1/auth/refresh", {"refresh_token": "not-a-token"}),
    ("POST", "/api/v1/auth/logout", {"refresh_token": "not-a-token"}),
    ("GET", "/api/v1/accounts/me", None),
    ("GET", "/api/v1/transactions", None),
    ("GET", "/api/v1/transactions/REAL", None),
    ("GET", "/api/v1/transactions/export.csv", None),
    ("GET", "/api/v1/dashboard", None),
    ("GET", "/api/v1/admin/reconciliation", None),
    ("GET", "/api/v1/admin/needs-attention", None),
    ("POST", "/api/v1/admin/needs-attention/redrive", {"kinds": ["deposit"]}),
    ("GET", "/health", None),
    ("GET", "/ready", None),
    ("GET", "/metrics", None),
    ("GET", "/openapi.json", None),
    ("GET", "/docs", None),
    ("DELETE", "/api/v1/dashboard", None),
    ("HEAD", "/api/v1/transactions", None),
    ("OPTIONS", "/api/v1/payments/deposit", None),
]
_NAMES = st.sampled_from(
    [
        "Authorization",
        "Idempotency-Key",
        "Content-Type",
        "Accept",
        "X-Request-ID",
        "Origin",
        "Accept-Encoding",
    ]
) | st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,30}", fullmatch=True)


@st.composite
def _headers(draw: st.DrawFn) -> list[tuple[str, str]]:
    """Maybe the caller's real token, then hostile headers (names may repeat)."""
    token = draw(st.sampled_from(["REAL", None]))
    headers = [("Authorization", "Bearer REAL")] if token else []
    authorization = st.sampled_from(["Bearer ", "bearer ", "Basic ", "Bearer REAL", "REAL"])
    for name in draw(st.lists(_NAMES, max_size=4)):
        if name == "Authorization":
            value = draw(authorization) + draw(st.just("") | _VALUES)
        elif name == "Idempotency-Key":
            value = draw(st.just(f"k-{uuid.uuid4()}") | _VALUES)
        else:
            value = draw(_VALUES | st.sampled_from(["application/json", "text/csv", "*/*"]))
        headers.append((name, value))
    return headers


@pytest.mark.asyncio
@FUZZ
@given(route=st.sampled_from(_ROUTES), headers=_headers())
async def test_headers_on_every_route(
    world: World, route: tuple[str, str, object], headers: list[tuple[str, str]]
) -> None:
    method, path, body = route
    token = world.tokens["access_token"]
    sent = [(name, value.replace("REAL", token)) for name, value in headers]
    payload = {"to": world.other_email, "amount": 1} if body == "TRANSFER" else body
    before = await snapshot(world.conn, world.redis)
    client: Any = world.client  # its protocol types neither repeated headers nor data alone
    response = await client.open(
        path.replace("REAL", world.txn_id),
        method=method,
        headers=Headers(sent),
        data=b"" if payload is None else json.dumps(payload).encode(),
    )
    status = await _checked(response, method)
    if not (status == 202 and "/payments/" in path):  # only an accepted payment changes state
        assert await snapshot(world.conn, world.redis) == before


@pytest.mark.asyncio
@settings(FUZZ, max_examples=12)  # each one hashes a password: about 0.1 s
@given(signing_up=st.booleans(), headers=_headers())
async def test_headers_on_sign_in_and_sign_up(
    world: World, signing_up: bool, headers: list[tuple[str, str]]
) -> None:
    token = world.tokens["access_token"]
    sent = Headers([(name, value.replace("REAL", token)) for name, value in headers])
    email = f"fuzz-{uuid.uuid4().hex[:12]}@example.test" if signing_up else world.other_email
    body = {"email": email, "password": "wrong password", **({"name": "F"} if signing_up else {})}
    before = await snapshot(world.conn, world.redis)
    client: Any = world.client
    path = "/api/v1/auth/signup" if signing_up else "/api/v1/auth/signin"
    response = await client.post(path, headers=sent, data=json.dumps(body).encode())
    status = await _checked(response)
    assert status in ((201,) if signing_up else (401,)) or 400 <= status < 500
    if status != 201:  # a refused sign-up and every sign-in (a wrong password) change nothing
        assert await snapshot(world.conn, world.redis) == before
