"""Password hashing in its own processes: answers, pauses while payments are in flight, bounded
pauses, recovery when a hashing process dies, the adaptive budget, and admission with a
deadline."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from api._auth import Passwords
from api._hashing import HashBudget
from api._problems import Problem
from infra.config import AuthConfig

# The OWASP configuration with the least memory: quick, and still a legal setting.
CONFIG = dataclasses.replace(
    AuthConfig(), pepper="hashing-test-pepper-0123", argon2_memory_kib=7_168, argon2_time_cost=5
)
HOLD_MAX_S = CONFIG.hash_hold_ms / 1000


@pytest_asyncio.fixture
async def passwords() -> AsyncIterator[Passwords]:
    p = Passwords(CONFIG)
    await p.warm_up()
    try:
        yield p
    finally:
        await p.aclose()


def _hashing_pids(p: Passwords) -> list[int]:
    return [w._proc.pid for w in p._workers if w._proc is not None]


@pytest.mark.asyncio
async def test_hash_and_verify_with_pepper(passwords: Passwords) -> None:
    stored = await passwords.hash("correct horse battery")
    assert stored.startswith("$argon2id$v=19$m=7168,t=5,p=1$")
    assert await passwords.verify(stored, "correct horse battery")
    assert not await passwords.verify(stored, "correct horse batterY")
    assert not await passwords.verify(None, "correct horse battery")  # unknown user: dummy
    assert not await passwords.verify("not\ta hash", "x")  # never confuses the protocol
    other = Passwords(dataclasses.replace(CONFIG, pepper="another-pepper"))
    try:
        assert not await other.verify(stored, "correct horse battery")
    finally:
        await other.aclose()


@pytest.mark.asyncio
async def test_a_hash_waits_while_a_payment_is_in_flight(passwords: Passwords) -> None:
    passwords.budget.share = passwords.budget.share_min  # payments have been slow
    hold_s = passwords.budget.hold_s(HOLD_MAX_S)
    with passwords.held_off():
        pending = asyncio.ensure_future(passwords.hash("correct horse battery"))
        done, _ = await asyncio.wait([pending], timeout=hold_s / 2)
        assert not done, "the hash ran although a payment was in flight"
    assert (await asyncio.wait_for(pending, 10)).startswith("$argon2id$")


@pytest.mark.asyncio
async def test_a_hash_is_held_off_for_a_bounded_time_only(passwords: Passwords) -> None:
    with passwords.held_off():
        # Still inside: sign-ins go through under a steady stream of payments.
        assert (await asyncio.wait_for(passwords.hash("pw-12345678"), 10)).startswith("$argon2")
        assert await asyncio.wait_for(passwords.verify(None, "pw-12345678"), 10) is False


@pytest.mark.asyncio
async def test_a_dead_hashing_process_costs_one_503_then_is_replaced(
    passwords: Passwords,
) -> None:
    [pid] = _hashing_pids(passwords)
    passwords.budget.share = passwords.budget.share_min  # so that the hash is surely paused
    with passwords.held_off():  # paused mid-hash, then killed: the worst moment
        pending = asyncio.ensure_future(passwords.hash("correct horse battery"))
        await asyncio.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(Problem) as refused:
            await asyncio.wait_for(pending, 10)
    assert (refused.value.status, refused.value.headers) == (503, {"Retry-After": "1"})
    assert (await passwords.hash("correct horse battery")).startswith("$argon2id$")
    assert _hashing_pids(passwords) != [pid]


def test_the_budget_halves_when_payments_are_slow_and_grows_back_while_they_are_fast() -> None:
    budget = HashBudget(target_s=0.05, share_min=0.05, share_step=0.1, window_s=0.5)
    budget.observe(0.01, now=100.0)  # opens the first window
    start = budget.share
    for i in range(19):  # one slow payment in twenty is noise: no change
        budget.observe(0.2 if i == 0 else 0.01, now=100.1)
    budget.observe(0.01, now=100.6)  # the window closes
    assert budget.share == start
    budget.observe(0.2, now=100.7)  # a slow half of this window...
    budget.observe(0.01, now=100.8)
    budget.observe(0.01, now=101.2)  # ...halves the share when it closes
    assert budget.share == pytest.approx(start / 2)
    for i in range(30):  # slow windows, one after another: down to the floor, not below
        budget.observe(0.2, now=101.3 + 0.6 * i)
    assert budget.share == budget.share_min
    assert budget.hold_s(0.1) == pytest.approx(0.1 * (1 - budget.share_min))
    budget.observe(0.01, now=200.0)  # a long quiet time: the CPU was there to take
    budget.advance(now=210.0)
    assert budget.share == 1.0
    assert (budget.rest_s(0.02), budget.hold_s(0.1)) == (0.0, 0.0)
    budget.share = 0.25  # a quarter of a core: rest three times the CPU a hash took
    assert budget.rest_s(0.02) == pytest.approx(0.06)


@pytest.mark.asyncio
async def test_sign_ins_beyond_the_deadline_are_refused_at_once_with_retry_after() -> None:
    deadline_s = 0.5
    p = Passwords(dataclasses.replace(CONFIG, signin_deadline_s=deadline_s))
    await p.warm_up()
    outcomes: list[tuple[float, int, int]] = []  # (seconds, status, Retry-After)

    async def sign_in() -> None:
        started = time.monotonic()
        try:
            await p.verify(None, "pw-12345678")
            outcomes.append((time.monotonic() - started, 200, 0))
        except Problem as refused:
            retry = int(refused.headers["Retry-After"])
            outcomes.append((time.monotonic() - started, refused.status, retry))

    try:
        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(sign_in() for _ in range(200))), 30)
        took_s = time.monotonic() - started
    finally:
        await p.aclose()
    served = [o for o in outcomes if o[1] == 200]
    refused = [o for o in outcomes if o[1] != 200]
    assert served, "nothing was served"
    assert refused, "200 sign-ins at once on one process all fit in half a second?"
    assert {status for _, status, _ in refused} == {503}
    assert all(retry >= 1 for *_, retry in refused)
    at_once = [o for o in refused if o[0] < deadline_s / 2]
    assert len(at_once) >= len(refused) / 2, "the line's estimate refused too few at once"
    # Nobody waits past the deadline for a hashing process: only the hash in progress then.
    assert took_s < deadline_s + 1.0


def _count(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


@pytest.mark.asyncio
async def test_a_sign_in_that_waited_long_enough_is_neither_rested_nor_paused() -> None:
    # Payments slow (the budget at its floor: a rest of 19 hashes' CPU after each) and one in
    # flight all along: a budget alone would make a line of five wait seconds. Every one of
    # these has waited signin_urgent_s (0 here): no rest, no pause, normal priority.
    p = Passwords(dataclasses.replace(CONFIG, signin_urgent_s=0.0))
    await p.warm_up()
    try:
        p.budget.share = p.budget.share_min
        pauses, urgent = _count("kizo_hashing_pauses_total"), _count("kizo_hashing_urgent_total")
        rests_s = 4 * p.budget.rest_s(0.015)  # what the budget would make the line wait
        started = time.monotonic()
        with p.held_off():
            await asyncio.wait_for(
                asyncio.gather(*(p.verify(None, "pw-12345678") for _ in range(5))), 10
            )
        took_s = time.monotonic() - started
    finally:
        await p.aclose()
    assert _count("kizo_hashing_pauses_total") == pauses
    assert _count("kizo_hashing_urgent_total") == urgent + 5
    assert took_s < rests_s, (took_s, rests_s)


@pytest.mark.asyncio
async def test_the_line_estimate_counts_on_urgent_service_past_the_urgent_wait() -> None:
    p = Passwords(dataclasses.replace(CONFIG, signin_urgent_s=2.0, signin_deadline_s=10.0))
    p._hash_s, p._urgent_hash_s = 0.5, 0.02  # paced: a rest after every hash
    p._waiting = 3
    assert p.expected_wait_s() == pytest.approx(4 * 0.5)  # the paced line is the shorter
    p._waiting = 99
    assert p.expected_wait_s() == pytest.approx(2.0 + 100 * 0.02)  # not 50 s: admitted
    await p.aclose()
