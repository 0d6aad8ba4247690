"""Access and refresh tokens, as a specification: a token the server's own key ring signed is
still refused when any claim says it must not be used now, here, by this user.

The tokens are minted with the server's real key ring (``KeyRing.load``, the code the API loads
its keys with), so a refusal can only come from the claim a case changes: the positive control,
minted the same way with the claims the server itself issued, must be accepted. Each refused
token is tried on a read (GET /api/v1/accounts/me) and on a payment, which must change nothing.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import jwt
import pytest
import pytest_asyncio
from quart.typing import TestClientProtocol as Client
from redis.asyncio import Redis

from api._auth import KeyRing, rotate_key
from api.app import create_app
from tests._api_helpers import PASSWORD, api_config, bearer, signup, snapshot
from tests.conftest import ServerSet, unique_email

DAY_S = 24 * 3600
# Claims in the future by this much are refused however slow this machine is: a margin that
# no request here takes, so "in the future" still holds when the server reads the token.
FUTURE_S = 120
KEYRING_RELOAD_S = 0.2  # the API re-reads the ring this often (5 s by default): rotations here
ME = "/api/v1/accounts/me"
DEPOSIT = "/api/v1/payments/deposit"


@dataclass
class World:
    client: Client
    conn: asyncpg.Connection
    redis: Redis
    keyring_key: bytes
    user: dict[str, Any]  # the signed-up user's answer: user and tokens
    header: dict[str, Any]  # the JOSE header of an access token the server issued
    claims: dict[str, Any]  # and its claims

    async def ring(self) -> KeyRing:
        return await KeyRing.load(self.conn, self.keyring_key)


@pytest_asyncio.fixture
async def world(servers: ServerSet, db_url: str, redis_client: Redis) -> AsyncIterator[World]:
    config = api_config(servers, db_url, keyring_reload_s=KEYRING_RELOAD_S)
    async with create_app(config).test_app() as test_app:
        client = test_app.test_client()
        user = await signup(client)
        issued = user["access_token"]
        conn = await asyncpg.connect(db_url)
        try:
            yield World(
                client,
                conn,
                redis_client,
                config.auth.keyring_key,
                user,
                jwt.get_unverified_header(issued),
                jwt.decode(issued, options={"verify_signature": False}),
            )
        finally:
            await conn.close()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hmac_token(header: dict[str, Any], claims: dict[str, Any], secret: str) -> str:
    """A JWS of any header, signed with HMAC-SHA256 whatever its ``alg`` says."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    mac = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


def fresh(claims: dict[str, Any]) -> dict[str, Any]:
    """The server's claims, issued now, for as long as the server issues them."""
    now = int(time.time())
    return {**claims, "iat": now, "exp": now + claims["exp"] - claims["iat"]}


def without(claims: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in claims.items() if k != name}


async def refused(world: World, token: str) -> None:
    """401 problem+json on a read and on a payment, and the payment changed nothing."""
    auth = {"Authorization": f"Bearer {token}"}
    me = await world.client.get(ME, headers=auth)
    before = await snapshot(world.conn, world.redis)
    paid = await world.client.post(
        DEPOSIT, json={"amount": 7}, headers=auth | {"Idempotency-Key": f"k-{uuid.uuid4()}"}
    )
    for answer in (me, paid):
        assert answer.status_code == 401, await answer.get_data()
        assert answer.headers["Content-Type"] == "application/problem+json"
        assert answer.headers["WWW-Authenticate"] == "Bearer"
        assert (await answer.get_json())["status"] == 401
    assert await snapshot(world.conn, world.redis) == before


async def accepted(world: World, token: str) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    me = await world.client.get(ME, headers=auth)
    assert me.status_code == 200, await me.get_data()
    assert (await me.get_json())["account_id"] == world.user["user"]["account_id"]
    paid = await world.client.post(
        DEPOSIT, json={"amount": 7}, headers=auth | {"Idempotency-Key": f"k-{uuid.uuid4()}"}
    )
    assert paid.status_code == 202, await paid.get_data()


# A case turns the server's (header, fresh claims, newest secret) into a token.
Mint = Callable[[dict[str, Any], dict[str, Any], str], str]


def _signed(change: Callable[[dict[str, Any]], dict[str, Any]]) -> Mint:
    """Signed exactly as the server signs, with claims changed."""
    return lambda header, claims, secret: jwt.encode(
        change(claims), secret, algorithm="HS256", headers={"kid": header["kid"]}
    )


def _now() -> int:
    return int(time.time())


