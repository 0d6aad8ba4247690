"""Passwords (Argon2id + pepper, off the event loop), access JWTs (key ring), refresh tokens.

- The pepper is mixed in with HMAC-SHA256 before Argon2id, so a stolen database alone does not
  allow offline guessing. Hashing runs in low-priority, paced processes (api/_hashing.py) with a
  bounded queue; when it is full the request is turned away at once (503 + Retry-After) instead
  of stalling every other request.
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
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg
import jwt
from argon2 import PasswordHasher
from redis.asyncio import Redis

from api._hashing import HashingUnavailable, HashWorker
from api._problems import Problem
from infra.config import AuthConfig

JWT_ALGORITHM = "HS256"
VERIFYING_KEYS = 2
HASH_WAITING_MAX = 64
_REFRESH_PREFIX = "kizo:refresh:"
_FAMILY_PREFIX = "kizo:refresh-family:"


class Passwords:
    """Argon2id over HMAC-SHA256(pepper, password), in hashing processes (api/_hashing.py)."""

    def __init__(self, config: AuthConfig) -> None:
        self._pepper = config.pepper.encode()
        args = (config.argon2_memory_kib, config.argon2_time_cost, config.argon2_parallelism)
        self._holding = 0  # requests in flight that outrank hashing
        hold_s = config.hash_hold_ms / 1000
        self._workers = [HashWorker(*args, config.hash_duty_pct, self._held, hold_s)
                         for _ in range(config.hash_processes)]  # fmt: skip
        self._idle: asyncio.Queue[HashWorker] = asyncio.Queue()
        for worker in self._workers:
            self._idle.put_nowait(worker)
        self._slots = asyncio.Semaphore(config.hash_processes + HASH_WAITING_MAX)
        # Verified against when the email is unknown: the same work, so no enumeration by timing.
        dummy = PasswordHasher(time_cost=args[1], memory_cost=args[0], parallelism=args[2])
        self._dummy = dummy.hash(self._peppered("not-a-password"))

    def _peppered(self, password: str) -> str:
        return base64.b64encode(
            hmac.new(self._pepper, password.encode(), "sha256").digest()
        ).decode()

    async def _exchange(self, request: str) -> str:
        worker = await self._idle.get()
        try:
            return await worker.call(request)
        finally:
            self._idle.put_nowait(worker)

    async def _run(self, request: str) -> str:
        busy = Problem(503, "Busy", "too many sign-ins at once, retry shortly",
                       headers={"Retry-After": "1"})  # fmt: skip
        if self._slots.locked():
            raise busy
        async with self._slots:
            # Shielded: a request cancelled mid-hash (the client went away) must not leave a
            # worker with an unread answer; the exchange finishes and returns the worker.
            exchange = asyncio.ensure_future(self._exchange(request))
            exchange.add_done_callback(_observed)
            try:
                return await asyncio.shield(exchange)
            except HashingUnavailable:
                raise busy from None

    def _held(self) -> bool:
        return self._holding > 0

    @contextlib.contextmanager
    def held_off(self) -> Iterator[None]:
        """Around a request that outranks hashing (a payment): running hashes pause meanwhile."""
        self._holding += 1
        if self._holding == 1:
            for worker in self._workers:
                worker.pause()
        try:
            yield
        finally:
            self._holding -= 1
            if self._holding == 0:
                for worker in self._workers:
                    worker.resume()

    async def warm_up(self) -> None:
        """Start the hashing processes now rather than at the first sign-in."""
        await asyncio.gather(*(w.start() for w in self._workers))

    async def hash(self, password: str) -> str:
        return await self._run(f"h\t{self._peppered(password)}")

    async def verify(self, stored: str | None, password: str) -> bool:
        if stored is not None and ("\t" in stored or "\n" in stored):
            stored = None  # not an Argon2 hash: verify the dummy, and fail
        ok = await self._run(f"v\t{stored or self._dummy}\t{self._peppered(password)}")
        return ok == "1" and stored is not None

    async def aclose(self) -> None:
        await asyncio.gather(*(w.stop() for w in self._workers))


def _observed(task: asyncio.Future[str]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so an abandoned failure is not logged as unhandled


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
