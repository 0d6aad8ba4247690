"""Locust users of the wallet API: sign up, fund themselves, then pay each other (a share of
payments to one hot merchant), retry with the same key, read balances and history.

Run through ``kizo loadtest`` (which starts a scratch system, creates the merchant, runs
locust headless and then checks that every accepted payment settled), or by hand:

    KIZO_LOAD_MERCHANT=<account id> locust -f loadtests/locustfile.py --host http://127.0.0.1:8000

A request counts as a failure unless it gets exactly the answer the API promises: 201 for a
sign-up, 202 for a payment, 202 with ``Idempotent-Replayed: true`` and the same body for a
retry, 200 for reads.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from typing import Any

from locust import HttpUser, between, task

PASSWORD = "loadtest-password-1"
DEPOSIT = 1_000_000
SETTLE_POLLS_MAX = 300
SETTLE_POLL_S = 0.1
MERCHANT = os.environ.get("KIZO_LOAD_MERCHANT", "")
MERCHANT_SHARE = float(os.environ.get("KIZO_LOAD_MERCHANT_SHARE", "0.2"))
KEYS_FILE = os.environ.get("KIZO_LOAD_KEYS_FILE", "")  # accepted transfers' keys, one a line
ACCOUNTS: list[str] = []  # every started user's account, shared by this locust process


class WalletUser(HttpUser):
    wait_time = between(0.02, 0.1)
    account = ""
    auth: dict[str, str] = {}  # noqa: RUF012 (set per user in on_start)

    def on_start(self) -> None:
        email = f"load-{uuid.uuid4().hex[:12]}@example.test"
        body = {"email": email, "password": PASSWORD, "name": "Load"}
        with self.client.post("/api/v1/auth/signup", json=body, name="signup",
                              catch_response=True) as r:  # fmt: skip
            if r.status_code != 201:
                r.failure(f"signup: HTTP {r.status_code}")
                self.stop()
                return
            data = r.json()
        self.account = data["user"]["account_id"]
        self.auth = {"Authorization": f"Bearer {data['access_token']}"}
        self._pay("deposit", {"amount": DEPOSIT}, "deposit")
        # Money can be spent once it has arrived: wait (bounded) for the deposit to settle.
        for _ in range(SETTLE_POLLS_MAX):
            me = self.client.get("/api/v1/accounts/me", headers=self.auth, name="balance")
            if me.status_code == 200 and me.json()["available"] >= DEPOSIT:
                break
            time.sleep(SETTLE_POLL_S)
        ACCOUNTS.append(self.account)

    def _pay(self, kind: str, body: dict[str, Any], name: str, key: str | None = None) -> Any:
        headers = {**self.auth, "Idempotency-Key": key or str(uuid.uuid4())}
        with self.client.post(f"/api/v1/payments/{kind}", json=body, headers=headers, name=name,
                              catch_response=True) as r:  # fmt: skip
            if r.status_code != 202:
                r.failure(f"{name}: HTTP {r.status_code} {r.text[:120]}")
                return None
            if KEYS_FILE and kind == "transfer":
                with open(KEYS_FILE, "a") as keys:
                    keys.write(headers["Idempotency-Key"] + "\n")
            return r

    def _recipient(self) -> str | None:
        if MERCHANT and random.random() < MERCHANT_SHARE:
            return MERCHANT
        others = [a for a in ACCOUNTS if a != self.account]
        return random.choice(others) if others else None

    @task(10)
    def transfer(self) -> None:
        to = self._recipient()
        if to is not None:
            amount = random.randint(1, 500)
            self._pay("transfer", {"to": to, "amount": amount}, "transfer")

    @task(1)
    def retry_with_the_same_key(self) -> None:
        to = self._recipient()
        if to is None:
            return
        key, body = str(uuid.uuid4()), {"to": to, "amount": random.randint(1, 500)}
        first = self._pay("transfer", body, "transfer", key)
        if first is None:
            return
        headers = {**self.auth, "Idempotency-Key": key}
        with self.client.post("/api/v1/payments/transfer", json=body, headers=headers,
                              name="transfer (replay)", catch_response=True) as again:  # fmt: skip
            replayed = again.headers.get("Idempotent-Replayed") == "true"
            if again.status_code != 202 or not replayed or again.json() != first.json():
                again.failure(f"not a replay: HTTP {again.status_code}, replayed={replayed}")

    @task(2)
    def history(self) -> None:
        self.client.get("/api/v1/transactions?limit=20", headers=self.auth, name="history")

    @task(2)
    def balance(self) -> None:
        self.client.get("/api/v1/accounts/me", headers=self.auth, name="balance")
