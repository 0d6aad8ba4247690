"""The Idempotency-Key contract of every payment route, as properties (DESIGN.md, docs/api.md,
the IETF httpapi idempotency draft):

- the same key with a body that differs in ANY field is 422 and changes nothing;
- the same key with the same body, however it is serialized, replays the first answer;
- the same key on another route is 422; a key is the caller's own: another user's is unrelated.

The routes are the app's idempotent operations and the fields are read from the pydantic model
each route validates with, so a route or a field added later is covered by these tests as soon
as it exists (a field with no strategy of valid values below fails, naming itself). Real HTTP
against the real app on PostgreSQL and Valkey: example counts are modest.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from quart import Quart
from quart.typing import TestClientProtocol as Client
from redis.asyncio import Redis

from api._openapi import operations
from api.routes import BLUEPRINTS
from infra.config import RateLimitConfig
from tests._api_helpers import api_client, bearer, signup, snapshot
from tests.conftest import ServerSet

PROPERTY = settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
RECIPIENTS = 3
AMOUNT_MAX_MINOR = 10**9  # well inside KIZO_AMOUNT_MAX_MINOR: every amount drawn is valid
REUSED = "Idempotency key reused"


def payment_routes() -> dict[str, type[BaseModel]]:
    """Every route the API declares idempotent, with the model its body is validated with:
    read from the API's own blueprints on a bare app (create_app would configure logging
    while the suite is still being collected)."""
    app = Quart("routes")
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)
    ops = operations(app)
    found = {}
    for rule in app.url_map.iter_rules():
        op = ops.get(rule.endpoint)
        if op is not None and op.idempotent:
            assert op.body is not None, rule.rule
            found[rule.rule] = op.body
    return dict(sorted(found.items()))


ROUTES = payment_routes()
FIELDS = [(path, name) for path, model in ROUTES.items() for name in model.model_fields]


@dataclass
class Person:
    tokens: dict[str, Any]

    @property
    def email(self) -> str:
        return str(self.tokens["user"]["email"])

    @property
    def account_id(self) -> str:
        return str(self.tokens["user"]["account_id"])


@dataclass
class World:
    client: Client
    conn: asyncpg.Connection
    redis: Redis
    payer: Person
    stranger: Person  # another user who pays with the same keys
    recipients: list[Person]


@pytest_asyncio.fixture
async def world(servers: ServerSet, db_url: str, redis_client: Redis) -> AsyncIterator[World]:
    async with api_client(servers, db_url, RateLimitConfig(enabled=False)) as client:
        people = [Person(await signup(client)) for _ in range(RECIPIENTS + 2)]
        conn = await asyncpg.connect(db_url)
        try:
            yield World(client, conn, redis_client, people[0], people[1], people[2:])
        finally:
            await conn.close()


# A recipient is a user named by email, by account id, or by email in other letter case (all
# three are valid, docs/api.md); the ways to name one user are told apart by the fingerprint.
_NAMINGS: dict[str, Callable[[Person], str]] = {
    "email": lambda p: p.email,
    "account id": lambda p: p.account_id,
    "EMAIL": lambda p: p.email.upper(),
}
_NOTES = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=280)

# Valid values of each field: (what the value means, the JSON value). Two values of a field
# with different meanings make different payments; None is an optional field left out.
Drawn = st.SearchStrategy[tuple[object, Any]]
Values = Callable[[World], Drawn]
VALUES: dict[str, Values] = {
    "amount": lambda w: st.integers(1, AMOUNT_MAX_MINOR).map(lambda a: (a, a)),
    "to": lambda w: st.builds(
        lambda n, naming: (n, _NAMINGS[naming](w.recipients[n])),
        st.sampled_from(range(len(w.recipients))),
        st.sampled_from(list(_NAMINGS)),
    ),
    "note": lambda w: (st.none() | _NOTES).map(lambda n: (n, n)),
}


def values(world: World, model: type[BaseModel], name: str) -> Drawn:
    if name not in VALUES:
        pytest.fail(f"{model.__name__}.{name} has no strategy of valid values: add one to VALUES")
    strategy = VALUES[name](world)
    if model.model_fields[name].is_required():
        return strategy.filter(lambda v: v[1] is not None)
    return strategy


def body_of(chosen: dict[str, tuple[object, Any]]) -> dict[str, Any]:
    return {name: value for name, (_, value) in chosen.items() if value is not None}


def draw_body(
    data: st.DataObject, world: World, model: type[BaseModel], fixed: dict[str, Any] | None = None
) -> dict[str, tuple[object, Any]]:
    """A valid body of ``model``: each field drawn, or taken from ``fixed`` when it names it."""
    fixed = fixed or {}
    return {
        name: fixed[name] if name in fixed else data.draw(values(world, model, name), name)
        for name in model.model_fields
    }


async def pay(world: World, who: Person, path: str, body: dict[str, Any] | bytes, key: str) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = bearer(who.tokens) | {"Idempotency-Key": key, "Content-Type": "application/json"}
    return await world.client.post(path, data=raw, headers=headers)


async def accepted(answer: Any) -> dict[str, Any]:
    assert answer.status_code == 202, await answer.get_data()
    assert "Idempotent-Replayed" not in answer.headers
    return dict(await answer.get_json())


async def replayed(answer: Any, first: dict[str, Any]) -> None:
    assert answer.status_code == 202, await answer.get_data()
    assert answer.headers["Idempotent-Replayed"] == "true"
    assert await answer.get_json() == first


async def reused(answer: Any) -> None:
    assert answer.status_code == 422, await answer.get_data()
    assert answer.headers["Content-Type"] == "application/problem+json"
    problem = await answer.get_json()
    assert (problem["status"], problem["title"]) == (422, REUSED)


def _key() -> str:
    return f"k-{uuid.uuid4()}"


def test_every_payment_route_is_covered() -> None:
    """The discovery above found the routes (so the properties below are not vacuous)."""
    assert {
        "/api/v1/payments/deposit",
        "/api/v1/payments/withdraw",
        "/api/v1/payments/transfer",
    } <= set(ROUTES)
    assert {"amount", "to", "note"} <= {name for _, name in FIELDS}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("path", "field"), FIELDS, ids=[f"{p.rsplit('/', 1)[1]}-{f}" for p, f in FIELDS]
)
@PROPERTY
@given(data=st.data())
async def test_the_same_key_with_any_field_changed_is_422_and_changes_nothing(
    world: World, path: str, field: str, data: st.DataObject
) -> None:
    model = ROUTES[path]
    chosen = draw_body(data, world, model)
    meaning = chosen[field][0]
    other = data.draw(values(world, model, field).filter(lambda v: v[0] != meaning), "changed")
    key = _key()
    first = await accepted(await pay(world, world.payer, path, body_of(chosen), key))
    before = await snapshot(world.conn, world.redis)
    await reused(await pay(world, world.payer, path, body_of({**chosen, field: other}), key))
    assert await snapshot(world.conn, world.redis) == before
    # The refused request left the record alone: the first body still replays the first answer.
    await replayed(await pay(world, world.payer, path, body_of(chosen), key), first)


_WHITESPACE = st.text(st.sampled_from(" \t\n\r"), max_size=3)  # JSON's insignificant whitespace


@st.composite
def serializations(draw: st.DrawFn, body: dict[str, Any], model: type[BaseModel]) -> bytes:
    """The same JSON object written another way: members in any order, whitespace anywhere
    between tokens, non-ASCII escaped or not, an optional field left out or sent as null."""
    members = dict(body)
    for name, field in model.model_fields.items():
        if name not in members and not field.is_required() and draw(st.booleans()):
            members[name] = None
    names = draw(st.permutations(list(members)))
    ascii_only = draw(st.booleans())

    def ws() -> str:
        return draw(_WHITESPACE)

    parts = [
        f"{ws()}{json.dumps(n, ensure_ascii=ascii_only)}{ws()}:{ws()}"
        f"{json.dumps(members[n], ensure_ascii=ascii_only)}{ws()}"
        for n in names
    ]
    return f"{ws()}{{{','.join(parts) or ws()}}}{ws()}".encode()


@pytest.mark.asyncio
@pytest.mark.parametrize("path", list(ROUTES), ids=[p.rsplit("/", 1)[1] for p in ROUTES])
@PROPERTY
@given(data=st.data())
async def test_the_same_key_with_an_equal_body_replays_the_first_answer(
    world: World, path: str, data: st.DataObject
) -> None:
    model = ROUTES[path]
    body = body_of(draw_body(data, world, model))
    key = _key()
    first = await accepted(await pay(world, world.payer, path, body, key))
    before = await snapshot(world.conn, world.redis)
    raw = data.draw(serializations(body, model), "written as")
    await replayed(await pay(world, world.payer, path, raw, key), first)
    assert await snapshot(world.conn, world.redis) == before


ROUTE_PAIRS = list(itertools.permutations(ROUTES, 2))


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("first_path", "then_path"),
    ROUTE_PAIRS,
    ids=[f"{a.rsplit('/', 1)[1]}-then-{b.rsplit('/', 1)[1]}" for a, b in ROUTE_PAIRS],
)
@settings(PROPERTY, max_examples=8)
@given(data=st.data())
async def test_a_key_used_on_another_route_is_422_and_changes_nothing(
    world: World, first_path: str, then_path: str, data: st.DataObject
) -> None:
    """The second body shares every field it can with the first ({"amount": 5} on deposit,
    then on withdraw): only the route tells the two requests apart."""
    chosen = draw_body(data, world, ROUTES[first_path])
    then = draw_body(data, world, ROUTES[then_path], fixed=chosen)
    key = _key()
    first = await accepted(await pay(world, world.payer, first_path, body_of(chosen), key))
    before = await snapshot(world.conn, world.redis)
    await reused(await pay(world, world.payer, then_path, body_of(then), key))
    assert await snapshot(world.conn, world.redis) == before
    await replayed(await pay(world, world.payer, first_path, body_of(chosen), key), first)


@pytest.mark.asyncio
@pytest.mark.parametrize("path", list(ROUTES), ids=[p.rsplit("/", 1)[1] for p in ROUTES])
@settings(PROPERTY, max_examples=10)
@given(data=st.data(), same_body=st.booleans())
async def test_keys_are_per_user(
    world: World, path: str, data: st.DataObject, same_body: bool
) -> None:
    """Another user's request with the same key, with the same body or not, is a payment of
    its own; the first user's key still replays the first user's answer."""
    model = ROUTES[path]
    mine = body_of(draw_body(data, world, model))
    theirs = mine if same_body else body_of(draw_body(data, world, model))
    key = _key()
    first = await accepted(await pay(world, world.payer, path, mine, key))
    other = await accepted(await pay(world, world.stranger, path, theirs, key))
    assert other["id"] != first["id"]
    await replayed(await pay(world, world.payer, path, mine, key), first)
    await replayed(await pay(world, world.stranger, path, theirs, key), other)


@pytest.mark.asyncio
async def test_the_same_recipient_named_another_way_is_another_request(world: World) -> None:
    """The fingerprint is of the body as sent, not of what it resolves to (docs/api.md): the
    recipient by email, by account id or in other letter case are three requests, so a key
    reused across them is 422, not a replay."""
    path = "/api/v1/payments/transfer"
    bob = world.recipients[0]
    key = _key()
    await accepted(await pay(world, world.payer, path, {"to": bob.email, "amount": 5}, key))
    before = await snapshot(world.conn, world.redis)
    for to in (bob.account_id, bob.email.upper()):
        await reused(await pay(world, world.payer, path, {"to": to, "amount": 5}, key))
    assert await snapshot(world.conn, world.redis) == before


@pytest.mark.asyncio
async def test_a_note_sent_as_null_is_a_note_left_out(world: World) -> None:
    path = "/api/v1/payments/transfer"
    body = {"to": world.recipients[0].email, "amount": 5}
    key = _key()
    first = await accepted(await pay(world, world.payer, path, body, key))
    await replayed(await pay(world, world.payer, path, {**body, "note": None}, key), first)
