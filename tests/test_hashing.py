"""Password hashing in its own processes: answers, pauses while payments are in flight, bounded
pauses, and recovery when a hashing process dies."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from api._auth import Passwords
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
    with passwords.held_off():
        pending = asyncio.ensure_future(passwords.hash("correct horse battery"))
        done, _ = await asyncio.wait([pending], timeout=HOLD_MAX_S / 2)
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
    with passwords.held_off():  # paused mid-hash, then killed: the worst moment
        pending = asyncio.ensure_future(passwords.hash("correct horse battery"))
        await asyncio.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(Problem) as refused:
            await asyncio.wait_for(pending, 10)
    assert (refused.value.status, refused.value.headers) == (503, {"Retry-After": "1"})
    assert (await passwords.hash("correct horse battery")).startswith("$argon2id$")
    assert _hashing_pids(passwords) != [pid]
