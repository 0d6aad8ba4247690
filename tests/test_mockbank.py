"""The mock bank, as a real process (``python -m kizo.cli bank``) on the test PostgreSQL server:
idempotent payments, the statement, faults, bad input, the fault CLI, a clean stop."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from chaos.mockbank.settings import bank_database_url
from infra.config import Config
from infra.servers import free_port
from tests.conftest import ServerSet, stop_process, wait_http

ROOT = Path(__file__).resolve().parent.parent
OPENING_MINOR = 100_000_000
PROBLEM = "application/problem+json"
RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")


@dataclass
class Bank:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path


def _start_bank(servers: ServerSet, home: Path, **extra: str) -> Bank:
    """``kizo bank`` with DATABASE_URL only: it must derive and create its database ``bank``."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "BANK_DATABASE_URL"}
    env.update(
        DATABASE_URL=servers.pg_url(f"kizo_mb{os.getpid()}"),
        KIZO_BANK_PORT=str(port),
        KIZO_HOME=str(home),
        **extra,
    )
    log_path = home / f"bank-{port}.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kizo.cli", "bank"],
            env=env,
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", timeout_s=30, proc=proc)
    except Exception:
        stop_process(proc, timeout_s=5)
        raise
    return Bank(url, port, proc, log_path)


@pytest.fixture(scope="module")
def bank_proc(servers: ServerSet) -> Iterator[Bank]:
    with tempfile.TemporaryDirectory(prefix="kizo-bank-") as home:
        bank = _start_bank(servers, Path(home))
        try:
            yield bank
        finally:
            stop_process(bank.proc, timeout_s=10)


@pytest.fixture
def bank(bank_proc: Bank) -> Iterator[Bank]:
    """The module's bank with no faults, cleared again after the test."""
    httpx.delete(f"{bank_proc.url}/admin/faults", timeout=5).raise_for_status()
    yield bank_proc
    httpx.delete(f"{bank_proc.url}/admin/faults", timeout=5)


def _pay(
    bank: Bank,
    path: str,
    key: str,
    account: str,
    amount: int,
    *,
    timeout_s: float = 10,
    **extra: object,
) -> httpx.Response:
    body = {"account": account, "amount_minor": amount, "currency": "USD", **extra}
    return httpx.post(
        f"{bank.url}{path}", json=body, headers={"Idempotency-Key": key}, timeout=timeout_s
    )


def _balance(bank: Bank, account: str) -> int | None:
    response = httpx.get(f"{bank.url}/admin/accounts/{account}", timeout=5)
    if response.status_code == 404:
        return None
    assert response.status_code == 200
    return int(response.json()["balance_minor"])


