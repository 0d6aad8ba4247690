"""Operator reads: the janitor's open findings, for users whose database role is admin."""

from __future__ import annotations

from quart import Response

from api import _service as svc
from api._http import authenticate, json_response
from api._openapi import FindingsOut, Operation, Resource
from api._problems import Problem
from api._state import state

bp = Resource("admin", __name__, "/api/v1/admin")


@bp.operation("GET", "/reconciliation", Operation("Open reconciliation findings (admins)", 200,
                                                  FindingsOut, errors=(403,)))  # fmt: skip
async def reconciliation() -> Response:
    _claims, user = await authenticate()
    if user.role != "admin":  # the database's role, not the token's claim, decides
        raise Problem(403, "Forbidden", "admins only")
    return json_response({"items": await svc.findings(state().pool)})
