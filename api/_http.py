"""What every handler shares: JSON answers, validated bodies, the caller's identity and tokens."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, TypeVar

import orjson
import structlog
from pydantic import BaseModel, ValidationError
from quart import Response, request

from api import _service as svc
from api._auth import Claims, KeyRing, WrongKeyringKey
from api._problems import Problem
from api._state import state
from infra import logs

log = structlog.get_logger("kizo.api")

BODY_MAX_BYTES = 64 * 1024
M = TypeVar("M", bound=BaseModel)
# Visible ASCII: what an Idempotency-Key or an echoed X-Request-ID may hold (always fullmatch:
# "$" would let a trailing newline through).
VISIBLE_ASCII = re.compile(r"[\x21-\x7e]{1,255}")


def json_response(body: object, status: int = 200, headers: dict[str, str] | None = None,
                  ) -> Response:  # fmt: skip
    response = Response(orjson.dumps(body), status=status, content_type="application/json")
    response.headers.update(headers or {})
    return response


async def read_body(model: type[M]) -> M:
    raw = await request.get_data(cache=True)
    if len(raw) > BODY_MAX_BYTES:
        raise Problem(413, "Body too large", f"at most {BODY_MAX_BYTES} bytes")
    try:
        data = json.loads(raw)  # not orjson: it refuses what json accepts (NaN, big integers)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise Problem(400, "Malformed JSON", "the body is not valid UTF-8 JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [{"field": ".".join(str(p) for p in e["loc"]) or "body", "message": e["msg"]}
                  for e in exc.errors()]  # fmt: skip
        raise Problem(
            422, "Invalid request", "the request body is invalid", errors=errors
        ) from None


async def keyring() -> KeyRing:
    """The key ring, re-read at most every ``keyring_reload_s``: ``kizo keys rotate`` reaches every
    running API process within that time, with no restart."""
    s = state()
    now = time.monotonic()
    if now - s.keys_loaded_at > s.config.auth.keyring_reload_s:
        try:
            s.keys = await KeyRing.load(s.pool, s.config.auth.keyring_key)
        except WrongKeyringKey as exc:  # a key sealed elsewhere: keep the ring that works
            log.error("KEYRING_UNREADABLE", error=str(exc))
        s.keys_loaded_at = now
    return s.keys


async def authenticate() -> tuple[Claims, svc.User]:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        raise Problem(401, "Unauthorized", "a Bearer access token is required",
                      headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
    claims = (await keyring()).verify(header[7:])
    logs.bind(user_id=str(claims.user_id))
    return claims, await _user(claims.user_id)


# The users behind access tokens, per process: a round trip saved on every request. A role
# change or a removed user reaches every API process within ``AuthConfig.user_cache_s``.
_USERS: dict[uuid.UUID, tuple[float, svc.User]] = {}
USERS_CACHED_MAX = 10_000


async def _user(user_id: uuid.UUID) -> svc.User:
    s = state()
    now = time.monotonic()
    cached = _USERS.get(user_id)
    if cached is not None and now - cached[0] < s.config.auth.user_cache_s:
        return cached[1]
    try:
        user = await svc.get_user(s.pool, user_id)
    except Problem as gone:  # RFC 6750 3: every 401 to a bearer token names the scheme
        gone.headers.setdefault("WWW-Authenticate", "Bearer")
        raise
    if len(_USERS) >= USERS_CACHED_MAX:
        _USERS.clear()
    _USERS[user_id] = (now, user)
    return user


async def tokens(user: svc.User, refresh: str | None = None) -> dict[str, Any]:
    s = state()
    ttl = s.config.auth.access_ttl_s
    return {"access_token": (await keyring()).sign(Claims(user.id, user.role), ttl),
            "refresh_token": refresh or await s.refresh.issue(user.id),
            "token_type": "Bearer", "expires_in": ttl}  # fmt: skip
