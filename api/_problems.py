"""RFC 9457 problem details: every error the API returns is one of these, mapped in one place."""

from __future__ import annotations

import json
from typing import Any

from quart import Response

from engine import CurrencyMismatch, InvalidAmount, LedgerError, SelfTransfer, UnknownAccount


class Problem(Exception):
    """An error answer: raise it anywhere below a handler."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}

    def response(self) -> Response:
        body: dict[str, Any] = {
            "type": f"https://kizo.dev/problems/{self.title.lower().replace(' ', '-')}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.errors:
            body["errors"] = self.errors
        response = Response(
            json.dumps(body), status=self.status, content_type="application/problem+json"
        )
        response.headers.update(self.headers)
        return response


_LEDGER: dict[type[LedgerError], tuple[int, str]] = {
    InvalidAmount: (422, "Invalid amount"),
    SelfTransfer: (422, "Self transfer"),
    UnknownAccount: (422, "Unknown recipient"),
    CurrencyMismatch: (422, "Currency mismatch"),
}


def from_ledger(exc: LedgerError) -> Problem:
    status, title = _LEDGER.get(type(exc), (422, "Refused"))
    return Problem(status, title, str(exc))
