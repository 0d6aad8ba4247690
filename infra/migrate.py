"""Forward-only SQL migrations: numbered files, applied in order, recorded, safe to run twice.

Two processes may run this at once (``kizo up`` and a test, or two workers starting): a
session-level advisory lock makes the second wait for the first, then find nothing left to do.
Each file runs in its own transaction together with its bookkeeping row, so a crash mid-file
leaves that file unapplied rather than half-applied.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from engine import Conn

# An arbitrary constant that names "the Kizo schema" among advisory locks.
MIGRATION_LOCK_ID = 0x4B495A4F
LOCK_TIMEOUT_S = 60.0
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class MigrationError(RuntimeError):
    """The migrations on disk and the ones recorded in the database disagree."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations_dir() -> Path:
    """``migrations/`` beside the packages in a checkout, ``kizo/_migrations`` in a wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "migrations", here / "_migrations"):
        if candidate.is_dir():
            return candidate
    raise MigrationError("no migrations directory found")


def load_migrations(directory: Path | None = None) -> list[Migration]:
    directory = migrations_dir() if directory is None else directory
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise MigrationError(f"migration file name {path.name!r} is not NNNN_name.sql")
        found.append(Migration(int(match.group(1)), path.name, path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migration files share a version number")
    return found


_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


async def pending_migrations(conn: Conn, directory: Path | None = None) -> list[Migration]:
    """Migrations on disk not yet recorded; raises if a recorded one was edited afterwards."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    applied: dict[int, str] = {}
    if exists:
        rows = await conn.fetch("SELECT version, checksum FROM schema_migrations")
        applied = {row["version"]: row["checksum"] for row in rows}
    todo = []
    for migration in load_migrations(directory):
        recorded = applied.get(migration.version)
        if recorded is None:
            todo.append(migration)
        elif recorded != migration.checksum:
            raise MigrationError(
                f"{migration.name} changed after it was applied; add a new migration instead"
            )
    return todo


async def migrate(conn: Conn, directory: Path | None = None) -> list[str]:
    """Apply every pending migration in ``directory`` (Kizo's own by default); returns the
    names applied (empty when up to date)."""
    await conn.execute(f"SET lock_timeout = '{int(LOCK_TIMEOUT_S * 1000)}ms'")
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
    try:
        await conn.execute(_CREATE_TABLE)
        applied = []
        for migration in await pending_migrations(conn, directory):
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            applied.append(migration.name)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
        await conn.execute("RESET lock_timeout")
