"""Workers on many hosts: shard leases (actors/leases.py) on the real Valkey, then two real
``kizo worker --lease`` processes sharing the shards, one killed mid-batch."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import time
import uuid

import pytest
from redis.asyncio import Redis

from actors.janitor import JanitorDeps
from actors.leases import PREFIX, ShardLeases, surplus
from engine import NewIntent
from tests._ledger_helpers import intents
from tests._pipeline_helpers import (
    SHARDS,
    bank_funded,
    enqueue,
    janitor_deps,
    janitor_until_quiet,
    stop_worker,
    until_some_final,
    wait_final,
    with_janitor,
)
from tests.conftest import BankProcess, ServerSet, kizo_env
from tests.test_pipeline_faults import FAST

LEASE_TTL_S = 3.0


async def _holders(redis: Redis, shards: int, prefix: str = PREFIX) -> dict[int, str | None]:
    values = await redis.mget([f"{prefix}{s}" for s in range(shards)])
    return {s: (v.decode() if isinstance(v, bytes) else v) or None for s, v in enumerate(values)}


async def _settle_round(leases: list[ShardLeases]) -> dict[str, frozenset[int]]:
    """One round each, surplus handed back as a worker does; returns what each holds."""
    held = {}
    for lease in leases:
        now = await lease.round()
        for s in surplus(now.held, now.share):
            assert await lease.release(s)
        held[lease.worker_id] = now.held - set(surplus(now.held, now.share))
    return held


def _disjoint(held: dict[str, frozenset[int]]) -> None:
    seen: set[int] = set()
    for shards in held.values():
        assert not (seen & shards), f"a shard held twice: {held}"
        seen |= shards


@pytest.mark.asyncio
async def test_leases_share_take_over_and_never_overlap(redis_client: Redis) -> None:
    prefix = f"test-lease-{uuid.uuid4().hex[:6]}:"
    a, b, c = (ShardLeases(redis_client, name, 8, 0.6, prefix) for name in "abc")
    assert (await a.round()).held == frozenset(range(8))  # alone: every shard
    now_b = await b.round()
    assert (now_b.live, now_b.share, now_b.held) == (2, 4, frozenset())  # none free yet
    for _ in range(3):  # a hands back its surplus, b takes it
        held = await _settle_round([a, b])
        _disjoint(held)
    assert sorted(len(h) for h in held.values()) == [4, 4]
    held = await _settle_round([a, b, c])
    for _ in range(3):
        held = await _settle_round([a, b, c])
        _disjoint(held)
    assert sorted(len(h) for h in held.values()) == [2, 3, 3]
    assert set().union(*held.values()) == set(range(8))
    # a stops renewing (dead, or paused): after the time to live the others take its shards
    a_had = held["a"]
    await asyncio.sleep(0.7)
    for _ in range(3):
        held = await _settle_round([b, c])
        _disjoint(held)
    assert set().union(*held.values()) == set(range(8))
    assert sorted(len(h) for h in held.values()) == [4, 4]
    # a resumes: it learns its shards are gone instead of consuming them with the new holders
    back = await a.round()
    assert not (back.held & (held["b"] | held["c"]))
    assert a_had - back.held, "a kept shards that expired"
    assert not await a.release(min(held["b"]))  # not a's to hand back


def _lease_worker(servers: ServerSet, db_url: str, bank_url: str) -> subprocess.Popen[bytes]:
    port = bank_url.rsplit(":", 1)[1]
    env = kizo_env(servers, db_url, KIZO_SHARDS=str(SHARDS), KIZO_BANK_PORT=port,
                   KIZO_SHARD_LEASE_TTL_S=str(LEASE_TTL_S))  # fmt: skip
    return subprocess.Popen([sys.executable, "-m", "kizo.cli", "worker", "--lease"], env=env)


async def _until(check: object, timeout_s: float, what: str) -> float:
    """Seconds until ``check()`` (an async callable) is true; bounded."""
    started = time.monotonic()
    while not await check():  # type: ignore[operator]
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


@pytest.mark.asyncio
async def test_two_lease_workers_one_killed_mid_batch_every_intent_settled_once(
    servers: ServerSet, db_url: str, own_bank: BankProcess, pool: object, redis_client: Redis
) -> None:
    async with janitor_deps(pool, redis_client, own_bank.url, FAST) as deps:  # type: ignore[arg-type]
        await _run_two_workers(servers, db_url, own_bank, deps, redis_client)


async def _run_two_workers(servers: ServerSet, db_url: str, own_bank: BankProcess,
                           deps: JanitorDeps, redis: Redis) -> None:  # fmt: skip
    rng = random.Random(5)
    users = await bank_funded(deps.pool, deps.bank, [50_000] * 40)
    pairs = [rng.sample(users, 2) for _ in range(1500)]
    new = [NewIntent("transfer", a, b, rng.randint(1, 100)) for a, b in pairs]
    ids = await intents(deps.pool, new)
    workers = [_lease_worker(servers, db_url, own_bank.url) for _ in range(2)]
    try:

        async def shared() -> bool:
            holders = await _holders(redis, SHARDS)
            return None not in holders.values() and len(set(holders.values())) == 2

        await _until(shared, 30, "two workers sharing the shards")
        await enqueue(deps.pool, servers.redis_url, ids)
        done = await until_some_final(deps.pool, ids)
        # the victim: a worker holding shards now (under load one may hold them all for a while)
        holding = {h.split(":")[1] for h in (await _holders(redis, SHARDS)).values() if h}
        victim = next(w for w in workers if str(w.pid) in holding)
        survivor = next(w for w in workers if w is not victim)
        assert stop_worker(victim, signal.SIGKILL) == -signal.SIGKILL
        assert 0 < done < len(ids)

        async def taken_over() -> bool:
            holders = set((await _holders(redis, SHARDS)).values())
            return len(holders) == 1 and str(survivor.pid) in str(holders.pop()).split(":")

        took_s = await _until(taken_over, LEASE_TTL_S * 4 + 5, "the dead worker's shards taken")
        # the bound: the time to live, then the survivor's next round (a third of it), plus slack
        assert took_s <= LEASE_TTL_S * 4 / 3 + 3.0, took_s
        # the dead worker's jobs were "active" in SAQ: the janitor re-drives their intents
        await with_janitor(deps, wait_final(deps.pool, ids, timeout_s=90))
    finally:
        for worker in workers:
            stop_worker(worker)
    summary = await janitor_until_quiet(deps)
    assert summary.findings == []
    postings = await deps.pool.fetchval(
        "SELECT count(*) FROM postings p JOIN transactions t ON t.id = p.transaction_id"
        " WHERE t.kind = 'transfer'"
    )
    settled = await deps.pool.fetchval(
        "SELECT count(*) FROM transactions WHERE kind = 'transfer' AND status = 'settled'"
    )
    assert settled > 0 and postings == 2 * settled  # each settled exactly once


def test_kizo_up_starts_lease_workers_when_asked() -> None:
    from infra.config import Config
    from infra.processes import children

    leased = Config.from_env({"KIZO_WORKER_LEASES": "1", "KIZO_WORKERS": "2"})
    fixed = Config.from_env({"KIZO_WORKERS": "2"})
    lease_args = [c.args[:2] for c in children(leased) if c.role == "worker"]
    assert lease_args == [["worker", "--lease"]] * 2
    assert [c.args[1:5] for c in children(fixed) if c.role == "worker"] == [
        ["--index", "0", "--of", "2"],
        ["--index", "1", "--of", "2"],
    ]


def test_lease_with_fixed_shards_is_a_usage_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kizo.cli", "worker", "--lease", "--of", "2"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "--lease takes no --shards" in done.stderr and "Traceback" not in done.stderr
