"""The migration runner: applies in order, records, is idempotent and safe under concurrency."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from infra.migrate import MigrationError, load_migrations, migrate
from tests.conftest import ServerSet


@pytest_asyncio.fixture
async def empty_db_url(servers: ServerSet, db_name: str) -> AsyncIterator[str]:
    """A database with nothing in it (not cloned from the migrated template)."""
    admin = await asyncpg.connect(servers.pg_url("postgres"))
    try:
        await admin.execute(f"CREATE DATABASE {db_name}")
        yield servers.pg_url(db_name)
        await admin.execute(f"DROP DATABASE IF EXISTS {db_name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.mark.asyncio
async def test_fresh_database_gets_every_migration_then_none(empty_db_url: str) -> None:
    conn = await asyncpg.connect(empty_db_url)
    try:
        first = await migrate(conn)
        second = await migrate(conn)
        recorded = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        tables = await conn.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = ANY($1)",
            ["accounts", "balances", "transactions", "postings", "idempotency_keys"],
        )
    finally:
        await conn.close()
    names = [m.name for m in load_migrations()]
    assert first == names
    assert second == []
    assert [r["name"] for r in recorded] == names
    assert tables == 5


@pytest.mark.asyncio
async def test_two_concurrent_runners_apply_each_file_once(empty_db_url: str) -> None:
    conns = [await asyncpg.connect(empty_db_url) for _ in range(2)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        count = await conns[0].fetchval("SELECT count(*) FROM schema_migrations")
    finally:
        for c in conns:
            await c.close()
    names = [m.name for m in load_migrations()]
    assert sorted([results[0], results[1]], key=len) == [[], names]
    assert count == len(names)


@pytest.mark.asyncio
async def test_an_edited_applied_migration_is_refused(empty_db_url: str, tmp_path: Path) -> None:
    (tmp_path / "0001_one.sql").write_text("CREATE TABLE one (id int);")
    conn = await asyncpg.connect(empty_db_url)
    try:
        assert await migrate(conn, tmp_path) == ["0001_one.sql"]
        (tmp_path / "0001_one.sql").write_text("CREATE TABLE one (id bigint);")
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await migrate(conn, tmp_path)
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_a_failing_migration_leaves_nothing_half_applied(
    empty_db_url: str, tmp_path: Path
) -> None:
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE ok (id int);")
    (tmp_path / "0002_bad.sql").write_text("CREATE TABLE half (id int); SELECT no_such_fn();")
    conn = await asyncpg.connect(empty_db_url)
    try:
        with pytest.raises(asyncpg.UndefinedFunctionError):
            await migrate(conn, tmp_path)
        versions = await conn.fetch("SELECT version FROM schema_migrations")
        half = await conn.fetchval("SELECT to_regclass('half')")
    finally:
        await conn.close()
    assert [r["version"] for r in versions] == [1]
    assert half is None


def test_badly_named_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "1_whatever.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"NNNN_name\.sql"):
        load_migrations(tmp_path)


def test_duplicate_versions_are_refused(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0001_b.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="share a version"):
        load_migrations(tmp_path)
