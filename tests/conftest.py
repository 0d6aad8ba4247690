"""Real servers for the whole suite: embedded PostgreSQL and Valkey, started once per session.

Each test that asks for ``db_url`` gets a database of its own, cloned from a migrated template
(``CREATE DATABASE ... TEMPLATE`` takes milliseconds), so tests never see each other's money.
Set ``KIZO_TEST_DATABASE_URL`` (a server URL whose user may create databases) and
``KIZO_TEST_REDIS_URL`` to run the suite against servers of your own instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from engine import ensure_system_accounts
from infra.migrate import migrate
from infra.readiness import wait_http
from infra.servers import EmbeddedPostgres, EmbeddedValkey, free_port

__all__ = ["wait_http"]  # tests start processes by hand and wait through the one readiness loop

CURRENCY = "USD"
# The suite's own secrets: the API refuses to start without them (docs/api.md). The in-process
# apps and every `kizo` child share them, so a key one rotates or a hash one writes works in all.
TEST_SECRETS = {
    "KIZO_PEPPER": "kizo-test-pepper-" + "p" * 16,
    "KIZO_KEYRING_KEY": "dGVzdC1rZXlyaW5nLWtleS0zMi1ieXRlcy1sb25nISE",
}
TEMPLATE_DB = "kizo_template"
_counter = itertools.count()


@dataclass
class ServerSet:
    """The session's servers; ``valkey`` is None when the suite runs against an external Redis."""

    pg_base_url: str  # URL of the server, without the database name
    redis_url: str
    pg: EmbeddedPostgres | None
    valkey: EmbeddedValkey | None
    home: Path

    def pg_url(self, database: str) -> str:
        return f"{self.pg_base_url}/{database}"


async def _prepare_template(servers: ServerSet) -> None:
    admin = await asyncpg.connect(servers.pg_url("postgres"))
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB}")
        await admin.execute(f"CREATE DATABASE {TEMPLATE_DB}")
    finally:
        await admin.close()
    conn = await asyncpg.connect(servers.pg_url(TEMPLATE_DB))
    try:
        await migrate(conn)
        await ensure_system_accounts(conn, CURRENCY)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def servers() -> Iterator[ServerSet]:
    external_pg = os.environ.get("KIZO_TEST_DATABASE_URL")
    external_redis = os.environ.get("KIZO_TEST_REDIS_URL")
    # A short path: CI clones anywhere, and the servers' paths should not depend on it. The
    # stack stops the servers and removes their data and this directory even if a start fails.
    with tempfile.TemporaryDirectory(prefix="kizo-test-") as tmp, contextlib.ExitStack() as stack:
        home = Path(tmp)
        pg = valkey = None
        if external_pg is None:
            pg = EmbeddedPostgres(home / "pgdata", free_port(), fsync=False, max_connections=400)
            stack.callback(pg.remove_data)
            stack.callback(pg.stop)
            pg.start()
            pg_base = f"postgresql://postgres@{pg.host}:{pg.port}"
        else:
            pg_base = external_pg.rstrip("/").rsplit("/", 1)[0]
        if external_redis is None:
            valkey = EmbeddedValkey(home / "valkey", free_port(), persist=False)
            stack.callback(valkey.stop)
            valkey.start()
            redis_url = valkey.url()
        else:
            redis_url = external_redis
        result = ServerSet(pg_base, redis_url, pg, valkey, home)
        asyncio.run(_prepare_template(result))
        yield result


@pytest.fixture
def db_name() -> str:
    return f"kizo_t{os.getpid()}_{next(_counter)}"


@pytest_asyncio.fixture
async def db_url(servers: ServerSet, db_name: str) -> AsyncIterator[str]:
    """A fresh, migrated database with the system accounts, dropped after the test."""
    admin = await asyncpg.connect(servers.pg_url("postgres"))
    try:
        await admin.execute(f"CREATE DATABASE {db_name} TEMPLATE {TEMPLATE_DB}")
    finally:
        await admin.close()
    yield servers.pg_url(db_name)
    admin = await asyncpg.connect(servers.pg_url("postgres"))
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {db_name} WITH (FORCE)")
    finally:
        await admin.close()


@contextlib.contextmanager
def template_database(
    servers: ServerSet, name: str, template: str | None = TEMPLATE_DB
) -> Iterator[str]:
    """A database cloned from the migrated template (an empty one with ``template=None``),
    dropped on exit; for fixtures that cannot use the async ``db_url`` (synchronous tests,
    module-scoped processes)."""

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(servers.pg_url("postgres"))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    clone = f" TEMPLATE {template}" if template is not None else ""
    asyncio.run(admin(f"CREATE DATABASE {name}{clone}"))
    try:
        yield servers.pg_url(name)
    finally:
        asyncio.run(admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
def sync_db_url(servers: ServerSet, db_name: str) -> Iterator[str]:
    """``db_url`` for synchronous tests (hypothesis drives its own ``asyncio.run`` per example)."""
    with template_database(servers, db_name) as url:
        yield url


@pytest_asyncio.fixture
async def pool(db_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=8, command_timeout=30)
    assert pool is not None
    try:
        yield pool
    finally:
        await pool.close()


@pytest_asyncio.fixture
async def redis_client(servers: ServerSet) -> AsyncIterator[aioredis.Redis]:
    """A client on a Redis database of its own, flushed before the test."""
    client: aioredis.Redis = aioredis.Redis.from_url(servers.redis_url, socket_timeout=5)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()


def unique_email(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}@example.test"


@dataclass
class BankProcess:
    url: str
    proc: subprocess.Popen[bytes]


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout_s``; always reaped, so no process outlives its test."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)
    return proc.returncode


def kizo_env(servers: ServerSet, db_url: str, **extra: str) -> dict[str, str]:
    """The environment of a real ``kizo`` child process pointed at the test servers."""
    env = {**os.environ, **TEST_SECRETS, "DATABASE_URL": db_url, "REDIS_URL": servers.redis_url}
    env.update(extra)
    return env


@contextlib.contextmanager
def running_bank(servers: ServerSet, database: str) -> Iterator[BankProcess]:
    """A real mock bank process on a database of its own (created on first start)."""
    port = free_port()
    env = kizo_env(
        servers,
        servers.pg_url("kizo"),
        BANK_DATABASE_URL=servers.pg_url(database),
        KIZO_BANK_PORT=str(port),
        KIZO_BANK_DROP_HOLD_S="3",
    )
    proc = subprocess.Popen([sys.executable, "-m", "kizo.cli", "bank"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc=proc)
        yield BankProcess(url, proc)
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def bank(servers: ServerSet) -> Iterator[BankProcess]:
    """One real mock bank process shared by the session."""
    with running_bank(servers, f"bank_t{os.getpid()}") as process:
        yield process


@pytest.fixture
def own_bank(servers: ServerSet, db_name: str) -> Iterator[BankProcess]:
    """A bank whose statement holds only this test's payments (for reconciliation)."""
    with running_bank(servers, f"{db_name}_bank") as process:
        yield process


@pytest.fixture
def bank_url(bank: BankProcess) -> Iterator[str]:
    """The session bank with no faults, reset again after the test."""
    httpx.delete(f"{bank.url}/admin/faults", timeout=5)
    yield bank.url
    httpx.delete(f"{bank.url}/admin/faults", timeout=5)
