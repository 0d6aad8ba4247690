"""Operator routes, for users whose database role is admin: the janitor's open findings, the
intents flagged needs_attention, and their re-arm (docs/pipeline.md)."""

from __future__ import annotations

import structlog
from quart import Response

from api import _service as svc
from api._http import authenticate, json_response, read_body
from api._models import RearmBody
from api._openapi import FindingsOut, NeedsAttentionOut, Operation, RearmedOut, Resource
from api._problems import Problem
from api._state import state

log = structlog.get_logger("kizo.api")
bp = Resource("admin", __name__, "/api/v1/admin")


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
