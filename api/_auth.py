"""Passwords (Argon2id + pepper, off the event loop), access JWTs (key ring), refresh tokens.

- The pepper is mixed in with HMAC-SHA256 before Argon2id, so a stolen database alone does not
  allow offline guessing. Hashing runs in a bounded thread pool; when its queue is full the
  request is turned away at once (503 + Retry-After) instead of stalling every other request.
- Access tokens: HS256 JWTs with ``kid``; the newest key signs, the newest two verify.
- Refresh tokens: opaque, stored hashed in Redis with a family id, rotated on every use; a reused
  (already rotated) token revokes its whole family.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import asyncpg
import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from redis.asyncio import Redis

from api._problems import Problem
from kizo.config import AuthConfig

JWT_ALGORITHM = "HS256"
VERIFYING_KEYS = 2
HASH_WAITING_MAX = 64
T = TypeVar("T")
_REFRESH_PREFIX = "kizo:refresh:"
_FAMILY_PREFIX = "kizo:refresh-family:"


# Argon2 is meant to be expensive; payments must not pay for it. Two measures, both measured
# with `kizo bench api` (docs/benchmarks.md):
# - Hashing threads run under Linux's SCHED_IDLE policy (set per thread): they get a core only
#   when nothing else wants it. Elsewhere (or if refused) they keep the default policy.
# - Each hashing thread is paced to a duty cycle (AuthConfig.hash_duty_pct): after a hash that
#   took t, its next hash starts no sooner than t * (100 - duty) / duty later. A core that
#   hashes flat out slows the other one (shared caches and memory bandwidth, and on a VM
#   possibly a shared physical core), which no scheduling policy inside the guest prevents.
#   Sign-ins beyond the paced rate wait in the bounded queue, then get a fast 503.


def _yield_cpu() -> None:
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))


class _Pacer:
    """Per hashing thread: when it may start its next hash."""

    def __init__(self, duty_pct: int) -> None:
        assert 1 <= duty_pct <= 100
        self.rest_per_busy = (100 - duty_pct) / duty_pct
        self.local = threading.local()

    def run(self, fn: Callable[..., T], *args: object) -> T:
        wait_s = getattr(self.local, "next_start", 0.0) - time.monotonic()
        if wait_s > 0:
            time.sleep(wait_s)
        started = time.monotonic()
        try:
            return fn(*args)
        finally:
            ended = time.monotonic()
            self.local.next_start = ended + (ended - started) * self.rest_per_busy


class Passwords:
    def __init__(self, config: AuthConfig) -> None:
        self._pepper = config.pepper.encode()
        self._hasher = PasswordHasher(
            time_cost=config.argon2_time_cost,
            memory_cost=config.argon2_memory_kib,
            parallelism=config.argon2_parallelism,
        )
        self._pool = ThreadPoolExecutor(
            config.hash_threads_max, thread_name_prefix="argon2", initializer=_yield_cpu
        )
        self._pacer = _Pacer(config.hash_duty_pct)
        self._slots = asyncio.Semaphore(config.hash_threads_max + HASH_WAITING_MAX)
        # Verified against when the email is unknown: the same work, so no enumeration by timing.
        self._dummy = self._hasher.hash(self._peppered("not-a-password"))

    def _peppered(self, password: str) -> bytes:
        return base64.b64encode(hmac.new(self._pepper, password.encode(), "sha256").digest())

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        if self._slots.locked():
            raise Problem(503, "Busy", "too many sign-ins at once, retry shortly",
                          headers={"Retry-After": "1"})  # fmt: skip
        async with self._slots:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, self._pacer.run, fn, *args)

    async def hash(self, password: str) -> str:
        result = await self._run(self._hasher.hash, self._peppered(password))
        assert isinstance(result, str)
        return result

    async def verify(self, stored: str | None, password: str) -> bool:
        def check() -> bool:
            try:
                return self._hasher.verify(stored or self._dummy, self._peppered(password))
            except (VerificationError, InvalidHashError):
                return False

        ok = await self._run(check)
        return bool(ok) and stored is not None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class Claims:
    user_id: uuid.UUID
    role: str


class KeyRing:
    """Signing keys from the database, newest first."""

    def __init__(self, keys: list[tuple[str, str]]) -> None:
        if not keys:
            raise RuntimeError("no signing key: run kizo keys rotate")
        self.keys = keys

    @classmethod
    async def load(cls, db: asyncpg.Pool) -> KeyRing:
        rows = await db.fetch(
            "SELECT kid, secret FROM signing_keys ORDER BY created_at DESC LIMIT $1",
            VERIFYING_KEYS,
        )
        return cls([(r["kid"], r["secret"]) for r in rows])

    def sign(self, claims: Claims, ttl_s: int) -> str:
        kid, secret = self.keys[0]
        now = int(time.time())
        payload = {"sub": str(claims.user_id), "role": claims.role, "iat": now, "exp": now + ttl_s}
        return jwt.encode(payload, secret, algorithm=JWT_ALGORITHM, headers={"kid": kid})

    def verify(self, token: str) -> Claims:
        unauthorized = Problem(401, "Unauthorized", "missing, invalid or expired access token",
                               headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            secret = dict(self.keys).get(kid) if isinstance(kid, str) else None
            if secret is None:
                raise unauthorized
            payload = jwt.decode(token, secret, algorithms=[JWT_ALGORITHM],
                                 options={"require": ["exp", "iat", "sub"]})  # fmt: skip
            return Claims(uuid.UUID(payload["sub"]), str(payload.get("role", "user")))
        except (jwt.PyJWTError, ValueError, KeyError):
            raise unauthorized from None


async def rotate_key(db: asyncpg.Connection | asyncpg.Pool) -> str:
    kid = secrets.token_hex(8)
    await db.execute("INSERT INTO signing_keys (kid, secret) VALUES ($1, $2)", kid,
                     secrets.token_urlsafe(48))  # fmt: skip
    return kid


async def ensure_key(db: asyncpg.Pool) -> None:
    if await db.fetchval("SELECT count(*) FROM signing_keys") == 0:
        await rotate_key(db)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class RefreshTokens:
    def __init__(self, redis: Redis, ttl_s: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s

    async def issue(self, user_id: uuid.UUID, family: str | None = None) -> str:
        token = secrets.token_urlsafe(32)
        family = family or secrets.token_hex(16)
        key = _REFRESH_PREFIX + _digest(token)
        await self.redis.hset(key, mapping={"user": str(user_id), "family": family, "used": 0})
        await self.redis.expire(key, self.ttl_s)
        return token

    async def rotate(self, token: str) -> tuple[uuid.UUID, str]:
        """Use ``token`` once; returns (user, new token). Reuse revokes the family."""
        invalid = Problem(401, "Unauthorized", "invalid refresh token")
        key = _REFRESH_PREFIX + _digest(token)
        record = await self.redis.hgetall(key)
        if not record:
            raise invalid
        family = _text(record[b"family"])
        if await self.redis.exists(_FAMILY_PREFIX + family):
            raise invalid
        if await self.redis.hincrby(key, "used", 1) > 1:  # atomic: only one use wins
            await self.revoke_family(family)
            raise invalid
        user_id = uuid.UUID(_text(record[b"user"]))
        return user_id, await self.issue(user_id, family)

    async def revoke(self, token: str) -> None:
        record = await self.redis.hgetall(_REFRESH_PREFIX + _digest(token))
        if record:
            await self.revoke_family(_text(record[b"family"]))

    async def revoke_family(self, family: str) -> None:
        await self.redis.set(_FAMILY_PREFIX + family, 1, ex=self.ttl_s)
