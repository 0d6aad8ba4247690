"""Group commit: the batches of many actors become one ``engine.apply_batch`` call.

A hot destination (a merchant everyone pays) has its balance row locked by every batch that
pays it; merging the actors' batches means one lock and one commit per group instead of one per
actor. ``flushers`` groups are in flight at once, each on its own pool connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import structlog

from actors import _metrics as metrics
from engine import Op, Outcome, apply_batch

log = structlog.get_logger("kizo.committer")


@dataclass
class _Submission:
    ops: Sequence[Op]
    done: asyncio.Future[list[Outcome]]


class Committer:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        ops_max: int,
        flushers: int,
        queue_max: int = 10_000,
        mutation: str = "",
    ) -> None:
        self.pool = pool
        self.mutation = mutation  # "" but in a chaos harness's broken build (Config.mutation)
        self.ops_max = ops_max
        self.flushers = flushers
        self._queue: asyncio.Queue[_Submission] = asyncio.Queue(maxsize=queue_max)
        self.groups = 0
        self.ops = 0

    async def apply(self, ops: Sequence[Op]) -> list[Outcome]:
        """Apply ``ops`` in some group; returns their outcomes once that group has committed."""
        if not ops:
            return []
        done: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Submission(ops, done))
        return await done

    async def run(self) -> None:
        """Run the flushers until cancelled."""
        async with asyncio.TaskGroup() as tg:
            for _ in range(self.flushers):
                tg.create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while True:
            group = [await self._queue.get()]
            size = len(group[0].ops)
            while size < self.ops_max and not self._queue.empty():
                item = self._queue.get_nowait()
                group.append(item)
                size += len(item.ops)
            await self._flush(group)

    async def _flush(self, group: list[_Submission]) -> None:
        ops = [op for item in group for op in item.ops]
        started = time.perf_counter()
        try:
            outcomes = await apply_batch(self.pool, ops, mutation=self.mutation)
        except Exception as exc:  # every waiter learns the group failed; their jobs retry
            metrics.GROUPS_FAILED.inc()
            log.warning("group_failed", ops=len(ops), error=repr(exc))
            for item in group:
                if not item.done.done():
                    item.done.set_exception(exc)
            return
        self.groups += 1
        self.ops += len(ops)
        metrics.GROUP_DURATION.observe(time.perf_counter() - started)
        metrics.GROUP_OPS.observe(len(ops))
        metrics.record_final(outcomes)
        start = 0
        for item in group:
            if not item.done.done():
                item.done.set_result(outcomes[start : start + len(item.ops)])
            start += len(item.ops)
