"""What a user reads about their own money: balance, history, one transaction, CSV, dashboard."""

from __future__ import annotations

import re
import uuid

from quart import Response, request

from api import _service as svc
from api._http import authenticate, json_response
from api._openapi import (
    BalanceOut,
    DashboardOut,
    Operation,
    Resource,
    TransactionOut,
    TransactionPage,
)
from api._problems import Problem
from api._state import state
from engine import get_balance

bp = Resource("history", __name__, "/api/v1")
PAGE_DEFAULT = 50
# ASCII digits only, and few of them: str.isdigit() also accepts "²" (which int() refuses) and
# int() refuses strings of more than 4300 digits; either was a 500.
_LIMIT = re.compile(r"[0-9]{1,9}")
_PAGE_QUERY = (
    {"name": "cursor", "in": "query", "schema": {"type": "string"},
     "description": "next_cursor of the previous page"},
    {"name": "limit", "in": "query",
     "schema": {"type": "integer", "minimum": 1, "maximum": svc.PAGE_MAX}},
)  # fmt: skip


@bp.operation("GET", "/accounts/me", Operation("Balance", 200, BalanceOut))
async def me() -> Response:
    _claims, user = await authenticate()
    view = await get_balance(state().pool, user.account_id)
    return json_response({"account_id": str(view.account_id), "currency": view.currency,
                          "posted": view.posted, "pending": view.pending,
                          "available": view.available})  # fmt: skip


def _limit() -> int:
    raw = request.args.get("limit", str(PAGE_DEFAULT))
    if not _LIMIT.fullmatch(raw) or not 1 <= int(raw) <= svc.PAGE_MAX:
        raise Problem(400, "Bad limit", f"limit must be an integer from 1 to {svc.PAGE_MAX}")
    return int(raw)


@bp.operation("GET", "/transactions", Operation("History, newest first", 200, TransactionPage,
                                                errors=(400,), query=_PAGE_QUERY))  # fmt: skip
async def transactions() -> Response:
    _claims, user = await authenticate()
    limit = _limit()
    page = await svc.list_transactions(state().pool, user, request.args.get("cursor"), limit)
    return json_response(page)


@bp.operation("GET", "/transactions/<txn_id>", Operation("One transaction", 200, TransactionOut,
                                                         errors=(404,)))  # fmt: skip
async def transaction(txn_id: str) -> Response:
    _claims, user = await authenticate()
    try:
        parsed = uuid.UUID(txn_id)
    except ValueError:
        raise Problem(404, "Not found", "no such transaction") from None
    return json_response(await svc.get_transaction(state().pool, user, parsed))


@bp.operation("GET", "/transactions/export.csv", Operation(
    "Own history as CSV, newest first; text cells that a spreadsheet would read as a formula "
    "start with a single quote", 200, "text/csv"))  # fmt: skip
async def export() -> Response:
    _claims, user = await authenticate()
    response = Response(svc.export_csv(state().pool, user), content_type="text/csv")
    response.headers["Content-Disposition"] = 'attachment; filename="transactions.csv"'
    return response


@bp.operation("GET", "/dashboard", Operation("Balances, recent activity, month totals", 200,
                                             DashboardOut))  # fmt: skip
async def dashboard() -> Response:
    _claims, user = await authenticate()
    return json_response(await svc.dashboard(state().pool, user, state().config.ledger.currency))
