"""OpenAPI 3.1, built from the pydantic models the handlers validate with (and a few response
models that describe what they return)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from api._models import (
    Amount,
    RefreshBody,
    Signin,
    Signup,
    TransferBody,
)


class Problem(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    errors: list[dict[str, str]] | None = None


class TokenPair(BaseModel):
    access_token: str
    refresh_token: str
    token_type: Literal["Bearer"]
    expires_in: int


class UserOut(BaseModel):
    id: str
    email: str
    name: str
    role: Literal["user", "admin"]
    account_id: str


class SignupOut(TokenPair):
    user: UserOut


class BalanceOut(BaseModel):
    account_id: str
    currency: str
    posted: int
    pending: int
    available: int


class TransactionOut(BaseModel):
    id: str
    kind: Literal["deposit", "withdrawal", "transfer"]
    status: Literal["pending", "processing", "settled", "failed"]
    amount: int
    currency: str
    direction: Literal["in", "out"]
    counterparty: str
    note: str | None
    failure_reason: str | None
    created_at: str
    settled_at: str | None


class TransactionPage(BaseModel):
    items: list[TransactionOut]
    next_cursor: str | None


MODELS: list[type[BaseModel]] = [Signup, Signin, RefreshBody, Amount, TransferBody, Problem,
                                 TokenPair, SignupOut, BalanceOut, TransactionOut,
                                 TransactionPage]  # fmt: skip
_REF = "#/components/schemas/{model}"


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _json(model: type[BaseModel]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": _ref(model)}}}


def _op(summary: str, ok: int, out: type[BaseModel] | None, body: type[BaseModel] | None = None,
        *, auth: bool = True, idempotent: bool = False,
        errors: tuple[int, ...] = ()) -> dict[str, Any]:  # fmt: skip
    responses: dict[str, Any] = {str(ok): {"description": "OK", **(_json(out) if out else {})}}
    problem = {"content": {"application/problem+json": {"schema": _ref(Problem)}}}
    for status in sorted({*errors, 400, 422, 429} if body else {*errors}):
        responses[str(status)] = {"description": "Problem", **problem}
    if auth:
        responses["401"] = {"description": "Unauthorized", **problem}
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if body is not None:
        op["requestBody"] = {"required": True, **_json(body)}
    if auth:
        op["security"] = [{"bearer": []}]
    if idempotent:
        op["parameters"] = [
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": True,
                "schema": {"type": "string", "minLength": 1, "maxLength": 255},
            }
        ]
        responses["409"] = {"description": "In flight", **problem}
    return op


def document() -> dict[str, Any]:
    _, schemas = models_json_schema([(m, "validation") for m in MODELS], ref_template=_REF)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Kizo", "version": "1"},
        "components": {"schemas": schemas.get("$defs", {}),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/api/v1/auth/signup": {"post": _op("Sign up", 201, SignupOut, Signup, auth=False,
                                                errors=(409, 503))},
            "/api/v1/auth/signin": {"post": _op("Sign in", 200, TokenPair, Signin, auth=False,
                                                errors=(401, 503))},
            "/api/v1/auth/refresh": {"post": _op("Rotate the refresh token", 200, TokenPair,
                                                 RefreshBody, auth=False, errors=(401,))},
            "/api/v1/auth/logout": {"post": _op("Revoke the refresh family", 204, None,
                                                RefreshBody, auth=False)},
            "/api/v1/accounts/me": {"get": _op("Balance", 200, BalanceOut)},
            "/api/v1/payments/deposit": {"post": _op("Deposit from the bank", 202,
                                                     TransactionOut, Amount, idempotent=True)},
            "/api/v1/payments/withdraw": {"post": _op("Withdraw to the bank", 202,
                                                      TransactionOut, Amount, idempotent=True)},
            "/api/v1/payments/transfer": {"post": _op("Pay another user", 202, TransactionOut,
                                                      TransferBody, idempotent=True)},
            "/api/v1/transactions": {"get": {**_op("History, newest first", 200,
                                                   TransactionPage, errors=(400,)),
                                             "parameters": [
                {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                {"name": "limit", "in": "query",
                 "schema": {"type": "integer", "minimum": 1, "maximum": 200}}]}},
            "/api/v1/transactions/{id}": {"get": {**_op("One transaction", 200, TransactionOut,
                                                        errors=(404,)),
                                                  "parameters": [{"name": "id", "in": "path",
                                                                  "required": True,
                                                                  "schema": {"type": "string"}}]}},
        },
    }  # fmt: skip


DOCS_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Kizo API</title>
<style>body{font:15px system-ui;margin:2em;max-width:60em}code{background:#eee;padding:0 .2em}
section{border-top:1px solid #ccc;padding:.5em 0}</style></head>
<body><h1>Kizo API</h1><p>Machine-readable: <a href="/openapi.json">/openapi.json</a>
(OpenAPI 3.1).</p><div id="ops">Loading…</div>
<script>
fetch('/openapi.json').then(r => r.json()).then(doc => {
  const out = [];
  for (const [path, ops] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const codes = Object.keys(op.responses).join(', ');
      out.push(`<section><code>${method.toUpperCase()} ${path}</code> — ${op.summary}` +
               `<br><small>responses: ${codes}</small></section>`);
    }
  }
  document.getElementById('ops').innerHTML = out.join('');
});
</script></body></html>
"""
