"""Child process for the crash test: settles pending transfers in large batches until killed."""

from __future__ import annotations

import asyncio
import sys

import asyncpg

from engine import Action, Op, apply_batch

BATCH = 500
ROUNDS_MAX = 10_000


async def main(url: str) -> None:
    conn = await asyncpg.connect(url, server_settings={"application_name": "kizo-crash-child"})
    for _ in range(ROUNDS_MAX):
        ids = await conn.fetch(
            "SELECT id FROM transactions WHERE kind = 'transfer' AND status = 'pending'"
            " ORDER BY random() LIMIT $1",
            BATCH,
        )
        if not ids:
            return
        await apply_batch(conn, [Op(r["id"], Action.TRANSFER) for r in ids])


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
