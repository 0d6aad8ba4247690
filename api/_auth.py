"""Passwords (Argon2id + pepper, off the event loop), access JWTs (key ring), refresh tokens.

- The pepper is mixed in with HMAC-SHA256 before Argon2id, so a stolen database alone does not
  allow offline guessing. Hashing runs in low-priority processes paced by an adaptive budget
  (api/_hashing.py); requests wait in line with a deadline, and one that cannot be served by
  then is turned away at once (503 + a Retry-After from the line) instead of stalling others.
- Access tokens: HS256 JWTs with ``kid``; the newest key signs, the newest two verify. The
  signing secrets are sealed (AES-256-GCM, the ``kid`` as associated data) with
  ``KIZO_KEYRING_KEY``, which never enters the database: a copy of the database alone can
  neither read them nor mint tokens.
- Refresh tokens: opaque, stored hashed in Redis with a family id, rotated on every use; a reused
  (already rotated) token revokes its whole family. Every key is written together with its
  expiry (MULTI/EXEC, or one script), so no failure can leave a token that never expires.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import math
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg
import jwt
from argon2 import PasswordHasher
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from redis.asyncio import Redis

from api import _metrics as metrics
from api._hashing import HashBudget, HashingUnavailable, HashWorker
from api._problems import Problem
from infra.config import DEV_PEPPER, PEPPER_CHARS_MIN, AuthConfig, ConfigError

JWT_ALGORITHM = "HS256"
VERIFYING_KEYS = 2
# Who made an access token and for whom: a token the ring signs for any other purpose, or one
# minted by another system that shares a secret, names another and is refused (RFC 8725 3.9).
ACCESS_ISSUER = "kizo"
ACCESS_AUDIENCE = "kizo-api"
_ACCESS_CLAIMS = ["exp", "iat", "sub", "iss", "aud"]  # a token without one of them is refused
# The first estimate of one exchange, until a hash has been timed; and the weight of each new
# timing in the moving average (about the last ten hashes count).
HASH_S_GUESS = 0.1
SHARE_START = 1.0  # hashing's share of a core until payments have said otherwise
HASH_S_WEIGHT = 0.1
_REFRESH_PREFIX = "kizo:refresh:"
_FAMILY_PREFIX = "kizo:refresh-family:"
_NONCE_BYTES = 12  # AES-GCM's standard nonce, random per sealing


def require_secrets(config: AuthConfig, *, pepper: bool = True, keyring_key: bool = True) -> None:
    """Refuse to run on a missing or published secret (a pepper everyone knows protects nothing)."""
    if pepper and not config.pepper:
        raise ConfigError(
            "KIZO_PEPPER is not set: give the API a secret pepper of its own"
            " (only `kizo up` on its embedded database makes one itself)"
        )
    if pepper and config.pepper == DEV_PEPPER:
        raise ConfigError("KIZO_PEPPER is the published development pepper: set a secret one")
    if pepper and len(config.pepper) < PEPPER_CHARS_MIN:
        raise ConfigError(f"KIZO_PEPPER must have at least {PEPPER_CHARS_MIN} characters")
    if keyring_key and not config.keyring_key:
        raise ConfigError(
            "KIZO_KEYRING_KEY is not set: it seals the JWT signing keys at rest"
            " (only `kizo up` on its embedded database makes one itself)"
        )


class Passwords:
    """Argon2id over HMAC-SHA256(pepper, password), in hashing processes (api/_hashing.py).

    Admission: a request waits in line for a hashing process, at most ``signin_deadline_s``.
    One that would not get a process by then, by the line's expected wait (its length times the
    measured time per hash, over the processes), is refused at once, as is one still waiting at
    its deadline: 503 with a ``Retry-After`` of the time the line ahead needs to drain.
    """

    def __init__(self, config: AuthConfig) -> None:
        self._pepper = config.pepper.encode()
        args = (config.argon2_memory_kib, config.argon2_time_cost, config.argon2_parallelism)
        self._holding = 0  # requests in flight that outrank hashing
        share_min = config.hash_share_min_pct / 100
        self.budget = HashBudget(config.hash_target_ms / 1000, share_min,
                                 share_start=max(SHARE_START, share_min))  # fmt: skip
        hold_s = config.hash_hold_ms / 1000
        self._workers = [HashWorker(*args, self.budget, self._held, hold_s,
                                    metrics.HASHING_PAUSES.inc)
                         for _ in range(config.hash_processes)]  # fmt: skip
        self._idle: asyncio.Queue[HashWorker] = asyncio.Queue()
        for worker in self._workers:
            self._idle.put_nowait(worker)
        self._waiting = 0
        self._waiting_max = config.hash_waiting_max
        self._deadline_s = config.signin_deadline_s
        self._urgent_s = min(config.signin_urgent_s, config.signin_deadline_s)
        self._hash_s = HASH_S_GUESS  # per exchange, rests and pauses included: a moving average
        self._urgent_hash_s = HASH_S_GUESS  # per urgent exchange (no rests, no pauses): the same
        # Verified against when the email is unknown: the same work, so no enumeration by timing.
        dummy = PasswordHasher(time_cost=args[1], memory_cost=args[0], parallelism=args[2])
        self._dummy = dummy.hash(self._peppered("not-a-password"))

    def _peppered(self, password: str) -> str:
        return base64.b64encode(
            hmac.new(self._pepper, password.encode(), "sha256").digest()
        ).decode()

    def expected_wait_s(self) -> float:
        """How long a request arriving now would wait for a hashing process: the line ahead at
        the budget's pace, but no longer than the urgent wait plus the line at urgent pace
        (whoever has waited ``signin_urgent_s`` is served without rests)."""
        if self._waiting == 0 and not self._idle.empty():
            return 0.0
        return self._line_s(self._waiting + 1)

    def _line_s(self, requests: int) -> float:
        paced = requests * self._hash_s
        urgent = self._urgent_s + requests * self._urgent_hash_s
        return min(paced, urgent) / len(self._workers)

    async def _exchange(self, request: str, deadline: float) -> str:
        """Counted as waiting by ``_run`` already (before this task first runs, so that a burst
        arriving in one tick sees its own line)."""
        arrived = time.monotonic()
        try:
            worker = await asyncio.wait_for(self._idle.get(), deadline - arrived)
        except TimeoutError:
            metrics.HASHING_REJECTED.inc()
            raise _busy(self._line_s(self._waiting)) from None
        finally:
            self._waiting -= 1
            metrics.HASHING_QUEUE.dec()
        metrics.HASHING_BUSY.inc()
        started = time.monotonic()
        urgent = started - arrived >= self._urgent_s
        if urgent:
            metrics.HASHING_URGENT.inc()
        try:
            return await worker.call(request, urgent)
        finally:
            took_s = time.monotonic() - started
            if urgent:
                self._urgent_hash_s += HASH_S_WEIGHT * (took_s - self._urgent_hash_s)
            else:
                self._hash_s += HASH_S_WEIGHT * (took_s - self._hash_s)
            metrics.HASHING_BUSY.dec()
            self._idle.put_nowait(worker)

    async def _run(self, request: str) -> str:
        wait_s = self.expected_wait_s()
        if wait_s > self._deadline_s or self._waiting >= self._waiting_max:
            metrics.HASHING_REJECTED.inc()
            raise _busy(wait_s - self._deadline_s)
        self._waiting += 1
        metrics.HASHING_QUEUE.inc()
        # Shielded: a request cancelled mid-hash (the client went away) must not leave a
        # worker with an unread answer; the exchange finishes and returns the worker.
        exchange = asyncio.ensure_future(
            self._exchange(request, time.monotonic() + self._deadline_s)
        )
        exchange.add_done_callback(_observed)
        try:
            return await asyncio.shield(exchange)
        except HashingUnavailable:
            raise _busy(0) from None

    def _held(self) -> bool:
        return self._holding > 0

    @contextlib.contextmanager
    def held_off(self) -> Iterator[None]:
        """Around a request that outranks hashing (a payment): running hashes pause meanwhile."""
        self._holding += 1
        if self._holding == 1:
            for worker in self._workers:
                worker.pause()
        started = time.monotonic()
        try:
            yield
        finally:
            now = time.monotonic()
            self.budget.observe(now - started, now)
            self._holding -= 1
            if self._holding == 0:
                for worker in self._workers:
                    worker.resume()

    async def warm_up(self) -> None:
        """Start the hashing processes now rather than at the first sign-in, and time a hash
        (the admission's first estimate)."""
        await asyncio.gather(*(w.start() for w in self._workers))
        started = time.monotonic()
        await self.verify(self._dummy, "not-a-password")
        self._hash_s = self._urgent_hash_s = time.monotonic() - started

    async def hash(self, password: str) -> str:
        with metrics.HASHING_DURATION.labels("hash").time():
            return await self._run(f"h\t{self._peppered(password)}")

    async def verify(self, stored: str | None, password: str) -> bool:
        if stored is not None and ("\t" in stored or "\n" in stored):
            stored = None  # not an Argon2 hash: verify the dummy, and fail
        with metrics.HASHING_DURATION.labels("verify").time():
            ok = await self._run(f"v\t{stored or self._dummy}\t{self._peppered(password)}")
        return ok == "1" and stored is not None

    async def aclose(self) -> None:
        await asyncio.gather(*(w.stop() for w in self._workers))


def hash_now(config: AuthConfig, password: str) -> str:
    """One password's stored hash, in this process (blocking): for seeding many users at once
    with one password (benchmarks), never for serving requests."""
    peppered = base64.b64encode(hmac.new(config.pepper.encode(), password.encode(),
                                         "sha256").digest())  # fmt: skip
    hasher = PasswordHasher(time_cost=config.argon2_time_cost,
                            memory_cost=config.argon2_memory_kib,
                            parallelism=config.argon2_parallelism)  # fmt: skip
    return hasher.hash(peppered)


def _busy(wait_s: float) -> Problem:
    retry_s = max(1, math.ceil(wait_s))
    return Problem(503, "Busy", "too many sign-ins at once, retry later",
                   headers={"Retry-After": str(retry_s)})  # fmt: skip


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
    async def load(cls, db: asyncpg.Pool | asyncpg.Connection, keyring_key: bytes) -> KeyRing:
        return cls(await _open_keys(db, keyring_key))

    def sign(self, claims: Claims, ttl_s: int) -> str:
        kid, secret = self.keys[0]
        now = int(time.time())
        payload = {"iss": ACCESS_ISSUER, "aud": ACCESS_AUDIENCE, "sub": str(claims.user_id),
                   "role": claims.role, "iat": now, "exp": now + ttl_s}  # fmt: skip
        return jwt.encode(payload, secret, algorithm=JWT_ALGORITHM, headers={"kid": kid})

    def verify(self, token: str) -> Claims:
        unauthorized = Problem(401, "Unauthorized", "missing, invalid or expired access token",
                               headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            secret = dict(self.keys).get(kid) if isinstance(kid, str) else None
            if secret is None:
                raise unauthorized
            # No leeway: it would only lengthen a stolen token's life. iat and nbf in the future
            # are refused too, so API hosts keep their clocks in step (NTP; docs/api.md).
            payload = jwt.decode(token, secret, algorithms=[JWT_ALGORITHM],
                                 audience=ACCESS_AUDIENCE, issuer=ACCESS_ISSUER,
                                 options={"require": _ACCESS_CLAIMS})  # fmt: skip
            return Claims(uuid.UUID(payload["sub"]), str(payload.get("role", "user")))
        except (jwt.PyJWTError, ValueError, KeyError):
            raise unauthorized from None


class WrongKeyringKey(ConfigError):
    """KIZO_KEYRING_KEY does not open the signing keys in the database."""


def _seal(keyring_key: bytes, kid: str, secret: str) -> bytes:
    nonce = secrets.token_bytes(_NONCE_BYTES)
    return nonce + AESGCM(keyring_key).encrypt(nonce, secret.encode(), kid.encode())


def _unseal(keyring_key: bytes, kid: str, sealed: bytes) -> str:
    nonce, box = sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:]
    try:
        return AESGCM(keyring_key).decrypt(nonce, box, kid.encode()).decode()
    except InvalidTag:
        raise WrongKeyringKey(
            f"KIZO_KEYRING_KEY does not open signing key {kid}: it was sealed with another"
            " key (set the key this system was started with)"
        ) from None


async def _open_keys(db: asyncpg.Pool | asyncpg.Connection, keyring_key: bytes
                     ) -> list[tuple[str, str]]:  # fmt: skip
    rows = await db.fetch(
        "SELECT kid, sealed FROM signing_keys ORDER BY created_at DESC LIMIT $1", VERIFYING_KEYS
    )
    return [(r["kid"], _unseal(keyring_key, r["kid"], r["sealed"])) for r in rows]


async def rotate_key(db: asyncpg.Connection | asyncpg.Pool, keyring_key: bytes) -> str:
    # Opening the current keys first refuses a wrong KIZO_KEYRING_KEY before it can add a key
    # that the running API processes could not open.
    await _open_keys(db, keyring_key)
    kid = secrets.token_hex(8)
    sealed = _seal(keyring_key, kid, secrets.token_urlsafe(48))
    await db.execute("INSERT INTO signing_keys (kid, sealed) VALUES ($1, $2)", kid, sealed)
    return kid


async def ensure_key(db: asyncpg.Pool | asyncpg.Connection, keyring_key: bytes) -> KeyRing:
    """The key ring, made with its first key if there is none; ``WrongKeyringKey`` when the
    key does not open it."""
    if await db.fetchval("SELECT count(*) FROM signing_keys") == 0:
        await rotate_key(db, keyring_key)
    return await KeyRing.load(db, keyring_key)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# Marks a refresh token used; returns [user, family, uses], or nil when there is no such token.
# One script, so a token that expires between the read and the write is never re-created
# without an expiry (HINCRBY on a missing key makes a new hash).
_USE_REFRESH_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local uses = redis.call('HINCRBY', KEYS[1], 'used', 1)
local record = redis.call('HMGET', KEYS[1], 'user', 'family')
return {record[1] or '', record[2] or '', uses}
"""


class RefreshTokens:
    def __init__(self, redis: Redis, ttl_s: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self._use = redis.register_script(_USE_REFRESH_SCRIPT)

    async def issue(self, user_id: uuid.UUID, family: str | None = None) -> str:
        token = secrets.token_urlsafe(32)
        family = family or secrets.token_hex(16)
        key = _REFRESH_PREFIX + _digest(token)
        # One MULTI/EXEC: the record and its expiry land together or not at all.
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"user": str(user_id), "family": family, "used": 0})
            pipe.expire(key, self.ttl_s)
            await pipe.execute()
        return token

    async def rotate(self, token: str) -> tuple[uuid.UUID, str]:
        """Use ``token`` once; returns (user, new token). Reuse revokes the family."""
        invalid = Problem(401, "Unauthorized", "invalid refresh token")
        used = await self._use(keys=[_REFRESH_PREFIX + _digest(token)])
        if not used or not used[0] or not used[1]:
            raise invalid
        user, family, uses = _text(used[0]), _text(used[1]), int(used[2])
        if uses > 1:  # atomic: only one use wins
            await self.revoke_family(family)
            raise invalid
        if await self.redis.exists(_FAMILY_PREFIX + family):
            raise invalid
        user_id = uuid.UUID(user)
        return user_id, await self.issue(user_id, family)

    async def revoke(self, token: str) -> None:
        record = await self.redis.hgetall(_REFRESH_PREFIX + _digest(token))
        if record:
            await self.revoke_family(_text(record[b"family"]))

    async def revoke_family(self, family: str) -> None:
        # One key, written with its expiry in one command: a family outlives none of its tokens.
        await self.redis.set(_FAMILY_PREFIX + family, 1, ex=self.ttl_s)
