"""The REST API on the real PostgreSQL and Valkey (the Quart app in-process)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import jwt
import pytest
import pytest_asyncio
from quart.typing import TestClientProtocol as Client

from api.app import create_app
from engine import Action, Op, apply_batch
from infra.config import Config, RateLimitConfig
from tests._api_helpers import api_config
from tests.conftest import TEST_SECRETS, ServerSet, kizo_env, unique_email


@pytest_asyncio.fixture
async def client(servers: ServerSet, db_url: str, redis_client: object) -> AsyncIterator[Client]:
    config = dataclasses.replace(
        Config.from_env(TEST_SECRETS),
        database_url=db_url,
        redis_url=servers.redis_url,
        limits=RateLimitConfig(enabled=False, cors_origins=("https://dash.example",)),
    )
    app = create_app(config)
    async with app.test_app() as test_app:
        yield test_app.test_client()


async def _signup(client: Client, email: str | None = None) -> dict[str, Any]:
    response = await client.post(
        "/api/v1/auth/signup",
        json={"email": email or unique_email(), "password": "correct horse battery", "name": "A"},
    )
    assert response.status_code == 201, await response.get_data()
    return dict(await response.get_json())


def _auth(tokens: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens['access_token']}"}


async def _pay(
    client: Client, tokens: dict[str, Any], path: str, body: object, key: str | None
) -> Any:
    headers = _auth(tokens) | ({"Idempotency-Key": key} if key else {})
    return await client.post(f"/api/v1/payments/{path}", json=body, headers=headers)


@pytest.mark.asyncio
async def test_signup_signin_and_balance(client: Client) -> None:
    email = unique_email()
    created = await _signup(client, email)
    assert created["token_type"] == "Bearer"
    assert created["user"]["email"] == email
    again = await client.post(
        "/api/v1/auth/signup",
        json={"email": email.upper(), "password": "another password", "name": "B"},
    )
    assert again.status_code == 409
    ok = await client.post(
        "/api/v1/auth/signin", json={"email": email, "password": "correct horse battery"}
    )
    assert ok.status_code == 200
    wrong = await client.post("/api/v1/auth/signin", json={"email": email, "password": "nope"})
    unknown = await client.post(
        "/api/v1/auth/signin", json={"email": unique_email(), "password": "nope"}
    )
    assert wrong.status_code == unknown.status_code == 401
    assert (await wrong.get_json())["detail"] == (await unknown.get_json())["detail"]
    me = await client.get("/api/v1/accounts/me", headers=_auth(await ok.get_json()))
    assert await me.get_json() == {
        "account_id": created["user"]["account_id"],
        "currency": "USD",
        "posted": 0,
        "pending": 0,
        "available": 0,
    }


@pytest.mark.asyncio
async def test_payment_idempotency_contract(client: Client) -> None:
    tokens = await _signup(client)
    missing = await _pay(client, tokens, "deposit", {"amount": 500}, None)
    assert missing.status_code == 400
    assert missing.headers["content-type"] == "application/problem+json"
    first = await _pay(client, tokens, "deposit", {"amount": 500}, "k-1")
    assert first.status_code == 202
    body = await first.get_json()
    assert (body["kind"], body["status"], body["amount"], body["direction"]) == (
        "deposit",
        "pending",
        500,
        "in",
    )
    replay = await _pay(client, tokens, "deposit", {"amount": 500}, "k-1")
    assert replay.status_code == 202
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert await replay.get_json() == body
    different = await _pay(client, tokens, "deposit", {"amount": 501}, "k-1")
    assert different.status_code == 422
    other_path = await _pay(client, tokens, "withdraw", {"amount": 500}, "k-1")
    assert other_path.status_code == 422
    listed = await client.get("/api/v1/transactions", headers=_auth(tokens))
    assert [t["id"] for t in (await listed.get_json())["items"]] == [body["id"]]


@pytest.mark.asyncio
async def test_one_key_sent_concurrently_makes_one_transaction(client: Client) -> None:
    tokens = await _signup(client)
    responses = await asyncio.gather(
        *(_pay(client, tokens, "deposit", {"amount": 70}, "race") for _ in range(20))
    )
    codes = sorted(r.status_code for r in responses)
    assert all(c in (202, 409) for c in codes), codes
    ids = {(await r.get_json())["id"] for r in responses if r.status_code == 202}
    assert len(ids) == 1
    listed = await client.get("/api/v1/transactions", headers=_auth(tokens))
    assert len((await listed.get_json())["items"]) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "body",
    [
        {"amount": 0},
        {"amount": -5},
        {"amount": 1.5},
        {"amount": "10"},
        {"amount": True},
        {"amount": 10**30},
        {"amount": 10**13},
        {"amount": 5, "extra": 1},
        {},
        [],
        "x",
        None,
    ],
)
async def test_bad_amounts_are_4xx_problems_and_change_nothing(
    client: Client, body: object
) -> None:
    tokens = await _signup(client)
    response = await _pay(client, tokens, "deposit", body, f"bad-{uuid.uuid4()}")
    assert 400 <= response.status_code < 500
    assert response.headers["content-type"] == "application/problem+json"
    listed = await client.get("/api/v1/transactions", headers=_auth(tokens))
    assert (await listed.get_json())["items"] == []


@pytest.mark.asyncio
async def test_non_json_and_bad_utf8_bodies(client: Client) -> None:
    tokens = await _signup(client)
    for raw in (b"{not json", b"\xff\xfe\x00{", b"x" * 70_000):
        response = await client.post(
            "/api/v1/payments/deposit",
            data=raw,
            headers=_auth(tokens) | {"Idempotency-Key": "raw", "Content-Type": "application/json"},
        )
        assert response.status_code in (400, 413)
        assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.asyncio
async def test_transfers_recipients_and_privacy(client: Client) -> None:
    alice, bob = await _signup(client), await _signup(client)
    sent = await _pay(client, alice, "transfer", {"to": bob["user"]["email"], "amount": 5}, "t1")
    assert sent.status_code == 202
    txn = await sent.get_json()
    assert (txn["direction"], txn["counterparty"]) == ("out", bob["user"]["email"])
    by_id = await _pay(
        client, alice, "transfer", {"to": bob["user"]["account_id"], "amount": 6}, "t2"
    )
    assert by_id.status_code == 202
    unknown = await _pay(client, alice, "transfer", {"to": unique_email(), "amount": 5}, "t3")
    self_pay = await _pay(
        client, alice, "transfer", {"to": alice["user"]["email"], "amount": 5}, "t4"
    )
    assert (unknown.status_code, self_pay.status_code) == (422, 422)
    assert (await unknown.get_json())["title"] == "Unknown recipient"
    seen_by_bob = await client.get(f"/api/v1/transactions/{txn['id']}", headers=_auth(bob))
    assert (await seen_by_bob.get_json())["direction"] == "in"
    carol = await _signup(client)
    hidden = await client.get(f"/api/v1/transactions/{txn['id']}", headers=_auth(carol))
    assert hidden.status_code == 404


@pytest.mark.asyncio
async def test_system_accounts_are_no_transfer_recipients(client: Client, db_url: str) -> None:
    tokens = await _signup(client)
    await _pay(client, tokens, "deposit", {"amount": 50}, "fund")
    conn = await asyncpg.connect(db_url)
    try:
        system_ids = [str(r["id"]) for r in await conn.fetch(
            "SELECT id FROM accounts WHERE kind = 'system'")]  # fmt: skip
        keys_before = await conn.fetchval("SELECT count(*) FROM idempotency_keys")
        assert system_ids
        for n, account in enumerate(system_ids):
            refused = await _pay(client, tokens, "transfer", {"to": account, "amount": 5}, f"s{n}")
            assert refused.status_code == 422
            assert refused.headers["Content-Type"] == "application/problem+json"
        assert await conn.fetchval("SELECT count(*) FROM idempotency_keys") == keys_before
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_history_pages_newest_first_with_a_cursor(client: Client) -> None:
    tokens = await _signup(client)
    ids = []
    for n in range(5):
        response = await _pay(client, tokens, "deposit", {"amount": n + 1}, f"h{n}")
        ids.append((await response.get_json())["id"])
    seen: list[str] = []
    cursor = None
    for step in range(10):
        query = "?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = await (
            await client.get(f"/api/v1/transactions{query}", headers=_auth(tokens))
        ).get_json()
        seen.extend(t["id"] for t in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
        # Payments made while the client pages: they are newer than the cursor, so the
        # remaining pages neither repeat nor skip anything.
        await _pay(client, tokens, "deposit", {"amount": 100 + step}, f"during{step}")
    assert seen == ids[::-1]
    for query in ("?limit=0", "?limit=201", "?limit=x", "?cursor=garbage"):
        response = await client.get(f"/api/v1/transactions{query}", headers=_auth(tokens))
        assert response.status_code == 400


def _forge(payload: dict[str, Any], header: dict[str, Any]) -> str:
    """Signed with a key of the right length that is not ours."""
    return jwt.encode(payload, "forged-" * 8, algorithm="HS256", headers=header)


@pytest.mark.asyncio
async def test_token_attacks_are_401(client: Client) -> None:
    tokens = await _signup(client)
    good = tokens["access_token"]
    claims = jwt.decode(good, options={"verify_signature": False})
    kid = jwt.get_unverified_header(good)["kid"]
    none_alg = (
        base64.urlsafe_b64encode(json.dumps({"alg": "none", "kid": kid}).encode())
        .rstrip(b"=")
        .decode()
        + "."
        + good.split(".")[1]
        + "."
    )
    head, _payload, sig = good.split(".")
    tampered = ".".join(
        [
            head,
            base64.urlsafe_b64encode(json.dumps({**claims, "role": "admin"}).encode())
            .rstrip(b"=")
            .decode(),
            sig,
        ]
    )
    attacks = [
        none_alg,
        tampered,
        _forge(claims, {"kid": kid}),  # wrong secret
        _forge(claims, {"kid": "unknown"}),
        _forge({**claims, "exp": int(time.time()) - 10}, {"kid": kid}),
        "not-a-token",
    ]
    for token in attacks:
        response = await client.get(
            "/api/v1/accounts/me", headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 401, token
    assert (await client.get("/api/v1/accounts/me")).status_code == 401


@pytest.mark.asyncio
async def test_refresh_rotates_and_reuse_revokes_the_family(client: Client) -> None:
    tokens = await _signup(client)
    first = await client.post(
        "/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
    )
    assert first.status_code == 200
    rotated = await first.get_json()
    assert rotated["refresh_token"] != tokens["refresh_token"]
    reuse = await client.post(
        "/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
    )
    assert reuse.status_code == 401
    # The reuse revoked the whole family: the newest token is dead too.
    after = await client.post(
        "/api/v1/auth/refresh", json={"refresh_token": rotated["refresh_token"]}
    )
    assert after.status_code == 401


@pytest.mark.asyncio
async def test_health_ready_and_unknown_routes(client: Client) -> None:
    assert (await client.get("/health")).status_code == 200
    ready = await client.get("/ready")
    assert (ready.status_code, (await ready.get_json())["checks"]) == (
        200,
        {"postgres": "ok", "redis": "ok"},
    )
    missing = await client.get("/api/v1/nothing-here")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert missing.headers["X-Request-ID"]


@pytest.mark.asyncio
async def test_csv_export_dashboard_and_admin_only_reconciliation(
    client: Client, servers: ServerSet, db_url: str
) -> None:
    tokens = await _signup(client)
    for n in range(3):
        assert (
            await _pay(client, tokens, "deposit", {"amount": 10 + n}, f"c{n}")
        ).status_code == 202
    csv_response = await client.get("/api/v1/transactions/export.csv", headers=_auth(tokens))
    assert csv_response.status_code == 200
    lines = (await csv_response.get_data(as_text=True)).strip().splitlines()
    assert lines[0].startswith("id,kind,status,amount")
    assert [line.split(",")[3] for line in lines[1:]] == ["12", "11", "10"]
    board = await (await client.get("/api/v1/dashboard", headers=_auth(tokens))).get_json()
    assert board["pending_count"] == 3
    assert board["balance"]["available"] == 0
    assert len(board["recent"]) == 3
    assert (
        await client.get("/api/v1/admin/reconciliation", headers=_auth(tokens))
    ).status_code == 403
    email = unique_email("admin")
    env = kizo_env(servers, db_url)
    created = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "kizo.cli", "admin", "create", email, "--password-stdin"],
        input="admin password 1\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert created.returncode == 0, created.stderr
    signin = await client.post(
        "/api/v1/auth/signin", json={"email": email, "password": "admin password 1"}
    )
    admin = await signin.get_json()
    report = await client.get("/api/v1/admin/reconciliation", headers=_auth(admin))
    assert (report.status_code, await report.get_json()) == (200, {"items": []})


async def _admin(client: Client, servers: ServerSet, db_url: str) -> dict[str, Any]:
    email = unique_email("admin")
    created = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "kizo.cli", "admin", "create", email, "--password-stdin"],
        input="admin password 1\n",
        env=kizo_env(servers, db_url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert created.returncode == 0, created.stderr
    signin = await client.post(
        "/api/v1/auth/signin", json={"email": email, "password": "admin password 1"}
    )
    tokens: dict[str, Any] = await signin.get_json()
    return tokens


@pytest.mark.asyncio
async def test_admins_see_and_rearm_intents_flagged_needs_attention(
    client: Client, servers: ServerSet, db_url: str
) -> None:
    tokens = await _signup(client)
    ids = []
    for n in range(3):
        paid = await _pay(client, tokens, "deposit", {"amount": 20 + n}, f"na{n}")
        ids.append((await paid.get_json())["id"])
    conn = await asyncpg.connect(db_url)
    try:  # as the janitor leaves them once the re-drive limit is spent
        await conn.execute(
            "UPDATE transactions SET needs_attention = true, attempts = 11, rearms = 3"
            " WHERE id = ANY($1::uuid[])",
            ids,
        )
    finally:
        await conn.close()
    route = "/api/v1/admin/needs-attention"
    for answer in (
        await client.get(route, headers=_auth(tokens)),
        await client.post(f"{route}/redrive", json={}, headers=_auth(tokens)),
    ):
        assert answer.status_code == 403
        assert answer.headers["Content-Type"] == "application/problem+json"
    admin = await _admin(client, servers, db_url)
    listed = await (await client.get(route, headers=_auth(admin))).get_json()
    assert listed["count"] >= 3
    mine = [item for item in listed["items"] if item["id"] in ids]
    assert sorted(i["amount"] for i in mine) == [20, 21, 22]
    assert {(i["kind"], i["attempts"], i["rearms"]) for i in mine} == {("deposit", 11, 3)}
    for bad, status in (
        ({"kinds": ["loan"]}, 422),
        ({"kinds": []}, 422),
        ({"limit": 0}, 422),
        ({"limit": "5"}, 422),
        ({"everything": True}, 422),
        ("not json", 400),
    ):
        refused = await client.post(
            f"{route}/redrive",
            data=bad if isinstance(bad, str) else json.dumps(bad),
            headers={**_auth(admin), "Content-Type": "application/json"},
        )
        assert refused.status_code == status, bad
        assert refused.headers["Content-Type"] == "application/problem+json"
    transfers_only = await client.post(
        f"{route}/redrive", json={"kinds": ["transfer"]}, headers=_auth(admin)
    )
    assert not set((await transfers_only.get_json())["ids"]) & set(ids)
    done = await client.post(
        f"{route}/redrive", json={"kinds": ["deposit"], "limit": 1000}, headers=_auth(admin)
    )
    body = await done.get_json()
    assert done.status_code == 200 and set(ids) <= set(body["ids"])
    assert body["rearmed"] == len(body["ids"])
    after = await (await client.get(route, headers=_auth(admin))).get_json()
    assert not {item["id"] for item in after["items"]} & set(ids)


@pytest.mark.asyncio
async def test_nul_characters_are_refused_not_a_500(client: Client) -> None:
    """Found by schemathesis: PostgreSQL text cannot hold NUL."""
    tokens = await _signup(client)
    response = await _pay(client, tokens, "transfer", {"to": "a\x00b", "amount": 5}, "nul")
    assert response.status_code == 422
    signin = await client.post("/api/v1/auth/signin", json={"email": "\x00", "password": "x"})
    assert signin.status_code == 422


async def _rotate(servers: ServerSet, db_url: str) -> None:
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "kizo.cli", "keys", "rotate"],
        env=kizo_env(servers, db_url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.asyncio
async def test_key_rotation_reaches_the_running_api_and_the_previous_key_still_verifies(
    servers: ServerSet, db_url: str, redis_client: object
) -> None:
    reload_s = 0.5  # the default 5 s, shortened: what is tested is that a reload happens
    config = api_config(servers, db_url, keyring_reload_s=reload_s)
    async with create_app(config).test_app() as test_app:
        await _rotations_reach_the_app(test_app.test_client(), servers, db_url, reload_s)


async def _rotations_reach_the_app(
    client: Client, servers: ServerSet, db_url: str, reload_s: float
) -> None:
    old = await _signup(client)
    old_kid = jwt.get_unverified_header(old["access_token"])["kid"]
    await _rotate(servers, db_url)
    await asyncio.sleep(reload_s + 0.2)
    fresh = await (
        await client.post("/api/v1/auth/refresh", json={"refresh_token": old["refresh_token"]})
    ).get_json()
    assert jwt.get_unverified_header(fresh["access_token"])["kid"] != old_kid
    for tokens in (old, fresh):  # the newest two keys verify
        assert (await client.get("/api/v1/accounts/me", headers=_auth(tokens))).status_code == 200
    await _rotate(servers, db_url)
    await asyncio.sleep(reload_s + 0.2)
    retired = await client.get("/api/v1/accounts/me", headers=_auth(old))
    assert retired.status_code == 401  # two rotations later the first key is retired


async def pay_while_valkey_is_down(client: Client, servers: ServerSet, amount: int,
                                   key: str) -> Any:  # fmt: skip
    """A deposit by a new user, asked while the embedded Valkey is killed (restarted after)."""
    if servers.valkey is None:
        pytest.skip("needs the embedded Valkey to stop and start it")
    tokens = await _signup(client)
    servers.valkey.kill()
    try:
        return await _pay(client, tokens, "deposit", {"amount": amount}, key)
    finally:
        servers.valkey.start()


@pytest.mark.asyncio
async def test_payment_is_accepted_while_redis_is_down(
    client: Client, servers: ServerSet, db_url: str
) -> None:
    response = await pay_while_valkey_is_down(client, servers, 25, "redis-down")
    assert response.status_code == 202  # the intent row is the outbox
    assert (await response.get_json())["status"] == "pending"
    conn = await asyncpg.connect(db_url)
    try:
        stored = await conn.fetchval(
            "SELECT count(*) FROM transactions WHERE kind = 'deposit'"
            " AND amount_minor = 25 AND status = 'pending'"
        )
    finally:
        await conn.close()
    assert stored == 1


@pytest.mark.asyncio
async def test_dashboard_month_totals_are_kept_by_the_settling_batch(
    client: Client, db_url: str
) -> None:
    payer, payee = await _signup(client), await _signup(client)
    deposit = await _pay(client, payer, "deposit", {"amount": 500}, "m1")
    payee_me = await (await client.get("/api/v1/accounts/me", headers=_auth(payee))).get_json()
    conn = await asyncpg.connect(db_url)
    try:
        await apply_batch(conn, [Op(uuid.UUID((await deposit.get_json())["id"]), Action.CREDIT)])
        transfer = await _pay(client, payer, "transfer",
                              {"to": payee_me["account_id"], "amount": 120}, "m2")  # fmt: skip
        board = await (await client.get("/api/v1/dashboard", headers=_auth(payer))).get_json()
        assert (board["month_totals"], board["pending_count"]) == ({"in": 500, "out": 0}, 1)
        await apply_batch(conn, [Op(uuid.UUID((await transfer.get_json())["id"]),
                                    Action.TRANSFER)])  # fmt: skip
        # A total of an earlier month reads as zero; the next settlement starts from zero.
        await conn.execute("UPDATE balances SET month_start = month_start - 31"
                           " WHERE account_id = $1", uuid.UUID(payee_me["account_id"]))  # fmt: skip
    finally:
        await conn.close()
    board = await (await client.get("/api/v1/dashboard", headers=_auth(payer))).get_json()
    assert (board["month_totals"], board["pending_count"]) == ({"in": 500, "out": 120}, 0)
    assert board["balance"]["available"] == 380
    other = await (await client.get("/api/v1/dashboard", headers=_auth(payee))).get_json()
    assert other["month_totals"] == {"in": 0, "out": 0}