def _stored(bank: Bank, key: str) -> dict[str, Any] | None:
    response = httpx.get(f"{bank.url}/payments/{key}", timeout=5)
    if response.status_code == 404:
        assert response.headers["content-type"] == PROBLEM
        return None
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def _statement_keys(bank: Bank) -> list[str]:
    keys: list[str] = []
    cursor: str | None = None
    for _ in range(1000):  # bounded: the module makes far fewer than 1000 pages of payments
        params: dict[str, str | int] = {"limit": 1000}
        if cursor is not None:
            params["since"] = cursor
        page = httpx.get(f"{bank.url}/statement", params=params, timeout=5).json()
        keys += [item["key"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return keys
    raise AssertionError("statement did not end")


def _new() -> str:
    return str(uuid.uuid4())


# --- configuration ------------------------------------------------------------------------


def test_bank_database_url_is_kizo_server_with_database_bank() -> None:
    config = Config.from_env({"DATABASE_URL": "postgresql://u:p@db:5433/kizo?sslmode=disable"})
    assert bank_database_url(config, {}) == "postgresql://u:p@db:5433/bank?sslmode=disable"
    explicit = {"BANK_DATABASE_URL": "postgresql://x@y/other"}
    assert bank_database_url(config, explicit) == "postgresql://x@y/other"
    embedded = Config.from_env({"KIZO_PG_PORT": "15999"})
    assert bank_database_url(embedded, {}) == "postgresql://postgres@127.0.0.1:15999/bank"


@pytest.mark.asyncio
async def test_payments_live_in_the_database_named_bank(bank: Bank, servers: ServerSet) -> None:
    key = _new()
    assert _pay(bank, "/payouts", key, _new(), 5).status_code == 201
    conn = await asyncpg.connect(servers.pg_url("bank"), timeout=10)
    try:
        assert await conn.fetchval("SELECT count(*) FROM payments WHERE key = $1", key) == 1
    finally:
        await conn.close()


# --- payments -----------------------------------------------------------------------------


def test_collection_and_payout_move_money_once_per_key(bank: Bank) -> None:
    account, key = _new(), _new()
    first = _pay(bank, "/collections", key, account, 2500)
    assert first.status_code == 201
    body = first.json()
    assert set(body) == {
        "key",
        "kind",
        "account",
        "amount_minor",
        "currency",
        "status",
        "failure_reason",
        "created_at",
    }
    assert (body["key"], body["kind"], body["account"]) == (key, "collection", account)
    assert (body["amount_minor"], body["currency"]) == (2500, "USD")
    assert (body["status"], body["failure_reason"]) == ("succeeded", None)
    assert RFC3339_UTC.match(body["created_at"])
    assert _balance(bank, account) == OPENING_MINOR - 2500
    payout = _pay(bank, "/payouts", _new(), account, 1000)
    assert (payout.status_code, payout.json()["kind"]) == (201, "payout")
    assert _balance(bank, account) == OPENING_MINOR - 1500
    assert _stored(bank, key) == body


def test_replay_answers_200_with_the_same_body_and_moves_nothing(bank: Bank) -> None:
    account, key = _new(), _new()
    first = _pay(bank, "/payouts", key, account, 300)
    for _ in range(3):
        replay = _pay(bank, "/payouts", key, account, 300)
        assert (replay.status_code, replay.json()) == (200, first.json())
    assert _balance(bank, account) == OPENING_MINOR + 300


@pytest.mark.parametrize(
    ("path", "account_same", "amount"),
    [("/collections", True, 101), ("/collections", False, 100), ("/payouts", True, 100)],
)
def test_same_key_different_request_is_422_and_changes_nothing(
    bank: Bank, path: str, account_same: bool, amount: int
) -> None:
    account, key = _new(), _new()
    assert _pay(bank, "/collections", key, account, 100).status_code == 201
    other = account if account_same else _new()
    conflict = _pay(bank, path, key, other, amount)
    assert conflict.status_code == 422
    assert conflict.headers["content-type"] == PROBLEM
    assert conflict.json()["status"] == 422
    assert _balance(bank, account) == OPENING_MINOR - 100
    if not account_same:
        assert _balance(bank, other) is None  # not even opened
    stored = _stored(bank, key)
    assert stored is not None
    assert (stored["kind"], stored["amount_minor"]) == ("collection", 100)


def test_insufficient_funds_is_a_definite_failed_payment(bank: Bank) -> None:
    account, key = _new(), _new()
    put = httpx.put(f"{bank.url}/admin/accounts/{account}", json={"balance_minor": 50}, timeout=5)
    assert put.json() == {"account": account, "balance_minor": 50}
    response = _pay(bank, "/collections", key, account, 51)
    assert response.status_code == 201
    assert (response.json()["status"], response.json()["failure_reason"]) == (
        "failed",
        "insufficient_funds",
    )
    assert _balance(bank, account) == 50
    assert _pay(bank, "/collections", key, account, 51).json() == response.json()
    assert key not in _statement_keys(bank)
    assert _pay(bank, "/collections", _new(), account, 50).json()["status"] == "succeeded"
    assert _balance(bank, account) == 0


@pytest.mark.asyncio
async def test_concurrent_requests_with_one_key_make_one_payment(bank: Bank) -> None:
    account, key = _new(), _new()
    body = {"account": account, "amount_minor": 700, "currency": "USD"}
    async with httpx.AsyncClient(base_url=bank.url, timeout=10) as client:
        responses = await asyncio.gather(
            *(
                client.post("/collections", json=body, headers={"Idempotency-Key": key})
                for _ in range(20)
            )
        )
    assert sorted(r.status_code for r in responses) == [200] * 19 + [201]
    assert len({r.text for r in responses}) == 1
    assert _balance(bank, account) == OPENING_MINOR - 700
    assert _statement_keys(bank).count(key) == 1


@pytest.mark.asyncio
async def test_concurrent_different_requests_with_one_key_never_500(bank: Bank) -> None:
    key, accounts = _new(), [_new() for _ in range(20)]
    async with httpx.AsyncClient(base_url=bank.url, timeout=10) as client:
        responses = await asyncio.gather(
            *(
                client.post(
                    "/payouts",
                    json={"account": a, "amount_minor": 10, "currency": "USD"},
                    headers={"Idempotency-Key": key},
                )
                for a in accounts
            )
        )
    assert sorted(r.status_code for r in responses) == [201] + [422] * 19
    winner = next(r.json()["account"] for r in responses if r.status_code == 201)
    assert [a for a in accounts if _balance(bank, a) is not None] == [winner]


def test_unknown_key_is_404_problem(bank: Bank) -> None:
    response = httpx.get(f"{bank.url}/payments/{_new()}", timeout=5)
    assert response.status_code == 404
    assert response.headers["content-type"] == PROBLEM
    assert set(response.json()) >= {"type", "title", "status", "detail"}


# --- statement ----------------------------------------------------------------------------


def test_statement_pages_through_succeeded_payments_in_order(bank: Bank) -> None:
    before = _statement_keys(bank)
    keys = [_new() for _ in range(5)]
    poor = _new()
    httpx.put(f"{bank.url}/admin/accounts/{poor}", json={"balance_minor": 0}, timeout=5)
    for i, key in enumerate(keys):
        assert _pay(bank, "/payouts", key, _new(), 10 + i).status_code == 201
        _pay(bank, "/collections", _new(), poor, 1)  # failed: never on the statement
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(100):
        params: dict[str, str | int] = {"limit": 2}
        if cursor is not None:
            params["since"] = cursor
        page = httpx.get(f"{bank.url}/statement", params=params, timeout=5).json()
        assert len(page["items"]) <= 2
        assert all(item["status"] == "succeeded" for item in page["items"])
        seen.extend(item["key"] for item in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [*before, *keys]
    assert len(set(seen)) == len(seen)


@pytest.mark.asyncio
async def test_statement_tail_never_skips_a_payment_committed_late(bank: Bank) -> None:
    """A reader tailing the statement while 120 payments commit concurrently sees every one."""
    start = _statement_keys(bank)
    cursor: str | None = None
    seen: list[str] = []
    keys = [_new() for _ in range(120)]
    async with httpx.AsyncClient(base_url=bank.url, timeout=10) as client:

        async def read_page() -> bool:
            nonlocal cursor
            params: dict[str, str | int] = {"limit": 7}
            if cursor is not None:
                params["since"] = cursor
            page = (await client.get("/statement", params=params)).json()
            seen.extend(item["key"] for item in page["items"])
            cursor = page["next_cursor"] or cursor
            return page["next_cursor"] is None

        async def pay(key: str) -> None:
            body = {"account": _new(), "amount_minor": 1, "currency": "USD"}
            response = await client.post("/payouts", json=body, headers={"Idempotency-Key": key})
            assert response.status_code == 201

        async def tail(until: asyncio.Event) -> None:
            for _ in range(2000):  # bounded; each round is one page
                caught_up = await read_page()
                if until.is_set() and caught_up:
                    return
                await asyncio.sleep(0.001)
            raise AssertionError("the tail never caught up")

        done = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            reader = tg.create_task(tail(done))
            async with asyncio.TaskGroup() as writers:
                for key in keys:
                    writers.create_task(pay(key))
            done.set()
            await reader
    # The tail re-reads its last page while caught up, as Kizo's janitor does: dedupe in order.
    ordered = list(dict.fromkeys(seen))
    new = [k for k in ordered if k not in set(start)]
    assert sorted(new) == sorted(keys)


@pytest.mark.asyncio
async def test_statement_holds_back_payments_behind_one_still_committing(
    bank: Bank, servers: ServerSet
) -> None:
    """A payment that took its place first but commits last must not be skipped: later ones
    wait for it on the statement, then both appear in processing order."""
    early, late = _new(), _new()
    conn = await asyncpg.connect(servers.pg_url("bank"), timeout=10)
    try:
        committing = conn.transaction()
        await committing.start()
        await conn.execute(
            "INSERT INTO payments (key, kind, account, amount_minor, currency, status)"
            " VALUES ($1, 'payout', $2, 1, 'USD', 'succeeded')",
            early,
            _new(),
        )
        assert _pay(bank, "/payouts", late, _new(), 1).status_code == 201
        assert late not in _statement_keys(bank)
        await committing.commit()
    finally:
        await conn.close()
    keys = _statement_keys(bank)
    assert keys.index(early) < keys.index(late)


@pytest.mark.parametrize(
    "params",
    [
        {"since": "abc"},
        {"since": "123"},
        {"since": ""},
        {"limit": "0"},
        {"limit": "1001"},
        {"limit": "x"},
        {"limit": "-1"},
    ],
)
def test_bad_statement_parameters_are_400(bank: Bank, params: dict[str, str]) -> None:
    response = httpx.get(f"{bank.url}/statement", params=params, timeout=5)
    assert response.status_code == 400
    assert response.headers["content-type"] == PROBLEM


# --- bad input ----------------------------------------------------------------------------

_GOOD = {"amount_minor": 1, "currency": "USD"}


@pytest.mark.parametrize(
    ("key", "body", "status"),
    [
        (None, _GOOD, 400),
        ("", _GOOD, 400),
        ("k" * 256, _GOOD, 400),
        ("ok", {**_GOOD, "amount_minor": -1}, 400),
        ("ok", {**_GOOD, "amount_minor": 0}, 400),
        ("ok", {**_GOOD, "amount_minor": 10**30}, 400),
        ("ok", {**_GOOD, "amount_minor": 1.5}, 400),
        ("ok", {**_GOOD, "amount_minor": "1"}, 400),
        ("ok", {**_GOOD, "amount_minor": True}, 400),
        ("ok", {**_GOOD, "extra": 1}, 400),
        ("ok", {"amount_minor": 1, "currency": "USD", "account": ""}, 400),
        ("ok", {"currency": "USD"}, 400),
        ("ok", {**_GOOD, "currency": "usd"}, 400),
        ("ok", {**_GOOD, "currency": "EUR"}, 422),
        ("ok", ["not", "an", "object"], 400),
        ("ok", b"\xff\xfe{", 400),
        ("ok", b"{not json", 400),
        ("ok", b"x" * 20_000, 413),
    ],
)
def test_bad_input_is_a_4xx_problem_and_stores_nothing(
    bank: Bank, key: str | None, body: object, status: int
) -> None:
    account = _new()
    if isinstance(body, dict) and "account" not in body:
        body = {**body, "account": account}
    unique_key = None if key is None else (key if key != "ok" else _new())
    headers = {} if unique_key is None else {"Idempotency-Key": unique_key}
    if isinstance(body, bytes):
        headers["content-type"] = "application/json"
        response = httpx.post(f"{bank.url}/collections", content=body, headers=headers, timeout=5)
    else:
        response = httpx.post(f"{bank.url}/collections", json=body, headers=headers, timeout=5)
    assert response.status_code == status
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["status"] == status
    if unique_key and len(unique_key) <= 255:
        assert _stored(bank, unique_key) is None
    assert _balance(bank, account) is None


def test_unknown_route_and_method_are_problems(bank: Bank) -> None:
    missing = httpx.get(f"{bank.url}/nope", timeout=5)
    assert (missing.status_code, missing.headers["content-type"]) == (404, PROBLEM)
    wrong = httpx.get(f"{bank.url}/collections", timeout=5)
    assert (wrong.status_code, wrong.headers["content-type"]) == (405, PROBLEM)


# --- faults -------------------------------------------------------------------------------


def _faults(bank: Bank, **body: object) -> httpx.Response:
    return httpx.put(f"{bank.url}/admin/faults", json=body, timeout=5)


def _metric(bank: Bank, name: str, **labels: str) -> float:
    text = httpx.get(f"{bank.url}/metrics", timeout=5).text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        metric, _, value = line.rpartition(" ")
        if metric.startswith(name + "{") and sorted(
            metric[len(name) + 1 : -1].split(",")
        ) == sorted(wanted.split(",")):
            return float(value)
    return 0.0


def test_admin_faults_validate_and_change_only_what_is_given(bank: Bank) -> None:
    cleared = {"error_rate": 0.0, "latency_ms": 0, "drop_rate": 0.0, "lose_rate": 0.0,
               "seed": None}  # fmt: skip
    assert httpx.get(f"{bank.url}/admin/faults", timeout=5).json() == cleared
    assert _faults(bank, error_rate=0.25, seed=9).json() == {
        **cleared,
        "error_rate": 0.25,
        "seed": 9,
    }
    assert _faults(bank, latency_ms=5).json() == {
        **cleared,
        "error_rate": 0.25,
        "latency_ms": 5,
        "seed": 9,
    }
    for bad in (
        {"error_rate": 1.5},
        {"drop_rate": -0.1},
        {"lose_rate": 1.01},
        {"lose_rate": "1"},
        {"latency_ms": 10_001},
        {"latency_ms": 1.5},
        {"error_rate": "0.5"},
        {"seed": "x"},
        {"other": 1},
    ):
        response = _faults(bank, **bad)
        assert (response.status_code, response.headers["content-type"]) == (400, PROBLEM), bad
    assert httpx.get(f"{bank.url}/admin/faults", timeout=5).json()["error_rate"] == 0.25
    assert httpx.delete(f"{bank.url}/admin/faults", timeout=5).json() == cleared


def test_error_fault_answers_503_without_processing(bank: Bank) -> None:
    injected = _metric(bank, "bank_faults_injected_total", fault="error")
    assert _faults(bank, error_rate=1.0, seed=1).status_code == 200
    key, account = _new(), _new()
    for _ in range(3):
        response = _pay(bank, "/collections", key, account, 5)
        assert (response.status_code, response.headers["content-type"]) == (503, PROBLEM)
    assert _stored(bank, key) is None
    assert _balance(bank, account) is None
    assert key not in _statement_keys(bank)  # reads stay truthful under faults
    assert _metric(bank, "bank_faults_injected_total", fault="error") == injected + 3
    httpx.delete(f"{bank.url}/admin/faults", timeout=5)
    assert _pay(bank, "/collections", key, account, 5).status_code == 201


def test_drop_fault_commits_then_closes_the_connection_without_an_answer(bank: Bank) -> None:
    assert _faults(bank, drop_rate=1.0).status_code == 200
    key, account = _new(), _new()
    started = time.monotonic()
    with pytest.raises(httpx.RemoteProtocolError):
        _pay(bank, "/payouts", key, account, 40, timeout_s=5)
    assert time.monotonic() - started < 2  # a reset, not a hold
    # The next request on a fresh connection is dropped too: the replay is not an answer either.
    with pytest.raises(httpx.RemoteProtocolError):
        _pay(bank, "/payouts", key, account, 40, timeout_s=5)
    stored = _stored(bank, key)
    assert stored is not None
    assert stored["status"] == "succeeded"
    httpx.delete(f"{bank.url}/admin/faults", timeout=5)
    assert _pay(bank, "/payouts", key, account, 40).status_code == 200
    assert _balance(bank, account) == OPENING_MINOR + 40  # applied exactly once
    assert _statement_keys(bank).count(key) == 1


def test_lose_fault_closes_the_connection_and_processes_nothing(bank: Bank) -> None:
    injected = _metric(bank, "bank_faults_injected_total", fault="lose")
    dropped = _metric(bank, "bank_faults_injected_total", fault="drop")
    assert _faults(bank, lose_rate=1.0, drop_rate=1.0, seed=5).status_code == 200
    key, account = _new(), _new()
    for path in ("/collections", "/collections", "/payouts"):
        started = time.monotonic()
        # What the caller sees is what a dropped answer looks like: no response at all.
        with pytest.raises(httpx.RemoteProtocolError):
            _pay(bank, path, key, account, 40, timeout_s=5)
        assert time.monotonic() - started < 2  # a reset, not a hold
    # ... but the bank has no record of it: asking by key is how the two are told apart.
    assert httpx.get(f"{bank.url}/payments/{key}", timeout=5).status_code == 404
    assert _balance(bank, account) is None
    assert key not in _statement_keys(bank)
    assert _metric(bank, "bank_faults_injected_total", fault="lose") == injected + 3
    assert _metric(bank, "bank_faults_injected_total", fault="drop") == dropped  # nothing to drop
    httpx.delete(f"{bank.url}/admin/faults", timeout=5)
    assert _pay(bank, "/collections", key, account, 40).status_code == 201  # the first time
    assert _balance(bank, account) == OPENING_MINOR - 40


def test_lose_dice_leave_the_error_dice_of_a_seed_unchanged(bank: Bank) -> None:
    def pattern(**rates: float) -> list[int]:
        _faults(bank, seed=77, **rates)
        return [_pay(bank, "/payouts", _new(), _new(), 1).status_code for _ in range(24)]

    errors_only = pattern(error_rate=0.5, lose_rate=0.0)
    assert pattern(error_rate=0.5, lose_rate=0.0) == errors_only  # repeatable
    # With losses on, the requests that are not lost are refused exactly as before.
    with_losses: list[int] = []
    _faults(bank, seed=77, error_rate=0.5, lose_rate=0.5)
    for _ in range(24):
        try:
            with_losses.append(_pay(bank, "/payouts", _new(), _new(), 1).status_code)
        except httpx.RemoteProtocolError:
            with_losses.append(0)
    httpx.delete(f"{bank.url}/admin/faults", timeout=5)
    assert 0 in with_losses and 503 in with_losses
    assert all(w in (0, e) for w, e in zip(with_losses, errors_only, strict=True))


def test_latency_fault_delays_payment_answers_only(bank: Bank) -> None:
    assert _faults(bank, latency_ms=300).status_code == 200
    key = _new()
    response = _pay(bank, "/payouts", key, _new(), 5)
    assert response.status_code == 201
    assert response.elapsed.total_seconds() >= 0.3
    lookup = httpx.get(f"{bank.url}/payments/{key}", timeout=5)
    assert lookup.status_code == 200
    assert lookup.elapsed.total_seconds() < 0.3


def test_seeded_faults_repeat(bank: Bank) -> None:
    def pattern() -> list[int]:
        _faults(bank, error_rate=0.5, seed=1234)
        return [_pay(bank, "/payouts", _new(), _new(), 1).status_code for _ in range(16)]

    first, second = pattern(), pattern()
    assert first == second
    assert set(first) == {201, 503}


def test_metrics_count_payments_by_kind_and_status(bank: Bank) -> None:
    before = _metric(bank, "bank_payments_total", kind="payout", status="succeeded")
    _pay(bank, "/payouts", _new(), _new(), 1)
    assert _metric(bank, "bank_payments_total", kind="payout", status="succeeded") == before + 1
    text = httpx.get(f"{bank.url}/metrics", timeout=5).text
    assert (
        'bank_request_duration_seconds_count{method="POST",route="/payouts",status="201"}' in text
    )


def test_logs_are_structured_json_lines(bank: Bank) -> None:
    key = _new()
    _pay(bank, "/payouts", key, _new(), 1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [line for line in bank.log_path.read_text().splitlines() if key in line]
        if lines:
            break
        time.sleep(0.05)
    assert len(lines) == 1
    event = json.loads(lines[0])  # one JSON object per event, like every Kizo process
    assert (event["event"], event["level"], event["process"]) == ("bank_payment", "info", "bank")
    assert "Traceback" not in bank.log_path.read_text()


# --- CLI ----------------------------------------------------------------------------------


def _cli(*args: str, port: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KIZO_BANK_PORT": str(port)}
    return subprocess.run(
        [sys.executable, "-m", "kizo.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


def test_bank_faults_cli_sets_shows_and_clears(bank: Bank) -> None:
    run = _cli(
        "bank-faults", "--error-rate", "0.25", "--latency-ms", "7", "--lose-rate", "0.125",
        "--seed", "3", port=bank.port,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert httpx.get(f"{bank.url}/admin/faults", timeout=5).json() == {
        "error_rate": 0.25,
        "latency_ms": 7,
        "drop_rate": 0.0,
        "lose_rate": 0.125,
        "seed": 3,
    }
    shown = _cli("bank-faults", "--show", port=bank.port)
    assert (shown.returncode, shown.stdout.count("\n")) == (0, 1)
    assert '"error_rate": 0.25' in shown.stdout
    cleared = _cli("bank-faults", "--clear", "--drop-rate", "0.5", port=bank.port)
    assert cleared.returncode == 0, cleared.stderr
    assert httpx.get(f"{bank.url}/admin/faults", timeout=5).json()["error_rate"] == 0.0
    assert httpx.get(f"{bank.url}/admin/faults", timeout=5).json()["drop_rate"] == 0.5


@pytest.mark.parametrize(
    "flags",
    [
        ["--drop-rate", "7"],
        ["--lose-rate", "-0.5"],
        ["--error-rate", "nan"],
        ["--error-rate", "x"],
        ["--latency-ms", "10001"],
        ["--latency-ms", "1.5"],
        ["--seed", "s"],
    ],
)
def test_bank_faults_cli_bad_values_exit_2_with_one_line(bank: Bank, flags: list[str]) -> None:
    bad = _cli("bank-faults", *flags, port=bank.port)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1, bad.stderr
    assert httpx.get(f"{bank.url}/admin/faults", timeout=5).json()["drop_rate"] == 0.0


def test_bank_faults_cli_without_a_bank_exits_1_with_one_line() -> None:
    run = _cli("bank-faults", "--show", port=free_port())
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1
    assert "not reachable" in run.stderr


# --- a second process: drop by holding, graceful stop ---------------------------------------


def test_hold_mode_times_the_caller_out_and_sigterm_drains_then_stops(servers: ServerSet) -> None:
    with tempfile.TemporaryDirectory(prefix="kizo-bank-") as home:
        bank = _start_bank(
            servers, Path(home), KIZO_BANK_DROP_MODE="hold", KIZO_BANK_DROP_HOLD_S="1.5"
        )
        try:
            _faults(bank, drop_rate=1.0)
            key, account = _new(), _new()
            with pytest.raises(httpx.ReadTimeout):
                _pay(bank, "/payouts", key, account, 9, timeout_s=0.5)
            stored = _stored(bank, key)
            assert stored is not None
            assert stored["status"] == "succeeded"
            held = _pay(bank, "/payouts", key, account, 9, timeout_s=5)
            assert (held.status_code, held.headers["content-type"]) == (504, PROBLEM)
            assert _balance(bank, account) == OPENING_MINOR + 9
            _faults(bank, drop_rate=0.0, latency_ms=800)
            with ThreadPoolExecutor(max_workers=1) as pool:
                in_flight = pool.submit(_pay, bank, "/payouts", _new(), account, 1)
                time.sleep(0.3)
                bank.proc.send_signal(signal.SIGTERM)
                assert in_flight.result(timeout=10).status_code == 201  # drained, not cut
            assert bank.proc.wait(timeout=20) == 0
            assert "bank_stopped" in bank.log_path.read_text()
        finally:
            stop_process(bank.proc, timeout_s=5)


@pytest.mark.parametrize("failure", ["port_in_use", "database_down", "bad_setting"])
def test_bank_that_cannot_start_says_why_in_one_line(servers: ServerSet, failure: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {k: v for k, v in os.environ.items() if k != "BANK_DATABASE_URL"}
        env.update(DATABASE_URL=servers.pg_url("kizo"), KIZO_BANK_PORT=str(free_port()))
        if failure == "port_in_use":
            env["KIZO_BANK_PORT"] = str(taken.getsockname()[1])
        elif failure == "database_down":
            env["DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{free_port()}/kizo"
        else:
            env["KIZO_BANK_OPENING_BALANCE_MINOR"] = "-5"
        run = subprocess.run(
            [sys.executable, "-m", "kizo.cli", "bank"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        )
    # a taken address and a bad setting are the operator's to fix (2); a database away is 1
    assert run.returncode == (1 if failure == "database_down" else 2)
    problems = [line for line in run.stderr.splitlines() if line.startswith("kizo")]
    assert len(problems) == 1, run.stderr
    assert "Traceback" not in run.stderr
