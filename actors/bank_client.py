"""Kizo's client for the bank (the mock bank in tests and chaos runs; any bank with its API).

Every call carries the Kizo transaction id as ``Idempotency-Key``, so a retry can never move
money twice. Each outcome is one of three, and the difference is the whole point:

- ``succeeded`` / ``failed``: the bank gave a definite, final answer;
- ``unknown``: a timeout, a dropped connection, a 5xx after the request may have been processed.
  The transaction stays ``processing`` and the janitor asks ``GET /payments/{key}`` later;
- ``unsent``: the bank could not even be connected to (refused, or no connection within the
  timeout), so the request certainly never reached it: a deposit stays ``pending`` and the
  janitor re-drives it, as any intent the pipeline could not finish yet.

A 503 is the bank's definite "not processed" and is retried here (bounded); a 4xx other than the
idempotency conflict is a bug on our side, surfaced as ``BankRejected``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from actors._metrics import BANK_CALLS, BANK_DURATION
from infra.http1 import REQUEST_FAILED, HttpClient, NotConnected, Reply

Outcome = Literal["succeeded", "failed", "unknown", "unsent"]
STATEMENT_PAGE_MAX = 1000
IDLE_MAX_S = 4.0  # an idle connection older than this is not reused (a server may close it)


class BankUnavailable(RuntimeError):
    """The bank could not be asked (read-only calls); try again later."""


class BankRejected(RuntimeError):
    """The bank refused the request as malformed or conflicting (4xx): never retried."""


@dataclass(frozen=True)
class BankPayment:
    key: str
    kind: str
    account: str
    amount_minor: int
    currency: str
    status: str
    failure_reason: str | None
    created_at: str

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> BankPayment:
        return cls(
            key=str(body["key"]),
            kind=str(body["kind"]),
            account=str(body["account"]),
            amount_minor=int(body["amount_minor"]),
            currency=str(body["currency"]),
            status=str(body["status"]),
            failure_reason=body.get("failure_reason"),
            created_at=str(body["created_at"]),
        )


@dataclass(frozen=True)
class BankResult:
    outcome: Outcome
    payment: BankPayment | None = None
    failure_reason: str | None = None


class BankClient:
    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 5.0,
        retries_max: int = 3,
        backoff_s: float = 0.05,
        connections_max: int = 100,
        key_per_request: bool = False,
        unknown_as_failed: bool = False,
        unknown_as_succeeded: bool = False,
    ) -> None:
        self.retries_max = retries_max
        # The "bank_key_off" broken build (never set outside a chaos harness's scratch system):
        # each request carries a fresh key, so the bank cannot tell a retry from a new payment.
        self.key_per_request = key_per_request
        # The "unknown_as_failed" broken build: a lost answer is taken for a refusal.
        self._lost: Outcome = "failed" if unknown_as_failed else "unknown"
        # The "unknown_as_succeeded" broken build: a lost answer is taken for a success, so a
        # request the bank never acted on (lost on its way) is credited or posted.
        if unknown_as_succeeded:
            self._lost = "succeeded"
        self.backoff_s = backoff_s
        # Never resent by the transport: a request that may have reached the bank is
        # "unknown" here and resolved by key later (a resend with the same key would be safe
        # too, but is left to the janitor, which asks first).
        self._http = HttpClient(base_url, connections_max, timeout_s, resend_stale=False,
                                idle_max_s=IDLE_MAX_S)  # fmt: skip

    async def aclose(self) -> None:
        await self._http.aclose()

    async def collect(
        self, key: uuid.UUID, account: uuid.UUID, amount_minor: int, currency: str
    ) -> BankResult:
        """Pull ``amount_minor`` from the customer's bank account into Kizo's."""
        return await self._pay("/collections", key, account, amount_minor, currency)

    async def payout(
        self, key: uuid.UUID, account: uuid.UUID, amount_minor: int, currency: str
    ) -> BankResult:
        """Push ``amount_minor`` from Kizo's bank account to the customer's."""
        return await self._pay("/payouts", key, account, amount_minor, currency)

    async def _pay(
        self, path: str, key: uuid.UUID, account: uuid.UUID, amount_minor: int, currency: str
    ) -> BankResult:
        call = "collect" if path == "/collections" else "payout"
        started = time.perf_counter()
        outcome = "rejected"  # what a BankRejected leaves
        try:
            result = await self._pay_once(path, key, account, amount_minor, currency)
            outcome = result.outcome
            return result
        finally:
            BANK_CALLS.labels(call, outcome).inc()
            BANK_DURATION.labels(call).observe(time.perf_counter() - started)

    async def _pay_once(
        self, path: str, key: uuid.UUID, account: uuid.UUID, amount_minor: int, currency: str
    ) -> BankResult:
        body = {"account": str(account), "amount_minor": amount_minor, "currency": currency}
        headers = {"Idempotency-Key": str(key)}
        for attempt in range(self.retries_max + 1):
            if self.key_per_request:
                headers = {"Idempotency-Key": str(uuid.uuid4())}
            try:
                response = await self._http.post(path, body, headers)
            except NotConnected:
                # No connection, so no request: nothing can have moved (a retry is harmless).
                return BankResult("unsent")
            except REQUEST_FAILED:
                # The request may have been processed: only the bank's record can tell.
                return BankResult(self._lost)
            if response.status == 503 and attempt < self.retries_max:
                await asyncio.sleep(self.backoff_s * 2**attempt)
                continue
            result = _result(response)
            return BankResult(self._lost) if result.outcome == "unknown" else result
        return BankResult(self._lost)

    async def healthy(self) -> bool:
        """The bank answers its health check (200) within the client's timeout."""
        try:
            return (await self._http.get("/health")).status == 200
        except REQUEST_FAILED:
            return False

    async def get_payment(self, key: uuid.UUID) -> BankPayment | None:
        """The bank's record for ``key``; None when the bank never processed it."""
        response = await self._get("payment", f"/payments/{key}")
        if response.status == 404:
            BANK_CALLS.labels("payment", "not_found").inc()
            return None
        if response.status != 200:
            BANK_CALLS.labels("payment", "unavailable").inc()
            raise BankUnavailable(f"GET /payments/{key} answered {response.status}")
        BANK_CALLS.labels("payment", "ok").inc()
        return BankPayment.from_json(response.json())

    async def statement(
        self, since: str | None = None, limit: int = STATEMENT_PAGE_MAX
    ) -> tuple[list[BankPayment], str | None]:
        """One page of Kizo's omnibus account statement and the cursor of the next."""
        params: dict[str, str | int] = {"limit": min(limit, STATEMENT_PAGE_MAX)}
        if since is not None:
            params["since"] = since
        response = await self._get("statement", "/statement", params)
        if response.status != 200:
            BANK_CALLS.labels("statement", "unavailable").inc()
            raise BankUnavailable(f"GET /statement answered {response.status}")
        BANK_CALLS.labels("statement", "ok").inc()
        body = response.json()
        items = [BankPayment.from_json(item) for item in body["items"]]
        return items, body.get("next_cursor")

    async def _get(self, call: str, path: str, params: dict[str, str | int] | None = None,
                   ) -> Reply:  # fmt: skip
        started = time.perf_counter()
        try:
            return await self._http.get(path, params=params)
        except REQUEST_FAILED as exc:
            BANK_CALLS.labels(call, "unavailable").inc()
            raise BankUnavailable(f"GET {path}: {exc.__class__.__name__}") from exc
        finally:
            BANK_DURATION.labels(call).observe(time.perf_counter() - started)


def _result(response: Reply) -> BankResult:
    if response.status in (200, 201):
        payment = BankPayment.from_json(response.json())
        if payment.status == "succeeded":
            return BankResult("succeeded", payment)
        return BankResult("failed", payment, payment.failure_reason or "bank_declined")
    if response.status >= 500:
        return BankResult("unknown")
    raise BankRejected(f"bank answered {response.status}: {response.text[:200]}")
