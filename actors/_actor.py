"""Per-account actors: a bounded mailbox, drained in batches, one batch in flight at a time.

The actor serializes everything that spends one account's money inside this process, so a hot
source costs no lock waits, and its messages reach the ledger as one batch. An actor is created
on demand and leaves when idle; an error in a batch fails that batch's messages (SAQ retries
their jobs, the ledger makes the retry safe) and the actor carries on.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import structlog

from actors import _metrics as metrics
from actors._committer import Committer
from actors.bank_client import BankClient, BankResult
from engine import Action, Op

log = structlog.get_logger("kizo.actor")

_LOAD = """
SELECT id, kind, status, source_id, dest_id, amount_minor, currency
FROM transactions WHERE id = ANY($1::uuid[])
"""


@dataclass(frozen=True)
class Limits:
    mailbox_size_max: int
    batch_size_max: int
    batch_wait_s: float
    idle_evict_s: float
    submit_timeout_s: float = 30.0


@dataclass
class _Message:
    txn_id: uuid.UUID
    done: asyncio.Future[None]


class Actor:
    def __init__(self, account_id: uuid.UUID, registry: Registry) -> None:
        self.account_id = account_id
        self.registry = registry
        self.mailbox: asyncio.Queue[_Message] = asyncio.Queue(registry.limits.mailbox_size_max)

    async def run(self) -> None:
        limits = self.registry.limits
        while True:
            try:
                first = await asyncio.wait_for(self.mailbox.get(), limits.idle_evict_s)
            except TimeoutError:
                if self.mailbox.empty():  # no await between the check and leaving: no race
                    self.registry.forget(self)
                    return
                continue
            batch = [first, *await self._more(limits)]
            metrics.BATCH_SIZE.observe(len(batch))
            started = time.perf_counter()
            try:
                await self.registry.settle([m.txn_id for m in batch])
            except Exception as exc:  # the supervisor's job: fail the batch, keep the actor
                metrics.BATCHES_FAILED.inc()
                log.warning("batch_failed", account=str(self.account_id), messages=len(batch),
                            error=repr(exc))  # fmt: skip
                for message in batch:
                    if not message.done.done():
                        message.done.set_exception(exc)
                continue
            finally:
                metrics.BATCH_DURATION.observe(time.perf_counter() - started)
            for message in batch:
                if not message.done.done():
                    message.done.set_result(None)

    async def _more(self, limits: Limits) -> list[_Message]:
        """Whatever else arrives within the batch wait, up to the batch size."""
        more: list[_Message] = []
        deadline = asyncio.get_running_loop().time() + limits.batch_wait_s
        while len(more) + 1 < limits.batch_size_max:
            if not self.mailbox.empty():
                more.append(self.mailbox.get_nowait())
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                more.append(await asyncio.wait_for(self.mailbox.get(), remaining))
            except TimeoutError:
                break
        return more


class Registry:
    """The actors of one worker process, owned by its TaskGroup."""

    def __init__(
        self,
        tg: asyncio.TaskGroup,
        pool: asyncpg.Pool,
        committer: Committer,
        bank: BankClient,
        limits: Limits,
        bank_concurrency_max: int = 64,
    ) -> None:
        self.tg = tg
        self.pool = pool
        self.committer = committer
        self.bank = bank
        self.limits = limits
        self._actors: dict[uuid.UUID, Actor] = {}
        self._bank_slots = asyncio.Semaphore(bank_concurrency_max)

    @property
    def active(self) -> int:
        return len(self._actors)

    def mailboxes(self) -> tuple[int, int]:
        """Messages waiting in all mailboxes, and in the deepest one (read at scrape time)."""
        depths = [actor.mailbox.qsize() for actor in list(self._actors.values())]
        return sum(depths), max(depths, default=0)

    def forget(self, actor: Actor) -> None:
        if self._actors.get(actor.account_id) is actor:
            del self._actors[actor.account_id]

    async def submit(self, account_id: uuid.UUID, txn_id: uuid.UUID) -> None:
        """Hand a transaction to its account's actor and wait until its batch committed."""
        actor = self._actors.get(account_id)
        if actor is None:
            actor = Actor(account_id, self)
            self._actors[account_id] = actor
            self.tg.create_task(actor.run())
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await asyncio.wait_for(
            actor.mailbox.put(_Message(txn_id, done)), self.limits.submit_timeout_s
        )
        await done

    async def settle(self, txn_ids: Sequence[uuid.UUID]) -> None:
        """Settle one actor's batch. Most work is transfers, which need nothing but the ledger:
        every id goes to the ledger as a TRANSFER first (for a deposit or withdrawal that is a
        no-op, reported as not applied), and only what is left is loaded and handled."""
        ids = list(dict.fromkeys(txn_ids))
        first = await self.committer.apply([Op(t, Action.TRANSFER) for t in ids])
        rest = [o.txn_id for o in first if not o.applied and o.status in ("pending", "processing")]
        if not rest:
            return
        rows = await self.pool.fetch(_LOAD, rest)
        holds = [
            Op(r["id"], Action.HOLD)
            for r in rows
            if r["kind"] == "withdrawal" and r["status"] == "pending"
        ]
        outcomes = await self.committer.apply(holds)
        held = {o.txn_id for o in outcomes if o.status == "processing"}
        to_bank = [
            r
            for r in rows
            if (r["kind"] == "withdrawal" and (r["id"] in held or r["status"] == "processing"))
            or (r["kind"] == "deposit" and r["status"] in ("pending", "processing"))
        ]
        results = await asyncio.gather(*(self._call_bank(r) for r in to_bank))
        await self.committer.apply(
            [op for r, res in zip(to_bank, results, strict=True) if (op := _after_bank(r, res))]
        )

    async def _call_bank(self, row: asyncpg.Record) -> BankResult:
        async with self._bank_slots:
            if row["kind"] == "deposit":
                return await self.bank.collect(
                    row["id"], row["dest_id"], row["amount_minor"], row["currency"]
                )
            return await self.bank.payout(
                row["id"], row["source_id"], row["amount_minor"], row["currency"]
            )


def _after_bank(row: asyncpg.Record, result: BankResult) -> Op | None:
    """The ledger op a bank answer calls for; None leaves the transaction for the janitor."""
    deposit = row["kind"] == "deposit"
    if result.outcome == "succeeded":
        return Op(row["id"], Action.CREDIT if deposit else Action.POST)
    if result.outcome == "failed":
        return Op(row["id"], Action.FAIL if deposit else Action.RELEASE, result.failure_reason)
    if result.outcome == "unsent":  # never reached the bank: a deposit stays pending
        return None
    return Op(row["id"], Action.MARK_PROCESSING) if deposit else None
