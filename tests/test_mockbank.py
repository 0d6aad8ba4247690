"""The mock bank, as a real process: idempotent payments, statement, faults, bad input."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid

import httpx
import pytest

from tests.conftest import BankProcess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pay(
    bank_url: str, path: str, key: str, account: str, amount: int, **kw: object
) -> httpx.Response:
    body = {"account": account, "amount_minor": amount, "currency": "USD", **kw}
    return httpx.post(f"{bank_url}{path}", json=body, headers={"Idempotency-Key": key}, timeout=10)


def _balance(bank_url: str, account: str) -> int:
    response = httpx.get(f"{bank_url}/admin/accounts/{account}", timeout=5)
    assert response.status_code == 200
    return int(response.json()["balance_minor"])


def test_collection_and_payout_move_money_once_per_key(bank_url: str) -> None:
    account, key = str(uuid.uuid4()), str(uuid.uuid4())
    first = _pay(bank_url, "/collections", key, account, 2500)
    assert first.status_code == 201
    assert first.json()["status"] == "succeeded"
    assert first.json()["kind"] == "collection"
    replay = _pay(bank_url, "/collections", key, account, 2500)
    assert (replay.status_code, replay.json()) == (200, first.json())
    assert _balance(bank_url, account) == 100_000_000 - 2500
    payout = _pay(bank_url, "/payouts", str(uuid.uuid4()), account, 1000)
    assert payout.status_code == 201
    assert _balance(bank_url, account) == 100_000_000 - 1500
    assert httpx.get(f"{bank_url}/payments/{key}", timeout=5).json() == first.json()


def test_same_key_different_body_is_422_and_changes_nothing(bank_url: str) -> None:
    account, key = str(uuid.uuid4()), str(uuid.uuid4())
    assert _pay(bank_url, "/collections", key, account, 100).status_code == 201
    conflict = _pay(bank_url, "/collections", key, account, 101)
    assert conflict.status_code == 422
    assert conflict.headers["content-type"] == "application/problem+json"
    assert _pay(bank_url, "/payouts", key, account, 100).status_code == 422
    assert _balance(bank_url, account) == 100_000_000 - 100


def test_insufficient_funds_is_a_definite_failed_payment(bank_url: str) -> None:
    account = str(uuid.uuid4())
    assert (
        httpx.put(
            f"{bank_url}/admin/accounts/{account}", json={"balance_minor": 50}, timeout=5
        ).status_code
        == 200
    )
    response = _pay(bank_url, "/collections", str(uuid.uuid4()), account, 51)
    assert response.status_code == 201
    assert (response.json()["status"], response.json()["failure_reason"]) == (
        "failed",
        "insufficient_funds",
    )
    assert _balance(bank_url, account) == 50


@pytest.mark.asyncio
async def test_concurrent_requests_with_one_key_make_one_payment(bank_url: str) -> None:
    account, key = str(uuid.uuid4()), str(uuid.uuid4())
    body = {"account": account, "amount_minor": 700, "currency": "USD"}
    async with httpx.AsyncClient(base_url=bank_url, timeout=10) as client:
        responses = await asyncio.gather(
            *(
                client.post("/collections", json=body, headers={"Idempotency-Key": key})
                for _ in range(20)
            )
        )
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 19 + [201]
    assert _balance(bank_url, account) == 100_000_000 - 700


def test_unknown_key_is_404(bank_url: str) -> None:
    response = httpx.get(f"{bank_url}/payments/{uuid.uuid4()}", timeout=5)
    assert response.status_code == 404
    assert response.json()["status"] == 404


def test_statement_pages_through_succeeded_payments_in_order(bank_url: str) -> None:
    keys = [str(uuid.uuid4()) for _ in range(5)]
    for key in keys:
        assert _pay(bank_url, "/payouts", key, str(uuid.uuid4()), 10).status_code == 201
    seen: list[str] = []
    all_items = httpx.get(f"{bank_url}/statement", params={"limit": 1000}, timeout=5).json()
    cursor = None
    for _ in range(100):
        params: dict[str, str | int] = {"limit": 2}
        if cursor is not None:
            params["since"] = cursor
        page = httpx.get(f"{bank_url}/statement", params=params, timeout=5).json()
        assert len(page["items"]) <= 2
        seen.extend(item["key"] for item in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen[-5:] == keys
    assert len(seen) >= len(all_items["items"])


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({}, {"account": "a", "amount_minor": 1, "currency": "USD"}, 400),
        ({"Idempotency-Key": "k1"}, {"account": "a", "amount_minor": -1, "currency": "USD"}, 400),
        (
            {"Idempotency-Key": "k2"},
            {"account": "a", "amount_minor": 10**30, "currency": "USD"},
            400,
        ),
        ({"Idempotency-Key": "k3"}, {"account": "a", "amount_minor": 1.5, "currency": "USD"}, 400),
        (
            {"Idempotency-Key": "k4"},
            {"account": "a", "amount_minor": 1, "currency": "USD", "x": 1},
            400,
        ),
        ({"Idempotency-Key": "k5"}, {"account": "a", "amount_minor": "1", "currency": "USD"}, 400),
    ],
)
def test_bad_input_is_a_4xx_problem_and_stores_nothing(
    bank_url: str, headers: dict[str, str], body: dict[str, object], status: int
) -> None:
    response = httpx.post(f"{bank_url}/collections", json=body, headers=headers, timeout=5)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    key = headers.get("Idempotency-Key")
    if key:
        assert httpx.get(f"{bank_url}/payments/{key}", timeout=5).status_code == 404


def test_non_json_and_bad_cursor_are_400(bank_url: str) -> None:
    raw = httpx.post(
        f"{bank_url}/collections",
        content=b"\xff\xfe{",
        timeout=5,
        headers={"Idempotency-Key": "nj", "content-type": "application/json"},
    )
    assert raw.status_code == 400
    assert httpx.get(f"{bank_url}/statement", params={"since": "abc"}, timeout=5).status_code == 400
    assert (
        httpx.put(f"{bank_url}/admin/faults", json={"error_rate": 2}, timeout=5).status_code == 400
    )


def test_error_fault_answers_503_without_processing(bank_url: str) -> None:
    httpx.put(f"{bank_url}/admin/faults", json={"error_rate": 1.0, "seed": 1}, timeout=5)
    key = str(uuid.uuid4())
    assert _pay(bank_url, "/payouts", key, str(uuid.uuid4()), 5).status_code == 503
    assert httpx.get(f"{bank_url}/payments/{key}", timeout=5).status_code == 404


def test_drop_fault_processes_but_the_caller_never_hears(bank_url: str) -> None:
    httpx.put(f"{bank_url}/admin/faults", json={"drop_rate": 1.0}, timeout=5)
    key, account = str(uuid.uuid4()), str(uuid.uuid4())
    with pytest.raises(httpx.TimeoutException):
        _pay_with_timeout(bank_url, key, account)
    httpx.delete(f"{bank_url}/admin/faults", timeout=5)
    found = httpx.get(f"{bank_url}/payments/{key}", timeout=5)
    assert found.status_code == 200
    assert found.json()["status"] == "succeeded"
    # A retry with the same key is answered from the record: paid exactly once.
    assert _pay(bank_url, "/payouts", key, account, 40).status_code == 200
    assert _balance(bank_url, account) == 100_000_000 + 40


def _pay_with_timeout(bank_url: str, key: str, account: str) -> None:
    httpx.post(
        f"{bank_url}/payouts",
        json={"account": account, "amount_minor": 40, "currency": "USD"},
        headers={"Idempotency-Key": key},
        timeout=1.0,
    )


def test_latency_fault_delays_answers(bank_url: str) -> None:
    httpx.put(f"{bank_url}/admin/faults", json={"latency_ms": 300}, timeout=5)
    response = _pay(bank_url, "/payouts", str(uuid.uuid4()), str(uuid.uuid4()), 5)
    assert response.status_code == 201
    assert response.elapsed.total_seconds() >= 0.3


def test_bank_faults_cli_talks_to_the_running_bank(bank: BankProcess, bank_url: str) -> None:
    port = bank_url.rsplit(":", 1)[1]
    env = {**os.environ, "KIZO_BANK_PORT": port}
    run = subprocess.run(
        [sys.executable, "-m", "kizo.cli", "bank-faults", "--error-rate", "0.25", "--seed", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    assert httpx.get(f"{bank_url}/admin/faults", timeout=5).json()["error_rate"] == 0.25
    bad = subprocess.run(
        [sys.executable, "-m", "kizo.cli", "bank-faults", "--drop-rate", "7"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
