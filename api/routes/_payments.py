"""Deposits, withdrawals and transfers: each records an intent and answers 202 at once."""

from __future__ import annotations

import structlog
from quart import Response, request

from actors import Routed, actor_account
from api import _metrics as metrics
from api import _service as svc
from api._http import VISIBLE_ASCII, authenticate, json_response, read_body
from api._models import Amount, TransferBody
from api._openapi import Operation, Resource, TransactionOut
from api._problems import Problem
from api._state import State, state
from engine import Transaction
from infra import logs

bp = Resource("payments", __name__, "/api/v1/payments")
log = structlog.get_logger("kizo.api")


async def payment(kind: str, model: type[Amount]) -> Response:
    with state().passwords.held_off():  # payments outrank sign-ins' hashing
        return await _payment(kind, model)


async def _payment(kind: str, model: type[Amount]) -> Response:
    _claims, user = await authenticate()
    key = request.headers.get("Idempotency-Key")
    if key is None or not VISIBLE_ASCII.fullmatch(key):
        raise Problem(
            400,
            "Idempotency key required",
            "send an Idempotency-Key header of 1 to 255 visible ASCII characters",
        )
    body = (await read_body(model)).model_dump(exclude_none=True)
    s = state()
    stored = await svc.pay(
        s.pool,
        user,
        key,
        request.path,
        kind,
        body,
        s.config.ledger.currency,
        s.config.ledger.amount_max_minor,
        record_key=s.config.mutation != "idempotency_off",
    )
    if stored.txn is not None:  # a new intent (a replay carries none)
        logs.bind(txn_id=str(stored.txn.id))
        metrics.accepted(kind)
        log.info("payment_accepted", kind=kind, amount_minor=stored.txn.amount_minor)
        await _enqueue(s, stored.txn)
    elif stored.replayed:
        log.info("payment_replayed", kind=kind, status=stored.status)
    headers = {"Idempotent-Replayed": "true"} if stored.replayed else {}
    return json_response(stored.body, stored.status, headers)


async def _enqueue(s: State, txn: Transaction) -> None:
    """After commit, so whatever goes wrong here the answer is still the 202 of a recorded
    intent: it stays pending, the coalescer retries it once Redis answers (actors.Coalescer)
    and the janitor's relay enqueues it should this process go away first."""
    try:
        await s.coalescer.enqueue(Routed(txn.id, actor_account(txn.kind, txn.source_id,
                                                               txn.dest_id)))  # fmt: skip
    except Exception as exc:  # Redis down, timeouts, SAQ errors: the outbox covers them all
        metrics.ENQUEUE_FAILURES.inc()
        log.warning("enqueue_failed", error=repr(exc))


@bp.operation("POST", "/deposit", Operation("Deposit from the bank", 202, TransactionOut, Amount,
                                            idempotent=True))  # fmt: skip
async def deposit() -> Response:
    return await payment("deposit", Amount)


@bp.operation("POST", "/withdraw", Operation("Withdraw to the bank", 202, TransactionOut, Amount,
                                             idempotent=True))  # fmt: skip
async def withdraw() -> Response:
    return await payment("withdrawal", Amount)


@bp.operation("POST", "/transfer", Operation("Pay another user", 202, TransactionOut,
                                             TransferBody, idempotent=True))  # fmt: skip
async def transfer() -> Response:
    return await payment("transfer", TransferBody)
