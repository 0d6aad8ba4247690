"""Connection types shared by the engine's functions."""

from __future__ import annotations

from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

# A connection of our own or one borrowed from a pool: both run queries and transactions.
Conn: TypeAlias = asyncpg.Connection | PoolConnectionProxy
# Anything that runs a single query: a connection or a pool.
Db: TypeAlias = asyncpg.Connection | PoolConnectionProxy | asyncpg.Pool