def _expired(ago_s: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A token of the usual lifetime whose exp was ``ago_s`` seconds ago."""
    return lambda c: {**c, "iat": _now() - ago_s - (c["exp"] - c["iat"]), "exp": _now() - ago_s}


def _issued_in_the_future(c: dict[str, Any]) -> dict[str, Any]:
    return {**c, "iat": _now() + FUTURE_S, "exp": _now() + FUTURE_S + c["exp"] - c["iat"]}


REFUSED: dict[str, Mint] = {
    # Time: no leeway (docs/api.md), so a second past exp is too late.
    "expired by 1 s": _signed(_expired(1)),
    "expired by 1 day": _signed(_expired(DAY_S)),
    "expiring right now": _signed(lambda c: {**c, "exp": _now()}),
    "not before a future time": _signed(lambda c: {**c, "nbf": _now() + FUTURE_S}),
    "issued in the future": _signed(_issued_in_the_future),
    "exp not a number": _signed(lambda c: {**c, "exp": "tomorrow"}),
    # Whom it is for and who made it.
    "another audience": _signed(lambda c: {**c, "aud": "kizo-bank"}),
    "no audience": _signed(lambda c: without(c, "aud")),
    "another issuer": _signed(lambda c: {**c, "iss": "https://issuer.example"}),
    "no issuer": _signed(lambda c: without(c, "iss")),
    # Required claims.
    "no subject": _signed(lambda c: without(c, "sub")),
    "no expiry": _signed(lambda c: without(c, "exp")),
    "no issued-at": _signed(lambda c: without(c, "iat")),
    "subject not a user id": _signed(lambda c: {**c, "sub": "admin"}),
    "subject no user has": _signed(lambda c: {**c, "sub": str(uuid.uuid4())}),
    # Keys and algorithms.
    "a kid never in the ring": lambda h, c, s: jwt.encode(
        c, secrets.token_urlsafe(48), algorithm="HS256", headers={"kid": secrets.token_hex(8)}
    ),
    "a kid of the ring, another key": lambda h, c, s: jwt.encode(
        c, secrets.token_urlsafe(48), algorithm="HS256", headers={"kid": h["kid"]}
    ),
    "no kid": lambda h, c, s: jwt.encode(c, s, algorithm="HS256"),
    "alg none": lambda h, c, s: (
        f"{_b64(json.dumps({'alg': 'none', 'kid': h['kid']}).encode())}"
        f".{_b64(json.dumps(c).encode())}."
    ),
    "HS512 with the ring's key": lambda h, c, s: jwt.encode(
        c, s, algorithm="HS512", headers={"kid": h["kid"]}
    ),
    # The ring's keys are symmetric, so there is no public key to confuse with a secret; what
    # is left of the confusion is a header naming another algorithm over a valid HMAC.
    "RS256 header over the ring's HMAC": lambda h, c, s: hmac_token(
        {"alg": "RS256", "typ": "JWT", "kid": h["kid"]}, c, s
    ),
    "HS256 keyed with the kid": lambda h, c, s: jwt.encode(
        c, h["kid"] * 4, algorithm="HS256", headers={"kid": h["kid"]}
    ),
}


@pytest.mark.asyncio
async def test_a_token_minted_like_the_servers_is_accepted(world: World) -> None:
    """The positive control: the cases below can only fail on the claim they change."""
    ring = await world.ring()
    kid, secret = ring.keys[0]
    assert world.header["kid"] == kid
    await accepted(world, _signed(lambda c: c)(world.header, fresh(world.claims), secret))
    await accepted(world, world.user["access_token"])


@pytest.mark.asyncio
async def test_the_server_issues_short_lived_tokens_for_itself(world: World) -> None:
    claims = world.claims
    assert claims["exp"] - claims["iat"] == world.user["expires_in"] <= 900
    assert (claims["iss"], claims["aud"]) == ("kizo", "kizo-api")
    assert claims["sub"] == world.user["user"]["id"]


@pytest.mark.asyncio
@pytest.mark.parametrize("case", list(REFUSED))
async def test_a_genuinely_signed_token_with_a_bad_claim_is_refused(
    world: World, case: str
) -> None:
    ring = await world.ring()
    token = REFUSED[case](world.header, fresh(world.claims), ring.keys[0][1])
    await refused(world, token)


@pytest.mark.asyncio
async def test_expiry_has_no_leeway(world: World) -> None:
    """Just inside: valid for a while yet (a margin no request here takes) and valid from a
    second ago; just outside: a second past exp, or exp now (exp is the first instant the
    token is no longer valid, RFC 7519 4.1.4)."""
    secret = (await world.ring()).keys[0][1]
    now = _now()
    inside = {**world.claims, "iat": now - 1, "nbf": now - 1, "exp": now + FUTURE_S}
    await accepted(world, _signed(lambda c: c)(world.header, inside, secret))
    for exp in (now - 1, now):
        outside = {**world.claims, "iat": now - 900, "exp": exp}
        await refused(world, _signed(lambda c: c)(world.header, outside, secret))


@pytest.mark.asyncio
async def test_a_token_of_a_deleted_user_is_refused(world: World) -> None:
    # A user whose tokens were never used: none of its lookups is cached by the API (a removed
    # user's cached record lives AuthConfig.user_cache_s, docs/api.md).
    gone = await signup(world.client)
    await world.conn.execute("DELETE FROM users WHERE id = $1", uuid.UUID(gone["user"]["id"]))
    await refused(world, gone["access_token"])


@pytest.mark.asyncio
async def test_a_refresh_token_is_no_access_token(world: World) -> None:
    await refused(world, world.user["refresh_token"])


async def _rotate(world: World) -> None:
    await rotate_key(world.conn, world.keyring_key)
    await asyncio.sleep(KEYRING_RELOAD_S * 2)  # the next request re-reads the ring first


@pytest.mark.asyncio
async def test_only_the_newest_two_keys_verify(world: World) -> None:
    """Two rotations later the first key is out of the ring: a token it signs, otherwise
    perfect, is refused; the newest two both verify."""
    oldest = (await world.ring()).keys[0]
    await _rotate(world)
    await _rotate(world)
    newest, previous = (await world.ring()).keys
    assert oldest not in (newest, previous)
    claims = fresh(world.claims)
    for kid, secret in (newest, previous):
        await accepted(world, jwt.encode(claims, secret, algorithm="HS256", headers={"kid": kid}))
    await refused(
        world, jwt.encode(claims, oldest[1], algorithm="HS256", headers={"kid": oldest[0]})
    )
    await refused(world, world.user["access_token"])  # the server's own, signed by that key


async def _refresh(client: Client, token: str) -> Any:
    return await client.post("/api/v1/auth/refresh", json={"refresh_token": token})


async def _signin(client: Client, email: str) -> dict[str, Any]:
    answer = await client.post("/api/v1/auth/signin", json={"email": email, "password": PASSWORD})
    assert answer.status_code == 200, await answer.get_data()
    return dict(await answer.get_json())


async def _dead(client: Client, token: str) -> None:
    answer = await _refresh(client, token)
    assert answer.status_code == 401, await answer.get_data()
    assert answer.headers["Content-Type"] == "application/problem+json"


@pytest.mark.asyncio
async def test_reusing_a_rotated_refresh_token_revokes_its_family_only(world: World) -> None:
    """t0 -> t1 -> t2, then t0 again: a thief or a client replaying an old token. The reuse is
    refused and the family's newest token (t2) dies with it; another session of the same user
    (another family) lives on."""
    other_session = await _signin(world.client, world.user["user"]["email"])
    t0 = world.user["refresh_token"]
    t1 = (await (await _refresh(world.client, t0)).get_json())["refresh_token"]
    t2 = (await (await _refresh(world.client, t1)).get_json())["refresh_token"]
    await _dead(world.client, t0)
    await _dead(world.client, t2)
    await _dead(world.client, t1)
    alive = await _refresh(world.client, other_session["refresh_token"])
    assert alive.status_code == 200, await alive.get_data()


@pytest.mark.asyncio
async def test_logout_ends_the_refresh_family_and_the_access_token_lives_until_its_exp(
    world: World,
) -> None:
    """What the design promises (docs/api.md): logout revokes the refresh family at once;
    access tokens are stateless and short-lived, so the one in hand works until its exp
    (at most 15 minutes) and not a second longer (test_expiry_has_no_leeway)."""
    other_session = await _signin(world.client, world.user["user"]["email"])
    out = await world.client.post(
        "/api/v1/auth/logout", json={"refresh_token": world.user["refresh_token"]}
    )
    assert out.status_code == 204
    await _dead(world.client, world.user["refresh_token"])
    still = await world.client.get(ME, headers=bearer(world.user))
    assert still.status_code == 200
    assert world.claims["exp"] - world.claims["iat"] <= 900
    alive = await _refresh(world.client, other_session["refresh_token"])
    assert alive.status_code == 200, await alive.get_data()


@pytest.mark.asyncio
async def test_an_unknown_refresh_token_is_refused_and_changes_nothing(world: World) -> None:
    before = await snapshot(world.conn, world.redis)
    await _dead(world.client, secrets.token_urlsafe(32))
    await _dead(world.client, unique_email())
    assert await snapshot(world.conn, world.redis) == before
