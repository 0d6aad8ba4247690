"""PostgreSQL connection pools as Kizo's processes use them."""

from __future__ import annotations

from typing import Any

import asyncpg


class LeanConnection(asyncpg.Connection):
    """Skips asyncpg's reset query (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL) when a
    connection goes back to its pool: one round trip less per request. Safe because pooled
    connections never keep session state: settings are SET LOCAL, cursors and locks live inside
    transactions, nothing LISTENs (the migration runner, which takes a session lock, resets its
    own state before releasing)."""

    def get_reset_query(self) -> str:
        return ""


async def create_pool(url: str, **options: Any) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(url, connection_class=LeanConnection, **options)
    assert pool is not None
    return pool
