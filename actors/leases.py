"""Shard leases: workers on any number of hosts share the shards with no coordinator.

Each worker started with ``--lease`` takes part in rounds (every ``ttl / 3``), each one Lua
script on Redis, atomic, timed by Redis's clock (hosts' clocks may disagree):

1. the worker's heartbeat goes into a sorted set of workers; members silent for longer than the
   lease's time to live are dropped from it;
2. its fair share is ``ceil(shards / live workers)``;
3. every lease it still holds is renewed for another ``ttl``; one that expired and went to
   another worker is no longer its own (a worker paused longer than ``ttl`` loses its shards);
4. while it holds fewer than its share, it takes free shards (``SET NX PX``), starting at a
   point of its own (crc32 of its id) so that workers starting together spread out.

The round answers the shards held and the share. The worker consumes exactly the shards it holds;
it hands surplus ones back (a new worker joined) only after it stopped consuming them
(``release``: deletes the lease if it is still its own). A worker that dies holds its leases
until they expire: its shards are consumed again within ``ttl`` plus one round.

During a takeover two workers may briefly run the same accounts' actors (the old one paused, not
dead, then resumed before it noticed): money stays safe because every batch takes the rows'
locks in order and the final-state guard lets an intent become final once (docs/pipeline.md).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from redis.asyncio import Redis

PREFIX = "kizo:shard-lease:"

_ROUND = """
local me, shards, ttl, prefix, start = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4],
    tonumber(ARGV[5])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local members = prefix .. 'workers'
redis.call('ZADD', members, now, me)
redis.call('ZREMRANGEBYSCORE', members, '-inf', now - ttl)
local live = redis.call('ZCARD', members)
local share = math.ceil(shards / live)
local held = {}
for s = 0, shards - 1 do
    local key = prefix .. s
    if redis.call('GET', key) == me then
        redis.call('PEXPIRE', key, ttl)
        held[#held + 1] = s
    end
end
for i = 0, shards - 1 do
    if #held >= share then break end
    local s = (start + i) % shards
    if redis.call('SET', prefix .. s, me, 'NX', 'PX', ttl) then
        held[#held + 1] = s
    end
end
return {live, share, held}
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

_LEAVE = """
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
"""


@dataclass(frozen=True)
class Round:
    live: int  # workers that took part in a round within the time to live
    share: int  # how many shards this worker should hold
    held: frozenset[int]  # the shards it holds now


class ShardLeases:
    def __init__(self, redis: Redis, worker_id: str, shards: int, ttl_s: float,
                 prefix: str = PREFIX) -> None:  # fmt: skip
        self._redis = redis
        self.worker_id = worker_id
        self.shards = shards
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.prefix = prefix
        self._start = zlib.crc32(worker_id.encode()) % shards

    @property
    def round_every_s(self) -> float:
        return self.ttl_ms / 3000

    async def round(self) -> Round:
        live, share, held = await self._redis.eval(
            _ROUND, 0, self.worker_id, self.shards, self.ttl_ms, self.prefix, self._start
        )
        return Round(int(live), int(share), frozenset(int(s) for s in held))

    async def release(self, shard: int) -> bool:
        """Hands ``shard`` back (once this worker has stopped consuming it); False if it was no
        longer this worker's."""
        released = await self._redis.eval(_RELEASE, 1, f"{self.prefix}{shard}", self.worker_id)
        return bool(released)

    async def leave(self, held: frozenset[int]) -> None:
        """A clean stop: hands every shard back and leaves the workers' set at once, so the
        others take the shards at their next round instead of after the time to live."""
        for shard in sorted(held):
            await self.release(shard)
        await self._redis.eval(_LEAVE, 1, f"{self.prefix}workers", self.worker_id)


def surplus(held: frozenset[int], share: int) -> list[int]:
    """The shards to hand back when holding more than the share (the highest numbers)."""
    return sorted(held)[share:] if len(held) > share else []
