"""Operator routes, for users whose database role is admin: the janitor's open findings, the
intents flagged needs_attention, and their re-arm (docs/pipeline.md); the operations console's
figures, the fault proxy's faults and recent chaos runs (api._console, docs/web.md)."""

from __future__ import annotations

import asyncio

import httpx
import structlog
from quart import Response

from api import _console as console
from api import _service as svc
from api._http import authenticate, json_response, read_body
from api._models import RearmBody
from api._openapi import (
    ChaosRunsOut,
    FaultsOut,
    FindingsOut,
    NeedsAttentionOut,
    Operation,
    OverviewOut,
    RearmedOut,
    Resource,
)
from api._problems import Problem
from api._state import state

log = structlog.get_logger("kizo.api")
bp = Resource("admin", __name__, "/api/v1/admin")
CONSOLE_ROWS_MAX = 50  # flagged intents and findings the console lists (counts are complete)


async def _admin() -> None:
    _claims, user = await authenticate()
    if user.role != "admin":  # the database's role, not the token's claim, decides
        raise Problem(403, "Forbidden", "admins only")


@bp.operation("GET", "/reconciliation", Operation("Open reconciliation findings (admins)", 200,
                                                  FindingsOut, errors=(403,)))  # fmt: skip
async def reconciliation() -> Response:
    await _admin()
    return json_response({"items": await svc.findings(state().pool)})


@bp.operation("GET", "/needs-attention", Operation(
    "Pending intents past their re-drive limit, oldest first (admins)", 200, NeedsAttentionOut,
    errors=(403,)))  # fmt: skip
async def needs_attention() -> Response:
    await _admin()
    return json_response(await svc.needs_attention(state().pool))


@bp.operation("POST", "/needs-attention/redrive", Operation(
    "Give flagged intents a fresh re-drive budget; the janitor's next pass re-drives them"
    " (admins)", 200, RearmedOut, body=RearmBody, errors=(400, 403, 413, 422)))  # fmt: skip
async def needs_attention_redrive() -> Response:
    await _admin()
    body = await read_body(RearmBody)
    done = await svc.rearm(state().pool, list(body.kinds), body.limit)
    log.info("needs_attention_rearmed_by_operator", count=done["rearmed"], kinds=body.kinds)
    return json_response(done)


@bp.operation("GET", "/overview", Operation(
    "The operations console's figures: backlog, settlement lag, janitor passes, needs_attention,"
    " reconciliation findings (admins)", 200, OverviewOut, errors=(403,)))  # fmt: skip
async def overview() -> Response:
    await _admin()
    s = state()
    async with httpx.AsyncClient() as http:
        backlog, attention, found, janitor, lag = await asyncio.gather(
            console.backlog(s.pool),
            svc.needs_attention(s.pool, limit=CONSOLE_ROWS_MAX),
            svc.findings(s.pool, limit=CONSOLE_ROWS_MAX),
            console.janitor(http, s.config),
            console.settlement_lag(http, s.config),
        )
    return json_response({"backlog": backlog, "settlement_lag": lag, "janitor": janitor,
                          "needs_attention": attention, "findings": {"items": found},
                          "grafana_url": console.grafana(s.config)})  # fmt: skip


@bp.operation("GET", "/faults", Operation(
    "The fault proxy's proxies and their toxics, from its Toxiproxy API (admins)", 200,
    FaultsOut, errors=(403,)))  # fmt: skip
async def faults() -> Response:
    await _admin()
    async with httpx.AsyncClient() as http:
        return json_response(await console.faults(http, state().config))


@bp.operation("GET", "/chaos-runs", Operation(
    "The newest chaos runs' verdicts, from their journals (admins)", 200, ChaosRunsOut,
    errors=(403,)))  # fmt: skip
async def chaos_runs() -> Response:
    await _admin()
    runs = await asyncio.to_thread(console.chaos_runs, state().config.chaos_runs_dir)
    return json_response({"items": runs})
