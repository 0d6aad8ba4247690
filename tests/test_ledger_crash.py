"""Killing the process in the middle of a batch leaves a ledger that passes every audit."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from engine import Action, NewIntent, Op, apply_batch, audit
from tests._ledger_helpers import funded, intents

TRANSFERS = 20_000
WAIT_S = 60.0


async def _in_transaction(pool: asyncpg.Pool) -> bool:
    return bool(
        await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = 'kizo-crash-child' AND xact_start IS NOT NULL"
        )
    )


async def _settled(pool: asyncpg.Pool) -> int:
    count = await pool.fetchval(
        "SELECT count(*) FROM transactions WHERE kind = 'transfer' AND status <> 'pending'"
    )
    assert isinstance(count, int)
    return count


@pytest.mark.asyncio
async def test_sigkill_mid_batch_leaves_the_ledger_consistent(
    pool: asyncpg.Pool, db_url: str
) -> None:
    rng = random.Random(3)
    users = await funded(pool, [50_000] * 200)
    pairs = [rng.sample(users, 2) for _ in range(TRANSFERS)]
    await intents(pool, [NewIntent("transfer", a, b, rng.randint(1, 500)) for a, b in pairs])
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__).with_name("_crash_child.py")),
        db_url,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    try:
        deadline = time.monotonic() + WAIT_S
        # Kill only once some batches have committed and the child is inside a transaction.
        while not (await _settled(pool) > 0 and await _in_transaction(pool)):
            assert child.returncode is None, "the child finished before it could be killed"
            assert time.monotonic() < deadline, "the child never got going"
            await asyncio.sleep(0.005)
        child.send_signal(signal.SIGKILL)
        await asyncio.wait_for(child.wait(), 10)
    finally:
        if child.returncode is None:
            child.kill()
            await asyncio.wait_for(child.wait(), 10)
    settled_at_kill = await _settled(pool)
    assert 0 < settled_at_kill < TRANSFERS  # killed mid-run, not before or after

    assert await audit(pool) == []

    # The rest settles on a second run; what the killed batch had not committed is applied once.
    pending = [
        r["id"]
        for r in await pool.fetch(
            "SELECT id FROM transactions WHERE kind = 'transfer' AND status = 'pending'"
        )
    ]
    for start in range(0, len(pending), 1000):
        await apply_batch(pool, [Op(t, Action.TRANSFER) for t in pending[start : start + 1000]])
    assert await _settled(pool) == TRANSFERS
    assert await audit(pool) == []
    postings = await pool.fetchval(
        "SELECT count(*) FROM postings p JOIN transactions t ON t.id = p.transaction_id"
        " WHERE t.kind = 'transfer'"
    )
    settled = await pool.fetchval(
        "SELECT count(*) FROM transactions WHERE kind = 'transfer' AND status = 'settled'"
    )
    assert postings == 2 * settled
