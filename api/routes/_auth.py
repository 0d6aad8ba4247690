"""Sign-up, sign-in and the refresh-token family: the only routes that need no access token."""

from __future__ import annotations

import re

import structlog
from quart import Response

from api import _service as svc
from api._http import json_response, read_body, tokens
from api._models import RefreshBody, Signin, Signup
from api._openapi import Operation, Resource, SignupOut, TokenPair
from api._problems import Problem
from api._state import state
from infra import logs

bp = Resource("auth", __name__, "/api/v1/auth")
log = structlog.get_logger("kizo.api")
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,189}\.[^@\s]{2,}$")


@bp.operation("POST", "/signup", Operation("Sign up", 201, SignupOut, Signup, auth=False,
                                           errors=(409,)))  # fmt: skip
async def signup() -> Response:
    body = await read_body(Signup)
    if not _EMAIL.match(body.email):
        raise Problem(
            422,
            "Invalid request",
            "email is not an email address",
            errors=[{"field": "email", "message": "not an email address"}],
        )
    s = state()
    password_hash = await s.passwords.hash(body.password)
    user = await svc.create_user(s.pool, body.email, body.name, password_hash,
                                 s.config.ledger.currency)  # fmt: skip
    logs.bind(user_id=str(user.id))
    log.info("signed_up")
    return json_response({"user": user.as_json(), **await tokens(user)}, 201)


@bp.operation("POST", "/signin", Operation("Sign in", 200, TokenPair, Signin, auth=False,
                                           errors=(401,)))  # fmt: skip
async def signin() -> Response:
    body = await read_body(Signin)
    user, stored = await svc.find_login(state().pool, body.email)
    if not await state().passwords.verify(stored, body.password) or user is None:
        log.info("sign_in_refused", known_email=user is not None)
        raise Problem(401, "Unauthorized", "wrong email or password")
    logs.bind(user_id=str(user.id))
    log.info("signed_in")
    return json_response(await tokens(user))


@bp.operation("POST", "/refresh", Operation("Rotate the refresh token", 200, TokenPair,
                                            RefreshBody, auth=False, errors=(401,)))  # fmt: skip
async def refresh() -> Response:
    body = await read_body(RefreshBody)
    user_id, new_token = await state().refresh.rotate(body.refresh_token)
    logs.bind(user_id=str(user_id))
    user = await svc.get_user(state().pool, user_id)
    log.info("tokens_refreshed")
    return json_response(await tokens(user, new_token))


@bp.operation("POST", "/logout", Operation("Revoke the refresh family", 204, None, RefreshBody,
                                           auth=False))  # fmt: skip
async def logout() -> Response:
    body = await read_body(RefreshBody)
    await state().refresh.revoke(body.refresh_token)
    log.info("signed_out")
    return Response(status=204)
