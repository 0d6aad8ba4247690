"""The Node original's own load test, as locust users, so both systems face the same mix.

Each user is one of ``KIZO_LOAD_USERS_FILE``'s accounts (one email a line, all with the password
``KIZO_LOAD_PASSWORD``; ``kizo bench e2e`` creates them) and loops:
sign in, GET /dashboard, GET /transactions, POST deposit 100, POST transfer 10 to the one
merchant everyone pays (``KIZO_LOAD_MERCHANT``, an account id).

- ``SeedUser``: signs in every loop and thinks 1 s between loops (the original's seed profile).
- ``CapacityUser``: signs in once and never thinks (its capacity profile; loadtests/capacity.py
  steps the number of users up).

A 503 to a sign-in is honoured (the user waits its Retry-After) and counted. Every request is
written to ``KIZO_LOAD_LOG`` (CSV: start epoch s, route, status, ms; status 0 = no answer) when
locust quits, and the Idempotency-Key of every accepted (202) payment to
``KIZO_LOAD_KEYS_FILE``: the runner checks them one by one against the ledger.
"""

from __future__ import annotations

import itertools
import os
import uuid
from pathlib import Path
from typing import Any

from locust import FastHttpUser, constant, events, task

PASSWORD = os.environ.get("KIZO_LOAD_PASSWORD", "")
MERCHANT = os.environ.get("KIZO_LOAD_MERCHANT", "")
LOG = os.environ.get("KIZO_LOAD_LOG", "")
KEYS_FILE = os.environ.get("KIZO_LOAD_KEYS_FILE", "")
_USERS_FILE = os.environ.get("KIZO_LOAD_USERS_FILE", "")
_EMAILS = itertools.cycle(Path(_USERS_FILE).read_text().split() if _USERS_FILE else ["-"])
RETRY_AFTER_MAX_S = 30.0
_records: list[str] = []
_keys: list[str] = []


@events.request.add_listener
def _record(name: str, response_time: float, response: Any, start_time: float = 0.0,
            **_: Any) -> None:  # fmt: skip
    status = getattr(response, "status_code", 0) or 0
    _records.append(f"{start_time:.4f},{name},{status},{response_time:.2f}\n")


@events.quitting.add_listener
def _write(**_: Any) -> None:
    if LOG:
        with open(LOG, "a") as out:
            out.writelines(_records)
    if KEYS_FILE:
        with open(KEYS_FILE, "a") as out:
            out.writelines(k + "\n" for k in _keys)


class _Wallet(FastHttpUser):
    abstract = True
    network_timeout = 120.0
    connection_timeout = 30.0
    token = ""

    def on_start(self) -> None:
        self.email = next(_EMAILS)

    def sign_in(self) -> None:
        with self.client.post("/api/v1/auth/signin", json={"email": self.email,
                              "password": PASSWORD}, name="signin",
                              catch_response=True) as r:  # fmt: skip
            if r.status_code == 200:
                self.token = r.json()["access_token"]
                return
            r.failure(f"signin: HTTP {r.status_code}")
            retry_s = r.headers.get("Retry-After", "1") if r.headers else "1"
        self.wait_s(min(RETRY_AFTER_MAX_S, float(retry_s) if retry_s.isdigit() else 1.0))

    def wait_s(self, seconds: float) -> None:
        import gevent

        gevent.sleep(seconds)

    def read(self, path: str, name: str) -> None:
        self.client.get(path, headers={"Authorization": f"Bearer {self.token}"}, name=name)

    def pay(self, kind: str, body: dict[str, Any]) -> None:
        key = str(uuid.uuid4())
        headers = {"Authorization": f"Bearer {self.token}", "Idempotency-Key": key}
        with self.client.post(f"/api/v1/payments/{kind}", json=body, headers=headers,
                              name=kind, catch_response=True) as r:  # fmt: skip
            if r.status_code != 202:
                r.failure(f"{kind}: HTTP {r.status_code}")
                return
        _keys.append(key)

    def loop(self) -> None:
        self.read("/api/v1/dashboard", "dashboard")
        self.read("/api/v1/transactions", "transactions")
        self.pay("deposit", {"amount": 100})
        self.pay("transfer", {"to": MERCHANT, "amount": 10})


class SeedUser(_Wallet):
    wait_time = constant(1)

    @task
    def signed_in_loop(self) -> None:
        self.sign_in()
        if self.token:
            self.loop()


class CapacityUser(_Wallet):
    wait_time = constant(0)

    def on_start(self) -> None:
        super().on_start()
        for _ in range(10):  # bounded: a user refused ten times runs without a token
            self.sign_in()
            if self.token:
                return

    @task
    def loop_without_thinking(self) -> None:
        self.loop()
