"""Safe production defaults: no known or missing secret, no mutation outside a scratch system,
refresh tokens that always expire, signing keys sealed at rest (docs/api.md)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
import redis.exceptions

from api._auth import RefreshTokens, WrongKeyringKey, ensure_key, rotate_key
from api._problems import Problem
from infra.config import DEV_PEPPER, SCRATCH_MARK_VAR, Config, ConfigError
from infra.devsecrets import KEYRING_KEY_FILE, PEPPER_FILE, scratch_env, up_env, with_dev_secrets
from infra.migrate import migrate, migrations_dir
from tests.conftest import TEST_SECRETS, ServerSet, kizo_env, template_database

OTHER_KEYRING_KEY = "b3RoZXIta2V5cmluZy1rZXktMzItYnl0ZXMtbG9uZyE"
TTL_S = 3600


def _kizo(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kizo.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def _one_line_refusal(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, never a traceback
    assert lines[0].startswith("kizo: "), lines
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def _env(home: Path, **values: str) -> dict[str, str]:
    """A production-like environment: none of the suite's secrets unless given."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("KIZO_") and k not in {"DATABASE_URL", "REDIS_URL"}}  # fmt: skip
    # Unreachable on purpose: every refusal here must come before any connection.
    env |= {"KIZO_HOME": str(home), "DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none"}
    return env | values


# -- the pepper and the keyring key ---------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"KIZO_KEYRING_KEY": TEST_SECRETS["KIZO_KEYRING_KEY"]}, "KIZO_PEPPER is not set"),
        ({**TEST_SECRETS, "KIZO_PEPPER": DEV_PEPPER}, "published development pepper"),
        ({**TEST_SECRETS, "KIZO_PEPPER": "short"}, "at least 16 characters"),
        ({"KIZO_PEPPER": TEST_SECRETS["KIZO_PEPPER"]}, "KIZO_KEYRING_KEY is not set"),
        ({**TEST_SECRETS, "KIZO_KEYRING_KEY": "too-short"}, "32 random bytes"),
    ],
)
def test_the_api_refuses_to_start_without_real_secrets(
    home: Path, values: dict[str, str], named: str
) -> None:
    _one_line_refusal(_kizo(["api"], _env(home, **values)), named)


def test_kizo_up_makes_its_secrets_once_in_its_home_readable_by_its_user_only(home: Path) -> None:
    config = Config.from_env({"KIZO_HOME": str(home)})
    with ThreadPoolExecutor(8) as pool:  # racing `kizo up`s agree on one pepper
        made = list(pool.map(lambda _: up_env(config), range(8)))
    assert all(m == made[0] for m in made)
    assert set(made[0]) == {"KIZO_PEPPER", "KIZO_KEYRING_KEY"}
    for name in (PEPPER_FILE, KEYRING_KEY_FILE):
        assert stat.S_IMODE((home / name).stat().st_mode) == 0o600
    assert sorted(p.name for p in home.iterdir()) == sorted([PEPPER_FILE, KEYRING_KEY_FILE])
    assert made[0]["KIZO_PEPPER"] != DEV_PEPPER and len(made[0]["KIZO_PEPPER"]) >= 40
    again = Config.from_env({"KIZO_HOME": str(home), **made[0]})
    assert again.auth.keyring_key and up_env(again) == {}  # set ones are kept, not replaced
    beside = with_dev_secrets(Config.from_env({"KIZO_HOME": str(home)}))  # kizo keys rotate
    assert (beside.auth.pepper, beside.auth.keyring_key) == (again.auth.pepper,
                                                             again.auth.keyring_key)  # fmt: skip
    (home / PEPPER_FILE).chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        up_env(config)


def test_kizo_up_on_servers_of_ones_own_needs_both_secrets_and_never_a_mutation(
    home: Path,
) -> None:
    external = Config.from_env({"KIZO_HOME": str(home), "DATABASE_URL": "postgresql://x@h/db"})
    with pytest.raises(ConfigError, match="KIZO_PEPPER and KIZO_KEYRING_KEY must be set"):
        up_env(external)
    assert not home.exists()  # no secret written for a database that does not live here
    with pytest.raises(ConfigError, match="never runs a mutation"):
        up_env(dataclasses.replace(external, mutation="idempotency_off"))
    with pytest.raises(ConfigError, match="start the system with `kizo up` first"):
        with_dev_secrets(Config.from_env({"KIZO_HOME": str(home)}))


# -- mutations only inside scratch systems --------------------------------------------------


@pytest.mark.parametrize("command", [["api"], ["worker"], ["janitor", "--once"], ["up"]])
def test_a_mutation_outside_a_scratch_system_is_refused_at_start(
    home: Path, command: list[str]
) -> None:
    env = _env(home, KIZO_MUTATION="idempotency_off", **TEST_SECRETS)
    _one_line_refusal(_kizo(command, env), "KIZO_MUTATION", "scratch")
    assert not home.exists()  # refused before anything started


def test_only_the_scratch_systems_marker_and_token_together_allow_a_mutation(
    home: Path,
) -> None:
    home.mkdir()
    made = scratch_env(home)
    env = {"KIZO_HOME": str(home), "KIZO_MUTATION": "idempotency_off"}
    assert Config.from_env(env | made).mutation == "idempotency_off"
    assert made["KIZO_PEPPER"] != made["KIZO_KEYRING_KEY"] != TEST_SECRETS["KIZO_KEYRING_KEY"]
    for forged in ({}, {SCRATCH_MARK_VAR: "x" * 43}, {SCRATCH_MARK_VAR: ""}):
        with pytest.raises(ConfigError, match="KIZO_MUTATION"):
            Config.from_env(env | forged)
    other = home.parent / "other"
    other.mkdir()
    with pytest.raises(ConfigError, match="KIZO_MUTATION"):  # the token alone is not enough
        Config.from_env(env | made | {"KIZO_HOME": str(other)})


