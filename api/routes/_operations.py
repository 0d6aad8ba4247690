"""For operators and machines: liveness, readiness, Prometheus metrics, the OpenAPI document."""

from __future__ import annotations

import asyncpg
import redis.exceptions
from pydantic import BaseModel
from quart import Response, current_app

from api._http import json_response
from api._openapi import DOCS_PAGE, HealthOut, Operation, ReadyOut, Resource, document
from api._state import State, state
from infra.metrics import CONTENT_TYPE, exposition
from infra.migrate import pending_migrations

bp = Resource("operations", __name__)


def _public(summary: str, out: type[BaseModel] | str,
            also: tuple[tuple[int, type[BaseModel]], ...] = ()) -> Operation:  # fmt: skip
    return Operation(summary, 200, out, auth=False, backend=False, also=also)


@bp.operation("GET", "/health", _public("Liveness", HealthOut))
async def health() -> Response:
    return json_response({"status": "ok"})


@bp.operation("GET", "/ready", _public("Readiness: PostgreSQL migrated, Redis answering",
                                      ReadyOut, also=((503, ReadyOut),)))  # fmt: skip
async def ready() -> Response:
    return await _ready(state())


@bp.operation("GET", "/metrics", _public("Prometheus metrics", "text/plain"))
async def metrics() -> Response:
    # Under `kizo api`, those of every granian worker process, summed (infra.metrics).
    return Response(exposition(), content_type=CONTENT_TYPE)


@bp.operation("GET", "/openapi.json", _public("This document (OpenAPI 3.1)",
                                             "application/json"))  # fmt: skip
async def openapi() -> Response:
    return json_response(document(current_app))


@bp.operation("GET", "/docs", _public("A readable index of this document", "text/html"))
async def docs() -> Response:
    return Response(DOCS_PAGE, content_type="text/html; charset=utf-8")


async def _ready(s: State) -> Response:
    checks: dict[str, str] = {}
    try:
        async with s.pool.acquire() as conn:
            checks["postgres"] = (
                "ok" if not await pending_migrations(conn) else "migrations pending"
            )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        checks["postgres"] = "unreachable"
    try:
        await s.redis.ping()
        checks["redis"] = "ok"
    except (redis.exceptions.RedisError, OSError):
        checks["redis"] = "unreachable"
    ok = all(v == "ok" for v in checks.values())
    return json_response({"status": "ready" if ok else "not ready", "checks": checks},
                         200 if ok else 503)  # fmt: skip
