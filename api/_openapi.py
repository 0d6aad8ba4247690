"""OpenAPI 3.1, built from the routes the app serves and the pydantic models the handlers
validate with (and response models that describe what they return).

Each route is declared with its ``Operation`` on a ``Resource`` (a blueprint that keeps them), so
a route cannot be served without being documented: ``document`` walks ``app.url_map`` and fails
on a rule that has no operation. Built here rather than with quart-schema, whose validation
answers 400 in its own shape where this API answers 422 problem+json, and which documents
responses as application/json where ours are application/problem+json.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema
from quart import Blueprint, Quart

F = TypeVar("F", bound=Callable[..., Any])


class FieldError(BaseModel):
    field: str
    message: str


class Problem(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    errors: list[FieldError] | None = None


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


class DashboardBalance(BaseModel):
    currency: str
    posted: int
    pending: int
    available: int


class MonthTotals(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    in_: int = Field(alias="in")
    out: int


class DashboardOut(BaseModel):
    balance: DashboardBalance
    pending_count: int
    month_totals: MonthTotals
    recent: list[TransactionOut]


class FindingOut(BaseModel):
    id: int
    kind: str
    subject: str
    detail: str
    found_at: str


class FindingsOut(BaseModel):
    items: list[FindingOut]


class FlaggedOut(BaseModel):
    id: str
    kind: Literal["deposit", "withdrawal", "transfer"]
    amount: int
    currency: str
    attempts: int
    rearms: int
    created_at: str


class NeedsAttentionOut(BaseModel):
    count: int
    items: list[FlaggedOut]


class RearmedOut(BaseModel):
    rearmed: int
    ids: list[str]


class BacklogOut(BaseModel):
    open: int
    oldest_open_age_s: float | None


class JanitorOut(BaseModel):
    reachable: bool
    error: str | None = None
    passes: dict[str, int] | None = None
    last_pass_age_s: float | None = None
    findings: dict[str, int] | None = None
    unresolved: int | None = None
    queued: int | None = None
    queue_depth: dict[str, int] | None = None


class LagOut(BaseModel):
    workers: int
    reachable: int
    count: int
    p50_s: float | Literal["+Inf"] | None
    p99_s: float | Literal["+Inf"] | None


class OverviewOut(BaseModel):
    backlog: BacklogOut
    settlement_lag: LagOut
    janitor: JanitorOut
    needs_attention: NeedsAttentionOut
    findings: FindingsOut
    grafana_url: str | None


class ToxicOut(BaseModel):
    name: str
    type: str
    stream: str
    toxicity: float
    attributes: dict[str, int | float | str | bool]


class ProxyOut(BaseModel):
    name: str
    enabled: bool
    listen: str
    upstream: str
    toxics: list[ToxicOut]


class FaultsOut(BaseModel):
    reachable: bool
    error: str | None = None
    active: int = 0
    proxies: list[ProxyOut]


class ChaosRunOut(BaseModel):
    run: str
    scenario: str
    seed: int | None
    mutation: str | None
    verdict: str
    violations: int | None
    lag_p99_ms: float | None
    convergence_s: float | None
    finished_at: str


class ChaosRunsOut(BaseModel):
    items: list[ChaosRunOut]


class HealthOut(BaseModel):
    status: Literal["ok"]


class ReadyOut(BaseModel):
    status: Literal["ready", "not ready"]
    checks: dict[str, str]


_REF = "#/components/schemas/{model}"
_PROBLEM = "application/problem+json"
# Every route may meet the per-IP rate limit; every route that reads PostgreSQL or Redis may
# find it gone (BACKEND_LOST in api.app), a 503 telling the client to retry.
_ALWAYS = (429,)
_BACKEND = (503,)
_TITLES = {400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found",
           409: "Conflict", 413: "Body too large", 422: "Invalid request",
           429: "Too many requests", 503: "Service unavailable"}  # fmt: skip


@dataclass(frozen=True)
class Operation:
    """One route as the document shows it. ``out`` describes the success answer: a model (JSON),
    a media type (CSV, HTML, Prometheus text) or None (no body)."""

    summary: str
    ok: int
    out: type[BaseModel] | str | None
    body: type[BaseModel] | None = None
    auth: bool = True
    backend: bool = True
    idempotent: bool = False
    errors: tuple[int, ...] = ()
    query: tuple[dict[str, Any], ...] = ()
    # Answers that are not problems: /ready answers 503 in its own shape.
    also: tuple[tuple[int, type[BaseModel]], ...] = ()


class Resource(Blueprint):
    """A blueprint whose routes carry their ``Operation``: declared together, never apart."""

    def __init__(self, name: str, import_name: str, url_prefix: str = "") -> None:
        super().__init__(name, import_name, url_prefix=url_prefix or None)
        self.operations: dict[str, Operation] = {}

    def operation(self, method: str, path: str, op: Operation) -> Callable[[F], F]:
        def register(view: F) -> F:
            self.operations[f"{self.name}.{view.__name__}"] = op
            self.add_url_rule(path, view_func=view, methods=[method])
            return view

        return register


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _content(out: type[BaseModel] | str, media: str = "application/json") -> dict[str, Any]:
    if isinstance(out, str):  # a media type: the body is text, or JSON of no model (this doc)
        schema = {"type": "object" if out.endswith("json") else "string"}
        return {"content": {out: {"schema": schema}}}
    return {"content": {media: {"schema": _ref(out)}}}


def _responses(op: Operation) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": op.summary, **(_content(op.out) if op.out else {})}
    if op.idempotent:
        ok["headers"] = {"Idempotent-Replayed": {
            "description": "true when this is the stored answer to an earlier request",
            "schema": {"type": "string", "enum": ["true"]}}}  # fmt: skip
    responses: dict[str, Any] = {str(op.ok): ok}
    for status, model in op.also:
        responses[str(status)] = {"description": model.__name__, **_content(model)}
    statuses = {*op.errors, *_ALWAYS, *(_BACKEND if op.backend else ())}
    if op.body is not None:
        statuses |= {400, 413, 422}
    if op.auth:
        statuses |= {401}
    if op.idempotent:
        statuses |= {400, 409, 422}
    for status in sorted(statuses - {s for s, _ in op.also}):
        responses[str(status)] = {"description": _TITLES[status], **_content(Problem, _PROBLEM)}
    responses["default"] = {"description": "Problem", **_content(Problem, _PROBLEM)}
    return responses


def _operation(endpoint: str, op: Operation, path_params: list[str]) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in path_params
    ]
    parameters += list(op.query)
    if op.idempotent:
        parameters.append({"name": "Idempotency-Key", "in": "header", "required": True,
                           "schema": {"type": "string", "minLength": 1, "maxLength": 255,
                                      "pattern": "^[\\x21-\\x7e]+$"}})  # fmt: skip
    doc: dict[str, Any] = {"operationId": endpoint, "summary": op.summary,
                           "responses": _responses(op)}  # fmt: skip
    if parameters:
        doc["parameters"] = parameters
    if op.body is not None:
        doc["requestBody"] = {"required": True, **_content(op.body)}
    if op.auth:
        doc["security"] = [{"bearer": []}]
    return doc


_ARGUMENT = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def operations(app: Quart) -> dict[str, Operation]:
    return {endpoint: op for blueprint in app.blueprints.values()
            if isinstance(blueprint, Resource)
            for endpoint, op in blueprint.operations.items()}  # fmt: skip


def _models(ops: dict[str, Operation]) -> list[type[BaseModel]]:
    found: dict[str, type[BaseModel]] = {"Problem": Problem}
    for op in ops.values():
        for model in (op.body, op.out, *(m for _, m in op.also)):
            if isinstance(model, type):
                found[model.__name__] = model
    return list(found.values())


def document(app: Quart) -> dict[str, Any]:
    """Every rule of ``app.url_map``, with its operation; a rule without one is a bug here."""
    ops = operations(app)
    paths: dict[str, dict[str, Any]] = {}
    for rule in app.url_map.iter_rules():
        op = ops.get(rule.endpoint)
        if op is None:
            raise LookupError(f"route {rule.rule} ({rule.endpoint}) has no documented operation")
        path = _ARGUMENT.sub(r"{\1}", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            paths.setdefault(path, {})[method.lower()] = _operation(
                rule.endpoint, op, _ARGUMENT.findall(rule.rule)
            )
    _, schemas = models_json_schema([(m, "validation") for m in _models(ops)],
                                    ref_template=_REF)  # fmt: skip
    return {
        "openapi": "3.1.0",
        "info": {"title": "Kizo", "version": "1"},
        "components": {"schemas": schemas.get("$defs", {}),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": dict(sorted(paths.items())),
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