# -- refresh tokens always expire -----------------------------------------------------------


async def _keys_without_expiry(client: aioredis.Redis) -> tuple[int, list[bytes]]:
    keys = [k async for k in client.scan_iter(match="kizo:refresh*", count=1000)]
    return len(keys), [k for k in keys if await client.ttl(k) < 0]


@pytest.mark.asyncio
async def test_every_refresh_key_written_has_an_expiry(redis_client: aioredis.Redis) -> None:
    tokens = RefreshTokens(redis_client, TTL_S)
    alice, bob = uuid.uuid4(), uuid.uuid4()
    first = await tokens.issue(alice)
    _, second = await tokens.rotate(first)
    with pytest.raises(Problem):
        await tokens.rotate(first)  # reuse: the family is revoked
    with pytest.raises(Problem):
        await tokens.rotate(second)
    await redis_client.delete(*[k async for k in redis_client.scan_iter(match="kizo:refresh:*")])
    with pytest.raises(Problem):
        await tokens.rotate(second)  # gone (expired): using it must not re-create it
    await tokens.revoke(await tokens.issue(bob))
    written, forever = await _keys_without_expiry(redis_client)
    assert written == 3 and forever == []  # bob's token and both families


@pytest.mark.asyncio
async def test_a_failure_between_record_and_expiry_leaves_no_token(
    servers: ServerSet, redis_client: aioredis.Redis
) -> None:
    """A connection that may write but not set expiries: the record must not land alone."""
    user = f"kizo-test-{uuid.uuid4().hex[:8]}"
    await redis_client.acl_setuser(user, enabled=True, passwords=["+pw"], keys=["*"],
                                   channels=["*"], commands=["+@all", "-expire"])  # fmt: skip
    limited: aioredis.Redis = aioredis.Redis.from_url(
        servers.redis_url, username=user, password="pw", socket_timeout=5
    )
    try:
        with pytest.raises(redis.exceptions.ResponseError):
            await RefreshTokens(limited, TTL_S).issue(uuid.uuid4())
    finally:
        await limited.aclose()
        await redis_client.acl_deluser(user)
    assert await _keys_without_expiry(redis_client) == (0, [])


# -- signing keys sealed at rest ------------------------------------------------------------


@pytest.mark.asyncio
async def test_signing_keys_are_not_readable_from_the_database_alone(
    pool: asyncpg.Pool,
) -> None:
    key = Config.from_env(TEST_SECRETS).auth.keyring_key
    await ensure_key(pool, key)
    await rotate_key(pool, key)
    ring = await ensure_key(pool, key)
    rows = await pool.fetch("SELECT * FROM signing_keys")
    assert len(rows) == 2 and len(ring.keys) == 2
    stored = b"".join(
        v if isinstance(v, bytes) else str(v).encode() for row in rows for v in row.values()
    )
    for _kid, secret in ring.keys:
        assert len(secret) >= 64 and secret.encode() not in stored
    other = Config.from_env({"KIZO_KEYRING_KEY": OTHER_KEYRING_KEY}).auth.keyring_key
    with pytest.raises(WrongKeyringKey, match="does not open signing key"):
        await ensure_key(pool, other)
    with pytest.raises(WrongKeyringKey):
        await rotate_key(pool, other)  # refused before it adds a key the API could not open
    assert await pool.fetchval("SELECT count(*) FROM signing_keys") == 2


def test_a_wrong_keyring_key_is_one_line_at_start_and_rotates_nothing(
    servers: ServerSet, sync_db_url: str
) -> None:
    assert _kizo(["keys", "rotate"], kizo_env(servers, sync_db_url)).returncode == 0
    wrong = kizo_env(servers, sync_db_url, KIZO_KEYRING_KEY=OTHER_KEYRING_KEY)
    _one_line_refusal(_kizo(["api"], wrong), "KIZO_KEYRING_KEY does not open signing key")
    _one_line_refusal(_kizo(["keys", "rotate"], wrong), "KIZO_KEYRING_KEY does not open")

    async def count() -> int:
        conn = await asyncpg.connect(sync_db_url)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM signing_keys"))
        finally:
            await conn.close()

    assert asyncio.run(count()) == 1


@pytest.fixture
def bare_database(servers: ServerSet) -> Iterator[str]:
    with template_database(servers, f"kizo_bare_{uuid.uuid4().hex[:8]}", template=None) as url:
        yield url


@pytest.mark.asyncio
async def test_upgrading_retires_the_plaintext_keys_of_earlier_builds(
    bare_database: str, tmp_path: Path
) -> None:
    before = tmp_path / "before"
    before.mkdir()
    for path in sorted(migrations_dir().glob("000[1-3]_*.sql")):
        shutil.copy(path, before)
    conn = await asyncpg.connect(bare_database)
    try:
        await migrate(conn, before)
        await conn.execute("INSERT INTO signing_keys (kid, secret) VALUES ('old', 'plaintext')")
        assert "0004_sealed_signing_keys.sql" in await migrate(conn)
        columns = await conn.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'signing_keys'"
        )
        assert sorted(c["column_name"] for c in columns) == ["created_at", "kid", "sealed"]
        assert await conn.fetchval("SELECT count(*) FROM signing_keys") == 0
    finally:
        await conn.close()
