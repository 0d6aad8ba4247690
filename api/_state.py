"""What one API process holds while it serves, reachable from any handler through ``state()``."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import cast

import asyncpg
from quart import current_app
from redis.asyncio import Redis

from actors import Coalescer
from api._auth import KeyRing, Passwords, RefreshTokens
from infra.config import Config

STATE_KEY = "kizo"  # in app.extensions: set at startup, read by every handler


@dataclass
class State:
    config: Config
    pool: asyncpg.Pool
    redis: Redis
    coalescer: Coalescer
    flusher: asyncio.Task[None]
    passwords: Passwords
    refresh: RefreshTokens
    keys: KeyRing
    keys_loaded_at: float


def state() -> State:
    return cast(State, current_app.extensions[STATE_KEY])
