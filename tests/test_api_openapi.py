"""/openapi.json documents every route the app serves, with its request body and its answers
(problem+json errors included), from the same pydantic models that validate the requests; and
the answers of a live app match the response models."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from pydantic import BaseModel
from quart import Quart, Response
from quart.typing import TestClientProtocol as Client

from api import document
from api._models import Amount, RearmBody, RefreshBody, Signin, Signup, TransferBody
from api._openapi import BalanceOut, DashboardOut, SignupOut, TransactionOut, TransactionPage
from api.app import create_app
from infra.config import Config, RateLimitConfig
from tests._api_helpers import api_client, bearer, signup
from tests.conftest import TEST_SECRETS, ServerSet

# The model each handler validates its body with (api/routes/*.py, read_body(...)).
BODIES: dict[tuple[str, str], type[BaseModel]] = {
    ("post", "/api/v1/auth/signup"): Signup,
    ("post", "/api/v1/auth/signin"): Signin,
    ("post", "/api/v1/auth/refresh"): RefreshBody,
    ("post", "/api/v1/auth/logout"): RefreshBody,
    ("post", "/api/v1/payments/deposit"): Amount,
    ("post", "/api/v1/payments/withdraw"): Amount,
    ("post", "/api/v1/payments/transfer"): TransferBody,
    ("post", "/api/v1/admin/needs-attention/redrive"): RearmBody,
}


def _app() -> Quart:
    return create_app(Config.from_env(TEST_SECRETS))


def _routes(app: Quart) -> list[tuple[str, str]]:
    return [(method.lower(), re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule))
            for rule in app.url_map.iter_rules()
            for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"})]  # fmt: skip


def _resolve(doc: dict[str, Any], ref: str) -> dict[str, Any]:
    name = ref.removeprefix("#/components/schemas/")
    assert name in doc["components"]["schemas"], ref
    return dict(doc["components"]["schemas"][name])


def test_every_route_is_documented_with_its_body_and_answers() -> None:
    app = _app()
    doc = document(app)
    assert doc["openapi"] == "3.1.0"
    routes = _routes(app)
    assert len(routes) >= 18
    documented = [(m, p) for p, ops in doc["paths"].items() for m in ops]
    assert sorted(documented) == sorted(routes)  # every route, and nothing that is not one
    for method, path in routes:
        op = doc["paths"][path][method]
        responses = op["responses"]
        successes = [s for s in responses if s[0] == "2"]
        assert len(successes) == 1, (method, path)
        for status, answer in responses.items():
            if status[0] == "4" or status == "default":
                schema = answer["content"]["application/problem+json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Problem"}, (path, status)
        if op.get("security"):
            assert "401" in responses, path
        model = BODIES.get((method, path))
        if model is None:
            assert "requestBody" not in op, path
            continue
        assert {"400", "413", "422"} <= responses.keys(), path
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith(f"/{model.__name__}")
        expected = model.model_json_schema(ref_template="#/components/schemas/{model}")
        assert _resolve(doc, ref) == expected  # the validating model, not a copy of it


def test_payments_document_the_202_transaction_and_the_idempotency_key() -> None:
    doc = document(_app())
    for kind in ("deposit", "withdraw", "transfer"):
        op = doc["paths"][f"/api/v1/payments/{kind}"]["post"]
        accepted = op["responses"]["202"]
        ref = accepted["content"]["application/json"]["schema"]["$ref"]
        shape = _resolve(doc, ref)
        assert set(shape["required"]) >= {"id", "kind", "status", "amount", "currency",
                                          "direction", "counterparty", "failure_reason",
                                          "created_at", "settled_at"}  # fmt: skip
        assert "Idempotent-Replayed" in accepted["headers"]
        [key] = [p for p in op["parameters"] if p["in"] == "header"]
        assert (key["name"], key["required"]) == ("Idempotency-Key", True)
        assert {"400", "409", "422", "429", "503"} <= op["responses"].keys()
    page = doc["paths"]["/api/v1/transactions"]["get"]
    assert {p["name"] for p in page["parameters"]} == {"cursor", "limit"}
    one = doc["paths"]["/api/v1/transactions/{txn_id}"]["get"]
    assert [p["name"] for p in one["parameters"]] == ["txn_id"]


def test_a_route_without_an_operation_cannot_be_served_undocumented() -> None:
    app = _app()

    async def secret() -> Response:
        return Response("hidden")

    app.add_url_rule("/api/v1/secret", view_func=secret)
    with pytest.raises(LookupError, match="/api/v1/secret"):
        document(app)


@pytest_asyncio.fixture
async def client(servers: ServerSet, db_url: str, redis_client: object) -> AsyncIterator[Client]:
    async with api_client(servers, db_url, RateLimitConfig(enabled=False)) as client:
        yield client


@pytest.mark.asyncio
async def test_live_answers_match_the_documented_models(client: Client) -> None:
    served = await (await client.get("/openapi.json")).get_json()
    assert served == document(_app())
    created = await signup(client)
    SignupOut.model_validate(created)
    headers = bearer(created) | {"Idempotency-Key": "doc-1"}
    accepted = await client.post("/api/v1/payments/deposit", json={"amount": 7}, headers=headers)
    assert accepted.status_code == 202
    TransactionOut.model_validate(await accepted.get_json())
    for path, model in (("/api/v1/accounts/me", BalanceOut),
                        ("/api/v1/transactions", TransactionPage),
                        ("/api/v1/dashboard", DashboardOut)):  # fmt: skip
        answer = await client.get(path, headers=bearer(created))
        assert answer.status_code == 200
        model.model_validate(await answer.get_json())


def test_the_document_does_not_depend_on_rate_limits() -> None:
    """Rate limits wrap the views of their app; the document is the same with them or without."""
    other = dataclasses.replace(
        Config.from_env(TEST_SECRETS), limits=RateLimitConfig(enabled=False)
    )
    assert document(create_app(other)) == document(_app())
